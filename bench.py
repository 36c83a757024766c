"""Benchmark what DTM costs (in the spirit of nanoGPT's bench.py). Every figure comes from this one run:

1. the pre-training step of pretrain.py (teacher forward, student forward and backward, loss, AdamW step)
   with the DTM loss and with the token-wise baseline (dtm=False), interleaved step by step: ms per step,
   images per second, peak memory, FLOPs (counted analytically) and, on GPU, the model FLOPs utilisation;
   the DTM overhead is the median of the ratios of back-to-back pairs of steps;
2. dtm_loss forward and backward against the dense formulation of the official release (N'xN source
   matrices tracked over the rounds, morphing with two matmuls), worst case n = 196, k = 14, and the aten ops
   (and on GPU the kernels) one call of each dispatches; with --compile
   also torch.compile(dtm_loss, fullgraph=True): its compile time, its graphs, and that new schedules add none;
3. our ViT's forward and backward against timm's BEiT of identical size (when timm is importable);
4. (--parts=data, not run by default) the data pipelines on JPEGs it writes (ImageNet-sized, and ADE20K-sized
   image and label pairs): CPU-ms per sample of the pre-training worker, of the pipeline it replaced ("before")
   and of the official PIL one, of fine-tuning's and segmentation's training pipelines; the device-side colour
   jitter per sample; a DataLoader's images/s with 1, 2 and all workers; the cores per GPU each pipeline needs.

    python bench.py --threads=2                                         # ViT-S/16 student, ViT-B/16 teacher, 224 px, batch 16
    python bench.py --model=base --batch_size=128 --compile --device=cuda   # the GPU figures (bf16 autocast)
    python bench.py --parts=data --threads=1                            # the data pipelines (CPU-ms, loaders)

The teacher is a randomly initialised open_clip model (timing only: no download, same cost as trained).
"""
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

import common
import data
from configurator import at_least, configure, settings
from model import SIZES, VisionTransformer, vit
from morph import at_least_fp32, dtm_loss, sample_schedule, schedule_tensor
from teacher import build_teacher

# ------------------------------------------------------------------------------------------------- settings
parts = "step,loss,vit"  # which benchmarks to run, comma-separated; also "data" (the data pipelines: see above)
# the pre-training step (names as in pretrain.py)
model = "small"
depth = 0  # 0: the size's own depth
img_size = 224
patch_size = 16
batch_size = 16
teacher = "ViT-B-16-quickgelu"  # open_clip model name, randomly initialised
teacher_overrides = {}
num_masked = 75
min_block = 16
num_schedules = 2
n_max = 196
k_max = 14
loss = "smooth_l1"
beta = 2.0
lr = 1e-4
weight_decay = 0.05
grad_clip = 3.0
# the dtm_loss micro-benchmark: the worst case of the official ViT-B/16 settings
loss_batch = 64
loss_tokens = 196
loss_dim = 512
loss_n = 196  # tokens merged away per schedule
loss_k = 14  # rounds per schedule
# the data pipelines (--parts=data)
data_images = 60  # JPEGs written to a temp folder for the CPU figures: ImageNet-sized ones, and as many ADE20K pairs
data_passes = 5  # CPU-ms per sample: the fastest of this many passes over the images
loader_batch = 64  # the DataLoader's batch for the images/s figures
loader_batches = 5  # batches timed per number of workers (after the first one, which starts the workers)
gpu_images_per_s = 1343.0  # images/s one GPU pre-trains (the last H100 figure): the cores per GPU a pipeline needs
# system
device = "auto"
compile = False
threads = 0  # torch.set_num_threads; 0: torch's default
warmup = 2  # untimed iterations per variant (compilation happens here)
iters = 5  # timed iterations per variant
peak_flops = 989e12  # the device's peak for MFU: H100 SXM bf16 dense; GPU only
seed = 0
# values configure() refuses beyond a wrong type: each setting's choices or range
RULES = {"model": tuple(SIZES), "loss": ("smooth_l1", "l2", "cosine"), "gpu_images_per_s": at_least(0),
         **dict.fromkeys(("img_size", "patch_size", "batch_size", "min_block", "loss_batch", "loss_tokens", "loss_dim",
                          "iters", "data_images", "data_passes", "loader_batch", "loader_batches"), at_least(1)),
         **dict.fromkeys(("depth", "num_masked", "num_schedules", "n_max", "k_max", "loss_n", "loss_k", "threads",
                          "warmup", "lr"), at_least(0))}


