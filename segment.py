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

import torch
import torch.nn.functional as F

import common
import data
import plot
from configurator import Range, at_least, configure
from data import IGNORE
from demo_data import make_demo_dataset
from model import SIZES, UperNetSegmenter, VisionTransformer, checkpoint_model_args, default_out_indices, \
    load_backbone

# ------------------------------------------------------------------------------------------------- settings
# I/O
out_dir = "out/segment"
data_dir = "data/ade20k/ADEChallengeData2016"  # holds images/{training,validation}, annotations/{...}
demo_data = ""  # if set: generate the offline demo dataset here first (data_dir: <it>/ADEChallengeData2016)
init_from = ""  # a checkpoint of this project (pre-training, fine-tuning, probe, segmentation); '' = random init
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

WARMUP_RATIO = 1e-6  # mmcv's linear warmup starts at this fraction of the lr


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
        dist_.print(f"segmenter: {describe(args, head_args)}, loaded from {cfg.init_from} (iteration "
                    f"{ckpt.get('step')})")
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
    source = f"backbone from {cfg.init_from} (its architecture: the settings model and depth are for random init)" \
        if ckpt is not None else "random backbone"
    dist_.print(f"segmenter: {describe(args, head_args)}, {source}")
    return net, args, head_args


def describe(args: dict, head_args: dict) -> str:
    """What was built, in a line."""
    return (f"ViT of width {args['embed_dim']}, depth {args['depth']}, patch {args['patch_size']}, "
            f"{args['img_size']}-px crops, blocks {head_args['out_indices']} into UperNet ({head_args['channels']} channels, "
            f"{head_args['num_classes']} classes)")


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


def evaluate(net, dataset: data.ADE20K, dist_: common.Dist, n_classes: int, crop_size: int, stride: int,
             workers: int = 0, autocast: bool = False, stop: common.StopOnSignal | None = None) -> dict | None:
    """Each rank scores its share of the images (every image exactly once); counts are summed over ranks.
    In fp32 unless `autocast` (BEiT v2 evaluates in fp32: bf16 would round the position bias and the logits).
    A stop asked for meanwhile (`stop`) ends it early: None, and the evaluation is run again on resume."""
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=range(dist_.rank, len(dataset), dist_.world_size),
                                         num_workers=workers)
    stats = torch.zeros(4, n_classes, dtype=torch.int64, device=dist_.device)
    every_rank_has = len(dataset) // dist_.world_size  # images each rank scores: where all ranks can agree to stop
    for i, (image, label) in enumerate(common.progress(loader, dist_, desc="eval", unit="img", leave=False)):
        if stop is not None and i < every_rank_has and stop.now():
            return None
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


def format_table(result: dict, names: list[str]) -> str:
    rows = [f"{'class':<22} {'IoU':>7} {'Acc':>7}"]
    for name, iou, acc in zip(names, result["IoU"], result["Acc"]):
        rows.append(f"{name:<22} {iou:7.2f} {acc:7.2f}")
    rows.append(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}")
    return "\n".join(rows)


def final_report(result: dict, best_miou: float, names: list[str], out_dir: str, dist_: common.Dist,
                 metrics: plot.Metrics) -> dict:
    """The result is the last evaluation (the weights in ckpt.pt), as BEiT v2 reports it. The best mIoU over all
    evaluations (best.pt) is extra information only: a maximum over noisy evaluations is biased upwards."""
    if dist_.is_main:
        print(format_table(result, names), flush=True)
        print(f"result (final evaluation, {out_dir}/ckpt.pt): mIoU {result['mIoU']:.2f}; best over the evaluations "
              f"{best_miou:.2f} ({out_dir}/best.pt, extra information, biased upwards)", flush=True)
    metrics.log({"final_mIoU": result["mIoU"], "final_mAcc": result["mAcc"], "final_aAcc": result["aAcc"],
                 "best_mIoU": best_miou, "time": time.time()})
    return {**result, "best_mIoU": best_miou}


# ----------------------------------------------------------------------------------------------------- main
def check_settings(cfg, dist_: common.Dist, sync_bn: bool):
    """Settings that cannot work together, refused before any work, each naming the fix."""
    if cfg.init_from and not os.path.isfile(cfg.init_from):
        raise SystemExit(f"init_from={cfg.init_from!r} does not exist (a checkpoint of pretrain.py, finetune.py or "
                         f"segment.py; '' starts from a random backbone)")
    if not cfg.demo_data:
        ade20k_root(cfg.data_dir)  # a wrong data_dir is refused before out_dir is made
    if cfg.eval_only:
        return
    if cfg.micro_batch_size < 2 and not sync_bn:
        raise SystemExit("micro_batch_size=1 without SyncBatchNorm: BatchNorm needs 2 images (use 2 or more)")
    check_batchnorm_batch(cfg.batch_size, cfg.micro_batch_size, dist_.world_size, sync_bn, cfg.micro_batch_bn)


