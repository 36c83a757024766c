"""Plumbing shared by every stage: distributed setup, checkpoints, optimizer groups, schedules, data and logs.

Nothing here is specific to DTM; read the stage scripts first.
"""
import contextlib
import ctypes
import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision import datasets
from tqdm import tqdm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------- distributed
class Dist:
    """Who we are under torchrun (or a single process): rank, world size, device, and a few helpers."""

    def __init__(self, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # a bare 'cuda' means this process's own GPU (set_device needs an index)
            device = f"cuda:{self.local_rank}"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"device={device!r}, but torch sees no CUDA GPU (torch {torch.__version__}, CUDA build "
                             f"{torch.version.cuda or 'none'}); use device=cpu, or device=auto to take a GPU if any")
        self.device = torch.device(device)
        if "LOCAL_RANK" in os.environ:  # started by torchrun: do not outlive it (kill -9 of the launcher)
            stop_with_parent()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0

    def autocast(self):
        """bf16 autocast on GPU; full fp32 on CPU (bf16 matmuls are slow there and tests want exact math)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulation_steps(self, batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per optimizer step that make up `batch_size` over all processes."""
        accum = batch_size // (micro_batch_size * self.world_size)
        if accum < 1 or accum * micro_batch_size * self.world_size != batch_size:
            raise SystemExit(f"batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size} "
                             f"x {self.world_size} processes")
        return accum

    def on_main(self, fn, *args, **kwargs):
        """Run fn on rank 0 only (e.g. writing a dataset), while the other ranks wait for it."""
        if self.is_main:
            fn(*args, **kwargs)
        self.barrier()

    def wrap(self, model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
        """DDP under torchrun, then torch.compile if asked (compiling the DDP module lets it split graphs at
        its gradient buckets). Keep the plain module for state_dict(), clipping and evaluation."""
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if compile else model

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()

    def print(self, *args):
        if self.is_main:
            print(*args, flush=True)


def stop_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send this process `sig` when its parent dies. torchrun stops its workers with SIGTERM, but
    a launcher killed with -9 cannot: this SIGTERM then takes the usual way out (checkpoint, exit). Returns
    whether it is armed (False on other systems)."""
    if not sys.platform.startswith("linux"):
        return False
    PR_SET_PDEATHSIG = 1
    # (A launcher killed before this call goes unnoticed; checking getppid() == 1 would misfire where torchrun
    # itself is PID 1, as in a container.)
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
def settings(defaults: dict, overrides: dict, script: str) -> SimpleNamespace:
    """A script's settings namespace (`cfg`): its defaults with `overrides` applied, unknown names refused."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {script} settings: {', '.join(unknown)}")
    return SimpleNamespace(**{**defaults, **overrides})


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity under Slurm or taskset), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- checkpoints
def rng_states() -> dict:
    """RNG states as plain tensors and lists, so checkpoints load with torch.load(weights_only=True). Kept for
    inspection: a resumed run does not need them (its randomness is seeded by position, see SeededSamples)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
              "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def atomic_write(path: str, write):
    """Replace `path` by what `write(binary file)` writes, all or nothing: to path.tmp, fsync, os.replace. A
    crash mid-write never leaves a torn file where the last good one was; a failed write leaves no .tmp and
    raises an OSError naming the file and the likely cause."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise OSError(f"could not write {path}: {e} ({_likely_cause(path, e)})") from e
        raise


def _likely_cause(path: str, error: Exception) -> str:
    code = getattr(error, "errno", None)
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 * 2**20):
        return f"no space left on the device of {folder}" + (f": {free / 2**20:.0f} MiB free" if free is not None else "")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{folder} is read-only or not writable by this user"
    if os.path.isdir(path):
        return f"{path} is a directory"
    return "see the error above" + (f"; {free / 2**30:.1f} GiB free there" if free is not None else "")


