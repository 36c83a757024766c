"""Shared fixtures. Tests run on CPU; tests marked `cuda` skip on machines without a GPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The generated demo dataset (64 px), made once per test session."""
    import demo_data
    return demo_data.make_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_train=120, n_val=40, size=64)


@pytest.fixture(scope="session")
def cifar10():
    if not os.path.isdir(CIFAR10):
        pytest.skip(f"{CIFAR10} is absent (developer/CI data only)")
    return CIFAR10


def run_script(args, cwd=ROOT, env=None, timeout=600, check=True):
    """Run a stage script in a subprocess (as a user would); return the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    """A TCP port free right now (the system picks it), for torchrun's --master_port: a fixed port collides
    with any other run on the machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The pre-training demo distils the teacher that the teacher demo trains (a checkpoint under out/). Tests of
# pre-training mechanics need no knowledgeable teacher: they take a small randomly initialised open_clip one
# (64-d tokens, 8-px patches at 64 px), the same wherever they run.
RANDOM_TEACHER = {"teacher": "ViT-B-16-quickgelu", "teacher_pretrained": "",
                  "teacher_overrides": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "patch_size": 8,
                                                                        "width": 128, "layers": 2, "head_width": 64},
                                        "text_cfg": {"width": 64, "heads": 1, "layers": 1}}}


def tiny_pretrain_args(demo_root, out_dir, *extra):
    """pretrain.py on the demo data with a 2-block tiny ViT and a tiny random teacher: seconds per step."""
    return ["pretrain.py", "config/pretrain_demo.py", f"--demo_data={demo_root}", f"--data_dir={demo_root}/train",
            f"--out_dir={out_dir}", "--depth=2", "--epochs=2", "--warmup_epochs=1", "--batch_size=16",
            "--micro_batch_size=16", "--workers=0", *(f"--{k}={v}" for k, v in RANDOM_TEACHER.items()), *extra]


@pytest.fixture(scope="session")
def pretrain_ckpt(demo_root, tmp_path_factory):
    """A tiny pre-training checkpoint of this project (64 px, patch 8, tiny width, depth 2)."""
    out = tmp_path_factory.mktemp("pretrain_ckpt")
    run_script(tiny_pretrain_args(demo_root, out, "--max_steps=2"))
    return os.path.join(out, "ckpt.pt")


def stage_settings(module, config_file, **overrides):
    """A stage script's settings as its main() gets them: defaults < config file < overrides (in-process runs)."""
    from configurator import settings
    return settings(module, os.path.join(ROOT, config_file), **overrides)


def stop_at_step(monkeypatch, k):
    """Send this process SIGTERM while optimizer step k is being prepared (common.set_lr runs once a step),
    as torchrun or Slurm would stop a job mid-epoch."""
    import signal
    import common
    set_lr, calls = common.set_lr, []

    def set_lr_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return set_lr(*args, **kwargs)
    monkeypatch.setattr(common, "set_lr", set_lr_then_stop)


def stopped_run_exit_code(monkeypatch, k, run) -> int:
    """Call run() with SIGTERM sent at optimizer step k (stop_at_step) and return the code it exits with. Its
    exception is dropped before returning: the traceback holds the stopped run's frames, and so its out_dir
    lock, which the exit of a real process would release."""
    import gc
    with monkeypatch.context() as patch:
        stop_at_step(patch, k)
        try:
            run()
        except SystemExit as stopped:
            code = stopped.code
        else:
            raise AssertionError(f"the run was not stopped at step {k}")
    gc.collect()
    return code


def assert_same_weights(path_a, path_b):
    import common
    import torch
    a, b = common.load_checkpoint(str(path_a))["model"], common.load_checkpoint(str(path_b))["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def bicubic_by_hand(image, out_h: int, out_w: int):
    """An independent bicubic resize of a NumPy array [H, W, ...] (the formula, not torch): Keys' cubic
    convolution with a = -0.75 (PyTorch's and OpenCV's), half-pixel centres (align_corners=False, the source
    of output i is (i + 0.5) * in / out - 0.5), border pixels repeated."""
    import numpy as np

    def weights(t, a=-0.75):
        near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
        far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def along(x, n_out, axis):
        n_in = x.shape[axis]
        out = []
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            base = int(np.floor(src))
            taps = [np.take(x, min(max(base + o, 0), n_in - 1), axis=axis) for o in (-1, 0, 1, 2)]
            out.append(sum(w * tap for w, tap in zip(weights(src - base), taps)))
        return np.stack(out, axis=axis)
    return along(along(np.asarray(image, dtype=np.float64), out_h, 0), out_w, 1)


def resized_rel_pos_table_by_hand(table, old_grid, new_grid):
    """A relative position table [(2h-1)(2w-1) + 3, heads] on another grid: bicubic_by_hand per head, the 3
    class-token entries kept."""
    import torch
    (h, w), (H, W) = old_grid, new_grid
    grid = table[:-3].detach().double().view(2 * h - 1, 2 * w - 1, -1).numpy()
    resized = torch.from_numpy(bicubic_by_hand(grid, 2 * H - 1, 2 * W - 1)).reshape(-1, table.shape[1])
    return torch.cat([resized.to(table.dtype), table[-3:]])