def ade20k_root(data_dir: str) -> str:
    try:
        return data.find_root(data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"data error: {e}") from None


def evaluate_only(cfg, segmenter, val_set, dist_: common.Dist, source: str) -> dict:
    """eval_only: score the loaded segmenter, print the per-class table, log it in out_dir/log.jsonl."""
    result = evaluate(segmenter, val_set, dist_, cfg.num_classes, cfg.crop_size, cfg.eval_stride, cfg.workers,
                      cfg.eval_autocast)
    dist_.print(format_table(result, val_set.classes))
    if dist_.is_main:
        common.log_json(os.path.join(cfg.out_dir, "log.jsonl"), {"eval_only": source, **result})
    return result


def main(cfg):
    dist_ = common.Dist(cfg.device)
    sync_bn = dist_.world_size > 1 and dist_.device.type == "cuda"  # SyncBatchNorm runs on GPUs only
    check_settings(cfg, dist_, sync_bn)
    accum = dist_.accumulation_steps(cfg.batch_size, cfg.micro_batch_size)
    try:
        with common.OutDirLock(cfg.out_dir, dist_.is_main):  # writable, and this run's alone
            if cfg.demo_data and dist_.is_main:
                make_demo_dataset(cfg.demo_data, seed=cfg.seed)
            dist_.barrier()
            root = ade20k_root(cfg.data_dir)
            try:
                val_set = data.ADE20K(root, "validation", cfg.num_classes, data.segment_eval_transform(cfg.scale))
                train_set = None if cfg.eval_only else data.ADE20K(root, "training", cfg.num_classes,
                    data.segment_train_transform(cfg.crop_size, cfg.scale, cfg.ratio_range, cfg.cat_max_ratio))
            except FileNotFoundError as e:
                raise SystemExit(f"data error: {e}") from e

            # Model: a resumed run's own checkpoint wins over init_from (the same random init on every rank).
            common.seed_everything(cfg.seed)
            ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
            own = common.load_checkpoint(ckpt_path, "segment") if os.path.isfile(ckpt_path) and not (
                cfg.eval_only and cfg.init_from) else None
            segmenter, backbone_args, head_args = build_segmenter(cfg, dist_) if own is None else \
                build_from(cfg, own, ckpt_path)
            segmenter = segmenter.to(dist_.device)
            if cfg.eval_only:
                if own is not None:
                    segmenter.load_state_dict(own["model"])
                return evaluate_only(cfg, segmenter, val_set, dist_, cfg.init_from or ckpt_path)
            if sync_bn:
                segmenter = torch.nn.SyncBatchNorm.convert_sync_batchnorm(segmenter)
            groups = common.param_groups(segmenter, cfg.weight_decay, cfg.layer_decay, len(segmenter.backbone.blocks))
            optimizer = common.adamw(groups, cfg.lr, cfg.betas, cfg.eps, dist_.device)
            loader = data.data_loader(data.SeededSamples(train_set, cfg.seed), cfg.micro_batch_size, dist_, train=True,
                                      workers=cfg.workers, seed=cfg.seed)
            steps_per_epoch = len(loader) // accum  # an incomplete accumulation at an epoch's end is dropped
            if steps_per_epoch == 0:
                raise SystemExit(f"{root} has {len(train_set)} training images, fewer than one batch of "
                                 f"{cfg.batch_size}")
            return train(cfg, dist_, loader, steps_per_epoch, accum, segmenter, optimizer, val_set,
                         dict(backbone_args=backbone_args, head_args=head_args), own is not None)
    finally:
        dist_.close()


