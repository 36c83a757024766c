"""DTM pre-training: a BEiT-style ViT student learns to predict a frozen CLIP teacher's patch tokens from a
block-masked image, with the Dynamic Token Morphing loss (morph.py).

    python pretrain.py config/pretrain_demo.py      # offline demo, CPU, minutes (after its teacher: see the config)
    torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitb_300ep.py --data_dir=/data/imagenet/train

Every setting below can be changed by a config file or --key=value (configurator.py). A run whose out_dir
already holds ckpt.pt resumes from it.
"""
import math
import os
import random
import time

import torch

import common
import data
import plot
from configurator import Range, at_least, configure
from demo_data import make_demo_dataset
from model import SIZES, VisionTransformer
from morph import dtm_loss, sample_schedule, schedule_tensor
from teacher import build_teacher, check_patch_grid, teacher_kind

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
n_max = 196  # at most this many tokens merged away per schedule (at most the number of patches)
k_max = 14  # at most this many matching rounds per schedule
loss = "smooth_l1"  # smooth_l1, l2 or cosine
beta = 2.0  # smooth-L1 switch point
# optimisation
epochs = 300
warmup_epochs = 10
batch_size = 2048  # total over all GPUs and accumulation steps
micro_batch_size = 128  # per GPU and forward pass; accumulation makes up the rest
lr = 1.5e-3  # learning rate at batch 2048; scaled by sqrt(batch_size / 2048)
min_lr = 1e-5
weight_decay = 0.05
weight_decay_end = 0.05  # cosine from weight_decay to this (BEiT's per-step weight-decay schedule)
betas = (0.9, 0.98)
eps = 1e-8
grad_clip = 3.0  # 0: off
# logging: log.jsonl and curves.png always; wandb and TensorBoard if asked for (rank 0, pip install them)
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


def check_settings(cfg):
    """Settings that cannot work together, refused before any work, each naming the fix."""
    if cfg.img_size % cfg.patch_size:
        raise SystemExit(f"img_size={cfg.img_size} is not a multiple of patch_size={cfg.patch_size}: the patch grid "
                         f"must cover the image, e.g. --img_size={cfg.img_size // cfg.patch_size * cfg.patch_size}")
    grid = cfg.img_size // cfg.patch_size
    tokens = grid * grid
    if cfg.num_masked > tokens:  # block masking would silently train almost unmasked
        raise SystemExit(f"num_masked={cfg.num_masked} is more than the {tokens} patches of the {grid}x{grid} grid "
                         f"(img_size={cfg.img_size} / patch_size={cfg.patch_size}); BEiT masks 75 of 196 (about 40%)")
    if cfg.dtm and cfg.num_schedules == 0:
        raise SystemExit("num_schedules=0 with dtm=True would train token-wise: give num_schedules >= 1 (the paper "
                         "averages 2), or pass --dtm=False for the token-wise baseline")
    if cfg.dtm and cfg.k_max == 0:
        raise SystemExit("k_max=0 with dtm=True: a schedule has k ~ U{1..k_max} matching rounds; give k_max >= 1 "
                         "(the paper: 14 for 196 tokens), or pass --dtm=False")
    if cfg.dtm and cfg.n_max > tokens:
        raise SystemExit(f"n_max={cfg.n_max} is more than the {tokens} tokens a schedule can merge away (img_size="
                         f"{cfg.img_size} / patch_size={cfg.patch_size}): give --n_max={tokens} or less")
    teacher_kind(cfg.teacher)  # a teacher file that does not exist stops here, before out_dir is made
    if not cfg.demo_data and not os.path.isdir(cfg.data_dir):
        raise SystemExit(f"data_dir: data folder {cfg.data_dir!r} does not exist; expected an ImageFolder layout: "
                         f"{cfg.data_dir}/<class name>/<image>.jpg")


def training_images(cfg) -> data.ImageFolder:
    """The ImageFolder of data_dir, refusing a dataset's root (whose train/ and val/ would become 'classes')."""
    try:
        folder = data.ImageFolder(cfg.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"data_dir: {e}") from None
    splits = sorted(set(folder.classes) & {"train", "val", "test", "training", "validation"})
    if splits:
        raise SystemExit(f"data_dir={cfg.data_dir!r} holds the splits {', '.join(splits)} as if they were classes: "
                         f"pass the training images' folder, e.g. --data_dir={os.path.join(cfg.data_dir, splits[0])}")
    return folder


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


def draw_schedules(cfg, device) -> torch.LongTensor:
    """The L schedules of one micro-batch, drawn with Python's `random` (seeded by the micro-batch's position)."""
    return schedule_tensor([sample_schedule(cfg.n_max, cfg.k_max, random)
                            for _ in range(cfg.num_schedules if cfg.dtm else 0)], device)


def dtm_step_loss(net, teacher, images, masks, schedules, loss: str, beta: float, loss_fn=dtm_loss):
    """One micro-batch: the teacher's tokens of the full image are the targets of the student's predictions
    for the masked image, compared after morphing both with the same token groups (morph.py)."""
    with torch.no_grad():
        targets = teacher(images).float()
    pred = net(common.normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD), masks)
    return loss_fn(pred, targets, schedules, loss, beta)


