"""DTM pre-training: a BEiT-style ViT student learns to predict a frozen CLIP teacher's patch tokens from a
block-masked image, with the Dynamic Token Morphing loss (morph.py).

    python pretrain.py config/pretrain_demo.py                                  # offline demo, CPU, minutes
    torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitb_300ep.py --data_dir=/data/imagenet/train

Every setting below can be changed by a config file or --key=value (configurator.py). A run whose out_dir
already holds ckpt.pt resumes from it.
"""
import math
import os
import random
import time
import warnings

import numpy as np
import torch
from torchvision.transforms import v2

import common
from configurator import Range, at_least, configure
from model import SIZES, VisionTransformer
from morph import dtm_loss, sample_schedule, schedule_tensor

# ------------------------------------------------------------------------------------------------- settings
# I/O
out_dir = "out/pretrain"
data_dir = "data/imagenet/train"  # an ImageFolder: <data_dir>/<class>/<image>.jpg (ImageNet's train/ layout)
demo_data = ""  # if set: generate the offline demo dataset in this folder first (data_dir should be <it>/train)
# student
model = "base"  # tiny, small, base, large
img_size = 224
patch_size = 16
depth = 0  # 0: the size's own depth
drop_path = 0.0
layer_scale = 0.0  # LayerScale init; 0: the size's own (0.1 base, 1e-5 large)
abs_pos = False  # absolute position embedding (off: relative position biases only, as BEiT v2)
# teacher
teacher = "ViT-B-16-quickgelu"  # an open_clip model name, or a pre-training or fine-tuned checkpoint of this project
teacher_pretrained = "openai"  # open_clip tag or a local weights file; '' = random init (smoke tests only)
teacher_overrides = {}  # merged into the open_clip model config, e.g. {'vision_cfg': {'layers': 2}}
# masking (BEiT block-wise)
num_masked = 75  # patches masked per image (of 196)
min_block = 16  # minimum patches per masked block
# DTM
dtm = True  # False: token-wise distillation, the baseline
num_schedules = 2  # L, schedules averaged per step
n_max = 196  # at most this many tokens merged away per schedule
k_max = 14  # at most this many matching rounds per schedule
loss = "smooth_l1"  # smooth_l1, l2 or cosine
beta = 2.0  # smooth-L1 switch point
# optimisation
epochs = 300
warmup_epochs = 10
batch_size = 2048  # total over all GPUs and accumulation steps
micro_batch_size = 128  # per GPU and forward pass; accumulation makes up the rest
lr = 1.5e-3  # at batch 2048; scaled by sqrt(batch_size / 2048)
min_lr = 1e-5
weight_decay = 0.05
weight_decay_end = 0.05  # cosine from weight_decay to this (BEiT's per-step weight-decay schedule)
betas = (0.9, 0.98)
eps = 1e-8
grad_clip = 3.0  # 0: off
# system
seed = 0
workers = 10
device = "auto"  # auto, cpu, cuda, cuda:1
compile = False
max_steps = 0  # stop after this many optimizer steps (0: run all epochs); for smoke tests and benchmarks
log_interval = 10  # optimizer steps between progress-bar updates (each costs a GPU sync)
# values configure() refuses beyond a wrong type: each setting's choices or range
RULES = {"model": tuple(SIZES), "loss": ("smooth_l1", "l2", "cosine"), "drop_path": Range(0, 1),
         **dict.fromkeys(("img_size", "patch_size", "min_block", "epochs", "batch_size", "micro_batch_size",
                          "log_interval"), at_least(1)),
         **dict.fromkeys(("depth", "layer_scale", "num_masked", "num_schedules", "n_max", "k_max", "beta",
                          "warmup_epochs", "lr", "min_lr", "grad_clip", "workers", "max_steps"), at_least(0))}

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------- data
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


