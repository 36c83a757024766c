"""Semantic segmentation on ADE20K: a checkpoint of this project as the backbone of UperNet, fine-tuned with
BEiT v2's ADE20K recipe, in plain PyTorch (no mmcv/mmseg).

    python segment.py config/segment_demo.py                                    # offline demo, CPU, minutes
    torchrun --nproc_per_node=8 segment.py config/segment_vitb_ade20k.py \\
        --data_dir=/data/ADEChallengeData2016 --init_from=out/pretrain_vitb/ckpt.pt --out_dir=out/seg_vitb
    python segment.py config/segment_vitb_ade20k.py --eval_only --init_from=out/seg_vitb/ckpt.pt

Every setting below can be changed by a config file or --key=value (configurator.py). A run whose out_dir
already holds ckpt.pt resumes from it, at the iteration where it stopped.
"""
import contextlib
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import common
from configurator import Range, at_least, configure, settings_of
from demo_data import SHAPES, TEXTURES, make_demo_dataset
from model import SIZES, UperNetSegmenter, VisionTransformer, checkpoint_model_args, default_out_indices, \
    load_backbone

# ------------------------------------------------------------------------------------------------- settings
# I/O
out_dir = "out/segment"
data_dir = "data/ade20k/ADEChallengeData2016"  # holds images/{training,validation}, annotations/{...}
demo_data = ""  # if set: generate the offline demo dataset here first (data_dir: <it>/ADEChallengeData2016)
init_from = ""  # a checkpoint of this project (pre-training, fine-tuning or segmentation); '' = random init
eval_only = False  # evaluate init_from (a segmentation checkpoint) or out_dir/ckpt.pt, print the table, exit
# backbone: the architecture comes from init_from; these are for random init only
model = "base"  # tiny, small, base, large
depth = 0  # 0: the size's own depth
patch_size = 16
drop_path = 0.15
out_indices = []  # the 4 blocks feeding the head; []: spread over the depth ([3, 5, 7, 11] for 12 blocks)
# head
num_classes = 150  # label k in 1..num_classes becomes class k - 1; label 0 is ignored
channels = 768  # UperHead width
aux_channels = 256
aux_weight = 0.4  # weight of the auxiliary FCN head's loss
dropout = 0.1
# data (mmseg's ADE20K pipeline)
crop_size = 512  # training crop = backbone input = sliding window at evaluation
scale = (2048, 512)  # rescale to fit (long side, short side) keeping the aspect ratio
ratio_range = (0.5, 2.0)  # training: scale times a random ratio from this range
cat_max_ratio = 0.75  # training crops: retry (up to 10 times) while one class covers this much or more
eval_stride = 341  # sliding-window stride at evaluation
# optimisation (BEiT v2's ADE20K config)
iters = 160000
warmup_iters = 1500
batch_size = 16  # total over all GPUs and accumulation steps
micro_batch_size = 2  # per GPU and forward pass; at least 2 without SyncBatchNorm (BatchNorm needs 2 values)
micro_batch_bn = False  # True: allow BatchNorm over fewer images than batch_size (one process with accumulation)
lr = 5e-5
min_lr = 0.0
power = 1.0  # poly decay exponent
betas = (0.9, 0.999)
eps = 1e-8
weight_decay = 0.05
layer_decay = 0.75  # the adapters and heads keep scale 1
grad_clip = 0.0  # 0: off
# evaluation and checkpoints
eval_interval = 16000  # iterations between evaluations (and always at the end, the reported result)
eval_autocast = False  # True: evaluate under bf16 autocast on GPU (faster; BEiT v2 evaluates in fp32)
ckpt_interval = 1000  # iterations between checkpoints (ckpt.pt)
# logging: log.jsonl and curves.png (plot.py) always; wandb and TensorBoard if asked for (rank 0, pip install them)
wandb_log = False  # also log to Weights & Biases
wandb_project = "dtm"
wandb_run_name = ""  # '': the out_dir's name
tensorboard = False  # also write TensorBoard event files to out_dir/tb
# system
seed = 0
workers = min(8, common.available_cpus())  # data-loading processes per GPU; at most the cores this process may use
device = "auto"  # auto, cpu, cuda, cuda:1
compile = False
max_iters = 0  # stop after this many iterations (0: run all); for smoke tests and benchmarks
log_interval = 50  # iterations between log lines (each costs a GPU sync)
# values configure() refuses beyond a wrong type: each setting's choices or range
RULES = {"model": tuple(SIZES),
         **dict.fromkeys(("drop_path", "dropout", "cat_max_ratio", "layer_decay"), Range(0, 1)),
         **dict.fromkeys(("patch_size", "num_classes", "channels", "aux_channels", "crop_size", "eval_stride", "iters",
                          "batch_size", "micro_batch_size", "eval_interval", "ckpt_interval", "log_interval"),
                         at_least(1)),
         **dict.fromkeys(("depth", "aux_weight", "warmup_iters", "lr", "min_lr", "power", "grad_clip", "workers",
                          "max_iters"), at_least(0))}

