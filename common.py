"""What the stages share besides data (data.py) and logs (plot.py): processes and devices, checkpoints and the
out_dir, the optimizer and its schedule, stopping on a signal.

Nothing here is specific to DTM; read the stage scripts first.
"""
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------- processes
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
            fits = [m for m in range(min(micro_batch_size, batch_size // self.world_size), 0, -1)
                    if batch_size % (m * self.world_size) == 0][:1]
            raise SystemExit(f"batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size} x "
                             f"{self.world_size} processes" + (f": e.g. --micro_batch_size={fits[0]}" if fits else ""))
        return accum

    def wrap(self, model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
        """DDP under torchrun, then torch.compile if asked (compiling the DDP module lets it split graphs at
        its gradient buckets). Keep the plain module for state_dict(), clipping and evaluation."""
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if compile else model

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Under DDP, gradients are all-reduced on the last micro-batch of a step only."""
        return model.no_sync() if self.world_size > 1 and not sync else contextlib.nullcontext()

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
    whether it is armed (False on other systems). (A launcher killed before this call goes unnoticed; checking
    getppid() == 1 would misfire where torchrun itself is PID 1, as in a container.)"""
    if not sys.platform.startswith("linux"):
        return False
    PR_SET_PDEATHSIG = 1
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity under Slurm or taskset), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, rank, step, micro-batch)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (on any device) -> float, (x / 255 - mean) / std per channel."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------- checkpoints
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
    """Read-only first: a read-only disk may also be nearly full, and 'no space' would send the user astray."""
    code = getattr(error, "errno", None)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist: create it first"
    free = shutil.disk_usage(folder).free
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{folder} is read-only or not writable by this user"
    if code in (errno.ENOSPC, errno.EDQUOT) or free < 64 * 2**20:
        return f"no space left on the device of {folder}: {free / 2**20:.0f} MiB free"
    if os.path.isdir(path):
        return f"{path} is a directory"
    return f"see the error above; {free / 2**30:.1f} GiB free there"


def save_checkpoint(obj: dict, path: str):
    """Write atomically (atomic_write): an interrupted save leaves the last good checkpoint as it was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_stage(ckpt: dict) -> str | None:
    """The stage that wrote a checkpoint: its 'stage' entry, or for checkpoints from before that entry, what
    its keys say (None if they say nothing)."""
    if "stage" in ckpt:
        return ckpt["stage"]
    for key, stage in (("backbone_args", "segment"), ("classes", "finetune"), ("model_args", "pretrain")):
        if key in ckpt:
            return stage
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


class OutDirLock:
    """`with OutDirLock(out_dir, is_main):` around a run: out_dir is made and checked before any work (writable,
    ckpt.pt and best.pt not folders) and held by this run alone. A second run there is refused, not queued: it
    would interleave logs and overwrite the first run's checkpoints. The lock is an flock on out_dir/run.lock,
    released by the system however its holder ends, so a killed run never leaves a stale lock. Ranks other
    than 0 take none."""

    def __init__(self, out_dir: str, is_main: bool = True):
        self.out_dir, self.file = out_dir, None
        if is_main:
            self.file = self._claim()

    def _claim(self):
        import fcntl  # Unix only, as torchrun's launcher
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.out_dir):  # new files can be made there (checkpoints are written so)
                pass
            lock = open(os.path.join(self.out_dir, "run.lock"), "a+")
        except OSError as e:
            raise SystemExit(f"out_dir={self.out_dir!r} is not writable: {e} ({_likely_cause(self.out_dir, e)})") \
                from None
        for name in ("ckpt.pt", "best.pt"):
            if os.path.isdir(os.path.join(self.out_dir, name)):
                raise SystemExit(f"{os.path.join(self.out_dir, name)} is a folder; this run would write its "
                                 f"checkpoint there: remove it or choose another out_dir")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise SystemExit(f"out_dir={self.out_dir!r} is in use by another run (pid {holder}); wait for it to "
                             f"finish, stop it, or choose another out_dir") from None
        try:  # the holder's pid, for the message a second run gets
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            os.fsync(lock.fileno())
        except OSError as e:
            raise SystemExit(f"out_dir={self.out_dir!r} is not writable: {e} ({_likely_cause(self.out_dir, e)})") \
                from None
        return lock

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def weights_digest(state_dict: dict) -> str:
    """A short fingerprint of a state dict, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def code_version(*files: str) -> str:
    """The code a run ran: the git commit ('+dirty' with uncommitted changes to tracked files), or outside git
    a hash of `files` (the stage script and morph.py)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return commit.stdout.strip()[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return "sha256:" + digest.hexdigest()[:12]


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
    ckpt.pt), step and `extra`. `loss` is the loss of these very weights on a recent batch: if it or any weight
    is not finite the run stops instead, and the checkpoint already in `path` stays the last good one (a rerun
    from it can train)."""
    state = net.state_dict()
    finite = math.isfinite(loss) and all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    if dist_.all_reduce(torch.tensor(float(not finite), device=dist_.device)).item():  # every rank agrees
        dist_.close()
        raise SystemExit(f"non-finite loss or weights at step {step} (loss {loss}): stopping; the last good "
                         f"checkpoint {path} is left as it was. Try a lower lr or grad_clip.")
    if dist_.is_main:
        optim = {"optimizer": optimizer.state_dict()} if optimizer is not None else {}
        save_checkpoint({"model": state, **optim, "step": step, **extra}, path)


# ------------------------------------------------------------------------------------- optimizer, schedules
def param_groups(model, weight_decay: float, layer_decay: float = 1.0, num_layers: int | None = None):
    """AdamW parameter groups: weight decay where the model says (`model.decays(name, p)`); with layer_decay < 1,
    each parameter's lr is scaled by layer_decay ** (num_layers + 1 - model.layer_id(name))."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = model.decays(name, p)
        layer = model.layer_id(name) if layer_decay != 1.0 else 0
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else 1.0
        groups.setdefault((layer, decay), {"params": [], "lr_scale": scale,
                                           "weight_decay": weight_decay if decay else 0.0})["params"].append(p)
    return list(groups.values())


def adamw(groups, lr, betas, eps=1e-8, device=torch.device("cpu")):
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
    """`with StopOnSignal(ckpt_path) as stop:` SIGTERM (how torchrun and Slurm stop a job) and Ctrl-C only set
    stop.requested, which the loop checks after each optimizer step (stop.now): it then saves a checkpoint of
    complete steps and leaves the block, which says so and exits with 130. Never mid-update, never
    mid-evaluation (evaluations check `stop.requested` between batches and give up, to be redone)."""

    def __init__(self, ckpt_path: str, dist_: Dist):
        self.ckpt_path, self.dist = ckpt_path, dist_

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _request(self, signum, frame):
        self.requested = True

    def now(self, sync_point: bool = True) -> bool:
        """Whether to stop after this optimizer step. Under DDP all ranks must stop at the same step, and SIGTERM
        reaches them at slightly different times: they compare flags at sync points only (the log steps)."""
        if self.dist.world_size == 1:
            return self.requested
        if not sync_point:
            return False
        return bool(self.dist.all_reduce(torch.tensor(float(self.requested), device=self.dist.device)).item())

    def __exit__(self, exc_type, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.requested and exc_type is None:
            self.dist.print(f"stopped: saved {self.ckpt_path}; run the same command to resume")
            raise SystemExit(130)


# -------------------------------------------------------------------------------------------------- logs
def progress(iterable, dist_: Dist, **kwargs):
    return tqdm(iterable, disable=not dist_.is_main, dynamic_ncols=True, **kwargs)


def log_json(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
