"""The data of every stage: image files and folders, per-sample seeding and loaders, and the training and
evaluation pipelines of pre-training, fine-tuning and ADE20K segmentation (bench.py times them).

Every random draw of a training sample is a function of (seed, epoch, index) (SeededSamples), whichever worker
loads it and after any resume.
"""
import math
import os
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, tv_tensors
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import common

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IGNORE = 255  # the label of pixels segmentation does not score
MEAN_FILL = tuple(round(255 * m) for m in common.IMAGENET_MEAN)  # RandAugment fills with the mean colour


# ------------------------------------------------------------------------------------------- images, folders
def load_image(path: str) -> Image.Image:
    """An image file as 8-bit RGB. 16-bit images (PNG, TIFF) are scaled to 8 bits, not clipped to white as
    PIL's convert('RGB') does. Raises OSError for unreadable files and Image.DecompressionBombError for
    enormous ones (more than 2 x Image.MAX_IMAGE_PIXELS)."""
    with Image.open(path) as image:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # one channel of 16 (or 32) bits
            pixels = np.asarray(image, dtype=np.float64)
            if image.mode == "F" or pixels.max(initial=0) > 65535:
                raise OSError(f"{image.mode} image with values up to {pixels.max():g}: not a 16-bit image")
            return Image.fromarray(np.round(pixels / 257).astype(np.uint8)).convert("RGB")
        image.load()  # decode now, before the file closes
        return image if image.mode == "RGB" else image.convert("RGB")  # convert() of an RGB image would copy it


def load_sample(samples: list, index: int):
    """(image, label) of samples[index], a (path, label) list; an unreadable or enormous image is skipped
    (the next one is taken) with a warning naming it, rather than killing a long run."""
    for offset in range(len(samples)):
        path, label = samples[(index + offset) % len(samples)]
        try:
            return load_image(path), label
        except (OSError, Image.DecompressionBombError) as e:  # OSError: truncated or unreadable files
            warnings.warn(f"skipping unreadable image {path}: {e}")
    raise RuntimeError(f"none of the {len(samples)} images is readable, e.g. {samples[0][0] if samples else None}")


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with clear errors for a missing or empty folder, images read by load_image
    (16-bit ones scaled to 8 bits), and an unreadable or enormous image skipped with a warning naming it."""

    def __init__(self, root: str, transform=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist; expected an ImageFolder layout: "
                                    f"{root}/<class name>/<image>.jpg")
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no images in {root!r} ({e}); expected {root}/<class name>/<image>.jpg "
                                    f"with extensions {', '.join(IMG_EXTENSIONS)}") from None

    def __getitem__(self, index):
        image, label = load_sample(self.samples, index)
        return (self.transform(image) if self.transform else image), label


def check_image_folders(root: str, train: str, val: str):
    """image_folders' first check, cheap enough to run before a run takes its out_dir: root exists."""
    if not os.path.isdir(root):
        raise SystemExit(f"data_dir {root!r} does not exist; expected {root}/{train}/<class>/<image>.jpg and "
                         f"{root}/{val}/<class>/<image>.jpg (ImageNet's layout after the usual val/ reorganisation)")


def image_folders(root: str, train: str, val: str, val_only: bool = False):
    """ImageNet's layout: root/train/<class>/*.jpg and root/val/<class>/*.jpg, with the same classes. With
    val_only (evaluation), train/ is not needed: (None, val set, its classes)."""
    check_image_folders(root, train, val)
    try:
        val_set = ImageFolder(os.path.join(root, val))
        if val_only:
            return None, val_set, val_set.classes
        train_set = ImageFolder(os.path.join(root, train))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if train_set.classes != val_set.classes:
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        raise SystemExit(f"the classes of {val_set.root} differ from those of {train_set.root}: "
                         f"only in {val}/: {only_val[:10] or 'none'}{' ...' if len(only_val) > 10 else ''}; "
                         f"only in {train}/: {only_train[:10] or 'none'}{' ...' if len(only_train) > 10 else ''}")
    return train_set, val_set, train_set.classes