IGNORE = 255
WARMUP_RATIO = 1e-6  # mmcv's linear warmup starts at this fraction of the lr
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")


# --------------------------------------------------------------------------------------------------- data
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


def train_transform(crop: int, scale, ratio_range, cat_max_ratio: float) -> v2.Compose:
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


def eval_transform(scale) -> v2.Compose:
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


class ADE20K(torch.utils.data.Dataset):
    """(image, label) pairs of one split. Training: the augmented crop [3, crop, crop] (normalised) and its
    labels [crop, crop]; evaluation: the rescaled image and the labels at the original size. Training wraps it
    in common.SeededSamples, which seeds each sample's augmentation by (seed, epoch, index)."""

    def __init__(self, root: str, split: str, num_classes: int, transform):
        image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir!r} does not exist; expected {root}/images/{split}/<name>.jpg")
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(common.IMG_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"no images in {image_dir!r} (extensions {', '.join(common.IMG_EXTENSIONS)})")
        self.samples = [(os.path.join(image_dir, f), os.path.join(label_dir, os.path.splitext(f)[0] + ".png"))
                        for f in names]
        missing = [(img, ann) for img, ann in self.samples if not os.path.isfile(ann)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no annotation file; the first: "
                                    f"{missing[0][0]} needs {missing[0][1]}")
        self.num_classes, self.transform = num_classes, transform
        self.train = split == "training"

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


# --------------------------------------------------------------------------------------------------- model
def seg_loss(logits, aux_logits, labels, aux_weight: float):
    """Cross entropy of both heads, ignoring label 255, averaged over all pixels as mmseg 0.11 does (ignored
    pixels count as 0, so the lr means what it means in BEiT v2's config). Returns (total, main, aux)."""
    main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none").mean()
    aux = F.cross_entropy(aux_logits.float(), labels, ignore_index=IGNORE, reduction="none").mean()
    return main + aux_weight * aux, main, aux


def poly_lr(it: int, total: int, warmup: int, base: float, power_: float, min_lr_: float) -> float:
    """mmcv's poly schedule with linear warmup: (base - min) (1 - it/total)^power + min, and during warmup that
    value times a factor rising linearly from WARMUP_RATIO to 1."""
    lr_ = (base - min_lr_) * (1 - it / total) ** power_ + min_lr_
    if it < warmup:
        lr_ *= 1 - (1 - it / warmup) * (1 - WARMUP_RATIO)
    return lr_


def backbone_args_from(ckpt_args: dict, crop_size: int, drop_path: float) -> dict:
    """A pre-training or fine-tuning checkpoint's architecture as a segmentation backbone: input crop_size,
    per-block position tables only (the shared one is folded in by load_backbone), no heads."""
    return dict(ckpt_args, img_size=crop_size, drop_path=drop_path, shared_rel_pos=False, block_rel_pos=True,
                mask_token=False, out_dim=0, num_classes=0)


def head_args_of(cfg) -> dict:
    return dict(num_classes=cfg.num_classes, channels=cfg.channels, aux_channels=cfg.aux_channels,
                dropout=cfg.dropout)


