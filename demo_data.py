"""The offline demo dataset: 64-px images of one coloured shape on a textured background, written as an
ImageFolder (labels: the shape), an ADE20K-style segmentation set (labels: texture and shape per pixel) and a
labels.json for other labellings. Deterministic by seed; no download.

    python demo_data.py data/demo        # the stage scripts do this themselves when demo_data is set
"""
import json
import os
import sys

import numpy as np

from common import atomic_write

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar", "dot_pair", "frame")
TEXTURES = ("hstripes", "vstripes", "checker", "noise")


def demo_image(rng: np.random.Generator, size: int):
    """One image: a textured background and one coloured shape. Returns (HxWx3 uint8, HxW labels, shape id,
    texture id); pixel labels are 1 + texture id on the background and 1 + 4 + shape id on the shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = int(rng.integers(len(TEXTURES)))
    period = rng.uniform(0.08, 0.2)
    pattern = {0: np.sin(2 * np.pi * yy / period), 1: np.sin(2 * np.pi * xx / period),
               2: np.sign(np.sin(2 * np.pi * yy / period) * np.sin(2 * np.pi * xx / period)),
               3: rng.standard_normal((size, size))}[texture]
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    t = (pattern - pattern.min()) / (np.ptp(pattern) + 1e-6)
    image = c1 * t[..., None] + c2 * (1 - t[..., None])
    shape = int(rng.integers(len(SHAPES)))
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.28)
    dy, dx = yy - cy, xx - cx
    d = np.sqrt(dy**2 + dx**2)
    inside = {0: d < r, 1: np.maximum(abs(dy), abs(dx)) < r * 0.8,
              2: (dy > -r * 0.7) & (dy < r * 0.7) & (abs(dx) < (dy + r * 0.7) * 0.6),
              3: (abs(dy) < r * 0.25) & (abs(dx) < r) | (abs(dx) < r * 0.25) & (abs(dy) < r),
              4: (d < r) & (d > r * 0.6), 5: abs(dy) + abs(dx) < r,
              6: (abs(dy) < r * 0.3) & (abs(dx) < r), 7: (abs(dx) < r * 0.3) & (abs(dy) < r),
              8: (np.sqrt(dy**2 + (dx - r * 0.5) ** 2) < r * 0.4) | (np.sqrt(dy**2 + (dx + r * 0.5) ** 2) < r * 0.4),
              9: (np.maximum(abs(dy), abs(dx)) < r) & (np.maximum(abs(dy), abs(dx)) > r * 0.7)}[shape]
    image[inside] = rng.uniform(0, 1, 3)
    labels = np.where(inside, 1 + len(TEXTURES) + shape, 1 + texture).astype(np.uint8)
    return (image * 255).round().astype(np.uint8), labels, shape, texture


def make_demo_dataset(root: str, n_train: int = 600, n_val: int = 200, size: int = 64, seed: int = 0) -> str:
    """Write the offline demo dataset under `root` (once; later calls reuse it), deterministic by seed:
    - `train/`, `val/`: ImageFolder by shape (10 classes), for pre-training and fine-tuning;
    - `ADEChallengeData2016/{images,annotations}/{training,validation}`: the same images with per-pixel labels
      (0 unused, 1-4 background textures, 5-14 shapes) and their names in objectInfo150.txt, for segmentation;
    - `labels.json`: split, file, shape and texture of every image (for other labellings)."""
    from PIL import Image
    done = os.path.join(root, "labels.json")
    if os.path.isfile(done):
        return root
    rng = np.random.default_rng(seed)
    records = []
    for split, n, ade_split in (("train", n_train, "training"), ("val", n_val, "validation")):
        for i in range(n):
            image, labels, shape, texture = demo_image(rng, size)
            name = f"{split}_{i:05d}"
            path = os.path.join(root, split, SHAPES[shape], name + ".png")
            for p in (path, os.path.join(root, "ADEChallengeData2016", "images", ade_split, name + ".jpg"),
                      os.path.join(root, "ADEChallengeData2016", "annotations", ade_split, name + ".png")):
                os.makedirs(os.path.dirname(p), exist_ok=True)
            Image.fromarray(image).save(path)
            Image.fromarray(image).save(os.path.join(root, "ADEChallengeData2016", "images", ade_split, name + ".jpg"),
                                        quality=95)
            Image.fromarray(labels).save(os.path.join(root, "ADEChallengeData2016", "annotations", ade_split,
                                                      name + ".png"))
            records.append({"split": split, "file": os.path.relpath(path, root), "shape": SHAPES[shape],
                            "texture": TEXTURES[texture]})
    names = [f"texture:{t}" for t in TEXTURES] + [f"shape:{s}" for s in SHAPES]  # labels 1..14, as ADE20K's table
    table = "Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i}\t0\t0\t0\t{n}\n" for i, n in enumerate(names, 1))
    atomic_write(os.path.join(root, "ADEChallengeData2016", "objectInfo150.txt"), lambda f: f.write(table.encode()))
    atomic_write(done, lambda f: f.write(json.dumps(records).encode()))  # written last: its presence means the dataset is complete
    return root


if __name__ == "__main__":
    print(make_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
