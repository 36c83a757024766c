"""Draw the token groups that DTM's matching finds on a teacher's tokens: the picture in README.md.

    python show_morph.py                                      # generated demo image, random ViT-B/16 teacher
    python show_morph.py --out=docs/morph.png                 # the picture in README.md
    python show_morph.py --image=photo.jpg --out=morph.png --tokens="[196, 98, 49, 16]"
    python show_morph.py --teacher=out/pretrain_demo/ckpt.pt  # a checkpoint of this project as the teacher
    python show_morph.py --teacher=out/cifar/teacher/ckpt.pt --image=../shared/data/cifar10/test \
        --tokens="(32, 16, 8, 4)" --display_size=128 --out=out/cifar/morph.png  # trained teacher, real images

For each number of remaining tokens, a schedule of equal rounds (as DTM draws them) merges the teacher's
patch tokens into that many groups with morph.morph_groups; every group is drawn as one coloured region over
the image (torchvision's draw_segmentation_masks, group borders in black), and the panels are saved side by
side as one PNG. Offline, the teacher is a randomly initialised open_clip model: its tokens are a random
function of the pixels, so its groups follow raw colour and texture similarity, not meaning.
"""
import colorsys
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from torchvision.utils import draw_segmentation_masks, make_grid

import data
from configurator import configure
from demo_data import demo_image
from morph import morph_groups, schedule_tensor
from teacher import build_teacher, teacher_kind

# ------------------------------------------------------------------------------------------------- settings
image = ""  # an image file, or an ImageFolder (one row per class: its first image); '' = a generated image
rows = 4  # rows drawn from an ImageFolder
display_size = 0  # pixels per panel; 0: the teacher's input size (e.g. 128 shows a 32 px CIFAR image larger)
out = "morph.png"
teacher = "ViT-B-16-quickgelu"  # an open_clip model name, or a checkpoint of this project
teacher_pretrained = ""  # open_clip weights (a tag or a local file); '' = random init
teacher_overrides = {}
tokens = []  # remaining tokens, a panel each; []: n, n/2, n/4, n/12 of the teacher's n (196: 196, 98, 49, 16)
rounds = 4  # matching rounds per schedule
alpha = 0.45  # opacity of the colours
seed = 0
device = "cpu"

PAD, LABEL = 4, 18  # pixels between panels; height of the label strip


def schedule_to(n: int, m: int, k: int) -> list[int]:
    """Equal rounds (at least k) that merge n tokens into m groups; a round merges at most half of them."""
    schedule = []
    while n > m:
        r = min(math.ceil((n - m) / max(1, k - len(schedule))), n // 2)
        schedule.append(r)
        n -= r
    return schedule


def load_image(image: str, size: int, seed: int) -> torch.Tensor:
    """[3, size, size] uint8: the image file resized and centre-cropped, or a generated one."""
    if not image:  # 2x2 tiles of the demo dataset's images: four textures, four shapes
        rng = np.random.default_rng(seed)
        half = size // 2
        tiles = [demo_image(rng, half)[0] for _ in range(4)]
        pixels = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        return v2.Resize(size, antialias=True)(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    return fit(Image.open(image).convert("RGB"), size)


def fit(picture: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] uint8: resized and centre-cropped."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])(picture)


def load_images(image: str, rows: int, size: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """(image, label) per row: the first image of each of `rows` classes of an ImageFolder, or one image."""
    if not os.path.isdir(image):
        return [(load_image(image, size, seed), "image" if image else "generated image")]
    folder = data.ImageFolder(image)
    first = {}
    for i, (_, label) in enumerate(folder.samples):
        first.setdefault(label, i)
    return [(fit(folder[i][0], size), folder.classes[label]) for label, i in list(first.items())[:rows]]


def palette(n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """n distinct, shuffled colours (hues spread by the golden ratio)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    colours = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)) for h in hues]
    return [colours[i] for i in rng.permutation(n)]


def draw_groups(img: torch.Tensor, groups: torch.Tensor, grid: int, rng, alpha: float) -> torch.Tensor:
    """The image with each group of `groups` [grid*grid] as one coloured region, borders in black."""
    size = img.shape[-1]
    patch = size // grid
    pixel_groups = groups.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    ids = pixel_groups.unique()
    masks = pixel_groups[None] == ids[:, None, None]
    drawn = draw_segmentation_masks(img, masks, alpha=alpha, colors=palette(len(ids), rng))
    border = torch.zeros(size, size, dtype=torch.bool)
    border[1:] |= pixel_groups[1:] != pixel_groups[:-1]
    border[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
    return drawn.masked_fill(border, 0)


def labelled(panel: torch.Tensor, text: str) -> torch.Tensor:
    strip = Image.new("RGB", (panel.shape[-1], LABEL), "white")
    ImageDraw.Draw(strip).text((4, 3), text, fill="black")
    strip = torch.from_numpy(np.array(strip)).permute(2, 0, 1)
    return torch.cat([strip, panel], dim=1)


@torch.no_grad()
def main(cfg):
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the teacher's banner for a random teacher: said below
        net = build_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_overrides, dev).float()
    if teacher_kind(cfg.teacher) == "checkpoint":
        which = f"checkpoint {cfg.teacher}"
    elif cfg.teacher_pretrained:
        which = f"open_clip {cfg.teacher} with weights {cfg.teacher_pretrained!r}"
    else:
        which = f"open_clip {cfg.teacher}, RANDOMLY INITIALISED (groups follow raw pixel similarity, not meaning)"
    size = net.img_size
    rng = np.random.default_rng(cfg.seed)
    panels, counts = [], list(cfg.tokens)
    for row, (img, label) in enumerate(load_images(cfg.image, cfg.rows, size, cfg.seed)):
        target = net(img[None].to(dev)).float()  # [1, N, C]
        n = target.shape[1]
        grid = math.isqrt(n)
        counts = counts or [n, n // 2, n // 4, max(1, round(n / 12))]
        bad = [m for m in counts if not 1 <= m <= n]
        if bad:
            raise SystemExit(f"tokens={cfg.tokens}: {bad} not between 1 and the teacher's {n} tokens; e.g. "
                             f"--tokens=\"{[n, n // 2, n // 4, max(1, round(n / 12))]}\" (or leave it out)")
        img = v2.Resize(cfg.display_size or size, antialias=True)(img)  # drawn at another size than the teacher saw
        panels.append(labelled(img, label))
        for m in counts:
            schedule = schedule_to(n, m, cfg.rounds)
            groups = morph_groups(target, schedule_tensor([schedule], dev))[0, 0].cpu()
            assert groups.unique().numel() == m, (m, schedule)
            panels.append(labelled(draw_groups(img, groups, grid, rng, cfg.alpha), f"{m} tokens"))
            if row == 0:
                print(f"{m:4d} tokens: schedule {schedule}")
    picture = make_grid(torch.stack(panels), nrow=len(counts) + 1, padding=PAD, pad_value=255)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(cfg.out, optimize=True)
    print(f"teacher: {which}\nimage: {cfg.image or 'generated (2x2 demo images, seed %d)' % cfg.seed}, {size} px, "
          f"{n} tokens, {len(panels) // (len(counts) + 1)} row(s)\n"
          f"wrote {cfg.out} ({picture.shape[2]}x{picture.shape[1]} px)")


if __name__ == "__main__":
    main(configure(globals()))