def build_segmenter(cfg, dist_: common.Dist):
    """The segmenter and its (backbone_args, head_args), initialised from cfg.init_from where given."""
    ckpt = common.load_checkpoint(cfg.init_from) if cfg.init_from else None
    head_args = head_args_of(cfg)
    if ckpt is not None and "head_args" in ckpt:  # a segmentation checkpoint: take the whole network
        args = dict(ckpt["backbone_args"])
        head_args["out_indices"] = cfg.out_indices or ckpt["head_args"]["out_indices"]
        wanted = dict(head_args, crop_size=cfg.crop_size)
        have = dict(ckpt["head_args"], crop_size=args["img_size"])
        diff = [f"{k}: checkpoint {have[k]!r} vs setting {wanted[k]!r}" for k in wanted if have[k] != wanted[k]]
        if diff:
            raise SystemExit(f"init_from={cfg.init_from!r} is a segmenter of another shape:\n  " + "\n  ".join(diff))
        net = UperNetSegmenter(VisionTransformer(**args), **head_args)
        net.load_state_dict(ckpt["model"])
        dist_.print(f"loaded segmenter {cfg.init_from} (iteration {ckpt.get('step')})")
        return net, args, head_args
    if cfg.eval_only:
        raise SystemExit(f"eval_only needs a segmentation checkpoint (best.pt or ckpt.pt of segment.py), but "
                         f"init_from={cfg.init_from!r} holds no segmentation head" if cfg.init_from else
                         "eval_only needs trained weights: give --init_from=<a segmentation checkpoint> or an "
                         "out_dir that holds ckpt.pt")
    if ckpt is not None:
        try:
            args = backbone_args_from(checkpoint_model_args(ckpt), cfg.crop_size, cfg.drop_path)
        except ValueError as e:
            raise SystemExit(f"init_from={cfg.init_from!r}: {e}") from e
    else:
        dist_.print("!" * 80 + "\ninit_from='' : the backbone is RANDOMLY INITIALISED (a baseline, not DTM).\n" + "!" * 80)
        size = dict(SIZES[cfg.model], depth=cfg.depth or SIZES[cfg.model]["depth"])
        args = backbone_args_from(dict(size, patch_size=cfg.patch_size, abs_pos=False, layer_scale=size["layer_scale"]),
                                  cfg.crop_size, cfg.drop_path)
    head_args["out_indices"] = list(cfg.out_indices) or default_out_indices(args["depth"])
    net = UperNetSegmenter(VisionTransformer(**args), **head_args)
    if ckpt is not None:
        try:
            load_backbone(net.backbone, ckpt, log=dist_.print)
        except ValueError as e:
            raise SystemExit(f"init_from={cfg.init_from!r}: {e}") from e
    return net, args, head_args


def build_from(cfg, ckpt: dict, path: str):
    """The segmenter of a resumed run, shaped by its own checkpoint (weights: common.resume), refusing a run
    of another shape."""
    args, head = ckpt["backbone_args"], ckpt["head_args"]
    if any(head[k] != v for k, v in head_args_of(cfg).items()) or args["img_size"] != cfg.crop_size:
        raise SystemExit(f"{path} holds a run of another model ({args}, {head}); choose a new out_dir to start a "
                         f"new run")
    return UperNetSegmenter(VisionTransformer(**args), **head), args, head


# ----------------------------------------------------------------------------------------------- evaluation
def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows (y1, y2, x1, x2): a grid with `stride`, the last row/column flush with the
    border; an image smaller than the crop is one window over the whole of it."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@torch.no_grad()
def slide_inference(net, image: torch.Tensor, crop: int, stride: int, chunk: int = 8) -> torch.Tensor:
    """Logits [1, C, H, W] for a normalised image [1, 3, H, W]: crop x crop windows (zero-padded, i.e. the mean
    colour, where the image is smaller), logits of overlapping windows averaged."""
    h, w = image.shape[-2:]
    boxes = windows(h, w, crop, stride)
    crops = torch.cat([F.pad(image[..., y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                       for y1, y2, x1, x2 in boxes])
    total, count = None, image.new_zeros(1, 1, h, w)
    for start in range(0, len(boxes), chunk):
        logits = net(crops[start:start + chunk]).float()
        if total is None:
            total = logits.new_zeros(1, logits.shape[1], h, w)
        for (y1, y2, x1, x2), out in zip(boxes[start:start + chunk], logits):
            total[0, :, y1:y2, x1:x2] += out[:, :y2 - y1, :x2 - x1]
            count[..., y1:y2, x1:x2] += 1
    return total / count


def area_stats(pred: torch.Tensor, label: torch.Tensor, n: int) -> torch.Tensor:
    """[4, n] int64 pixel counts per class: intersection, union, predicted area, labelled area (ignoring 255)."""
    valid = label != IGNORE
    pred, label = pred[valid], label[valid]
    inter = torch.bincount(label[pred == label], minlength=n)
    area_pred, area_label = torch.bincount(pred, minlength=n), torch.bincount(label, minlength=n)
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])