# ----------------------------------------------------------------------------------- sampling, seeding
class ShardSampler(torch.utils.data.Sampler):
    """Evaluation under DDP: rank r takes samples r, r + W, r + 2W, ... so that every sample is counted exactly
    once (DistributedSampler pads the last shard with duplicates). Shards may differ in length by one."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededSamples(torch.utils.data.Dataset):
    """A training set whose sample i of epoch e is augmented (cropped, masked, ...) with the RNGs of torch,
    NumPy and Python seeded by (seed, e, i): the same draw in any worker, after any resume. They are left so
    seeded: every draw of the training loops is seeded by its own position too (before each micro-batch)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, i):
        seed = common.seed_of(self.seed, self.epoch, i)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # torch's CPU generator alone, as torch.manual_seed seeds it: torch.manual_seed also queues a seed for
        # CUDA with a formatted stack trace (~0.1 ms a sample), and augmentation runs on the CPU.
        torch.default_generator.manual_seed(seed)
        return self.dataset[i]


def data_loader(dataset, batch_size: int, dist_: common.Dist, train: bool, workers: int, seed: int = 0):
    """DataLoader with a DistributedSampler under DDP for training (evaluation: ShardSampler, no duplicates).
    Training shuffles from `seed` and set_epoch(), so a resumed run sees the same order as an uninterrupted one."""
    sampler = None
    if dist_.world_size > 1 and not train:
        sampler = ShardSampler(len(dataset), dist_.rank, dist_.world_size)
    elif dist_.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=dist_.device.type == "cuda",
        drop_last=train, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed))


def start_epoch(loader, epoch: int, seed: int):
    """Make the epoch's shuffle and augmentation randomness a function of (seed, epoch) alone."""
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, torch.utils.data.RandomSampler):
        loader.sampler.generator.manual_seed(seed + epoch)
    loader.generator.manual_seed(seed * 1000 + epoch)  # seeds the workers' augmentation RNGs
    if hasattr(loader.dataset, "set_epoch"):  # datasets that seed each sample's augmentation themselves
        loader.dataset.set_epoch(epoch)


def epoch_batches(loader, epoch: int, seed: int, skip: int = 0):
    """The batches of `epoch` after its first `skip` (resuming mid-epoch), without loading the skipped ones."""
    start_epoch(loader, epoch, seed)
    if skip == 0:
        return loader
    indices = list(loader.sampler)[skip * loader.batch_size:]
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last, generator=loader.generator)



# ------------------------------------------------------------------------------------------ pre-training
class BlockMasking:
    """BEiT v2's block-wise masking: add random rectangles (area >= min_block patches, aspect ratio in
    [0.3, 1/0.3]) until num_masked patches are masked, or no rectangle adds anything in 10 tries; then, as the
    official generator, top the mask up with random single patches to exactly num_masked."""

    def __init__(self, grid: int, num_masked: int, min_block: int = 16, min_aspect: float = 0.3):
        self.grid, self.num_masked, self.min_block = grid, num_masked, min_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, max_new: int) -> int:
        for _ in range(10):
            area = random.uniform(self.min_block, max_new)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < self.grid and w < self.grid:
                top, left = random.randint(0, self.grid - h), random.randint(0, self.grid - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block[:] = True
                    return new
        return 0

    def __call__(self) -> torch.Tensor:
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, self.num_masked - count)
            if added == 0:
                break
            count += added
        mask = mask.reshape(-1)
        if count < self.num_masked:  # blocks stopped short: the official generator masks random patches
            mask[random.sample(np.flatnonzero(~mask).tolist(), self.num_masked - count)] = True
        return torch.from_numpy(mask)


# ColorJitter(0.4, 0.4, 0.4) of the official recipe: brightness, contrast and saturation factors ~ U(0.6, 1.4), no
# hue. Ids as torchvision's ColorJitter numbers its ops (3, hue, is off).
JITTER_RANGE = [0.6, 1.4]
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


