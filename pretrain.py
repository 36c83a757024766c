"""DTM pre-training: a BEiT-style ViT student learns to predict a frozen CLIP teacher's patch tokens from a
block-masked image, with the Dynamic Token Morphing loss (morph.py).

    python pretrain.py config/pretrain_demo.py      # offline demo, CPU, minutes (after its teacher: see the config)
    torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitb_300ep.py --data_dir=/data/imagenet/train

Every setting below can be changed by a config file or --key=value (configurator.py). A run whose out_dir
already holds ckpt.pt resumes from it.
"""
import contextlib
import math
import os
import random
import socket
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from torchvision.transforms import v2

import common
from configurator import Range, at_least, configure
from demo_data import make_demo_dataset
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
# logging: log.jsonl and curves.png (plot.py) always; wandb and TensorBoard if asked for (rank 0, pip install them)
wandb_log = False  # also log to Weights & Biases
wandb_project = "dtm"
wandb_run_name = ""  # '': the out_dir's name
tensorboard = False  # also write TensorBoard event files to out_dir/tb
# system
seed = 0
workers = min(10, common.available_cpus())  # data-loading processes per GPU; at most the cores this process may use
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


def hub_unreachable(host: str = "huggingface.co", timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub cannot be reached, found in at most `timeout` seconds. Behind a proxy the
    direct connection may fail where downloads work: then the hub is taken as reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def hub_cache_only_if_unreachable(pretrained: str):
    """Offline, open_clip would spend about 50 s in hub retries before failing: with the hub out of reach, look
    in the local cache only (huggingface_hub's offline mode), which finds cached weights or fails at once."""
    if not pretrained or os.path.isfile(pretrained) or not hub_unreachable():
        yield
        return
    import huggingface_hub.constants as hub
    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline


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
            with hub_cache_only_if_unreachable(pretrained):
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


def check_teacher_file(teacher: str):
    """A teacher given as a path (a folder in it, or a checkpoint's suffix) must exist; without this, a missing
    file would be taken for an unknown open_clip model name."""
    looks_like_path = os.sep in teacher or teacher.endswith((".pt", ".pth"))
    if looks_like_path and not os.path.isfile(teacher):
        raise SystemExit(f"teacher={teacher!r} does not exist: train it first (a checkpoint of finetune.py, "
                         f"eval_transfer.py or pretrain.py), or name an open_clip model. The offline demo's "
                         f"teacher is written by: python eval_transfer.py config/transfer_demo_teacher.py")


def build_teacher(teacher: str, pretrained: str, overrides: dict, device: torch.device) -> torch.nn.Module:
    """The frozen teacher: a checkpoint of this project if `teacher` is a file, else an open_clip model."""
    net = CheckpointTeacher(teacher) if os.path.isfile(teacher) else ClipTeacher(teacher, pretrained, overrides)
    net = net.to(device).eval().requires_grad_(False)
    return net.to(torch.bfloat16) if device.type == "cuda" else net


def check_patch_grid(teacher: torch.nn.Module, img_size: int, patch_size: int, device: torch.device):
    """Teacher and student must see the same patch grid: one target per student token."""
    grid = img_size // patch_size
    with torch.no_grad():
        tokens = teacher(torch.zeros(1, 3, img_size, img_size, device=device)).shape[1]
    if tokens != grid * grid:
        raise SystemExit(f"the teacher gives {tokens} tokens for a {img_size}px image, the student {grid * grid} "
                         f"(patch_size={patch_size}): give them the same patch grid")


# --------------------------------------------------------------------------------------------------- student
def model_args(size: str, out_dim: int, img_size: int, patch_size: int, depth: int = 0, layer_scale: float = 0.0,
               drop_path: float = 0.0, abs_pos: bool = False) -> dict:
    """The student's VisionTransformer arguments: a BEiT v2 ViT of `size` with a mask token and a linear
    head predicting the teacher's `out_dim`-wide tokens; depth, layer_scale 0: the size's own."""
    args = dict(SIZES[size])
    if depth:
        args["depth"] = depth
    if layer_scale:
        args["layer_scale"] = layer_scale
    return dict(args, img_size=img_size, patch_size=patch_size, drop_path=drop_path, abs_pos=abs_pos,
                shared_rel_pos=True, block_rel_pos=True, mask_token=True, out_dim=out_dim)


def check_masking(num_masked: int, img_size: int, patch_size: int):
    """Block masking can mask at most the whole grid: more would silently train almost unmasked."""
    grid = img_size // patch_size
    if not num_masked <= grid * grid:
        raise SystemExit(f"num_masked={num_masked} is more than the {grid * grid} patches of the {grid}x{grid} grid "
                         f"(img_size={img_size} / patch_size={patch_size}); BEiT masks 75 of 196 (about 40%)")


def dtm_step_loss(net, teacher, images, masks, schedules, loss: str, beta: float, loss_fn=dtm_loss):
    """One micro-batch: the teacher's tokens of the full image are the targets of the student's predictions
    for the masked image, compared after morphing both with the same token groups (morph.py)."""
    with torch.no_grad():
        targets = teacher(images).float()
    pred = net(normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD), masks)
    return loss_fn(pred, targets, schedules, loss, beta)