def metrics(stats: torch.Tensor) -> dict:
    """mmseg's metrics (percent) from dataset-wide counts: mIoU over classes present in the labels or the
    predictions, mAcc over classes present in the labels, aAcc over all scored pixels."""
    inter, union, _, area_label = stats.double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.nan)
    acc = torch.where(area_label > 0, inter / area_label.clamp(min=1), torch.nan)
    return {"mIoU": 100 * iou.nanmean().item(), "mAcc": 100 * acc.nanmean().item(),
            "aAcc": 100 * (inter.sum() / area_label.sum().clamp(min=1)).item(),
            "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}


def evaluate(net, dataset: ADE20K, dist_: common.Dist, n_classes: int, crop_size: int, stride: int,
             workers: int = 0, autocast: bool = False) -> dict:
    """Each rank scores its share of the images (every image exactly once); counts are summed over ranks.
    In fp32 unless `autocast` (BEiT v2 evaluates in fp32: bf16 would round the position bias and the logits)."""
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=range(dist_.rank, len(dataset), dist_.world_size),
                                         num_workers=workers)
    stats = torch.zeros(4, n_classes, dtype=torch.int64, device=dist_.device)
    for image, label in common.progress(loader, dist_, desc="eval", unit="img", leave=False):
        with dist_.autocast() if autocast else contextlib.nullcontext():
            logits = slide_inference(net, image.to(dist_.device), crop_size, stride)
        pred = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        stats += area_stats(pred, label.to(dist_.device), n_classes)
    dist_.all_reduce(stats)
    return metrics(stats.cpu())


def check_batchnorm_batch(batch_size: int, micro_batch_size: int, world_size: int, sync_bn: bool, allow: bool):
    """The recipe's BatchNorm sees the whole batch (BEiT v2: SyncBatchNorm over 8 GPUs x 2 images = 16). Gradient
    accumulation cannot give BatchNorm the statistics of images that are not in the forward pass, so a run whose
    BatchNorm would see fewer images than batch_size is refused unless `allow` (micro_batch_bn=True)."""
    seen = micro_batch_size * (world_size if sync_bn else 1)
    if seen < batch_size and not allow:
        how = "SyncBatchNorm across the processes" if sync_bn else "each process on its own (no SyncBatchNorm)"
        raise SystemExit(
            f"BatchNorm would normalise over {seen} images ({how}, micro_batch_size={micro_batch_size}), where the "
            f"recipe normalises over the whole batch of batch_size={batch_size} (BEiT v2: SyncBatchNorm over 8 GPUs "
            f"x 2). Accumulating gradients does not change BatchNorm's statistics. Use micro_batch_size={batch_size} "
            f"on one process, or torchrun on {batch_size // micro_batch_size} GPUs (SyncBatchNorm), or pass "
            f"--micro_batch_bn=True to train with BatchNorm over micro-batches knowingly.")


def class_names(n: int) -> list[str]:
    if n == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    if n == len(TEXTURES) + len(SHAPES):
        return [f"texture:{t}" for t in TEXTURES] + [f"shape:{s}" for s in SHAPES]
    return [f"class {k}" for k in range(n)]


def format_table(result: dict) -> str:
    rows = [f"{'class':<22} {'IoU':>7} {'Acc':>7}"]
    for name, iou, acc in zip(class_names(len(result["IoU"])), result["IoU"], result["Acc"]):
        rows.append(f"{name:<22} {iou:7.2f} {acc:7.2f}")
    rows.append(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}")
    return "\n".join(rows)


def final_report(result: dict, best_miou: float, out_dir: str, dist_: common.Dist, metrics: common.Metrics) -> dict:
    """The result is the last evaluation (the weights in ckpt.pt), as BEiT v2 reports it. The best mIoU over all
    evaluations (best.pt) is extra information only: a maximum over noisy evaluations is biased upwards."""
    if dist_.is_main:
        print(format_table(result), flush=True)
        print(f"result (final evaluation, {out_dir}/ckpt.pt): mIoU {result['mIoU']:.2f}; best over the evaluations "
              f"{best_miou:.2f} ({out_dir}/best.pt, extra information, biased upwards)", flush=True)
    metrics.log({"final_mIoU": result["mIoU"], "final_mAcc": result["mAcc"], "final_aAcc": result["aAcc"],
                 "best_mIoU": best_miou, "time": time.time()})
    return {**result, "best_mIoU": best_miou}


# ----------------------------------------------------------------------------------------------------- main
def settings(**overrides) -> SimpleNamespace:
    """This script's default settings with `overrides` applied: the `cfg` that main() takes."""
    return common.settings(settings_of(globals()), overrides, "segment.py")


