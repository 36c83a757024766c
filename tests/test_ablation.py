"""The CIFAR-10 ablation (ablation.py) at smoke size on the real data, its pieces: a fine-tuned checkpoint as
the teacher (pretrain.CheckpointTeacher), the curves picture (plot.py), the torchvision path to the data."""
import json
import os

import pytest
import torch
from PIL import Image

import common
import data
import finetune
import plot
import teacher
from conftest import ROOT, run_script
from configurator import settings

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # stages run one after another: one thread each wastes nothing


# ---------------------------------------------------------------------------------------------- the teacher
def finetuned_checkpoint(path, seed=0):
    """A classifier as finetune.py saves it, with a non-trivial fc_norm (so a skipped norm would show)."""
    torch.manual_seed(seed)
    cfg = settings(finetune, model="tiny", depth=2, img_size=32, patch_size=8)
    args = finetune.model_args(cfg, 10)
    net = finetune.build_model(args, None)
    with torch.no_grad():
        net.fc_norm.weight.uniform_(0.5, 2.0)
        net.fc_norm.bias.normal_()
    common.save_checkpoint({"model": net.state_dict(), "model_args": args, "probe": None,
                            "classes": [str(i) for i in range(10)]}, str(path))
    return net


def classifier_patch_tokens(net, images_uint8):
    """The targets by hand: the last block's patch tokens through the classifier's own fc_norm."""
    x = common.normalize(images_uint8, common.IMAGENET_MEAN, common.IMAGENET_STD)
    return net.fc_norm(net.forward_blocks(x)[0][:, 1:])


def test_a_finetuned_checkpoint_as_teacher_gives_its_normed_last_block_patch_tokens(tmp_path):
    net = finetuned_checkpoint(tmp_path / "ft.pt").eval()
    net_teacher = teacher.CheckpointTeacher(str(tmp_path / "ft.pt")).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        targets = net_teacher(images)
        torch.testing.assert_close(targets, classifier_patch_tokens(net, images))
        other = classifier_patch_tokens(finetuned_checkpoint(tmp_path / "other.pt", seed=1).eval(), images)
    assert targets.shape == (2, 16, 192) and net_teacher.out_dim == 192
    assert (targets - other).abs().mean() > 0.1  # another net's tokens are far off: the weights were loaded


def test_init_from_a_finetuned_checkpoint_loads_its_weights(tmp_path):
    """Fine-tuned checkpoints hold probe=None: they are not linear-probe checkpoints (whose backbone is taken)."""
    saved = finetuned_checkpoint(tmp_path / "ft.pt")
    net = finetune.build_model(finetune.model_args(settings(finetune, model="tiny", depth=2, img_size=32,
                                                                     patch_size=8), 10), None)
    finetune.init_model(net, str(tmp_path / "ft.pt"), log=lambda *_: None)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(net.state_dict()[name], tensor), name


def test_a_linear_probe_checkpoint_as_teacher_is_refused_with_a_hint(tmp_path):
    common.save_checkpoint({"model": {}, "model_args": {"embed_dim": 8}, "probe": {"block": -1}},
                           str(tmp_path / "probe.pt"))
    with pytest.raises(SystemExit, match="linear probe: pass the checkpoint it probed"):
        teacher.CheckpointTeacher(str(tmp_path / "probe.pt"))


# ----------------------------------------------------------------------------------------------- the curves
def _plot_area(panel=0, columns=1):
    left, top = (panel % columns) * plot.PANEL_W, (panel // columns) * plot.PANEL_H
    return (left + plot.LEFT, top + plot.TOP, left + plot.PANEL_W - plot.RIGHT, top + plot.PANEL_H - plot.BOTTOM)


def _inked(png, x, y):
    """Any non-white pixel within 2 pixels of (x, y)."""
    return any(png.getpixel((x + dx, y + dy)) != (255, 255, 255) for dx in range(-2, 3) for dy in range(-2, 3))


def test_plot_draws_a_log_where_its_values_are(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"epoch": s, "step": s, "loss": float(s), "time": 0.0}) + "\n"
                           for s in range(1, 11)))
    proc = run_script(["plot.py", str(log)], timeout=120)
    out = tmp_path / "run" / "curves.png"
    assert f"wrote {out}" in proc.stdout
    with Image.open(out) as png:
        png = png.convert("RGB")
        assert png.size == (plot.PANEL_W, plot.PANEL_H + plot.LEGEND_ROW + 6)  # one panel (loss), one legend line
        x0, y0, x1, y1 = _plot_area()
        for t in (0.25, 0.5, 0.75):  # loss = step: the diagonal of the plot area
            assert _inked(png, round(x0 + t * (x1 - x0)), round(y1 - t * (y1 - y0)))
        assert not _inked(png, round(x0 + 0.2 * (x1 - x0)), round(y1 - 0.8 * (y1 - y0)))  # far from the line
        assert not _inked(png, round(x0 + 0.8 * (x1 - x0)), round(y1 - 0.2 * (y1 - y0)))