# ----------------------------------------------------------------------------------------------------- main
def main(cfg):
    check_settings(cfg)
    dist_ = common.Dist(cfg.device)
    dev = dist_.device
    accum = dist_.accumulation_steps(cfg.batch_size, cfg.micro_batch_size)
    with common.OutDirLock(cfg.out_dir, dist_.is_main):  # writable, and this run's alone
        if cfg.demo_data and dist_.is_main:
            make_demo_dataset(cfg.demo_data, size=cfg.img_size, seed=cfg.seed)
        dist_.barrier()

        # Data: each image's crop, flip, colour jitter and mask are drawn from (seed, epoch, index).
        folder = training_images(cfg)
        masking = data.BlockMasking(cfg.img_size // cfg.patch_size, cfg.num_masked, cfg.min_block)
        dataset = data.SeededSamples(data.MaskedImages(folder, cfg.img_size, masking), cfg.seed)
        loader = data.data_loader(dataset, cfg.micro_batch_size, dist_, train=True, workers=cfg.workers, seed=cfg.seed)
        steps_per_epoch = len(loader) // accum  # an incomplete accumulation at an epoch's end is dropped
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
        train(cfg, dist_, loader, steps_per_epoch, accum, teacher, student, optimizer, args, base_lr)
    if dist_.world_size > 1:  # DDP keeps replicas identical; print a fingerprint so that is easy to check
        dist_.barrier()  # after rank 0's epoch line; one write per line, so that lines of two ranks never mix
        print(f"rank {dist_.rank}: weights sha256 {common.weights_digest(student.state_dict())}\n", end="", flush=True)
    dist_.close()


def train(cfg, dist_, loader, steps_per_epoch, accum, teacher, student, optimizer, args, base_lr):
    """The training loop: one optimizer step per iteration of the outer loop, one micro-batch per iteration of
    the inner one; a checkpoint at every epoch's end, at the last step and when stopped."""
    dev = dist_.device
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = common.resume(ckpt_path, student, optimizer, dist_, "pretrain", model_args=args)
    step = ckpt["step"] if ckpt else 0
    epoch_sums = torch.tensor(ckpt["epoch_sums"] if ckpt else [0.0, 0.0], device=dev)  # [loss sum, count]
    net = dist_.wrap(student, cfg.compile)  # DDP (and torch.compile); `student` keeps the plain weights
    loss_fn = torch.compile(dtm_loss, fullgraph=True) if cfg.compile else dtm_loss
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    dist_.print(f"{len(loader.dataset)} images, {steps_per_epoch} steps per epoch of {cfg.batch_size} images = "
                f"{cfg.micro_batch_size} x {accum} micro-batches x {dist_.world_size} processes; peak lr {base_lr:.3g}")
    if step >= last_step:
        dist_.print(f"finished: nothing to train ({ckpt_path} is at step {step} of {last_step}; raise epochs or "
                    f"max_steps to train on)")
    metrics = plot.Metrics(cfg.out_dir, cfg, dist_.is_main, __file__)  # log.jsonl, and wandb / TensorBoard

    with common.StopOnSignal(ckpt_path, dist_) as stop:
        batches = None
        while step < last_step:
            if batches is None:  # an epoch starts (or resumes mid-way, without loading the batches it had)
                epoch, done = divmod(step, steps_per_epoch)
                batches = iter(data.epoch_batches(loader, epoch, cfg.seed, skip=done * accum))
                bar = common.progress(None, dist_, desc=f"epoch {epoch}", unit="step", total=steps_per_epoch,
                                      initial=done)
                sums, t0, seen = torch.zeros(2, device=dev), time.time(), 0
                student.train()
            lr = common.cosine_schedule(step, total_steps, warmup_steps, base_lr, cfg.min_lr)
            common.set_lr(optimizer, lr, common.cosine_schedule(step, total_steps, 0, cfg.weight_decay,
                                                                cfg.weight_decay_end))
            for micro in range(accum):
                images, masks, jitter = (x.to(dev, non_blocking=True) for x in next(batches))
                images = data.color_jitter(images, jitter)  # here, before the teacher and the student both see it
                common.seed_everything(common.seed_of(cfg.seed, dist_.rank, step, micro))  # drop path, schedules
                schedules = draw_schedules(cfg, dev)
                with dist_.no_sync(net, sync=micro == accum - 1), dist_.autocast():
                    loss = dtm_step_loss(net, teacher, images, masks, schedules, cfg.loss, cfg.beta, loss_fn)
                    (loss / accum).backward()
                sums += torch.stack([loss.detach().float(), torch.ones((), device=dev)])
                seen += len(images) * dist_.world_size
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
            stopping = stop.now(sync_point=log_step)
            epoch_done = step % steps_per_epoch == 0
            if not (epoch_done or step == last_step or stopping):
                continue

            # Checkpoint at the epoch's end, at the last step and when stopped; log complete epochs.
            bar.close()
            batches = None
            epoch_sums += sums
            mean = common.mean_loss(epoch_sums, dist_, step, cfg.out_dir)
            student.eval()
            with torch.no_grad(), dist_.autocast():  # the loss of the weights about to be saved
                check = dtm_step_loss(student, teacher, images, masks, schedules, cfg.loss, cfg.beta).item()
            common.save_state(ckpt_path, dist_, student, optimizer, step, check, stage="pretrain", config=vars(cfg),
                              model_args=args, code=metrics.code,
                              epoch_sums=[0.0, 0.0] if epoch_done else epoch_sums.tolist())
            if epoch_done or step == last_step:
                metrics.log({"epoch": epoch, "step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                             "images_per_s": seen / (time.time() - t0), "time": time.time()})
                dist_.print(f"epoch {epoch}: loss {mean:.4f}, step {step}/{total_steps}")
            if epoch_done:
                epoch_sums.zero_()
            if stopping:
                break
    metrics.close()  # and curves.png


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