class MaskedImages(torch.utils.data.Dataset):
    """(uint8 image [3, S, S], block mask, jitter [7]) of the official augmentation (BEiT v2 / DTM
    DataAugmentationForBEiT): colour jitter on the whole image, horizontal flip, RandomResizedCrop(S, scale 0.2-1,
    bicubic). The worker draws all three in that order from torch's RNG, as torchvision would, and crops; the
    colour jitter itself runs on the device, batched, on the crop (color_jitter): jittering the whole image here
    cost more than everything else together. jitter = (the 3 op ids in order, brightness, contrast and saturation
    factors, the grey level contrast blends towards), float32 so that the default collate stacks it."""

    def __init__(self, images, img_size: int, masking: BlockMasking):
        self.images, self.img_size, self.masking = images, img_size, masking

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, _ = self.images[i]
        order, b, c, s, _ = T.ColorJitter.get_params(JITTER_RANGE, JITTER_RANGE, JITTER_RANGE, None)
        flip = torch.rand(1).item() < 0.5  # RandomHorizontalFlip's draw
        top, left, h, w = T.RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
        if flip:  # the box drawn on the flipped image is the mirror of this box; the small crop is flipped below
            left = image.width - left - w
        # [H, W, 3] viewed as [3, H, W] (channels last): torch's uint8 bicubic resize is fastest on that layout,
        # and with antialias it is PIL's filter (a = -0.5), so it matches the official PIL resize.
        pixels = np.array(image)
        crop = TF.resized_crop(torch.from_numpy(pixels).permute(2, 0, 1), top, left, h, w,
                               [self.img_size, self.img_size], interpolation=v2.InterpolationMode.BICUBIC,
                               antialias=True)
        order = [op for op in order.tolist() if op != 3]
        jitter = torch.tensor(order + [b, c, s, contrast_mean(pixels, order, (b, c, s))])
        return (crop.flip(-1) if flip else crop), self.masking(), jitter


def contrast_mean(pixels: np.ndarray, order: list, factors) -> float:
    """The grey level contrast blends towards: the mean greyscale of the WHOLE image [H, W, 3] as the ops before
    contrast in this sample's order leave it (with clipping: brightness 1.4 on a bright image does not raise its
    mean 1.4x). Estimated on every 4th pixel of every 4th row, 16x fewer pixels, each through the same ops: within
    0.3 grey level of the whole image's (tests/test_data.py); contrast scales that by 1 - c, at most 0.4."""
    x = torch.from_numpy(pixels[2::4, 2::4]).permute(2, 0, 1)[None].float()
    for op in order[:order.index(CONTRAST)]:
        x = blend(x, 0.0 if op == BRIGHTNESS else greyscale(x), factors[op])
    return greyscale(x).mean().item()


def greyscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's greyscale of uint8 images (held in float) [B, 3, H, W] -> [B, 1, H, W]: 0.2989 R + 0.587 G +
    0.114 B, floored (its uint8 rounding), the same float operations in the same order."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def blend(x: torch.Tensor, y, f) -> torch.Tensor:
    """torchvision's colour ops on uint8 images, on their values held in float: f x + (1 - f) y, clipped and
    truncated to an integer as torchvision's uint8 result is (rounding between ops: without it a jitter drifts
    ~1.7 grey levels from torchvision's)."""
    return x.mul(f).add_(y * (1 - f)).clamp_(0, 255).floor_()


def color_jitter(images: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """MaskedImages' colour jitter on a batch, on any device: uint8 [B, 3, S, S] and jitter [B, 7] -> uint8
    [B, 3, S, S], each sample's three ops in its own order, each blending the image with y: black (brightness),
    its greyscale (saturation) or jitter[:, 6], the mean grey of the whole image (contrast). Static shapes: at
    each of the three positions every sample's y is computed and its own op's selected, no loop over samples."""
    x = images.float()
    order = jitter[:, :3].long()
    mean = jitter[:, 6].view(-1, 1, 1, 1)
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        f = jitter[:, 3:6].gather(1, order[:, position:position + 1]).view(-1, 1, 1, 1)
        x = blend(x, torch.where(op == BRIGHTNESS, 0.0, torch.where(op == CONTRAST, mean, greyscale(x))), f)
    return x.to(torch.uint8)



# ----------------------------------------------------------------------------------------- fine-tuning
def finetune_train_transform(cfg):
    """uint8 PIL image -> (uint8 tensor [3, S, S], erase box). Fine-tuning: BEiT/DeiT augmentation; linear
    probing: crop and flip only (MAE). Normalisation and random erasing happen on the device (finetune.fit): the
    worker hands over uint8, a quarter of float32's bytes, and draws the erase box (EraseBox)."""
    ops = [v2.PILToTensor(),
           v2.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.crop_scale),
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
           v2.RandomHorizontalFlip()]
    if cfg.randaug_ops and not cfg.linear_probe:
        ops.append(v2.RandAugment(cfg.randaug_ops, cfg.randaug_magnitude,
                                  interpolation=v2.InterpolationMode.BILINEAR, fill=list(MEAN_FILL)))
    return EraseBox(v2.Compose(ops), 0.0 if cfg.linear_probe else cfg.erase_prob)