# ------------------------------------------------------------------------------ the dense formulation
def _merge_rows(v, unmerged, merged, partner, reduce):
    """One round of the official release's merge (ToMe) on v [B, t, C]: merged A rows reduced into their B
    partners; the result is the unmerged A rows, then the B rows."""
    C = v.shape[-1]
    a, b = v[:, ::2], v[:, 1::2]
    kept = a.gather(1, unmerged[..., None].expand(-1, -1, C))
    moved = a.gather(1, merged[..., None].expand(-1, -1, C))
    b = b.scatter_reduce(1, partner[..., None].expand(-1, -1, C), moved, reduce=reduce)
    return torch.cat([kept, b], dim=1)


@torch.no_grad()
def dense_sources(target: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    """The 0/1 source matrices [B, N', N] of the official release: row j marks the tokens merged into token j.

    Rounds follow morph.py's semantics (no protected class token; unmerged A tokens keep their order), as
    the official code does with ToMe's bipartite_soft_matching, merge_wavg and merge_source: the matching
    metric is the running size-weighted mean of the merged tokens."""
    B, N, _ = target.shape
    x = target.detach().to(at_least_fp32(target))
    size = x.new_ones(B, N, 1)
    source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
    for r in schedule:
        t = x.shape[1]
        r = min(r, t // 2)
        if r <= 0:
            continue
        metric = F.normalize(x, dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
        dst = partner.gather(1, merged)
        x = _merge_rows(x * size, unmerged, merged, dst, "sum")
        size = _merge_rows(size, unmerged, merged, dst, "sum")
        x = x / size
        source = _merge_rows(source, unmerged, merged, dst, "amax")
    return source


def dense_morph(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Morph x [B, N, C] with two matmuls: group means S x / |S|, then back to the tokens with S^T.
    (The official code adds 1e-6 to |S|; left out here, so the result equals morph.py's exactly.)"""
    return source.transpose(1, 2) @ ((source @ x) / source.sum(dim=-1, keepdim=True))


def dense_dtm_loss(pred, target, schedules, loss="smooth_l1", beta=2.0):
    """dtm_loss as the official release computes it: one source matrix and two matmuls per schedule."""
    pred = pred.to(at_least_fp32(pred))
    target = target.detach().to(pred.dtype)
    total = 0.0
    for schedule in schedules or [[]]:
        source = dense_sources(target, schedule).to(pred.dtype)
        p, t = dense_morph(pred, source), dense_morph(target, source)
        if loss == "smooth_l1":  # written out, as the official smooth_l1_loss
            diff = (p - t).abs()
            total = total + torch.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean()
        elif loss == "l2":
            total = total + ((p - t) ** 2).mean()
        elif loss == "cosine":
            total = total + (1 - F.cosine_similarity(p, t, dim=-1)).mean()
        else:
            raise ValueError(f"loss={loss!r}")
    return total / max(1, len(schedules))


# --------------------------------------------------------------------------------------------- helpers
def vit_flops(tokens: int, width: int, depth: int, hidden: int, patch_in: int, out_dim: int) -> int:
    """Forward FLOPs of a ViT on one image (2 per multiply-add): per block the qkv, projection and MLP
    matmuls and the two attention matmuls; the patch embedding; a head on the patch tokens."""
    per_block = 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width
    return depth * per_block + 2 * (tokens - 1) * width * (patch_in + out_dim)


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(cfg, fns: dict, dev: torch.device) -> dict:
    """Run each function warmup + iters times, interleaved (the order alternates every round, so drift
    and neighbours' load hit every variant alike); return each one's timed durations in ms."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(cfg.warmup + cfg.iters):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(dev)
            t0 = time.perf_counter()
            fns[name]()
            sync(dev)
            if i >= cfg.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def dispatches(fn, dev: torch.device) -> tuple:
    """Operators dispatched by one call of fn (aten ops called from Python, not those they call in turn) and,
    on GPU, the kernels (and copies) the GPU ran: how much of a call is the host's work."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own log lines ('gpuGetDeviceCount failed' on CPU)
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(dev)
    events = prof.events()
    ops = sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
              for e in events)
    kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return ops, kernels if dev.type == "cuda" else None


def fmt(ms: list) -> str:
    return f"{statistics.median(ms):9.1f} ms (min {min(ms):.1f}, {len(ms)} runs)"


def memory(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
    return f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def amp(dev: torch.device):
    """bf16 autocast on GPU, fp32 on CPU, as in pretrain.py."""
    return common.Dist(str(dev)).autocast()


# ------------------------------------------------------------------------------------------- benchmarks
def time_loss_alone(cfg, loss_fn, pred, targets, draws, token_wise, dev) -> dict:
    """Forward + backward times of the loss alone, DTM (the drawn schedules in turn) and token-wise interleaved."""
    pred = pred.requires_grad_(True)
    calls = {"dtm": 0}

    def loss_only(schedules):
        with amp(dev):
            value = loss_fn(pred, targets, schedules, cfg.loss, cfg.beta)
        value.backward()
        pred.grad = None

    def dtm_loss_only():
        loss_only(draws[calls["dtm"] % len(draws)])
        calls["dtm"] += 1
    return time_interleaved(cfg, {"DTM": dtm_loss_only, "token-wise": lambda: loss_only(token_wise)}, dev)


def step_flops(teacher_net, student, patches: int, patch_size: int) -> int:
    """Analytic FLOPs of one image's step: teacher forward, student forward and backward (3x forward)."""
    visual = teacher_net.visual
    t_width, t_patch = visual.conv1.weight.shape[0], visual.conv1.weight.shape[-1]
    t_flops = vit_flops(patches + 1, t_width, len(visual.transformer.resblocks),
                        visual.transformer.resblocks[0].mlp.c_fc.out_features, 3 * t_patch ** 2,
                        teacher_net.out_dim)
    s_flops = vit_flops(patches + 1, student.embed_dim, len(student.blocks),
                        student.blocks[0].mlp.fc1.out_features, 3 * patch_size ** 2, teacher_net.out_dim)
    return t_flops + 3 * s_flops


def step_inputs(cfg, dev: torch.device):
    """Random uint8 images, their block masks and the DTM schedules of every timed step, all from `seed`."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(dev)
    random.seed(cfg.seed)
    masking = data.BlockMasking(cfg.img_size // cfg.patch_size, cfg.num_masked, cfg.min_block)
    masks = torch.stack([masking() for _ in range(cfg.batch_size)]).to(dev)
    rng = random.Random(cfg.seed)
    draws = [schedule_tensor([sample_schedule(cfg.n_max, cfg.k_max, rng) for _ in range(cfg.num_schedules)], dev)
             for _ in range(cfg.warmup + cfg.iters)]
    return images, masks, draws


def bench_step(cfg, dev: torch.device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the banner for a random teacher: expected here
        teacher_net = build_teacher(cfg.teacher, "", cfg.teacher_overrides, dev)
    student = vit(cfg.model, **({"depth": cfg.depth} if cfg.depth else {}), img_size=cfg.img_size,
                  patch_size=cfg.patch_size, mask_token=True, out_dim=teacher_net.out_dim).to(dev)
    optimizer = common.adamw(common.param_groups(student, cfg.weight_decay), cfg.lr, (0.9, 0.98), 1e-8, dev)
    net = torch.compile(student) if cfg.compile else student
    loss_fn = torch.compile(dtm_loss, fullgraph=True) if cfg.compile else dtm_loss

    images, masks, draws = step_inputs(cfg, dev)
    token_wise, calls = schedule_tensor([], dev), {"dtm": 0}

    def step(schedules):
        with torch.no_grad(), amp(dev):
            targets = teacher_net(images).float()
        with amp(dev):
            pred = net(common.normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD), masks)
            loss_value = loss_fn(pred, targets, schedules, cfg.loss, cfg.beta)
        loss_value.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return pred.detach(), targets

    def dtm_step():
        step(draws[calls["dtm"] % len(draws)])
        calls["dtm"] += 1

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = time_interleaved(cfg, {"DTM": dtm_step, "token-wise": lambda: step(token_wise)}, dev)
    dtm_ms, base_ms = statistics.median(times["DTM"]), statistics.median(times["token-wise"])
    # Each DTM step and its token-wise neighbour ran back to back: their ratio cancels slow drifts of load.
    paired = statistics.median(d / b for d, b in zip(times["DTM"], times["token-wise"]))

    # The loss alone, on this step's tensors: the DTM cost without the noise of the whole step.
    pred, targets = step(token_wise)
    loss_times = time_loss_alone(cfg, loss_fn, pred, targets, draws, token_wise, dev)
    extra = statistics.median(loss_times["DTM"]) - statistics.median(loss_times["token-wise"])
    flops = cfg.batch_size * step_flops(teacher_net, student, (cfg.img_size // cfg.patch_size) ** 2, cfg.patch_size)
    achieved = flops / (dtm_ms / 1e3)
    mfu = f"MFU {100 * achieved / cfg.peak_flops:.1f}% of {cfg.peak_flops / 1e12:.0f} TFLOP/s" if dev.type == "cuda" \
        else "MFU: GPU only"
    schedules_seen = ", ".join(str(s.tolist()) for s in draws[:3])
    print(f"\n[step] student ViT-{cfg.model}/{cfg.patch_size} (depth {len(student.blocks)}), teacher {cfg.teacher} "
          f"(random init), {cfg.img_size} px, batch {cfg.batch_size}, compile {cfg.compile}, loss {cfg.loss}, "
          f"L={cfg.num_schedules}, n_max={cfg.n_max}, k_max={cfg.k_max} (schedules drawn per step: "
          f"{schedules_seen}, ...)")
    print(f"  DTM step        {fmt(times['DTM'])}  {cfg.batch_size / dtm_ms * 1e3:8.1f} images/s")
    print(f"  token-wise step {fmt(times['token-wise'])}  {cfg.batch_size / base_ms * 1e3:8.1f} images/s")
    print(f"  DTM overhead: {100 * (paired - 1):+.2f}% of the step (median of the {len(times['DTM'])} "
          f"back-to-back pairs' ratios; ratio of the medians {dtm_ms / base_ms:.4f})")
    print(f"  loss alone (forward + backward): DTM {fmt(loss_times['DTM'])}, token-wise "
          f"{statistics.median(loss_times['token-wise']):.1f} ms: DTM adds {extra:.1f} ms = "
          f"{100 * extra / base_ms:+.2f}% of the token-wise step")
    print(f"  {memory(dev)}")
    print(f"  {flops / 1e12:.3f} TFLOP per step (analytic), {achieved / 1e12:.3f} TFLOP/s, {mfu}")


def compile_dtm_loss(cfg, pred, target, dev):
    """torch.compile(dtm_loss, fullgraph=True): the compiled function, the graphs compiled and the seconds taken
    by its first call (forward + backward), and the graphs that 10 more calls with new random schedules add."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dtm_loss, fullgraph=True)
    rng = random.Random(cfg.seed)

    def call():
        schedules = schedule_tensor([sample_schedule(cfg.loss_tokens, cfg.loss_k, rng) for _ in range(2)], dev)
        compiled(pred, target, schedules, cfg.loss, cfg.beta).backward()
        pred.grad = None
    sync(dev)
    t0 = time.perf_counter()
    call()
    sync(dev)
    seconds, graphs = time.perf_counter() - t0, counters["stats"]["unique_graphs"]
    for _ in range(10):
        call()
    return compiled, graphs, seconds, counters["stats"]["unique_graphs"] - graphs


def bench_loss(cfg, dev: torch.device):
    r = math.ceil(cfg.loss_n / cfg.loss_k)
    if r * cfg.loss_k > cfg.loss_n:
        r = cfg.loss_n // cfg.loss_k
    schedules = [[r] * cfg.loss_k] * 2
    gen = torch.Generator().manual_seed(cfg.seed)
    pred = torch.randn(cfg.loss_batch, cfg.loss_tokens, cfg.loss_dim, generator=gen).to(dev).requires_grad_(True)
    target = torch.randn(cfg.loss_batch, cfg.loss_tokens, cfg.loss_dim, generator=gen).to(dev)
    values = {}

    def run(fn, name, schedules):
        def go():
            values[name] = fn(pred, target, schedules, cfg.loss, cfg.beta)
            values[name].backward()
            pred.grad = None
        return go
    variants = {"dtm_loss": run(dtm_loss, "dtm_loss", schedule_tensor(schedules, dev)),
                "dense": run(dense_dtm_loss, "dense", schedules)}
    if cfg.compile:
        compiled, graphs, seconds, new_graphs = compile_dtm_loss(cfg, pred, target, dev)
        variants["compiled"] = run(compiled, "compiled", schedule_tensor(schedules, dev))
    times = time_interleaved(cfg, variants, dev)
    ours, dense = statistics.median(times["dtm_loss"]), statistics.median(times["dense"])
    counts = {name: dispatches(fn, dev) for name, fn in variants.items()}
    print(f"\n[loss] dtm_loss forward + backward, B={cfg.loss_batch}, N={cfg.loss_tokens}, D={cfg.loss_dim}, L=2, "
          f"n={cfg.loss_n}, k={cfg.loss_k} (schedule {r} x {cfg.loss_k} rounds), fp32")
    print(f"  dtm_loss (morph.py)            {fmt(times['dtm_loss'])}")
    print(f"  dense (source matrices, bmm)   {fmt(times['dense'])}")
    print(f"  speed-up of dtm_loss over the dense formulation: {dense / ours:.2f}x")
    if cfg.compile:
        print(f"  torch.compile(dtm_loss, fullgraph=True) {fmt(times['compiled'])}: "
              f"{dense / statistics.median(times['compiled']):.2f}x the dense formulation")
        print(f"  compiled graphs: {graphs}, compile time of dtm_loss {seconds:.1f} s (first call, forward + "
              f"backward); 10 new random schedules compiled {new_graphs} more graphs")
    else:
        print("  compiled graphs and compile time of dtm_loss: not measured (run with --compile)")
    for name, (ops, kernels) in counts.items():
        print(f"  one call of {name}: {ops} aten ops dispatched" + (f", {kernels} GPU kernels" if kernels is not None
                                                                     else " (GPU kernels: GPU only)"))
    print(f"  loss values: dtm_loss {values['dtm_loss'].item():.6f}, dense {values['dense'].item():.6f} "
          f"(fp32: near-ties in the matching may differ; tests/test_bench.py checks equality in fp64)")


def bench_vit(cfg, dev: torch.device):
    """Our ViT against timm's BEiT of identical size (per-block relative position biases, LayerScale, average
    pooling), forward + backward under the step's autocast; with compile=True, eager and compiled both."""
    try:
        from timm.models.beit import Beit
    except ImportError as e:
        print(f"\n[vit] skipped: timm is not importable ({e})")
        return
    size = dict(SIZES[cfg.model])
    if cfg.depth:
        size["depth"] = cfg.depth
    common_args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=size["embed_dim"],
                       depth=size["depth"], num_heads=size["num_heads"], num_classes=1000)
    ours = VisionTransformer(**common_args, layer_scale=0.1, shared_rel_pos=False, block_rel_pos=True).to(dev)
    theirs = Beit(**common_args, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True,
                  global_pool="avg").to(dev)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen).to(dev)

    def fwd_bwd(net):
        def go():
            with amp(dev):
                net(images).float().square().mean().backward()
        return go
    nets = {"ours": ours, "timm": theirs}
    if cfg.compile:
        nets.update({"ours compiled": torch.compile(ours), "timm compiled": torch.compile(theirs)})
    times = time_interleaved(cfg, {name: fwd_bwd(net) for name, net in nets.items()}, dev)
    peaks = {}
    for name, net in nets.items():  # one more call each, alone, for its own peak memory
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            fwd_bwd(net)()
            peaks[name] = f", peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
    grid = cfg.img_size // cfg.patch_size
    flops = 3 * cfg.batch_size * vit_flops(grid * grid + 1, size["embed_dim"], size["depth"], 4 * size["embed_dim"],
                                       3 * cfg.patch_size ** 2, 0)  # forward + backward (3x), the head left out
    print(f"\n[vit] forward + backward, ViT-{cfg.model}/{cfg.patch_size} depth {size['depth']}, {cfg.img_size} px, "
          f"batch {cfg.batch_size}, per-block relative position bias, "
          f"{'bf16 autocast' if dev.type == 'cuda' else 'fp32'}; "
          f"{n_ours / 1e6:.2f}M parameters (ours), {n_theirs / 1e6:.2f}M (timm), {flops / 1e12:.3f} TFLOP")
    for name, ms in times.items():
        achieved = flops / (statistics.median(ms) / 1e3)
        mfu = f", MFU {100 * achieved / cfg.peak_flops:.1f}%" if dev.type == "cuda" else ""
        label = {"ours": "ours (model.py)", "timm": "timm Beit"}.get(name, name.replace("timm", "timm Beit"))
        print(f"  {label:22s}{fmt(times[name])}  {cfg.batch_size / statistics.median(ms) * 1e3:8.1f} images/s, "
              f"{achieved / 1e12:.2f} TFLOP/s{mfu}{peaks.get(name, '')}")
    for kind in ("", " compiled"):
        if f"ours{kind}" in times:
            ratio = statistics.median(times[f"ours{kind}"]) / statistics.median(times[f"timm{kind}"])
            print(f"  ours / timm time{kind or ' eager'}: {ratio:.3f} (speed-up over timm {1 / ratio:.2f}x; ours "
                  f"{'faster' if ratio < 1 else 'slower'} by {abs(1 - ratio) * 100:.1f}%)")
    if dev.type != "cuda":
        print(f"  {memory(dev)}")


# ---------------------------------------------------------------------------------------------- data pipelines
# finetune.py's and segment.py's defaults (BEiT v2's ImageNet-1K and ADE20K recipes), repeated: bench.py is a
# script and imports no other script (tests/test_bench.py checks that they still agree).
FINETUNE_RECIPE = dict(img_size=224, crop_scale=(0.08, 1.0), randaug_ops=2, randaug_magnitude=9, erase_prob=0.25,
                       linear_probe=False)
SEGMENT_RECIPE = dict(num_classes=150, crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A stand-in for a photo: smooth colour fields (four random low-frequency waves per channel on a random base
    colour) plus pixel noise. At 500x375 a quality-90 JPEG of it is about 85 KB, as ImageNet's photos."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    image = rng.uniform(60, 190, 3) + rng.normal(0, 16, (height, width, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0, 6, 3)
            image[..., c] += rng.uniform(20, 60) * np.cos(2 * np.pi * (fx * x + fy * y) + 3 * phase)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_data(root: str, n: int, seed: int):
    """n ImageNet-sized JPEGs (500x375, quality 90) as an ImageFolder root/imagenet/<one class>/, and n ADE20K-sized
    pairs (683x512 JPEG, PNG labels 0..150 in smooth regions) as root/ade/{images,annotations}/training/."""
    rng = np.random.default_rng(seed)
    folders = [os.path.join(root, "imagenet", "n0"), *(os.path.join(root, "ade", kind, "training")
                                                       for kind in ("images", "annotations"))]
    for folder in folders:
        os.makedirs(folder)
    for i in range(n):
        photo_like(rng, 500, 375).save(os.path.join(folders[0], f"{i}.jpg"), quality=90)
        photo_like(rng, 683, 512).save(os.path.join(folders[1], f"{i}.jpg"), quality=90)
        fields = photo_like(rng, 683, 512).resize((22, 16)).resize((683, 512), Image.BILINEAR)  # a few regions
        classes = rng.choice(np.arange(SEGMENT_RECIPE["num_classes"] + 1), 3)  # 0: 'other', not scored
        labels = classes[np.asarray(fields).argmax(axis=-1)].astype(np.uint8)
        Image.fromarray(labels).save(os.path.join(folders[2], f"{i}.png"))


def before_pipeline(img_size: int):
    """The pre-training augmentation this project used before the device-side jitter: torchvision v2 on the uint8
    tensor, ColorJitter on the whole image, flip, RandomResizedCrop bicubic with antialias."""
    return v2.Compose([v2.PILToTensor(), v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomHorizontalFlip(),
                       v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True)])


class AsItRan(torch.utils.data.Dataset):
    """Today's whole per-sample path before this change, for "today's CPU-ms": every RNG's state saved, all seeded
    with torch.manual_seed (which also queues a CUDA seed), the image read and copied by convert('RGB'), the
    `before` pipeline and the mask, the states put back."""

    def __init__(self, images, transform, seed: int):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self):
        return len(self.images.samples)

    def __getitem__(self, i):
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        common.seed_everything(common.seed_of(self.seed, 0, i))
        try:
            with Image.open(self.images.samples[i][0]) as image:
                return self.transform(image.convert("RGB"))
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def official_pipeline(img_size: int):
    """The official release's (BEiT v2 / DTM DataAugmentationForBEiT, torchvision v1 on the PIL image); its
    ToTensor and Normalize left out, as the brief of issue 25 measured it."""
    return T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(),
                      T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)])


