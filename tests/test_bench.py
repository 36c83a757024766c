"""bench.py (the dense formulation of the official release, FLOP counts, the benchmark end to end) and
show_morph.py (the picture)."""
import json
import os

import numpy as np

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import show_morph
from conftest import ROOT, run_script
from model import VisionTransformer
from morph import dtm_loss, morph_groups, schedule_tensor

# A small open_clip teacher: 32 px, patch 8 (16 tokens), one block.
TINY_TEACHER = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                "head_width": 16},
                "text_cfg": {"width": 16, "heads": 1, "layers": 1}}


# --------------------------------------------------------------------------------- the dense formulation
def test_dense_sources_on_a_hand_worked_example():
    """Tokens 0 and 1 point the same way, 2 and 3 less so. A = {0, 2}, B = {1, 3}: one merge joins 0 into 1,
    and the sequence becomes [2, {0, 1}, 3]."""
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.5, 1.0]]], dtype=torch.float64)
    expected = torch.tensor([[[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]], dtype=torch.float64)
    assert torch.equal(bench.dense_sources(tokens, [1]), expected)
    assert morph_groups(tokens, schedule_tensor([[1]])).tolist() == [[[1, 1, 0, 2]]]
    # l2 with pred = 0: the mean over tokens and channels of the squared group means.
    means = torch.tensor([[1.0, 0.05], [1.0, 0.05], [0.0, 1.0], [0.5, 1.0]], dtype=torch.float64)
    pred = torch.zeros_like(tokens)
    for loss_fn, schedules in ((bench.dense_dtm_loss, [[1]]), (dtm_loss, schedule_tensor([[1]]))):
        assert loss_fn(pred, tokens, schedules, "l2").item() == pytest.approx((means ** 2).mean().item(), abs=1e-15)


CASES = [
    (3, 196, 16, [[14] * 14, [7] * 3]),  # the worst case of the official settings, and a mild one
    (2, 196, 8, [[98], [1] * 14]),
    (4, 20, 6, [[3] * 4, []]),  # one schedule merges nothing
    (2, 20, 6, []),  # token-wise
    (3, 30, 5, [[0], [2, 2], [15, 15]]),  # L = 3; the last rounds are capped at half the tokens
]


@pytest.mark.parametrize("loss", ["smooth_l1", "l2", "cosine"])
@pytest.mark.parametrize("B,N,D,schedules", CASES)
def test_dense_formulation_equals_dtm_loss(B, N, D, schedules, loss):
    """Loss and gradients of morph.py's dtm_loss and of the dense source-matrix formulation (float64)."""
    torch.manual_seed(N + D + len(schedules))
    target = torch.randn(B, N, D, dtype=torch.float64) * 2
    pred = (target + torch.randn(B, N, D, dtype=torch.float64)).requires_grad_(True)
    values, grads = [], []
    for fn, arg in ((dtm_loss, schedule_tensor(schedules)), (bench.dense_dtm_loss, schedules)):
        value = fn(pred, target, arg, loss, 2.0)
        grads.append(torch.autograd.grad(value, pred)[0])
        values.append(value.item())
    assert values[0] == pytest.approx(values[1], rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    for schedule in schedules:  # the same groups: token i belongs to source row groups[i]
        groups = morph_groups(target, schedule_tensor([schedule]))[0]
        assert torch.equal(bench.dense_sources(target, schedule).argmax(dim=1), groups)


def test_dense_morph_is_the_group_mean():
    x = torch.arange(12.0).view(1, 4, 3)
    source = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]])
    expected = torch.stack([(x[0, 0] + x[0, 2]) / 2, x[0, 1], (x[0, 0] + x[0, 2]) / 2, x[0, 3]])[None]
    torch.testing.assert_close(bench.dense_morph(x, source), expected)


# ------------------------------------------------------------------------------------------- FLOP counts
def test_vit_flops_matches_torch_flop_counter():
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mask_token=True,
                            out_dim=24)
    # The math backend: the counter sees its matmuls, not the inside of CPU's fused attention kernel.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(torch.randn(1, 3, 32, 32))
    hidden = net.blocks[0].mlp.fc1.out_features
    assert bench.vit_flops(17, 32, 2, hidden, 3 * 8 * 8, 24) == counter.get_total_flops()


# ------------------------------------------------------------------------------------------ end to end
TINY_BENCH = ["bench.py", "--model=tiny", "--depth=1", "--img_size=32", "--patch_size=8", "--batch_size=2",
              "--num_masked=4", "--min_block=2", "--n_max=16", "--k_max=4", "--loss_batch=2",
              "--loss_tokens=16", "--loss_dim=8", "--loss_n=16", "--loss_k=4", "--warmup=1", "--iters=2",
              "--threads=1", f"--teacher_overrides={json.dumps(TINY_TEACHER)}"]


def test_bench_runs_end_to_end_and_prints_every_figure():
    proc = run_script(TINY_BENCH, timeout=600)
    out = proc.stdout
    for figure in ("DTM step", "token-wise step", "images/s", "DTM overhead:", "loss alone", "peak RSS",
                   "TFLOP per step", "MFU: GPU only", "speed-up of dtm_loss over the dense formulation",
                   "compiled graphs", "one call of dtm_loss:", "aten ops dispatched",
                   "ours (model.py)", "timm Beit", "ours / timm time", "bench done"):
        assert figure in out, f"{figure!r} missing from:\n{out}"
    assert "gpuGetDeviceCount" not in proc.stderr  # the profiler's own noise, alarming on a CPU machine