# ----------------------------------------------------------------------------------------------------- main
def main(cfg: SimpleNamespace):
    dist_ = common.Dist(cfg.device)
    dev = dist_.device
    accum = dist_.accumulation_steps(cfg.batch_size, cfg.micro_batch_size)
    check_masking(cfg.num_masked, cfg.img_size, cfg.patch_size)
    check_teacher_file(cfg.teacher)
    if cfg.demo_data:
        dist_.on_main(make_demo_dataset, cfg.demo_data, size=cfg.img_size, seed=cfg.seed)

    # Data: each image's crop, flip, colour jitter and mask are drawn from (seed, epoch, index).
    try:
        folder = common.ImageFolder(cfg.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"data_dir: {e}") from None
    masking = BlockMasking(cfg.img_size // cfg.patch_size, cfg.num_masked, cfg.min_block)
    dataset = common.SeededSamples(MaskedImages(folder, cfg.img_size, masking), cfg.seed)
    loader = common.data_loader(dataset, cfg.micro_batch_size, dist_, train=True, workers=cfg.workers, seed=cfg.seed)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data_dir!r} has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")

    # Teacher, student, optimizer (the same random init on every rank).
    common.seed_everything(cfg.seed)
    teacher = build_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_overrides, dev)
    check_patch_grid(teacher, cfg.img_size, cfg.patch_size, dev)
    args = model_args(cfg.model, teacher.out_dim, cfg.img_size, cfg.patch_size, cfg.depth, cfg.layer_scale,
                      cfg.drop_path, cfg.abs_pos)
    student = VisionTransformer(**args).to(dev)
    base_lr = cfg.lr * math.sqrt(cfg.batch_size / 2048)
    optimizer = common.adamw(common.param_groups(student, cfg.weight_decay), base_lr, cfg.betas, cfg.eps, dev)

    # Resume: a run whose out_dir holds ckpt.pt goes on from its last complete optimizer step.
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    out_lock = common.prepare_out_dir(cfg.out_dir, dist_.is_main)  # writable, not in use; held while the run lives
    ckpt = common.resume(ckpt_path, student, optimizer, dist_, "pretrain", model_args=args)
    step = ckpt["step"] if ckpt else 0
    epoch_sums = torch.tensor(ckpt["epoch_sums"] if ckpt else [0.0, 0.0], device=dev)  # [loss sum, count]
    net = dist_.wrap(student, cfg.compile)  # DDP (and torch.compile); `student` keeps the plain weights
    loss_fn = torch.compile(dtm_loss) if cfg.compile else dtm_loss
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if step >= last_step:
        dist_.print(f"finished: nothing to train ({ckpt_path} is at step {step} of {last_step}; raise epochs or "
                    f"max_steps to train on)")
    metrics = common.Metrics(cfg.out_dir, cfg, dist_.is_main)  # log.jsonl, and wandb / TensorBoard if asked

    with common.StopOnSignal() as stop:
        while step < last_step:
            epoch, skip = common.position(step, steps_per_epoch, accum)
            batches = common.epoch_batches(loader, epoch, cfg.seed, skip)
            bar = common.progress(batches, dist_, desc=f"epoch {epoch}", unit="step",
                                  total=steps_per_epoch - step % steps_per_epoch)
            student.train()
            sums, t0, seen = torch.zeros(2, device=dev), time.time(), 0
            for micro, (images, masks) in enumerate(bar.iterable, start=skip):
                images, masks = images.to(dev, non_blocking=True), masks.to(dev, non_blocking=True)
                common.seed_step(cfg.seed, dist_.rank, step, micro % accum)  # drop path and schedules, by position
                schedules = schedule_tensor([sample_schedule(cfg.n_max, cfg.k_max, random)
                                             for _ in range(cfg.num_schedules if cfg.dtm else 0)], dev)
                last_micro = (micro + 1) % accum == 0
                with common.no_sync(net, dist_, sync=last_micro), dist_.autocast():
                    loss = dtm_step_loss(net, teacher, images, masks, schedules, cfg.loss, cfg.beta, loss_fn)
                    (loss / accum).backward()
                sums += torch.stack([loss.detach().float(), torch.ones((), device=dev)])
                seen += len(images) * dist_.world_size
                if not last_micro:
                    continue
                lr = common.cosine_schedule(step, total_steps, warmup_steps, base_lr, cfg.min_lr)
                weight_decay = common.cosine_schedule(step, total_steps, 0, cfg.weight_decay, cfg.weight_decay_end)
                common.set_lr(optimizer, lr, weight_decay)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                log_step = step % cfg.log_interval == 0 or step == last_step
                if log_step:  # a GPU sync: only every log_interval steps
                    mean = common.mean_loss(sums, dist_, step, cfg.out_dir)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.time() - t0):.0f}")
                    epoch_sums += sums
                    sums.zero_()
                stopping = stop.now(dist_, sync_point=log_step)
                if stopping or step == last_step or step % steps_per_epoch == 0:
                    break  # an incomplete accumulation at the epoch's end is dropped
            bar.close()

            # Checkpoint at the epoch's end, at the last step and when stopped; log complete epochs.
            epoch_sums += sums
            mean = common.mean_loss(epoch_sums, dist_, step, cfg.out_dir)
            student.eval()
            with torch.no_grad(), dist_.autocast():  # the loss of the weights about to be saved
                check = dtm_step_loss(student, teacher, images, masks, schedules, cfg.loss, cfg.beta).item()
            epoch_done = step % steps_per_epoch == 0
            common.save_state(ckpt_path, dist_, student, optimizer, step, check, stage="pretrain", config=vars(cfg),
                              model_args=args, epoch_sums=[0.0, 0.0] if epoch_done else epoch_sums.tolist())
            if dist_.is_main and (epoch_done or step == last_step):
                metrics.log({"epoch": epoch, "step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                             "images_per_s": seen / (time.time() - t0), "time": time.time()})
                print(f"epoch {epoch}: loss {mean:.4f}, step {step}/{total_steps}", flush=True)
            if epoch_done:
                epoch_sums.zero_()
            if stopping:
                dist_.print(f"stopped: saved {ckpt_path} at step {step}; run the same command to resume")
                break
    metrics.close()  # and curves.png
    if dist_.world_size > 1:  # DDP keeps replicas identical; print a fingerprint so that is easy to check
        dist_.barrier()  # after rank 0's epoch line; one write per line, so that lines of two ranks never mix
        print(f"rank {dist_.rank}: weights sha256 {common.weights_digest(student.state_dict())}\n", end="", flush=True)
    dist_.close()


if __name__ == "__main__":
    main(SimpleNamespace(**configure(globals(), rules=RULES)))