class EraseBox:
    """timm's RandomErasing as BEiT uses it ('pixel' mode: per-pixel N(0, 1) noise on the NORMALISED image), split
    in two since normalisation moved to the device: here, after `augment`, the box is drawn as
    v2.RandomErasing(prob) draws it (its coin, then its make_params: area 0.02-0.33 of the image, aspect ratio
    0.3-3.3), from the sample's seeded RNG; erase() fills it with noise on the device. Returns (uint8 image,
    box [top, left, height, width]; height 0: nothing to erase)."""

    def __init__(self, augment, prob: float):
        self.augment = augment
        self.erasing = v2.RandomErasing(prob, value=0)  # a fixed value: make_params draws the box and no noise

    def __call__(self, image):
        image = self.augment(image)
        box = torch.zeros(4, dtype=torch.int64)
        if self.erasing.p > 0 and torch.rand(1).item() < self.erasing.p:  # v2.RandomErasing's coin
            params = self.erasing.make_params([image])
            if params["v"] is not None:  # None: no box fitted in 10 tries, nothing is erased
                box = torch.tensor([params["i"], params["j"], params["h"], params["w"]])
        return image, box


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """EraseBox's second half, on the device: normalised images [B, 3, H, W] with each sample's box (boxes [B, 4],
    on the CPU, from the loader) filled with per-pixel N(0, 1) noise drawn from torch's RNG there, which the
    training loop seeds per micro-batch. No box in the batch: no noise drawn."""
    if not boxes[:, 2].any():
        return images
    top, left, height, width = boxes.to(images.device).view(-1, 4, 1, 1).unbind(1)
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    cols = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return torch.where(inside[:, None], torch.randn_like(images), images)


def finetune_eval_transform(img_size: int, crop_pct: float):
    """Resize to img_size / crop_pct (256 for 224), centre crop; uint8 (finetune.evaluate normalises on the device)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(int(img_size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
    ])


class Transformed(torch.utils.data.Dataset):
    """(image, label) pairs of any dataset with a transform applied to the image."""

    def __init__(self, data, transform):
        self.data, self.transform = data, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        return self.transform(image), label



# ------------------------------------------------------------------------------------ ADE20K segmentation
def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """ADE20K's 0 means 'other' and is not scored: 0 -> 255 (ignored), k -> k - 1."""
    label = label.long() - 1
    return torch.where(label < 0, IGNORE, label)


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv's imrescale: the largest size with the same aspect ratio whose long side fits max(scale) and short
    side fits min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def crop_is_varied(label: torch.Tensor, cat_max_ratio: float) -> bool:
    """mmseg's crop rule: at least 2 classes among the scored pixels, none covering cat_max_ratio or more."""
    counts = torch.bincount(label[label != IGNORE].flatten().long())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