def cpu_ms(dataset, n: int, passes: int) -> float:
    """CPU-ms (time.process_time: this process's user + system time) per sample of dataset[0..n-1], the fastest
    of `passes` passes: the least disturbed by neighbours."""
    best = math.inf
    for _ in range(passes):
        t0 = time.process_time()
        for i in range(n):
            dataset[i]
        best = min(best, (time.process_time() - t0) / n * 1e3)
    return best


def loader_images_per_s(cfg, dataset, workers: int) -> float:
    """Images/s of a DataLoader over `dataset` with `workers` processes, after its first batch (workers starting)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.loader_batch, num_workers=workers)
    batches = iter(loader)
    next(batches)
    t0 = time.perf_counter()
    for _ in range(cfg.loader_batches):
        next(batches)
    seconds = time.perf_counter() - t0
    del batches  # stops the workers
    return cfg.loader_batches * cfg.loader_batch / seconds


def bench_data(cfg, dev: torch.device):
    masking = data.BlockMasking(cfg.img_size // cfg.patch_size, cfg.num_masked, cfg.min_block)
    finetune_cfg = settings(FINETUNE_RECIPE)
    seg = SEGMENT_RECIPE
    with tempfile.TemporaryDirectory() as root:
        write_data(root, cfg.data_images, cfg.seed)
        images = data.ImageFolder(os.path.join(root, "imagenet"))
        jpeg_kb = statistics.mean(os.path.getsize(path) for path, _ in images.samples) / 1024
        ade = data.ADE20K(os.path.join(root, "ade"), "training", seg["num_classes"], data.segment_train_transform(
            seg["crop_size"], seg["scale"], seg["ratio_range"], seg["cat_max_ratio"]))
        before, official = before_pipeline(cfg.img_size), official_pipeline(cfg.img_size)
        new = data.MaskedImages(images, cfg.img_size, masking)
        pipelines = {  # name: (what it is, its dataset); each sample seeded by data.SeededSamples, as in training
            "decode": ("decode alone (data.ImageFolder)", images),
            "new": ("pre-training, new (decode, draws, crop; jitter on the device)", new),
            "before": ("pre-training, before (v2 jitter on the whole image, flip, crop)",
                       data.Transformed(images, lambda image: (before(image), masking()))),
            "official": ("pre-training, official (v1 on the PIL image, then the mask)",
                         data.Transformed(images, lambda image: (official(image), masking()))),
            "finetune": ("fine-tuning training (finetune.py's defaults)",
                         data.Transformed(images, data.finetune_train_transform(finetune_cfg))),
            "segment": ("segmentation training (ADE20K recipe, 683x512)", ade),
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker
        try:
            ms = {name: cpu_ms(data.SeededSamples(dataset, cfg.seed), cfg.data_images, cfg.data_passes)
                  for name, (_, dataset) in pipelines.items()}
            as_it_ran = AsItRan(images, lambda image: (before(image), masking()), cfg.seed)
            ms["as it ran"] = cpu_ms(as_it_ran, cfg.data_images, cfg.data_passes)
        finally:
            torch.set_num_threads(threads)

        # The colour jitter the new pipeline left to the device, on a batch of its crops.
        batch = torch.utils.data.default_collate([data.SeededSamples(new, cfg.seed)[i % cfg.data_images]
                                                  for i in range(cfg.loader_batch)])
        crops, jitter = batch[0].to(dev), batch[2].to(dev)
        times = time_interleaved(cfg, {"jitter": lambda: data.color_jitter(crops, jitter)}, dev)
        jitter_ms = statistics.median(times["jitter"]) / cfg.loader_batch

        # A DataLoader of the new pipeline, its images repeated to fill the batches timed.
        images.samples = images.samples * math.ceil((cfg.loader_batches + 1) * cfg.loader_batch / len(images))
        seeded = data.SeededSamples(new, cfg.seed)
        per_s = {w: loader_images_per_s(cfg, seeded, w) for w in sorted({1, 2, common.available_cpus()})}
    labels = {**{name: label for name, (label, _) in pipelines.items()},
              "as it ran": "pre-training as it ran before (its seeding and reading too)"}
    report_data(cfg, dev, labels, ms, jitter_ms, per_s, jpeg_kb)


def report_data(cfg, dev, labels: dict, ms: dict, jitter_ms: float, per_s: dict, jpeg_kb: float):
    print(f"\n[data] CPU-ms per sample (time.process_time, one process, 1 thread, the fastest of {cfg.data_passes} "
          f"passes over {cfg.data_images} images; per-sample seeding included), cores per GPU at "
          f"{cfg.gpu_images_per_s:.0f} images/s; pre-training at {cfg.img_size} px; JPEGs 500x375, quality 90, "
          f"{jpeg_kb:.0f} KB on average")
    for name, label in labels.items():
        print(f"  {label:66s}{ms[name]:7.2f} ms  {cfg.gpu_images_per_s * ms[name] / 1e3:5.1f} cores per GPU")
    print(f"  new / as it ran before: {ms['new'] / ms['as it ran']:.2f} of today's CPU time (target <= 0.40); new / "
          f"before on the new seeding and reading: {ms['new'] / ms['before']:.2f}; new vs official: "
          f"{ms['official'] / ms['new']:.2f}x faster (target >= 1.4x)")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"  colour jitter on the device (data.color_jitter, batch {cfg.loader_batch}, {where}): "
          f"{jitter_ms * 1e3:.1f} us per sample")
    print(f"  DataLoader of the new pipeline, batch {cfg.loader_batch}: " + ", ".join(
        f"{w} worker{'s' if w > 1 else ''} {v:.0f} images/s" for w, v in per_s.items()) +
        f" ({os.cpu_count()} cores here, load average {os.getloadavg()[0]:.2f})")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = common.Dist(cfg.device).device
    torch.manual_seed(cfg.seed)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cores")
    print(f"device: {where}; python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    chosen = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    benches = {"step": bench_step, "loss": bench_loss, "vit": bench_vit, "data": bench_data}
    unknown = set(chosen) - set(benches)
    if unknown:
        raise SystemExit(f"parts: unknown {sorted(unknown)}; choose from {', '.join(benches)}")
    t0 = time.time()
    for part in chosen:
        benches[part](cfg, dev)
    print(f"\nbench done in {time.time() - t0:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
