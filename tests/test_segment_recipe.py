"""segment.py against BEiT v2 / mmseg on what gets reported and how: the final evaluation is the result (the best
one only extra information), evaluation runs in fp32, BatchNorm over the recipe's batch (or a clear refusal),
and the hue shift range."""
import json
import os

import pytest
import torch

import common
import data
import segment
import configurator
from conftest import ROOT


def _demo_settings(monkeypatch, demo_root, out_dir, **overrides):
    """config/segment_demo.py on a 2-block random backbone, 32-px crops, 4 iterations, as segment.main's cfg."""
    settings = dict(demo_data="", data_dir=os.path.join(demo_root, "ADEChallengeData2016"), out_dir=str(out_dir),
                    depth=2, crop_size=32, scale=(128, 48), eval_stride=21, channels=32, aux_channels=16,
                    batch_size=4, micro_batch_size=4, workers=0, iters=4, warmup_iters=2, eval_interval=2,
                    ckpt_interval=2, log_interval=1, device="cpu")
    return configurator.settings(segment, os.path.join(ROOT, "config", "segment_demo.py"), **{**settings, **overrides})


def _scores(miou):
    return {"mIoU": miou, "mAcc": miou, "aAcc": miou, "IoU": [miou] * 14, "Acc": [miou] * 14}


def test_reported_miou_is_the_final_evaluation_not_the_best(demo_root, tmp_path, monkeypatch):
    settings = _demo_settings(monkeypatch, demo_root, tmp_path / "out")
    scripted = iter([50.0, 30.0])  # evaluations at iterations 2 and 4: the best comes first
    monkeypatch.setattr(segment, "evaluate", lambda *args, **kwargs: _scores(next(scripted)))
    result = segment.main(settings)
    assert result["mIoU"] == 30.0 and result["best_mIoU"] == 50.0
    with open(tmp_path / "out" / "log.jsonl") as f:
        summary = [json.loads(line) for line in f][-1]
    assert summary["final_mIoU"] == 30.0 and summary["best_mIoU"] == 50.0
    # ckpt.pt holds the final weights (iteration 4), best.pt those of iteration 2
    assert common.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["step"] == 4
    assert common.load_checkpoint(str(tmp_path / "out" / "best.pt"))["step"] == 2


class _Bf16Dist(common.Dist):
    """A CPU Dist whose autocast is bf16, as on a GPU: what evaluation must not use by default."""

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


class _Recorder(torch.nn.Module):
    """A per-pixel 'segmenter' (1x1 conv) that records the dtype of the logits it returns."""

    def __init__(self, n):
        super().__init__()
        self.conv, self.dtypes = torch.nn.Conv2d(3, n, 1), []

    def forward(self, x):
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


def test_evaluation_logits_are_fp32():
    images = [(torch.randn(3, 24, 24), torch.randint(0, 3, (24, 24))) for _ in range(2)]
    net = _Recorder(3)
    segment.evaluate(net, images, _Bf16Dist("cpu"), 3, crop_size=16, stride=8)
    assert net.dtypes and set(net.dtypes) == {torch.float32}
    net.dtypes.clear()
    segment.evaluate(net, images, _Bf16Dist("cpu"), 3, crop_size=16, stride=8, autocast=True)  # the opt-in setting
    assert set(net.dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("asked", [None, True])
def test_the_stage_evaluates_in_fp32_unless_its_setting_asks(demo_root, tmp_path, monkeypatch, asked):
    """What segment.main passes, from the script's own default (not evaluate()'s): on a device whose autocast is
    bf16, every evaluation runs without autocast, unless --eval_autocast=True."""
    monkeypatch.setattr(common, "Dist", _Bf16Dist)  # segment.main's Dist: bf16 autocast, as on a GPU
    during_evaluation, slide = [], segment.slide_inference

    def spy(*args, **kwargs):
        during_evaluation.append(torch.is_autocast_enabled("cpu"))
        return slide(*args, **kwargs)
    monkeypatch.setattr(segment, "slide_inference", spy)
    given = {} if asked is None else {"eval_autocast": asked}
    segment.main(_demo_settings(monkeypatch, demo_root, tmp_path / "out", iters=2, **given))
    assert during_evaluation and set(during_evaluation) == {asked is True}


def test_accumulated_one_process_run_is_refused_naming_the_batchnorm_difference(demo_root, tmp_path, monkeypatch):
    settings = _demo_settings(monkeypatch, demo_root, tmp_path / "out", batch_size=8, micro_batch_size=2)
    with pytest.raises(SystemExit, match=r"BatchNorm would normalise over 2 images .* whole batch of batch_size=8"):
        segment.main(settings)
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written
    # One process without accumulation is the recipe's statistics (BatchNorm over all 8 images): accepted.
    segment.check_batchnorm_batch(8, 8, 1, sync_bn=False, allow=False)
    # SyncBatchNorm over 4 GPUs x 2 without accumulation: accepted; the same without SyncBatchNorm: refused.
    segment.check_batchnorm_batch(8, 2, 4, sync_bn=True, allow=False)
    with pytest.raises(SystemExit, match="no SyncBatchNorm"):
        segment.check_batchnorm_batch(8, 2, 4, sync_bn=False, allow=False)
    segment.check_batchnorm_batch(8, 2, 1, sync_bn=False, allow=True)  # micro_batch_bn=True: knowingly


def test_batchnorm_in_one_full_batch_differs_from_micro_batches():
    """Why the refusal: BatchNorm over 2 micro-batches of 4 normalises differently from over the batch of 8."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)  # images differ in mean
    whole = bn(x)
    parts = torch.cat([bn(x[:4]), bn(x[4:])])
    assert not torch.allclose(whole, parts, atol=1e-2)


def test_hue_shift_draws_minus_18_to_17_as_mmseg():
    torch.manual_seed(0)
    shifts = {data.PhotometricDistortion._hue_shift() for _ in range(3000)}
    assert shifts == set(range(-18, 18))  # np.random.randint(-18, 18): 18 excluded