def train(cfg, dist_, loader, steps_per_epoch, accum, segmenter, optimizer, val_set, shape: dict, resuming: bool):
    """The training loop: one optimizer step (iteration) per iteration of the outer loop, one micro-batch per
    iteration of the inner one; evaluations every eval_interval iterations and at the end (each after a
    checkpoint), checkpoints every ckpt_interval iterations and when stopped."""
    dev = dist_.device
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    ckpt = common.resume(ckpt_path, segmenter, optimizer, dist_, "segment", unit="iteration", **shape) \
        if resuming else None
    step = ckpt["step"] if ckpt else 0
    state = {k: ckpt[k] for k in ("best_miou", "evaluated", "result")} if ckpt else \
        {"best_miou": -1.0, "evaluated": 0, "result": None}
    last_step = min(cfg.iters, cfg.max_iters) if cfg.max_iters else cfg.iters
    net = dist_.wrap(segmenter, cfg.compile)
    metrics = plot.Metrics(cfg.out_dir, cfg, dist_.is_main, __file__)  # log.jsonl, and wandb / TensorBoard
    extra = dict(config=vars(cfg), **shape, stage="segment", code=metrics.code)
    evaluation_due = lambda: state["evaluated"] < step and (step % cfg.eval_interval == 0 or step == cfg.iters)
    if step >= last_step and not evaluation_due():
        dist_.print(f"finished: nothing to train ({ckpt_path} is at iteration {step} of {last_step}, evaluated; "
                    f"raise iters or max_iters to train on)")
    dist_.print(f"{len(loader.dataset)} training images, batch {cfg.batch_size} = {cfg.micro_batch_size} x {accum} "
                f"micro-batches x {dist_.world_size} processes; {steps_per_epoch} iterations per epoch")
    sums, aux_sum, t0 = torch.zeros(2, device=dev), torch.zeros((), device=dev), time.time()
    check = 0.0  # the loss of the weights in hand: those of a saved checkpoint were checked when it was saved
    bar = common.progress(None, dist_, desc="iter", unit="it", total=last_step, initial=step)  # all iterations

    with common.StopOnSignal(ckpt_path, dist_) as stop:
        batches = None
        while True:
            if batches is None:  # at the start, and after an epoch, an evaluation or a stop
                if evaluation_due():
                    result = evaluate(segmenter, val_set, dist_, cfg.num_classes, cfg.crop_size, cfg.eval_stride,
                                      cfg.workers, cfg.eval_autocast, stop)
                    if result is None:  # stopped: ckpt.pt (saved before) is at this iteration, not yet evaluated
                        break
                    dist_.print(f"iteration {step}: mIoU {result['mIoU']:.2f}, mAcc {result['mAcc']:.2f}, "
                                f"aAcc {result['aAcc']:.2f}")
                    metrics.log({"iter": step, **result, "time": time.time()})
                    if result["mIoU"] > state["best_miou"]:  # best.pt: the weights alone (runs resume from ckpt.pt)
                        common.save_state(best_path, dist_, segmenter, None, step, check, mIoU=result["mIoU"], **extra)
                    state.update(best_miou=max(state["best_miou"], result["mIoU"]), evaluated=step, result=result)
                    common.save_state(ckpt_path, dist_, segmenter, optimizer, step, check, **extra, **state)
                if step >= last_step or stop.now():  # also a stop asked for while evaluating
                    break
                epoch, done = divmod(step, steps_per_epoch)
                batches = iter(data.epoch_batches(loader, epoch, cfg.seed, skip=done * accum))
                segmenter.train()
            common.set_lr(optimizer, poly_lr(step, cfg.iters, cfg.warmup_iters, cfg.lr, cfg.power, cfg.min_lr))
            for micro in range(accum):
                images, labels = (x.to(dev, non_blocking=True) for x in next(batches))
                common.seed_everything(common.seed_of(cfg.seed, dist_.rank, step, micro))  # dropout, drop path
                with dist_.no_sync(net, sync=micro == accum - 1), dist_.autocast():
                    logits, aux_logits = net(images, with_aux=True)
                    loss, _, aux = seg_loss(logits, aux_logits, labels, cfg.aux_weight)
                    (loss / accum).backward()
                sums += torch.stack([loss.detach().float(), torch.ones((), device=dev)])
                aux_sum += aux.detach()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(segmenter.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            log_step = step % cfg.log_interval == 0 or step == last_step
            if log_step:  # a GPU sync: only every log_interval steps
                mean, count = common.mean_loss(sums, dist_, step, cfg.out_dir), sums[1].item()
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
                metrics.log({"iter": step, "loss": mean, "aux_loss": aux_sum.item() / count,
                             "lr": optimizer.param_groups[-1]["lr"], "time": time.time(),
                             "images_per_s": count * cfg.micro_batch_size * dist_.world_size / (time.time() - t0),
                             **({"max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
                                if dev.type == "cuda" else {})})
                sums, aux_sum, t0 = torch.zeros_like(sums), torch.zeros_like(aux_sum), time.time()
            stopping = stop.now(sync_point=log_step)
            if step % cfg.ckpt_interval == 0 or evaluation_due() or step == last_step or stopping:
                segmenter.eval()  # checkpoint every ckpt_interval iterations, before each evaluation, at the end
                with torch.no_grad(), dist_.autocast():  # the loss of the weights about to be saved
                    check = seg_loss(*segmenter(images, with_aux=True), labels, cfg.aux_weight)[0].item()
                segmenter.train()
                common.save_state(ckpt_path, dist_, segmenter, optimizer, step, check, **extra, **state)
            if evaluation_due() or step == last_step or stopping or step % steps_per_epoch == 0:
                batches = None
    bar.close()
    report = None if state["result"] is None else final_report(
        state["result"], state["best_miou"], val_set.classes, cfg.out_dir, dist_, metrics)
    metrics.close()  # and curves.png
    return report


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