def test_plot_without_numbers_or_file_is_a_clear_error(tmp_path):
    proc = run_script(["plot.py", str(tmp_path / "missing.jsonl")], check=False, timeout=120)
    assert proc.returncode != 0 and "missing.jsonl' does not exist" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------------------------------------- the data
def test_cifar10_folder_writes_torchvisions_cifar10_as_an_image_folder(tmp_path, monkeypatch):
    """Everything but the download: a stand-in for torchvision's CIFAR10 with 3 images per split."""
    import ablation
    import torchvision.datasets

    class FakeCIFAR10(torch.utils.data.Dataset):
        classes = ["airplane", "automobile"]

        def __init__(self, root, train, download):
            assert download and root == str(tmp_path / "c10" / "download")
            self.labels = [1, 0, 1] if train else [0, 0, 1]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), (40 * i, 100, 200)), self.labels[i]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = ablation.cifar10_folder(str(tmp_path / "c10"))
    train = data.ImageFolder(os.path.join(root, "train"))
    assert train.classes == ["airplane", "automobile"]
    assert [os.path.relpath(p, root) for p, _ in train.samples] == [
        "train/airplane/0000.jpg", "train/automobile/0000.jpg", "train/automobile/0001.jpg"]
    assert train[2][0].getpixel((5, 5))[2] > 180  # the image itself, through JPEG
    assert len(data.ImageFolder(os.path.join(root, "test"))) == 3
    assert not any(n.endswith(".tmp") for n in os.listdir(root))


def test_stage_settings_come_back_from_the_command_line_unchanged():
    import ablation
    from configurator import _parse_value
    for value in ["tiny", "", "/data/my cifar", "1", "True", "None", (0.5, 1.0), True, 3e-3, 24, {"k_max": 4}]:
        assert _parse_value(ablation.as_text(value)) == value, value


# ----------------------------------------------------------------------------------- the whole experiment
SMOKE = ["--train_per_class=8", "--test_per_class=5", "--depth=1", "--seeds=(0, 1)", "--teacher_epochs=1",
         "--pretrain_epochs=2", "--probe_epochs=1", "--finetune_epochs=1", "--batch_size=16", "--workers=0",
         "--device=cpu"]