def evaluate_only(cfg, segmenter, val_set, dist_: common.Dist, source: str) -> dict:
    """eval_only: score the loaded segmenter, print the per-class table, log it in out_dir/log.jsonl."""
    result = evaluate(segmenter, val_set, dist_, cfg.num_classes, cfg.crop_size, cfg.eval_stride, cfg.workers,
                      cfg.eval_autocast)
    dist_.print(format_table(result))
    if dist_.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.log_json(os.path.join(cfg.out_dir, "log.jsonl"), {"eval_only": source, **result})
    dist_.close()
    return result


def main(cfg: SimpleNamespace):
    dist_ = common.Dist(cfg.device)
    dev = dist_.device
    accum = dist_.accumulation_steps(cfg.batch_size, cfg.micro_batch_size)
    sync_bn = dist_.world_size > 1 and dev.type == "cuda"  # SyncBatchNorm runs on GPUs only
    if cfg.micro_batch_size < 2 and not sync_bn and not cfg.eval_only:
        raise SystemExit("micro_batch_size=1 without SyncBatchNorm: BatchNorm needs 2 images (use 2 or more)")
    if not cfg.eval_only:
        check_batchnorm_batch(cfg.batch_size, cfg.micro_batch_size, dist_.world_size, sync_bn, cfg.micro_batch_bn)
    if cfg.demo_data:
        dist_.on_main(make_demo_dataset, cfg.demo_data, seed=cfg.seed)
    try:
        root = find_root(cfg.data_dir)
        val_set = ADE20K(root, "validation", cfg.num_classes, eval_transform(cfg.scale))
    except FileNotFoundError as e:
        raise SystemExit(f"data error: {e}") from e

    # Model: a resumed run's own checkpoint wins over init_from (the same random init on every rank).
    common.seed_everything(cfg.seed)
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    out_lock = common.prepare_out_dir(cfg.out_dir, dist_.is_main)  # writable, not in use; held while the run lives
    own = common.load_checkpoint(ckpt_path, "segment") if os.path.isfile(ckpt_path) and not (cfg.eval_only and cfg.init_from) \
        else None
    segmenter, backbone_args, head_args = build_segmenter(cfg, dist_) if own is None else \
        build_from(cfg, own, ckpt_path)
    segmenter = segmenter.to(dev)
    if cfg.eval_only:
        if own is not None:
            segmenter.load_state_dict(own["model"])
        return evaluate_only(cfg, segmenter, val_set, dist_, cfg.init_from or ckpt_path)

    # Data: each image's rescale, crop, flip and photometric distortion are drawn from (seed, epoch, index).
    try:
        train_set = ADE20K(root, "training", cfg.num_classes,
                           train_transform(cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio))
    except FileNotFoundError as e:
        raise SystemExit(f"data error: {e}") from e
    loader = common.data_loader(common.SeededSamples(train_set, cfg.seed), cfg.micro_batch_size, dist_, train=True,
                                workers=cfg.workers, seed=cfg.seed)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{root} has {len(train_set)} training images, fewer than one batch of {cfg.batch_size}")
    if sync_bn:
        segmenter = torch.nn.SyncBatchNorm.convert_sync_batchnorm(segmenter)
    groups = common.param_groups(segmenter, cfg.weight_decay, cfg.layer_decay, len(segmenter.backbone.blocks))
    optimizer = common.adamw(groups, cfg.lr, cfg.betas, cfg.eps, dev)

    # Resume: weights, optimizer, iteration and the evaluations done so far.
    ckpt = common.resume(ckpt_path, segmenter, optimizer, dist_, "segment", unit="iteration",
                         backbone_args=backbone_args, head_args=head_args) if own is not None else None
    step = ckpt["step"] if ckpt else 0
    state = {k: ckpt[k] for k in ("best_miou", "evaluated", "result")} if ckpt else \
        {"best_miou": -1.0, "evaluated": 0, "result": None}
    last_step = min(cfg.iters, cfg.max_iters) if cfg.max_iters else cfg.iters
    net = dist_.wrap(segmenter, cfg.compile)
    extra = dict(config=vars(cfg), backbone_args=backbone_args, head_args=head_args, stage="segment")
    sums, aux_sum, t0 = torch.zeros(2, device=dev), torch.zeros((), device=dev), time.time()
    check = 0.0  # the loss of the weights in hand: those of a saved checkpoint were checked when it was saved
    if step >= last_step and not (state["evaluated"] < step and (step % cfg.eval_interval == 0 or step == cfg.iters)):
        dist_.print(f"finished: nothing to train ({ckpt_path} is at iteration {step} of {last_step}, evaluated; "
                    f"raise iters or max_iters to train on)")
    metrics = common.Metrics(cfg.out_dir, cfg, dist_.is_main)  # log.jsonl, and wandb / TensorBoard if asked
    bar = common.progress(None, dist_, desc="iter", unit="it", total=last_step, initial=step)  # all iterations

    with common.StopOnSignal() as stop:
        while True:
            if state["evaluated"] < step and (step % cfg.eval_interval == 0 or step == cfg.iters):
                result = evaluate(segmenter, val_set, dist_, cfg.num_classes, cfg.crop_size, cfg.eval_stride,
                                  cfg.workers, cfg.eval_autocast)
                dist_.print(f"iteration {step}: mIoU {result['mIoU']:.2f}, mAcc {result['mAcc']:.2f}, "
                            f"aAcc {result['aAcc']:.2f}")
                metrics.log({"iter": step, **result, "time": time.time()})
                if result["mIoU"] > state["best_miou"]:  # best.pt: the weights alone (a run resumes from ckpt.pt)
                    common.save_state(best_path, dist_, segmenter, None, step, check, mIoU=result["mIoU"], **extra)
                state.update(best_miou=max(state["best_miou"], result["mIoU"]), evaluated=step, result=result)
                common.save_state(ckpt_path, dist_, segmenter, optimizer, step, check, **extra, **state)
            if step >= last_step or stop.now(dist_, sync_point=True):  # also a stop asked for while evaluating
                break

            epoch, skip = common.position(step, steps_per_epoch, accum)
            segmenter.train()
            for micro, (images, labels) in enumerate(common.epoch_batches(loader, epoch, cfg.seed, skip), start=skip):
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                common.seed_step(cfg.seed, dist_.rank, step, micro % accum)  # dropout, drop path: by position
                last_micro = (micro + 1) % accum == 0
                with common.no_sync(net, dist_, sync=last_micro), dist_.autocast():
                    logits, aux_logits = net(images, with_aux=True)
                    loss, _, aux = seg_loss(logits, aux_logits, labels, cfg.aux_weight)
                    (loss / accum).backward()
                sums += torch.stack([loss.detach().float(), torch.ones((), device=dev)])
                aux_sum += aux.detach()
                if not last_micro:
                    continue
                lr = poly_lr(step, cfg.iters, cfg.warmup_iters, cfg.lr, cfg.power, cfg.min_lr)
                common.set_lr(optimizer, lr)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(segmenter.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                log_step = step % cfg.log_interval == 0 or step == last_step
                if log_step:  # a GPU sync: only every log_interval steps
                    mean, count = common.mean_loss(sums, dist_, step, cfg.out_dir), sums[1].item()
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                    metrics.log({"iter": step, "loss": mean, "aux_loss": aux_sum.item() / count, "lr": lr,
                                 "images_per_s": count * cfg.micro_batch_size * dist_.world_size / (time.time() - t0),
                                 "time": time.time(), **({"max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
                                                         if dev.type == "cuda" else {})})
                    sums, aux_sum, t0 = torch.zeros_like(sums), torch.zeros_like(aux_sum), time.time()
                due = step % cfg.ckpt_interval == 0 or step % cfg.eval_interval == 0 or step == last_step
                stopping = stop.now(dist_, sync_point=log_step)
                if due or stopping or step % steps_per_epoch == 0:
                    break  # an incomplete accumulation at the epoch's end is dropped

            # Checkpoint every ckpt_interval iterations, before each evaluation, at the end and when stopped.
            if due or stopping:
                segmenter.eval()
                with torch.no_grad(), dist_.autocast():  # the loss of the weights about to be saved
                    check = seg_loss(*segmenter(images, with_aux=True), labels, cfg.aux_weight)[0].item()
                segmenter.train()
                common.save_state(ckpt_path, dist_, segmenter, optimizer, step, check, **extra, **state)
    bar.close()
    dist_.close()
    report = None if state["result"] is None else final_report(state["result"], state["best_miou"], cfg.out_dir,
                                                                dist_, metrics)
    metrics.close()  # and curves.png
    return report


if __name__ == "__main__":
    main(SimpleNamespace(**configure(globals(), rules=RULES)))