class MaskedImages(torch.utils.data.Dataset):
    """(augmented uint8 image, block mask): normalisation happens on the device, once per view. The official
    order (BEiT v2 / DTM DataAugmentationForBEiT): colour jitter on the whole image (so contrast moves pixels
    around the whole image's mean), horizontal flip, then the random resized crop."""

    def __init__(self, images, img_size: int, masking: BlockMasking):
        self.images, self.masking = images, masking
        self.augment = v2.Compose([
            v2.PILToTensor(),
            v2.ColorJitter(0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, _ = self.images[i]
        return self.augment(image), self.masking()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# -------------------------------------------------------------------------------------------------- teacher
def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class ClipTeacher(torch.nn.Module):
    """An open_clip vision tower; targets are its patch tokens after ln_post, projected by proj."""

    def __init__(self, name: str, pretrained: str, overrides: dict):
        super().__init__()
        import open_clip  # lazily: only pre-training needs it
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise SystemExit(f"teacher={name!r} is neither an open_clip model nor a checkpoint file; "
                             f"open_clip models include: {', '.join(open_clip.list_models()[:12])}, ...")
        kwargs = {k: v for k, v in _merge(cfg, overrides).items() if k in overrides}
        if not pretrained:
            warnings.warn("\n" + "!" * 80 + f"\nteacher_pretrained='' : the teacher {name} is RANDOMLY INITIALISED. "
                          "Fine for smoke tests;\nuseless for real pre-training.\n" + "!" * 80)
        try:
            clip = open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
        except Exception as e:
            raise SystemExit(
                f"could not load teacher weights teacher_pretrained={pretrained!r} for teacher={name!r}: {e}\n"
                f"Without internet access, download the weights on another machine (open_clip: {name}, "
                f"'{pretrained}') and pass the file: --teacher_pretrained=/path/to/open_clip_model.bin") from e
        self.visual = clip.visual
        self.visual.output_tokens = True
        self.mean, self.std = tuple(self.visual.preprocess_cfg.get("mean", CLIP_MEAN)), \
            tuple(self.visual.preprocess_cfg.get("std", CLIP_STD))
        self.out_dim = self.visual.proj.shape[1]

    def forward(self, images_uint8):
        _, tokens = self.visual(normalize(images_uint8, self.mean, self.std).to(self.visual.proj.dtype))
        return tokens @ self.visual.proj


class CheckpointTeacher(torch.nn.Module):
    """A checkpoint of this project as the teacher. Its targets, per patch:
    - a pre-training checkpoint: its predictions (final norm, then lm_head), what that student learned to give;
    - a fine-tuned classifier (finetune.py): the last block's patch tokens after fc_norm, the norm its head
      reads. That is what ClipTeacher takes from CLIP: every patch token through ln_post, the norm CLIP trained
      on its pooled output. The class head is left out: a handful of class logits per patch would throw away
      most of what a token holds, where CLIP's proj keeps a 512-d embedding.
    Every weight is loaded strictly from the file: a teacher that silently kept random weights would teach
    noise."""

    def __init__(self, path: str):
        super().__init__()
        ckpt = common.load_checkpoint(path)
        state, args = dict(ckpt.get("model", {})), ckpt.get("model_args")
        if args is None or ckpt.get("probe"):
            raise SystemExit(f"teacher={path!r} is neither a pre-training nor a fine-tuned checkpoint of this "
                             f"project" + (" (a linear probe: pass the checkpoint it probed)" if args else ""))
        if args.get("num_classes"):  # fine-tuned: fc_norm becomes the per-token norm, the class head goes
            state = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v
                     for k, v in state.items() if not k.startswith("head.")}
        elif "lm_head.weight" not in state:
            raise SystemExit(f"teacher={path!r} has neither a pre-training head (lm_head) nor a classifier")
        args = dict(args, mask_token=False, num_classes=0, drop_path=0.0)
        self.net = VisionTransformer(**args)
        self.net.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
        self.out_dim = args.get("out_dim") or args["embed_dim"]
        self.mean, self.std = common.IMAGENET_MEAN, common.IMAGENET_STD

    def forward(self, images_uint8):
        return self.net(normalize(images_uint8, self.mean, self.std))


def build_teacher(device: torch.device) -> torch.nn.Module:
    net = CheckpointTeacher(teacher) if os.path.isfile(teacher) else ClipTeacher(teacher, teacher_pretrained,
                                                                                 teacher_overrides)
    net = net.to(device).eval().requires_grad_(False)
    return net.to(torch.bfloat16) if device.type == "cuda" else net


# ----------------------------------------------------------------------------------------------------- main
def model_args(out_dim: int) -> dict:
    size = dict(SIZES[model])
    if depth:
        size["depth"] = depth
    if layer_scale:
        size["layer_scale"] = layer_scale
    return dict(size, img_size=img_size, patch_size=patch_size, drop_path=drop_path, abs_pos=abs_pos,
                shared_rel_pos=True, block_rel_pos=True, mask_token=True, out_dim=out_dim)


def check_masking(grid: int):
    """Block masking can mask at most the whole grid: more would silently train almost unmasked."""
    if not num_masked <= grid * grid:
        raise SystemExit(f"num_masked={num_masked} is more than the {grid * grid} patches of the {grid}x{grid} grid "
                         f"(img_size={img_size} / patch_size={patch_size}); BEiT masks 75 of 196 (about 40%)")


def main(config: dict):
    dist_ = common.Dist(device)
    common.seed_everything(seed + dist_.rank)
    accum = dist_.accumulation_steps(batch_size, micro_batch_size)
    if demo_data:
        dist_.on_main(common.make_demo_dataset, demo_data, size=img_size, seed=seed)

    # Data, teacher, student, optimizer.
    grid = img_size // patch_size
    check_masking(grid)
    try:
        images = common.ImageFolder(data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"data_dir: {e}") from None
    dataset = MaskedImages(images, img_size, BlockMasking(grid, num_masked, min_block))
    loader = common.data_loader(dataset, micro_batch_size, dist_, train=True, workers=workers, seed=seed)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{data_dir!r} has {len(dataset)} images, fewer than one batch of {batch_size}")
    teacher_net = build_teacher(dist_.device)
    with torch.no_grad():
        teacher_tokens = teacher_net(torch.zeros(1, 3, img_size, img_size, device=dist_.device)).shape[1]
    if teacher_tokens != grid * grid:
        raise SystemExit(f"the teacher gives {teacher_tokens} tokens for a {img_size}px image, the student "
                         f"{grid * grid} (patch_size={patch_size}): give them the same patch grid")
    args = model_args(teacher_net.out_dim)
    student = VisionTransformer(**args).to(dist_.device)
    base_lr = lr * math.sqrt(batch_size / 2048)
    optimizer = common.adamw(common.param_groups(student, weight_decay), base_lr, betas, eps, dist_.device)

    out_lock = common.prepare_out_dir(out_dir, dist_.is_main)  # writable, not in use; held while the run lives
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    step = 0
    if os.path.isfile(ckpt_path):
        ckpt = common.load_checkpoint(ckpt_path, stage="pretrain")
        if ckpt.get("model_args") != args:
            raise SystemExit(f"{ckpt_path} holds a run of another model ({ckpt.get('model_args')}); "
                             f"choose a new out_dir to start a new run")
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        common.set_rng_states(ckpt["rng"])
        dist_.print(f"resuming from {ckpt_path} at step {step}")
    elif dist_.is_main:
        os.makedirs(out_dir, exist_ok=True)

    model = dist_.wrap(student, compile)
    loss_fn = torch.compile(dtm_loss) if compile else dtm_loss
    rng = random.Random()

    def loss_of(batch, step, micro):
        images, masks = batch
        rng.seed(f"{seed}-{dist_.rank}-{step}-{micro % accum}")  # schedules per GPU, a function of the position
        schedules = schedule_tensor([sample_schedule(n_max, k_max, rng) for _ in range(num_schedules)] if dtm else [],
                                    dist_.device)
        with torch.no_grad():
            targets = teacher_net(images).float()
        pred = model(normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD), masks)
        return loss_fn(pred, targets, schedules, loss, beta)

    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch

    def lr_at(step):
        return (common.cosine_schedule(step, total_steps, warmup_steps, base_lr, min_lr),
                common.cosine_schedule(step, total_steps, 0, weight_decay, weight_decay_end))

    def save(step):
        if dist_.is_main:
            common.save_checkpoint({"model": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "config": config, "model_args": args, "rng": common.rng_states(),
                                    "stage": "pretrain"}, ckpt_path)

    def end_of_epoch(epoch, step, mean_loss, images_per_s):
        save(step)
        if dist_.is_main:
            common.log_json(os.path.join(out_dir, "log.jsonl"), {
                "epoch": epoch, "step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": images_per_s, "time": time.time()})
        dist_.print(f"epoch {epoch}: loss {mean_loss:.4f}, step {step}/{total_steps}")

    common.train(dist_, model, optimizer, loader, loss_of, step=step, total_steps=total_steps, accum=accum,
                 lr_at=lr_at, save=save, out_dir=out_dir, seed=seed, max_steps=max_steps, grad_clip=grad_clip,
                 params=student.parameters(), log_interval=log_interval, on_epoch=end_of_epoch)
    if dist_.world_size > 1:  # DDP keeps replicas identical; print a fingerprint so that is easy to check
        print(f"rank {dist_.rank}: weights sha256 {common.weights_digest(student.state_dict())}", flush=True)
    dist_.close()


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