def save_checkpoint(obj: dict, path: str):
    """Write atomically (atomic_write): an interrupted save leaves the last good checkpoint as it was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_stage(ckpt: dict) -> str | None:
    """The stage that wrote a checkpoint: its 'stage' entry, or for checkpoints from before that entry, what
    its keys say (None if they say nothing)."""
    if "stage" in ckpt:
        return ckpt["stage"]
    if "backbone_args" in ckpt:
        return "segment"
    if "classes" in ckpt:
        return "finetune"
    if "model_args" in ckpt:
        return "pretrain"
    return None


def load_checkpoint(path: str, stage: str | None = None) -> dict:
    """Load a checkpoint (weights_only). With `stage`, refuse one written by another stage (e.g. a
    pre-training ckpt.pt in segment.py's out_dir) with a message naming the file and both stages."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if os.fspath(path).endswith(".safetensors"):  # weights only (timm, export.py); safetensors comes with open_clip
            from safetensors.torch import load_file
            ckpt = load_file(path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which file, not only what pickle thought
        raise ValueError(f"cannot read checkpoint {path!r}: {e}") from e
    found = checkpoint_stage(ckpt) if isinstance(ckpt, dict) else None
    if stage and found != stage:
        raise SystemExit(f"{path} is a checkpoint of {found or 'an unknown'} stage, not of {stage}: a run of "
                         f"{stage}.py cannot resume from it; choose another out_dir (or pass it as init_from)")
    return ckpt


def prepare_out_dir(out_dir: str, is_main: bool = True):
    """Make out_dir and check, before any training, that this run can write its results there: not read-only,
    ckpt.pt and best.pt not folders, no other run using it. Returns the run's lock (hold it for the run's life;
    None on ranks other than 0). A second run in the same out_dir is refused, not queued: it would interleave
    logs and overwrite the first run's checkpoints. The lock is an flock, released by the system when its
    holder exits in any way, so a killed run never leaves a stale lock."""
    if not is_main:
        return None
    import fcntl  # Unix only, as torchrun's launcher
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # new files can be made there (checkpoints are written so)
            pass
        lock = open(os.path.join(out_dir, "run.lock"), "a+")
    except OSError as e:
        raise SystemExit(f"out_dir={out_dir!r} is not writable: {e} ({_likely_cause(out_dir, e)})") from None
    for name in ("ckpt.pt", "best.pt"):
        if os.path.isdir(os.path.join(out_dir, name)):
            raise SystemExit(f"{os.path.join(out_dir, name)} is a folder; this run would write its checkpoint "
                             f"there: remove it or choose another out_dir")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SystemExit(f"out_dir={out_dir!r} is in use by another run (pid {holder}); wait for it to finish, "
                         f"stop it, or choose another out_dir") from None
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        os.fsync(lock.fileno())
    except OSError as e:
        raise SystemExit(f"out_dir={out_dir!r} is not writable: {e} ({_likely_cause(out_dir, e)})") from None
    return lock


def weights_digest(state_dict: dict) -> str:
    """A short fingerprint of a state dict, bit for bit."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resume(path: str, net: torch.nn.Module, optimizer, dist_: Dist, stage: str, unit: str = "step",
           **expected) -> dict | None:
    """Load the run saved in `path`, if there is one, into `net` and `optimizer` and return its checkpoint (None:
    a new run). It must be a checkpoint of `stage`, holding the `expected` entries (model_args=..., ...):
    another run is refused."""
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path, stage)
    differ = {key: ckpt.get(key) for key, value in expected.items() if ckpt.get(key) != value}
    if differ:
        raise SystemExit(f"{path} holds a run of another model or task ({differ}); choose a new out_dir to start a "
                         f"new run")
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    dist_.print(f"resuming from {path} at {unit} {ckpt['step']}")
    return ckpt


def save_state(path: str, dist_: Dist, net: torch.nn.Module, optimizer, step: int, loss: float, **extra):
    """Checkpoint a run (rank 0 writes): weights, optimizer (None: weights only, as best.pt: a run resumes from
    ckpt.pt), step, RNG states and `extra`. `loss` is the loss of these very weights on a recent batch: if it or
    any weight is not finite the run stops instead, and the checkpoint already in `path` stays the last good one
    (a rerun from it can train)."""
    state = net.state_dict()
    finite = math.isfinite(loss) and all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    if dist_.all_reduce(torch.tensor(float(not finite), device=dist_.device)).item():  # every rank agrees
        dist_.close()
        raise SystemExit(f"non-finite loss or weights at step {step} (loss {loss}): stopping; the last good "
                         f"checkpoint {path} is left as it was. Try a lower lr or grad_clip.")
    if dist_.is_main:
        optim = {"optimizer": optimizer.state_dict()} if optimizer is not None else {}
        save_checkpoint({"model": state, **optim, "step": step, "rng": rng_states(), **extra}, path)


# ------------------------------------------------------------------------------------- optimizer, schedules
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")  # the official models' no_weight_decay() set


def decays(name: str, p: torch.Tensor) -> bool:
    """The official optimizer's rule (BEiT v2 / DTM optim_factory): weight decay on every parameter with 2 or
    more dimensions except pos_embed and cls_token, so the mask token and the relative position tables are
    decayed; never on biases and 1-D parameters (norms, LayerScale). A `backbone.` prefix (the segmenter) is
    looked through, so the class token stays exempt there too."""
    exempt = name.removeprefix("backbone.") in NO_WEIGHT_DECAY
    return p.ndim > 1 and not name.endswith(".bias") and not exempt


def param_groups(model, weight_decay: float, layer_decay: float = 1.0, num_layers: int | None = None):
    """AdamW parameter groups, weight decay where `decays` says; with layer_decay < 1, each parameter's lr is
    scaled by layer_decay ** (num_layers + 1 - layer_id)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = not decays(name, p)
        layer = model.layer_id(name) if hasattr(model, "layer_id") else 0
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else 1.0
        key = (layer if layer_decay != 1.0 else 0, no_decay)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": scale,
                                        "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def adamw(groups, lr, betas, eps=1e-8, device=torch.device("cpu")):
    for g in groups:
        g.pop("names", None)
    fused = device.type == "cuda"  # one kernel for the whole update on GPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def cosine_schedule(step: int, total: int, warmup: int, base: float, final: float) -> float:
    """The official cosine_scheduler (BEiT v2 / DTM utils.py): a warmup of `warmup` steps that goes linearly
    from 0 to `base` inclusive (np.linspace(0, base, warmup): the peak is reached at step warmup - 1), then a
    cosine from `base` at step `warmup` to `final` at `total` steps."""
    if step < warmup:
        return base * step / (warmup - 1) if warmup > 1 else 0.0  # linspace of one point is its start
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float, weight_decay: float | None = None):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g["weight_decay"] > 0:
            g["weight_decay"] = weight_decay


# ------------------------------------------------------------------------------------------------------ data
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
        return image.convert("RGB")


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


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation under DDP: rank r takes samples r, r + W, r + 2W, ... so that every sample is counted exactly
    once (DistributedSampler pads the last shard with duplicates). Shards may differ in length by one."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, epoch, sample index)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(torch.utils.data.Dataset):
    """A training set whose sample i of epoch e is augmented (cropped, masked, ...) with the RNGs of torch,
    NumPy and Python seeded by (seed, e, i), then put back: the same draw in any worker, after any resume."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, i):
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seed_everything(seed_of(self.seed, self.epoch, i))
        try:
            return self.dataset[i]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def seed_step(seed: int, rank: int, step: int, micro: int):
    """Seed what a forward pass draws (drop path, MixUp, dropout) by its position in the run: a resumed run
    draws what the uninterrupted one drew."""
    seed_everything(seed_of(seed, rank, step, micro))


def data_loader(dataset, batch_size: int, dist_: Dist, train: bool, workers: int, seed: int = 0):
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


def position(step: int, steps_per_epoch: int, accum: int) -> tuple[int, int]:
    """Where optimizer step `step` falls: (epoch, micro-batches of that epoch already done)."""
    epoch, done = divmod(step, steps_per_epoch)
    return epoch, done * accum


def epoch_batches(loader, epoch: int, seed: int, skip: int = 0):
    """The batches of `epoch` after its first `skip` (resuming mid-epoch), without loading the skipped ones."""
    start_epoch(loader, epoch, seed)
    if skip == 0:
        return loader
    indices = list(loader.sampler)[skip * loader.batch_size:]
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last, generator=loader.generator)


# ----------------------------------------------------------------------------------------- training helpers
def no_sync(net: torch.nn.Module, dist_: Dist, sync: bool):
    """Under DDP, gradients are all-reduced on the last micro-batch of an accumulation only."""
    return net.no_sync() if dist_.world_size > 1 and not sync else contextlib.nullcontext()


def mean_loss(sums: torch.Tensor, dist_: Dist, step: int, out_dir: str) -> float:
    """The mean loss over all ranks (sums = [loss sum, count]; a GPU sync); stop the run if it is not finite."""
    total = dist_.all_reduce(sums.clone())
    mean = (total[0] / total[1].clamp(min=1)).item()
    if not math.isfinite(mean):
        dist_.close()
        raise SystemExit(f"non-finite loss ({mean}) at step {step}: stopping; the last good checkpoint in "
                         f"{out_dir} is left as it was. Try a lower lr or grad_clip.")
    return mean


class StopOnSignal:
    """`with StopOnSignal() as stop:` SIGTERM (how torchrun and Slurm stop a job) and Ctrl-C only set
    stop.requested, which the loop checks after each optimizer step (stop.now): it then saves a checkpoint of
    complete steps and leaves the block, and the process exits with 130. Never mid-update, never mid-evaluation."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _request(self, signum, frame):
        self.requested = True

    def now(self, dist_: Dist, sync_point: bool) -> bool:
        """Whether to stop after this optimizer step. Under DDP all ranks must stop at the same step, and SIGTERM
        reaches them at slightly different times: they compare flags at sync points only (the log steps)."""
        if dist_.world_size == 1:
            return self.requested
        if not sync_point:
            return False
        return bool(dist_.all_reduce(torch.tensor(float(self.requested), device=dist_.device)).item())

    def __exit__(self, exc_type, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.requested and exc_type is None:
            raise SystemExit(130)


# ------------------------------------------------------------------------------------------------- progress
def progress(iterable, dist_: Dist, **kwargs):
    return tqdm(iterable, disable=not dist_.is_main, dynamic_ncols=True, **kwargs)


def log_json(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def optional_import(module: str, setting: str, package: str):
    """Import an optional package that `setting` asks for, or stop with an error naming both."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"{setting}=True needs the {package} package, which is not installed ({e}): "
                         f"pip install {package}, or leave {setting}=False") from None


def wandb_run_id(out_dir: str) -> str:
    """The wandb run id of out_dir, made once and kept in out_dir/wandb_id.txt: a resumed run (same out_dir)
    goes on logging into the same wandb run instead of starting a new one."""
    path = os.path.join(out_dir, "wandb_id.txt")
    if not os.path.isfile(path):
        atomic_write(path, lambda f: f.write(os.urandom(8).hex().encode()))
    with open(path) as f:
        return f.read().strip()


class Metrics:
    """A run's numbers: each record goes to out_dir/log.jsonl and, where the settings ask (cfg.wandb_log,
    cfg.tensorboard), to Weights & Biases (one run per out_dir, resumed with it) and TensorBoard (out_dir/tb),
    on rank 0 only. close() draws the curves of log.jsonl into out_dir/curves.png (plot.py). wandb and
    tensorboard are optional and imported only when asked for."""

    def __init__(self, out_dir: str, cfg, is_main: bool = True):
        self.out_dir, self.is_main, self.wandb, self.tensorboard = out_dir, is_main, None, None
        if is_main and getattr(cfg, "wandb_log", False):
            wandb = optional_import("wandb", "wandb_log", "wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(
                os.path.abspath(out_dir)), config=vars(cfg), dir=out_dir, id=wandb_run_id(out_dir), resume="allow")
        if is_main and getattr(cfg, "tensorboard", False):
            writer = optional_import("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter
            self.tensorboard = writer(os.path.join(out_dir, "tb"))

    def log(self, record: dict):
        """Append `record` to log.jsonl; its numbers (not time, nor lists such as per-class IoU) also go to
        wandb and TensorBoard, at its step (or iter)."""
        if not self.is_main:
            return
        log_json(os.path.join(self.out_dir, "log.jsonl"), record)
        step = record.get("step", record.get("iter"))
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("step", "iter", "time")}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def close(self):
        """Finish the wandb run, close TensorBoard, draw out_dir/curves.png from log.jsonl."""
        if not self.is_main:
            return
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        log = os.path.join(self.out_dir, "log.jsonl")
        if os.path.isfile(log):
            import plot
            plot.plot_logs([log], os.path.join(self.out_dir, "curves.png"))
