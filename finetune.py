"""Fine-tuning and linear probing of DTM checkpoints on an image classification set (ImageNet-1K).

    python finetune.py config/finetune_demo.py                                     # offline demo, CPU, minutes
    torchrun --nproc_per_node=8 finetune.py config/finetune_vitb_in1k.py --init_from=out/pretrain/ckpt.pt
    torchrun --nproc_per_node=8 finetune.py config/finetune_vitb_in1k.py --linear_probe --init_from=...
    python finetune.py --eval_only --init_from=out/finetune/best.pt --data_dir=/data/imagenet  # val/ only

Every setting below can be changed by a config file or --key=value (configurator.py). A run whose out_dir
already holds ckpt.pt resumes from it; best.pt keeps the weights of the epoch with the best val top-1.
eval_transfer.py runs `fit` on other datasets, with a cfg it builds with configurator.settings(finetune, ...).
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common
import data
import plot
from configurator import Range, at_least, configure
from demo_data import make_demo_dataset
from model import SIZES, VisionTransformer, load_backbone

# ------------------------------------------------------------------------------------------------- settings
# Defaults: BEiT v2's ViT-B/16 ImageNet-1K fine-tuning recipe for 300-epoch pre-training, which the DTM
# release follows (config/finetune_vitb_in1k.py repeats them and says where each comes from).
# I/O
out_dir = "out/finetune"
data_dir = "data/imagenet"  # ImageFolders <data_dir>/<train_split>/<class>/*.jpg and <data_dir>/<val_split>/...
train_split = "train"
val_split = "val"
demo_data = ""  # if set: generate the offline demo dataset in this folder first (data_dir should be it)
init_from = ""  # a checkpoint of this project (pre-training, fine-tuning, probe, segmentation); '' = random init
eval_only = False  # evaluate init_from (or out_dir/best.pt) on the val split, log it in out_dir/log.jsonl, exit
# model: must match init_from (a checkpoint of another size is refused)
model = "base"  # tiny, small, base, large
img_size = 224
patch_size = 16
depth = 0  # 0: the size's own depth
layer_scale = 0.0  # LayerScale init for random init; 0: the size's own. Loaded checkpoints bring their own.
abs_pos = False
drop_path = 0.1
init_scale = 0.001  # the new head's normal(0.02) weights are scaled by this (BEiT): std 2e-5
# augmentation (timm/BEiT names in brackets)
crop_scale = (0.08, 1.0)  # RandomResizedCrop scale
randaug_ops = 2  # RandAugment number of ops [rand-m9-n2]; 0: off
randaug_magnitude = 9
erase_prob = 0.25  # RandomErasing probability [reprob]
mixup = 0.8  # MixUp alpha; 0: off
cutmix = 1.0  # CutMix alpha; 0: off
mixup_switch_prob = 0.5  # probability of CutMix rather than MixUp when both are on
smoothing = 0.1  # label smoothing
crop_pct = 0.875  # eval: Resize(img_size / crop_pct), CenterCrop(img_size): 256 -> 224
# optimisation (fine-tuning)
epochs = 100
warmup_epochs = 20
batch_size = 1024  # total over all GPUs and accumulation steps
micro_batch_size = 128  # per GPU and forward pass; accumulation makes up the rest
lr = 5e-4  # learning rate at batch 1024; scaled linearly with batch_size
min_lr = 1e-6
weight_decay = 0.05
layer_decay = 0.65
betas = (0.9, 0.999)
eps = 1e-8
grad_clip = 0.0  # 0: off
# linear probing (MAE's protocol): frozen backbone, mean-pooled patch tokens of one block, BatchNorm, Linear
linear_probe = False
probe_block = -1  # which block's output to pool; -1: the last
probe_epochs = 90
probe_warmup_epochs = 10
probe_lr = 0.1  # learning rate at batch 256; scaled linearly with batch_size; SGD with momentum 0.9
probe_weight_decay = 0.0
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
RULES = {"model": tuple(SIZES), "crop_pct": Range(0.01, 1),
         **dict.fromkeys(("drop_path", "erase_prob", "mixup_switch_prob", "smoothing", "layer_decay"), Range(0, 1)),
         **dict.fromkeys(("img_size", "patch_size", "epochs", "batch_size", "micro_batch_size", "probe_epochs",
                          "log_interval"), at_least(1)),
         **dict.fromkeys(("depth", "layer_scale", "randaug_ops", "mixup", "cutmix", "warmup_epochs", "lr", "min_lr",
                          "weight_decay", "grad_clip", "probe_warmup_epochs", "probe_lr", "workers", "max_steps"),
                         at_least(0))}


# -------------------------------------------------------------------------------------------------- mixing
def make_targets(cfg, num_classes: int):
    """(images, int labels) -> (images, soft targets), a distribution per sample for F.cross_entropy: MixUp or
    CutMix per batch (if on), then label smoothing.
    Smoothing after mixing equals timm's smoothing before mixing: both give (1 - s) * mixed + s / K."""
    mixes = []
    if cfg.mixup > 0 and not cfg.linear_probe:
        mixes.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0 and not cfg.linear_probe:
        mixes.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    mix = v2.RandomChoice(mixes, p=[1 - cfg.mixup_switch_prob, cfg.mixup_switch_prob]) if len(mixes) == 2 else \
        mixes[0] if mixes else None
    smoothing = 0.0 if cfg.linear_probe else cfg.smoothing

    def apply(images, labels):
        if mix is not None:
            images, targets = mix(images, labels)
        else:
            targets = F.one_hot(labels, num_classes).float()
        return images, targets * (1 - smoothing) + smoothing / num_classes
    return apply