def test_ablation_end_to_end_on_real_cifar10_at_smoke_size(cifar10, tmp_path):
    out = tmp_path / "cifar"
    args = ["ablation.py", f"--data_dir={cifar10}", f"--out_dir={out}", *SMOKE]
    run_script(args, env=ONE_THREAD, timeout=900)

    # The table: every (method, seed, evaluation) cell, a top-1 in [0, 100], and mean and spread from them.
    report = json.loads((out / "results.json").read_text())
    for method in ("dtm", "tokenwise"):
        for ev in ("linear_probe", "finetune"):
            cell = report["summary"][method][ev]
            values = [report["stages"][f"{method}_seed{s}/{ev}"]["top1"] for s in (0, 1)]
            assert all(0 <= v <= 100 for v in values) and cell["n"] == 2
            assert cell["mean"] == pytest.approx(sum(values) / 2)
            assert cell["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    table = (out / "results.md").read_text()
    assert "| dtm |" in table and "| tokenwise |" in table and "± " in table

    # The students: one per method and seed, taught by the trained teacher, pre-trained the asked way.
    teacher_path = out / "teacher" / "ckpt.pt"
    for method in ("dtm", "tokenwise"):
        for seed in (0, 1):
            config = common.load_checkpoint(out / f"{method}_seed{seed}" / "pretrain" / "ckpt.pt")["config"]
            assert (config["teacher"], config["dtm"], config["seed"]) == (str(teacher_path), method == "dtm", seed)

    # The targets come from the trained teacher's weights: equal to the classifier built directly from its
    # checkpoint, on real CIFAR-10 images, and unlike a random net's.
    ckpt = common.load_checkpoint(teacher_path)
    net = finetune.build_model(ckpt["model_args"], None)
    net.load_state_dict(ckpt["model"])
    images = torch.stack([finetune.v2.PILToTensor()(data.ImageFolder(os.path.join(cifar10, "test"))[i][0])
                          for i in (0, 5000)])
    with torch.no_grad():
        targets = teacher.CheckpointTeacher(str(teacher_path))(images)
        torch.testing.assert_close(targets, classifier_patch_tokens(net.eval(), images))
        random_net = finetune.build_model(ckpt["model_args"], None).eval()
        assert (targets - classifier_patch_tokens(random_net, images)).abs().mean() > 0.05

    # The curves: four panels (2 x 2) and a legend of three; ink in every plot area.
    with Image.open(out / "curves.png") as png:
        png = png.convert("RGB")
        assert png.size == (2 * plot.PANEL_W, 2 * plot.PANEL_H + plot.LEGEND_ROW + 6)
        for panel in range(4):
            x0, y0, x1, y1 = _plot_area(panel, columns=2)
            inside = png.crop((x0 + 1, y0 + 1, x1, y1))
            assert inside.getcolors(1 << 16) != [((x1 - x0 - 1) * (y1 - y0 - 1), (255, 255, 255))], panel

    # The teacher's groups on real test images: four rows (classes) of the image and 32, 16, 8, 4 groups.
    import show_morph
    with Image.open(out / "morph.png") as png:
        pad, label = show_morph.PAD, show_morph.LABEL
        assert png.size == (5 * 128 + 6 * pad, 4 * (128 + label) + 5 * pad)
        firsts = [png.crop((pad, pad + label + r * (128 + label + pad), pad + 128, (r + 1) * (128 + label + pad)))
                  for r in range(4)]
        assert len({f.tobytes() for f in firsts}) == 4  # four different images

    # Resumable: a rerun skips every finished stage; other settings in the same out_dir are refused.
    before = (out / "results.json").read_text()
    proc = run_script(args, env=ONE_THREAD, timeout=300)
    assert proc.stdout.count("done, skipped") == 13 and "configuration:" not in proc.stdout.split("[1/13]")[1]
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(before)["summary"]
    proc = run_script([*args, "--pretrain_epochs=3"], env=ONE_THREAD, check=False, timeout=300)
    assert proc.returncode != 0 and "finished with other settings (epochs differ)" in proc.stderr
    assert (out / "results.json").read_text() == before


def test_ctrl_c_stops_the_running_stage_cleanly(tmp_path):
    """Ctrl-C reaches the whole process group (ablation.py and its stage): the stage saves its checkpoint (a rerun
    resumes from it) and says so, and ablation.py exits with 130 without a traceback."""
    import signal
    import subprocess
    import sys
    import threading
    for split, n in (("train", 16), ("test", 4)):
        for c, name in enumerate(("cat", "dog")):
            os.makedirs(tmp_path / "c10" / split / name)
            for i in range(n):
                Image.new("RGB", (32, 32), (60 * c + i, 90, 200 - i)).save(tmp_path / "c10" / split / name / f"{i}.jpg")
    args = [sys.executable, "ablation.py", f"--data_dir={tmp_path / 'c10'}", f"--out_dir={tmp_path / 'out'}",
            "--depth=1", "--seeds=(0,)", "--methods=['dtm']", "--teacher_epochs=200", "--pretrain_epochs=1",
            "--probe_epochs=1", "--finetune_epochs=1", "--batch_size=8", "--workers=0", "--device=cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    out, err, training = [], [], threading.Event()

    def read(stream, lines):
        for line in iter(stream.readline, ""):
            lines.append(line)
            if "epoch 0" in line:  # the teacher stage is training: its stop handler is in place
                training.set()
    readers = [threading.Thread(target=read, args=pair, daemon=True)
               for pair in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    assert training.wait(600), "".join(err)  # a guard against a hang, not a speed requirement
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=600)
    for reader in readers:
        reader.join(timeout=60)
    stdout, text = "".join(out), "".join(err)
    assert proc.returncode == 130 and "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert f"stopped: saved {tmp_path / 'out' / 'teacher' / 'ckpt.pt'}" in stdout
    assert "stopped: stage teacher saved its checkpoint; run the same command to resume" in text
    assert common.load_checkpoint(str(tmp_path / "out" / "teacher" / "ckpt.pt"))["step"] > 0