class RandomRescale(v2.Transform):
    """mmseg's Resize with ratio_range: scale times a random ratio, then rescale keeping the aspect ratio.
    Bilinear without antialiasing for the image (as cv2), nearest for the mask (v2 does that for Masks)."""

    def __init__(self, scale, ratio_range):
        super().__init__()
        self.scale, self.ratio_range = scale, ratio_range

    def make_params(self, flat_inputs):
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand(()).item()
        h, w = v2.query_size(flat_inputs)
        return {"size": rescale_size(h, w, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))}

    def transform(self, inpt, params):
        return TF.resize(inpt, list(params["size"]), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


class RandomCropVaried(v2.Transform):
    """mmseg's RandomCrop with cat_max_ratio: a random crop_size crop (smaller images: the whole side), drawn
    again, up to 10 times, while one class dominates it (crop_is_varied); after that the last draw is kept."""

    def __init__(self, size: int, cat_max_ratio: float):
        super().__init__()
        self.size, self.cat_max_ratio = size, cat_max_ratio

    def _box(self, h, w):
        top = torch.randint(0, max(h - self.size, 0) + 1, ()).item()
        left = torch.randint(0, max(w - self.size, 0) + 1, ()).item()
        return top, left, min(self.size, h), min(self.size, w)

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        mask = next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))
        box = self._box(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                top, left, ch, cw = box
                if crop_is_varied(mask[..., top:top + ch, left:left + cw], self.cat_max_ratio):
                    break
                box = self._box(h, w)
        return dict(zip(("top", "left", "height", "width"), box))

    def transform(self, inpt, params):
        return TF.crop(inpt, **params)


class PhotometricDistortion(v2.Transform):
    """mmseg's PhotoMetricDistortion on a uint8 image, each step with probability 1/2: brightness + U(-32, 32);
    contrast x U(0.5, 1.5) before or after the colour steps; HSV saturation x U(0.5, 1.5); hue + an integer in
    -18..17 degrees-of-180 (OpenCV units; mmseg's np.random.randint(-18, 18) excludes 18)."""
    _transformed_types = (tv_tensors.Image,)

    @staticmethod
    def _coin():
        return torch.rand(()).item() < 0.5

    @staticmethod
    def _uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(()).item()

    @staticmethod
    def _hue_shift() -> int:
        return torch.randint(-18, 18, ()).item()  # -18..17, as mmseg

    def transform(self, inpt, params):
        img = inpt.as_subclass(torch.Tensor).float()
        if self._coin():
            img = (img + self._uniform(-32, 32)).clamp(0, 255)
        contrast_first = self._coin()
        if contrast_first and self._coin():
            img = (img * self._uniform(0.5, 1.5)).clamp(0, 255)
        if self._coin():
            img = scale_saturation(img, self._uniform(0.5, 1.5))
        if self._coin():
            img = TF.adjust_hue(img / 255, self._hue_shift() / 180) * 255
        if not contrast_first and self._coin():
            img = (img * self._uniform(0.5, 1.5)).clamp(0, 255)
        return tv_tensors.Image(img.round().to(torch.uint8))


def scale_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply HSV saturation by `factor` (capped at 1), keeping hue and value. Each channel is
    c = V (1 - S f(H)), so scaling S scales V - c; the cap keeps the smallest channel at >= 0."""
    v = img.max(dim=0, keepdim=True).values
    s = (v - img.min(dim=0, keepdim=True).values) / v.clamp(min=1e-6)
    factor = torch.minimum(torch.full_like(s, factor), 1 / s.clamp(min=1e-6))
    return v - (v - img) * factor


class PadTo(v2.Transform):
    """Pad bottom and right to size x size: the (normalised) image with 0, the mask with 255 (ignored)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size - w, 0), max(self.size - h, 0)]}

    def transform(self, inpt, params):
        return TF.pad(inpt, params["padding"], fill=IGNORE if isinstance(inpt, tv_tensors.Mask) else 0)


def segment_train_transform(crop: int, scale, ratio_range, cat_max_ratio: float) -> v2.Compose:
    return v2.Compose([
        RandomRescale(scale, ratio_range),
        RandomCropVaried(crop, cat_max_ratio),
        v2.RandomHorizontalFlip(),
        PhotometricDistortion(),
        v2.ToDtype(torch.float32, scale=True),  # images only
        v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD),
        PadTo(crop),
    ])


class Rescale(RandomRescale):
    """The evaluation resize: RandomRescale without the random ratio."""

    def __init__(self, scale):
        super().__init__(scale, (1.0, 1.0))

    def make_params(self, flat_inputs):
        return {"size": rescale_size(*v2.query_size(flat_inputs), self.scale)}


