"""Faults and hostile inputs around the runs: failed writes, unusable or shared out_dirs, a killed launcher,
checkpoints of another stage, odd images, broken JSON files."""
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
from conftest import ROOT, run_script, tiny_pretrain_args


# ----------------------------------------------------------------------------------------- atomic writes
def _failing_save(error):
    def save(obj, f):
        f.write(b"x" * 100_000)  # a partial file, as a disk that fills up mid-write leaves
        raise error
    return save


def test_a_full_disk_leaves_no_tmp_keeps_the_last_checkpoint_and_names_file_and_cause(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match=rf"could not write {path}: .*no space left on the device of {tmp_path}"):
        common.save_checkpoint({"step": 2}, path)
    # torch.save itself reports ENOSPC as a RuntimeError without an errno: the free space tells
    monkeypatch.setattr(torch, "save", _failing_save(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                  "unexpected pos 1024 vs 998")))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match=rf"could not write {path}: .*unexpected pos.*no space left.*0 MiB free"):
        common.save_checkpoint({"step": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no ckpt.pt.tmp left behind
    assert common.load_checkpoint(path) == {"step": 1}


def test_an_interrupted_write_leaves_no_tmp(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(tmp_path / "results.json"), interrupted)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- out_dir
def test_read_only_out_dir_is_found_at_start(tmp_path, monkeypatch):
    # Tests may run as root, for whom chmod does not make a folder read-only: the file system's answer is faked.
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(common, "open", read_only, raising=False)
    with pytest.raises(SystemExit, match=rf"out_dir='{tmp_path}' is not writable: .*Read-only.*read-only or not "
                                         rf"writable"):
        common.OutDirLock(str(tmp_path))


def test_an_out_dir_where_no_file_can_be_created_is_found_at_start(tmp_path, monkeypatch):
    (tmp_path / "run.lock").write_text("")  # left by an earlier run: opening it alone would still work

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    monkeypatch.setattr(common.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit, match=rf"out_dir='{tmp_path}' is not writable: .*read-only or not writable"):
        common.OutDirLock(str(tmp_path))


def test_ckpt_pt_being_a_folder_stops_the_run_before_training(demo_root, tmp_path):
    os.makedirs(tmp_path / "ckpt.pt")
    proc = run_script(tiny_pretrain_args(demo_root, tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'ckpt.pt'} is a folder" in proc.stderr
    assert not os.path.exists(tmp_path / "log.jsonl")  # not one step trained


def test_a_second_run_in_the_same_out_dir_is_refused_while_the_first_runs(tmp_path):
    first = common.OutDirLock(str(tmp_path / "run"))
    with pytest.raises(SystemExit, match=rf"out_dir='{tmp_path / 'run'}' is in use by another run \(pid "
                                         rf"{os.getpid()}\)"):
        common.OutDirLock(str(tmp_path / "run"))
    assert common.OutDirLock(str(tmp_path / "run"), is_main=False).file is None  # other ranks take no lock
    first.close()  # the first run ends: the next one may start
    common.OutDirLock(str(tmp_path / "run")).close()


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import common, sys, time; "
                               f"lock = common.OutDirLock({str(tmp_path)!r}); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {holder.pid}\)"):
            common.OutDirLock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert os.path.isfile(tmp_path / "run.lock")  # left behind by kill -9, yet:
    common.OutDirLock(str(tmp_path)).close()


def test_a_stage_script_refuses_an_out_dir_in_use(demo_root, tmp_path):
    lock = common.OutDirLock(str(tmp_path))  # as a first run of pretrain.py would hold it
    try:
        proc = run_script(tiny_pretrain_args(demo_root, tmp_path), check=False)
    finally:
        lock.close()
    assert proc.returncode == 1 and f"is in use by another run (pid {os.getpid()})" in proc.stderr
    assert not os.path.exists(tmp_path / "log.jsonl") and not os.path.exists(tmp_path / "ckpt.pt")


# ----------------------------------------------------------------------------------------- killed launcher
CHILD = """
import os, signal, sys, time
import common
def stop(*_):
    open(sys.argv[1] + '.stopped', 'w').close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)  # the stage scripts checkpoint here
common.Dist('cpu')  # under torchrun (LOCAL_RANK is set): arms the parent-death signal
with open(sys.argv[1] + '.ready', 'w') as f:
    f.write(str(os.getpid()))
time.sleep(900)
"""
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])
time.sleep(900)
"""


def wait_for(path: str, alive=lambda: True, guard: float = 600) -> bool:
    """Whether `path` appears while `alive()`; the guard (seconds) only keeps a broken run from hanging the suite."""
    end = time.time() + guard
    while not os.path.exists(path) and alive() and time.time() < end:
        time.sleep(0.05)
    return os.path.exists(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_workers_get_sigterm_when_the_launcher_is_killed(tmp_path):
    mark = str(tmp_path / "worker")
    env = {**os.environ, "LOCAL_RANK": "0", "WORLD_SIZE": "1", "RANK": "0"}
    launcher = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mark], cwd=ROOT, env=env)
    try:
        assert wait_for(mark + ".ready", alive=lambda: launcher.poll() is None), "the worker never started"
    finally:
        launcher.kill()  # kill -9: the launcher cannot stop its workers itself
        launcher.wait()
    with open(mark + ".ready") as f:
        worker = int(f.read())
    try:  # without the parent-death signal the worker would sleep on (900 s) and never write its mark
        assert wait_for(mark + ".stopped", guard=300), "the worker outlived its launcher: no SIGTERM reached it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, 9)


# ------------------------------------------------------------------------------------ checkpoint stages
def test_new_checkpoints_record_their_stage(pretrain_ckpt):
    assert common.load_checkpoint(pretrain_ckpt)["stage"] == "pretrain"


def test_a_checkpoint_of_another_stage_is_refused_naming_path_and_stages(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"model": {}, "stage": "finetune"}, path)
    with pytest.raises(SystemExit, match=rf"{path} is a checkpoint of finetune stage, not of segment"):
        common.load_checkpoint(path, stage="segment")
    assert common.load_checkpoint(path, stage="finetune")["stage"] == "finetune"
    # checkpoints from before the 'stage' entry: their keys tell
    for keys, stage in ((("model_args",), "pretrain"), (("model_args", "classes"), "finetune"),
                        (("backbone_args", "head_args"), "segment")):
        common.save_checkpoint({"model": {}, **dict.fromkeys(keys, {})}, path)
        assert common.load_checkpoint(path, stage=stage) is not None
        wrong = "pretrain" if stage != "pretrain" else "segment"
        with pytest.raises(SystemExit, match=rf"of {stage} stage, not of {wrong}"):
            common.load_checkpoint(path, stage=wrong)


def test_segment_refuses_a_pretraining_checkpoint_in_its_out_dir(demo_root, pretrain_ckpt, tmp_path):
    shutil.copy(pretrain_ckpt, tmp_path / "ckpt.pt")
    proc = run_script(["segment.py", "config/segment_demo.py", "--demo_data=''", f"--out_dir={tmp_path}",
                       f"--data_dir={demo_root}/ADEChallengeData2016", "--workers=0"], check=False)
    assert proc.returncode == 1 and "KeyError" not in proc.stderr
    assert f"{tmp_path / 'ckpt.pt'} is a checkpoint of pretrain stage, not of segment" in proc.stderr


# ------------------------------------------------------------------------------------------------- images
def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    os.makedirs(tmp_path / "a")
    Image.fromarray(values).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I")  # really a 16-bit file
    image, label = data.ImageFolder(str(tmp_path))[0]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and label == 0
    expected = np.round(values / 65535 * 255)  # 65535 -> 255, 32768 -> 128
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1 and (pixels[..., 0] == pixels[..., 2]).all()
    assert (pixels == 255).mean() < 0.01  # convert('RGB') alone makes 99.6% of it white


def test_an_enormous_image_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (100, 100), (200, 0, 0)).save(tmp_path / "a" / "0_huge.png")
    Image.new("RGB", (20, 20), (0, 200, 0)).save(tmp_path / "a" / "1_small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 10000 pixels: a decompression bomb now (> 2 x limit)
    folder = data.ImageFolder(str(tmp_path))
    with pytest.warns(UserWarning, match=rf"skipping unreadable image {tmp_path / 'a' / '0_huge.png'}: .*"
                                         rf"decompression bomb"):
        image, _ = folder[0]
    assert image.size == (20, 20)  # the next image instead


def test_transfer_samples_read_images_the_same_way(tmp_path):
    import eval_transfer
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white.png")
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(tmp_path / "grey.png")
    data = eval_transfer.Samples([(str(tmp_path / "white.png"), 0), (str(tmp_path / "grey.png"), 1)], "list")
    assert np.asarray(data[0][0]).max() == 255 and (np.asarray(data[1][0]) == 100).all()


# -------------------------------------------------------------------------------------- eval_transfer input
def _transfer_config(tmp_path, **changes):
    import eval_transfer
    from configurator import settings
    return settings(eval_transfer, **{"out_dir": str(tmp_path / "out"), **changes})


def test_transfer_refuses_an_empty_dataset_list(tmp_path):
    import eval_transfer
    with pytest.raises(SystemExit, match=r"datasets='' names no dataset"):
        eval_transfer.main(_transfer_config(tmp_path, datasets=""))
    with pytest.raises(SystemExit, match=r"datasets=' , ' names no dataset"):
        eval_transfer.main(_transfer_config(tmp_path, datasets=" , "))


def test_a_truncated_results_json_is_named(tmp_path):
    import eval_transfer
    os.makedirs(tmp_path / "out")
    path = tmp_path / "out" / "results.json"
    path.write_text('{"rows": [{"dataset": "demo_coarse", "top1": 1')
    with pytest.raises(SystemExit, match=rf"{path} is not valid JSON .*truncated"):
        eval_transfer.main(_transfer_config(tmp_path, datasets="demo_coarse"))
    path.write_text('[1, 2]')
    with pytest.raises(SystemExit, match=rf"{path} holds no 'rows' list"):
        eval_transfer.main(_transfer_config(tmp_path, datasets="demo_coarse"))


def test_an_invalid_inat_annotation_file_is_named(tmp_path):
    import eval_transfer
    for split in ("train", "val"):
        (tmp_path / f"{split}2018.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (tmp_path / "val2018.json").write_bytes(b'{"images": [{"id": 1, "file_na')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'val2018.json'} is not valid JSON"):
        eval_transfer.load_inat(str(tmp_path), 2018)
    (tmp_path / "val2018.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'val2018.json'} is not valid JSON"):
        eval_transfer.load_inat(str(tmp_path), 2018)


# ----------------------------------------------------------------------------------------- masking setting
def test_more_masked_patches_than_the_grid_holds_is_refused(demo_root, tmp_path):
    proc = run_script(tiny_pretrain_args(demo_root, tmp_path, "--num_masked=1000"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "num_masked=1000 is more than the 64 patches of the 8x8 grid (img_size=64 / patch_size=8)" in proc.stderr


def test_device_cuda_without_a_gpu_is_a_clear_error_not_a_traceback():
    """bench.py (as every stage, through common.Dist) on a machine where torch sees no GPU."""
    hide_gpus = ("import runpy, sys, torch; torch.cuda.is_available = lambda: False; "
                 "sys.argv = ['bench.py', '--device=cuda']; runpy.run_path('bench.py', run_name='__main__')")
    proc = run_script(["-c", hide_gpus], check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "device='cuda:0', but torch sees no CUDA GPU" in proc.stderr and "use device=cpu" in proc.stderr


def test_default_workers_fit_the_cores_this_process_may_use():
    """DataLoader warns when asked for more workers than cores (as 10 on a 2-core machine did)."""
    import warnings
    import finetune
    import pretrain
    import segment
    for module in (pretrain, finetune, segment):
        assert 1 <= module.workers <= common.available_cpus()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.utils.data.DataLoader(range(4), num_workers=module.workers)


def test_a_read_only_out_dir_on_a_full_disk_is_reported_read_only(tmp_path, monkeypatch):
    """The read-only answer comes first: a read-only disk that is also nearly full is not 'no space left'."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    cause = common._likely_cause(str(tmp_path / "ckpt.pt"), OSError(errno.EROFS, "Read-only file system"))
    assert cause == f"{tmp_path} is read-only or not writable by this user"
    assert "no space left" in common._likely_cause(str(tmp_path / "ckpt.pt"), OSError(errno.ENOSPC, "No space"))


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "segment"])
def test_an_out_dir_in_use_is_refused_before_any_setup(stage, demo_root, pretrain_ckpt, tmp_path, monkeypatch):
    """The lock comes first: no teacher, data set or model is built for a run that cannot write its results."""
    import importlib
    from conftest import RANDOM_TEACHER, stage_settings
    module = importlib.import_module(stage)

    def setup(*args, **kwargs):
        raise AssertionError("set-up work began before the out_dir lock was taken")
    for name in ("ImageFolder", "image_folders", "ADE20K"):
        monkeypatch.setattr(data, name, setup)
    if stage == "pretrain":
        monkeypatch.setattr(module, "build_teacher", setup)
    given = {"pretrain": dict(data_dir=f"{demo_root}/train", **RANDOM_TEACHER),
             "finetune": dict(data_dir=demo_root, init_from=pretrain_ckpt),
             "segment": dict(data_dir=f"{demo_root}/ADEChallengeData2016", init_from=pretrain_ckpt)}[stage]
    cfg = stage_settings(module, f"config/{stage}_demo.py", demo_data="", out_dir=str(tmp_path / "out"),
                         device="cpu", **given)
    with common.OutDirLock(str(tmp_path / "out")):  # a first run holds it
        with pytest.raises(SystemExit, match=f"out_dir='{tmp_path / 'out'}' is in use by another run"):
            module.main(cfg)