# -------------------------------------------------------------------------------------------------- models
class LinearProbe(nn.Module):
    """A frozen backbone; mean of one block's patch tokens -> BatchNorm without affine parameters -> Linear."""

    def __init__(self, backbone: VisionTransformer, block: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.block = block % len(backbone.blocks)
        self.bn = nn.BatchNorm1d(backbone.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's linear-probe head init
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no stochastic depth either
        return self

    def forward(self, x):
        with torch.no_grad():
            _, (tokens,) = self.backbone.forward_blocks(x, out_indices=(self.block,))
        return self.head(self.bn(tokens.mean(dim=1).float()))


def model_args(cfg, num_classes: int) -> dict:
    """VisionTransformer arguments: the classifier, or for linear probing the backbone (no head)."""
    size = dict(SIZES[cfg.model])
    if cfg.depth:
        size["depth"] = cfg.depth
    if cfg.layer_scale:
        size["layer_scale"] = cfg.layer_scale
    return dict(size, img_size=cfg.img_size, patch_size=cfg.patch_size, abs_pos=cfg.abs_pos,
                drop_path=0.0 if cfg.linear_probe else cfg.drop_path, shared_rel_pos=False, block_rel_pos=True,
                mask_token=False, out_dim=0, num_classes=0 if cfg.linear_probe else num_classes)


def build_model(args: dict, probe: dict | None, init_scale: float = 1.0) -> nn.Module:
    """The classifier (its new head's weights scaled by init_scale, as BEiT) or a linear probe."""
    net = VisionTransformer(**args)
    if probe:
        return LinearProbe(net, probe["block"], probe["num_classes"])
    init_head(net.head, init_scale)
    return net


@torch.no_grad()
def init_head(head: nn.Linear, init_scale: float):
    """The official classifier init (BEiT v2 / DTM modeling_finetune): timm's trunc_normal_(std=0.02), whose
    bounds a=-2, b=2 are absolute (100 std: in effect no cut, unlike pre-training's +-1 std), then both weight
    and bias scaled by init_scale: std 0.02 * init_scale (2e-5 for 0.001)."""
    nn.init.trunc_normal_(head.weight, std=0.02, a=-2.0, b=2.0)
    nn.init.zeros_(head.bias)
    head.weight.mul_(init_scale)


def init_model(net: nn.Module, path: str, log=print):
    """Load the ViT of any checkpoint (pre-training, fine-tuning, a linear probe's or a segmenter's backbone, an
    official or timm one) into the backbone: model.load_backbone drops the mask token and pre-training head,
    adds the shared position table to every block's own, resizes the tables, and refuses another model size or
    a checkpoint that would leave part of the backbone at random init."""
    ckpt = common.load_checkpoint(path)
    backbone = net.backbone if isinstance(net, LinearProbe) else net
    try:
        load_backbone(backbone, ckpt, log=log)
    except ValueError as e:
        raise SystemExit(f"init_from={path!r}: {e}") from None


def describe(net: nn.Module, args: dict) -> str:
    """What was built, in a line."""
    kind = "linear probe of" if isinstance(net, LinearProbe) else f"{args['num_classes']}-class"
    return (f"{kind} ViT of width {args['embed_dim']}, depth {args['depth']}, {args['num_heads']} heads, "
            f"{args['img_size']} px, patch {args['patch_size']}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
            f"parameters, {sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6:.2f}M trained")


# ------------------------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader, dist_: common.Dist) -> dict:
    """Top-1, top-5 (%) and mean cross entropy over the whole val set. Each rank counts its own shard (no
    padding duplicates, see data.data_loader) and the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=dist_.device)  # top-1 hits, top-5 hits, samples, loss
    for images, labels in common.progress(loader, dist_, desc="eval", unit="batch", leave=False):
        images, labels = images.to(dist_.device, non_blocking=True), labels.to(dist_.device, non_blocking=True)
        if images.dtype == torch.uint8:  # the workers' images (data.finetune_eval_transform): normalised here
            images = common.normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD)
        with dist_.autocast():
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=dist_.device),
                               F.cross_entropy(logits, labels, reduction="sum")]).double()
    dist_.all_reduce(counts)
    model.train(was_training)
    n = counts[2].item()
    return {"top1": 100 * counts[0].item() / max(n, 1), "top5": 100 * counts[1].item() / max(n, 1),
            "loss": counts[3].item() / max(n, 1), "samples": int(n)}


# ----------------------------------------------------------------------------------------------------- fit
def make_optimizer(cfg, net: nn.Module, device: torch.device):
    """(optimizer, base lr, final lr): SGD with momentum on the head for linear probing (MAE), AdamW with
    layer-wise lr decay for fine-tuning (BEiT). The lrs are scaled linearly with batch_size."""
    if cfg.linear_probe:
        base_lr = cfg.probe_lr * cfg.batch_size / 256
        optimizer = torch.optim.SGD(net.head.parameters(), lr=base_lr, momentum=0.9,
                                    weight_decay=cfg.probe_weight_decay)
        return optimizer, base_lr, 0.0
    base_lr = cfg.lr * cfg.batch_size / 1024
    groups = common.param_groups(net, cfg.weight_decay, cfg.layer_decay, len(net.blocks))
    return common.adamw(groups, base_lr, cfg.betas, cfg.eps, device), base_lr, cfg.min_lr


def fit(cfg, train_data, val_data, classes: list, dist_: common.Dist) -> dict:
    """Fine-tune (or linear-probe) on `train_data`, evaluating on `val_data` after every epoch; both yield
    (PIL image, int label). Checkpoints go to cfg.out_dir (ckpt.pt: last, best.pt: best val top-1; the caller
    holds its lock) and a run whose out_dir holds ckpt.pt resumes from it, evaluating first an epoch it
    finished but did not evaluate. One optimizer step per iteration of the outer loop, one micro-batch per
    iteration of the inner one. Returns the last evaluation, the best top-1 and the epochs evaluated (fewer
    than the schedule's when max_steps stops it early)."""
    dev = dist_.device
    accum = dist_.accumulation_steps(cfg.batch_size, cfg.micro_batch_size)

    # Data: each image's augmentation is drawn from (seed, epoch, index), whichever worker loads it.
    train_set = data.SeededSamples(data.Transformed(train_data, data.finetune_train_transform(cfg)), cfg.seed)
    loader = data.data_loader(train_set, cfg.micro_batch_size, dist_, train=True, workers=cfg.workers, seed=cfg.seed)
    val_set = data.Transformed(val_data, data.finetune_eval_transform(cfg.img_size, cfg.crop_pct))
    val_loader = data.data_loader(val_set, cfg.micro_batch_size, dist_, train=False, workers=cfg.workers)
    steps_per_epoch = len(loader) // accum  # an incomplete accumulation at an epoch's end is dropped
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    targets_of = make_targets(cfg, len(classes))

    # Model and optimizer (the new head's init is the same on every rank and in every rerun).
    common.seed_everything(cfg.seed)
    args = model_args(cfg, len(classes))
    probe = {"block": cfg.probe_block, "num_classes": len(classes)} if cfg.linear_probe else None
    net = build_model(args, probe, cfg.init_scale).to(dev)  # before the optimizer: states go beside weights
    optimizer, base_lr, final_lr = make_optimizer(cfg, net, dev)

    # Resume from out_dir, or initialise from init_from.
    ckpt = common.resume(os.path.join(cfg.out_dir, "ckpt.pt"), net, optimizer, dist_, "finetune", model_args=args,
                         probe=probe)
    if ckpt is None and cfg.init_from:
        init_model(net, cfg.init_from, log=dist_.print)
    dist_.print(f"model: {describe(net, args)}, " + ("resumed" if ckpt else f"from {cfg.init_from}" if cfg.init_from
                else "from random initialisation") + f"; {steps_per_epoch} steps per epoch of {cfg.batch_size} = "
                f"{cfg.micro_batch_size} x {accum} micro-batches x {dist_.world_size} processes; peak lr {base_lr:.3g}")
    extra = dict(config=vars(cfg).copy(), model_args=args, probe=probe, classes=list(classes), stage="finetune")
    epochs, warmup_epochs = (cfg.probe_epochs, cfg.probe_warmup_epochs) if cfg.linear_probe else \
        (cfg.epochs, cfg.warmup_epochs)
    total_steps = epochs * steps_per_epoch
    lr_at = lambda step: common.cosine_schedule(step, total_steps, warmup_epochs * steps_per_epoch, base_lr, final_lr)
    return train(cfg, dist_, net, optimizer, loader, val_loader, targets_of, ckpt, extra, steps_per_epoch, accum,
                 total_steps, lr_at)


def train(cfg, dist_, net, optimizer, loader, val_loader, targets_of, ckpt, extra: dict, steps_per_epoch: int,
          accum: int, total_steps: int, lr_at) -> dict:
    """fit's loop: one optimizer step per iteration of the outer loop, one micro-batch per iteration of the inner
    one; an evaluation between epochs (with checkpoints), a checkpoint at each epoch's end and when stopped."""
    dev = dist_.device
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    step = ckpt["step"] if ckpt else 0
    keep = ("best_top1", "metrics", "evaluated", "train_loss", "images_per_s", "epoch_sums")
    state = {k: ckpt[k] for k in keep} if ckpt else {"best_top1": -1.0, "metrics": {}, "evaluated": 0,
                                                    "train_loss": None, "images_per_s": None, "epoch_sums": [0, 0]}
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if step >= last_step and state["evaluated"] >= step // steps_per_epoch:  # no step and no evaluation left
        dist_.print(f"finished: nothing to train ({ckpt_path} is at step {step} of {last_step}, evaluated; raise "
                    f"epochs or max_steps to train on)")
    log = plot.Metrics(cfg.out_dir, cfg, dist_.is_main, __file__)  # log.jsonl, and wandb / TensorBoard if asked
    extra["code"] = log.code
    model = dist_.wrap(net, cfg.compile)
    trainable = [p for p in net.parameters() if p.requires_grad]

    with common.StopOnSignal(ckpt_path, dist_) as stop:
        batches = None
        while True:
            if batches is None:  # between epochs: evaluate the one just finished (perhaps in an earlier run)
                epoch, done = divmod(step, steps_per_epoch)
                if state["evaluated"] < epoch:
                    metrics = evaluate(net, val_loader, dist_)
                    improved = metrics["top1"] > state["best_top1"]
                    state.update(metrics=metrics, best_top1=max(state["best_top1"], metrics["top1"]), evaluated=epoch)
                    common.save_state(ckpt_path, dist_, net, optimizer, step, metrics["loss"], epoch=epoch, **extra,
                                      **state)
                    if improved:  # best.pt: the weights alone (no optimizer: a run resumes from ckpt.pt)
                        common.save_state(best_path, dist_, net, None, step, metrics["loss"], epoch=epoch, **extra,
                                          **state)
                    log.log({"epoch": epoch - 1, "step": step, "train_loss": state["train_loss"],
                             "lr": optimizer.param_groups[-1]["lr"], "val_top1": metrics["top1"],
                             "val_top5": metrics["top5"], "val_loss": metrics["loss"], "best_top1": state["best_top1"],
                             "images_per_s": state["images_per_s"], "time": time.time()})
                    dist_.print(f"epoch {epoch - 1}: train loss {state['train_loss']:.4f}, val top-1 "
                                f"{metrics['top1']:.2f}, top-5 {metrics['top5']:.2f} (best {state['best_top1']:.2f}), "
                                f"step {step}/{total_steps}")
                if step >= last_step or stop.now():  # also a stop asked for while evaluating
                    break
                batches = iter(data.epoch_batches(loader, epoch, cfg.seed, skip=done * accum))
                bar = common.progress(None, dist_, desc=f"epoch {epoch}", unit="step", total=steps_per_epoch,
                                      initial=done)
                net.train()
                sums, t0, seen = torch.zeros(2, device=dev), time.time(), 0
                epoch_sums = torch.tensor(state["epoch_sums"], dtype=torch.float32, device=dev)
            lr = lr_at(step)
            common.set_lr(optimizer, lr)
            for micro in range(accum):
                (images, boxes), labels = next(batches)  # uint8 images and their erase boxes (data.EraseBox)
                images = common.normalize(images.to(dev, non_blocking=True), common.IMAGENET_MEAN, common.IMAGENET_STD)
                labels = labels.to(dev, non_blocking=True)
                common.seed_everything(common.seed_of(cfg.seed, dist_.rank, step, micro))  # erasing, MixUp, drop path
                images = data.erase(images, boxes)  # random erasing, moved from the worker: after normalisation
                images, targets = targets_of(images, labels)  # MixUp/CutMix per micro-batch, then label smoothing
                with dist_.no_sync(model, sync=micro == accum - 1), dist_.autocast():
                    loss = F.cross_entropy(model(images).float(), targets)
                    (loss / accum).backward()
                sums += torch.stack([loss.detach().float(), torch.ones((), device=dev)])
                seen += len(images) * dist_.world_size
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
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
            epoch_done = step % steps_per_epoch == 0
            if not (epoch_done or step == last_step or stop.now(sync_point=log_step)):
                continue

            # Checkpoint at the epoch's end (evaluated next), at the last step and when stopped.
            bar.close()
            batches = None
            epoch_sums += sums
            state.update(train_loss=common.mean_loss(epoch_sums, dist_, step, cfg.out_dir), images_per_s=seen /
                         (time.time() - t0), epoch_sums=[0, 0] if epoch_done else epoch_sums.tolist())
            net.eval()
            with torch.no_grad(), dist_.autocast():  # the loss of the weights about to be saved
                check = F.cross_entropy(net(images).float(), targets).item()
            common.save_state(ckpt_path, dist_, net, optimizer, step, check, epoch=step // steps_per_epoch, **extra,
                              **state)
    log.close()  # and curves.png
    return dict(state["metrics"], best_top1=state["best_top1"], epochs=state["evaluated"])  # epochs evaluated


def evaluate_checkpoint(cfg, val_data, classes: list, dist_: common.Dist) -> dict:
    """eval_only: the checkpoint's own model (classifier or linear probe) on the val set, logged (with the
    checkpoint's path) in out_dir/log.jsonl as segment.py's eval_only does."""
    path = cfg.init_from or os.path.join(cfg.out_dir, "best.pt")
    ckpt = common.load_checkpoint(path)
    if "classes" not in ckpt:
        raise SystemExit(f"{path!r} is not a fine-tuned checkpoint (it has no classification head to evaluate); "
                         f"fine-tune it first")
    if list(ckpt["classes"]) != list(classes):
        raise SystemExit(f"{path!r} was trained on {len(ckpt['classes'])} classes that differ from the "
                         f"{len(classes)} classes of the val set")
    net = build_model(ckpt["model_args"], ckpt.get("probe"))
    net.load_state_dict(ckpt["model"])
    val_set = data.Transformed(val_data, data.finetune_eval_transform(ckpt["model_args"]["img_size"], cfg.crop_pct))
    loader = data.data_loader(val_set, cfg.micro_batch_size, dist_, train=False, workers=cfg.workers)
    metrics = evaluate(net.to(dist_.device), loader, dist_)
    dist_.print(f"{path}: top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}, loss {metrics['loss']:.4f} "
                f"on {metrics['samples']} images")
    if dist_.is_main:
        common.log_json(os.path.join(cfg.out_dir, "log.jsonl"), {"eval_only": path, **metrics, "time": time.time()})
    return metrics


# ----------------------------------------------------------------------------------------------------- main
def main(cfg):
    if cfg.init_from and not os.path.isfile(cfg.init_from):
        raise SystemExit(f"init_from={cfg.init_from!r} does not exist (a checkpoint of pretrain.py or finetune.py; "
                         f"'' trains from random initialisation)")
    if not cfg.demo_data:
        data.check_image_folders(cfg.data_dir, cfg.train_split, cfg.val_split)  # a typo leaves no out_dir behind
    dist_ = common.Dist(cfg.device)
    try:
        with common.OutDirLock(cfg.out_dir, dist_.is_main):  # writable, and this run's alone
            if cfg.demo_data and dist_.is_main:
                make_demo_dataset(cfg.demo_data, size=cfg.img_size, seed=cfg.seed)
            dist_.barrier()
            train_data, val_data, classes = data.image_folders(cfg.data_dir, cfg.train_split, cfg.val_split,
                                                               cfg.eval_only)
            if cfg.eval_only:
                evaluate_checkpoint(cfg, val_data, classes, dist_)
                return
            dist_.print(f"{len(train_data)} training and {len(val_data)} val images, {len(classes)} classes")
            fit(cfg, train_data, val_data, classes, dist_)
    finally:
        dist_.close()


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