def segment_eval_transform(scale) -> v2.Compose:
    """Rescale keeping the ratio (short side to min(scale) unless the long side hits max(scale)), normalise."""
    return v2.Compose([Rescale(scale), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])


def find_root(path: str) -> str:
    """The folder holding images/ and annotations/; `path` may also be the folder above ADEChallengeData2016."""
    for root in (path, os.path.join(path, "ADEChallengeData2016")):
        if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "annotations")):
            return root
    what = "does not exist" if not os.path.isdir(path) else "has no images/ and annotations/ folders"
    raise FileNotFoundError(f"data_dir={path!r} {what}; expected the ADE20K layout <data_dir>/images/"
                            f"{{training,validation}}/<name>.jpg with <data_dir>/annotations/{{training,validation}}/"
                            f"<name>.png (the ADEChallengeData2016 folder of the official zip)")


def class_names(root: str, n: int) -> list[str]:
    """The names of the n classes, from root/objectInfo150.txt (the official zip's table: Idx, Ratio, Train, Val,
    Name; the first of a name's synonyms, as mmseg names them), else 'class k'."""
    path = os.path.join(root, "objectInfo150.txt")
    if os.path.isfile(path):
        with open(path) as f:
            names = [line.split("\t")[-1].split(",")[0].strip() for line in f.read().splitlines()[1:] if line.strip()]
        if len(names) == n:
            return names
    return [f"class {k}" for k in range(n)]


class ADE20K(torch.utils.data.Dataset):
    """(image, label) pairs of one split. Training: the augmented crop [3, crop, crop] (normalised) and its
    labels [crop, crop]; evaluation: the rescaled image and the labels at the original size. Training wraps it
    in common.SeededSamples, which seeds each sample's augmentation by (seed, epoch, index)."""

    def __init__(self, root: str, split: str, num_classes: int, transform):
        image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir!r} does not exist; expected {root}/images/{split}/<name>.jpg")
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMG_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"no images in {image_dir!r} (extensions {', '.join(IMG_EXTENSIONS)})")
        self.samples = [(os.path.join(image_dir, f), os.path.join(label_dir, os.path.splitext(f)[0] + ".png"))
                        for f in names]
        missing = [(img, ann) for img, ann in self.samples if not os.path.isfile(ann)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no annotation file; the first: "
                                    f"{missing[0][0]} needs {missing[0][1]}")
        self.num_classes, self.transform = num_classes, transform
        self.train = split == "training"
        self.classes = class_names(root, num_classes)

    def __len__(self):
        return len(self.samples)

    def load(self, i: int) -> tuple[tv_tensors.Image, torch.Tensor]:
        """The image (uint8 [3, H, W]) and its labels mapped to 0..num_classes-1 and 255 ([H, W], int64)."""
        image_path, label_path = self.samples[i]
        try:
            with Image.open(image_path) as im:
                image = TF.pil_to_tensor(im.convert("RGB"))
            with Image.open(label_path) as im:
                label = np.array(im)  # 'L' or 'P' (palette indices are the labels)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"cannot read {image_path} or {label_path}: {e}") from e
        if label.ndim != 2:
            raise ValueError(f"{label_path}: expected a single-channel label map, got shape {label.shape}")
        if label.shape != tuple(image.shape[-2:]):
            raise ValueError(f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                             f"{image.shape[2]}x{image.shape[1]}")
        if label.max() > self.num_classes:
            raise ValueError(f"{label_path} has label {label.max()} > num_classes={self.num_classes}; labels must be "
                             f"0 (ignored) or 1..{self.num_classes} (set num_classes to your dataset's class count)")
        return tv_tensors.Image(image), reduce_zero_label(torch.from_numpy(label.astype(np.int64)))

    def __getitem__(self, i):
        image, label = self.load(i)
        if not self.train:
            return self.transform(image).as_subclass(torch.Tensor), label
        image, mask = self.transform(image, tv_tensors.Mask(label.to(torch.uint8)))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