def test_bench_data_runs_end_to_end_and_prints_every_figure():
    out = run_script(["bench.py", "--parts=data", "--data_images=3", "--data_passes=1", "--loader_batch=4",
                      "--loader_batches=1", "--img_size=32", "--patch_size=8", "--num_masked=4", "--min_block=2",
                      "--threads=1", "--iters=1", "--warmup=1"], timeout=300).stdout
    for figure in ("decode alone", "pre-training, new", "pre-training, before", "pre-training, official",
                   "pre-training as it ran before", "fine-tuning training", "segmentation training", "cores per GPU",
                   "new / as it ran before:", "of today's CPU time",
                   "x faster", "colour jitter on the device", "us per sample", "1 worker", "images/s", "bench done"):
        assert figure in out, f"{figure!r} missing from:\n{out}"
    assert "[step]" not in out and "[loss]" not in out  # only the part asked for


def test_bench_data_recipes_are_the_stage_scripts_defaults():
    """bench.py repeats finetune.py's and segment.py's defaults (a script imports no other script): still equal."""
    import finetune
    import segment
    assert {key: getattr(finetune, key) for key in bench.FINETUNE_RECIPE} == bench.FINETUNE_RECIPE
    assert {key: getattr(segment, key) for key in bench.SEGMENT_RECIPE} == bench.SEGMENT_RECIPE


def test_dispatches_counts_the_ops_called_from_python_not_the_ops_inside_them():
    x = torch.randn(4, 3)
    # add, ones, linear (which calls t and matmul, and matmul mm, inside itself) and sum: 4 from Python
    assert bench.dispatches(lambda: torch.nn.functional.linear(x + 1, torch.ones(2, 3)).sum(), torch.device("cpu")) \
        == (4, None)


def test_bench_rejects_unknown_parts():
    proc = run_script(["bench.py", "--parts=step,warp"], check=False, timeout=120)
    assert proc.returncode != 0 and "warp" in proc.stderr


# ------------------------------------------------------------------------------------------- the picture
@pytest.mark.parametrize("n", [16, 64, 196])
def test_schedule_to_reaches_every_count(n):
    for m in range(1, n + 1):
        schedule = show_morph.schedule_to(n, m, 4)
        t = n
        for r in schedule:
            assert 1 <= r <= t // 2
            t -= r
        assert t == m and (len(schedule) >= 4 or m == n or n - m < 4)


def expected_png_size(panels, size):
    return panels * size + (panels + 1) * show_morph.PAD, size + show_morph.LABEL + 2 * show_morph.PAD


def test_picture_from_a_generated_image_with_a_random_teacher(tmp_path):
    out = tmp_path / "morph.png"
    proc = run_script(["show_morph.py", f"--out={out}", "--tokens=(16, 8, 3)",
                       f"--teacher_overrides={json.dumps(TINY_TEACHER)}"], timeout=300)
    assert "RANDOMLY INITIALISED" in proc.stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == expected_png_size(4, 32)
        panels = [png.crop((x, show_morph.PAD + show_morph.LABEL, x + 32, show_morph.PAD + show_morph.LABEL + 32))
                  for x in (show_morph.PAD + i * (32 + show_morph.PAD) for i in range(4))]
    assert len({p.tobytes() for p in panels}) == 4  # the image and three different groupings


def test_picture_with_a_checkpoint_of_this_project_as_teacher(tmp_path, pretrain_ckpt):
    """The group borders drawn (the only pure black pixels: colours are blended over the image) are those of the
    groups matched here on the tokens of the checkpoint's own weights, loaded on their own."""
    import common
    out = tmp_path / "morph.png"
    proc = run_script(["show_morph.py", f"--out={out}", f"--teacher={pretrain_ckpt}", "--tokens=(64, 10)"],
                      timeout=300)
    assert f"checkpoint {pretrain_ckpt}" in proc.stdout
    with Image.open(out) as png:  # the checkpoint's 64 px, 8 x 8 patches
        assert png.size == expected_png_size(3, 64)
        left, top = show_morph.PAD + 2 * (64 + show_morph.PAD), show_morph.PAD + show_morph.LABEL
        drawn = torch.from_numpy(np.array(png.crop((left, top, left + 64, top + 64)).convert("RGB")))
    ckpt = common.load_checkpoint(pretrain_ckpt)
    teacher = VisionTransformer(**ckpt["model_args"]).eval()
    teacher.load_state_dict(ckpt["model"])
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = teacher((show_morph.load_image("", 64, show_morph.seed)[None].float() / 255 - mean) / std)
    groups = morph_groups(tokens, schedule_tensor([show_morph.schedule_to(64, 10, show_morph.rounds)]))[0, 0]
    pixels = groups.view(8, 8).repeat_interleave(8, 0).repeat_interleave(8, 1)
    border = torch.zeros(64, 64, dtype=torch.bool)
    border[1:] |= pixels[1:] != pixels[:-1]
    border[:, 1:] |= pixels[:, 1:] != pixels[:, :-1]
    assert groups.unique().numel() == 10 and border.any()
    wrong = int(((drawn == 0).all(-1) != border).sum())
    assert wrong == 0, f"{wrong} of {64 * 64} pixels differ from the borders of the checkpoint teacher's groups"


def test_picture_defaults_fit_the_teacher_and_leave_the_tracked_picture_alone(tmp_path, pretrain_ckpt):
    """Without --tokens the panels follow the teacher's own token count (64 here: 64, 32, 16 and 5 groups, where a
    fixed 196 failed), and without --out the picture goes to the current folder, not over docs/morph.png."""
    proc = run_script([os.path.join(ROOT, "show_morph.py"), f"--teacher={pretrain_ckpt}"], cwd=tmp_path, timeout=300)
    for m in (64, 32, 16, 5):
        assert f"{m:4d} tokens: schedule" in proc.stdout
    with Image.open(tmp_path / "morph.png") as png:
        assert png.size == expected_png_size(5, 64)
