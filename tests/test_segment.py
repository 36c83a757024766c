"""segment.py and the UperNet head: metrics, sliding window, data pipeline, model, end to end, bad input."""
import colorsys
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import common
import data
import model
import segment
from configurator import settings
from conftest import run_script


# --------------------------------------------------------------------------------------------------- metrics
def test_metrics_by_hand_with_ignored_pixels_and_an_absent_class():
    # 4 classes; class 3 appears nowhere. Ignored pixels (255) carry predictions that must not count.
    label = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 0]])
    stats = segment.area_stats(pred, label, 4)
    # (label, pred) over scored pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
    assert stats.tolist() == [[1, 2, 1, 0],   # intersection
                              [3, 3, 2, 0],   # union
                              [2, 3, 1, 0],   # predicted area
                              [2, 2, 2, 0]]   # labelled area
    m = segment.metrics(stats)
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)  # class 3 left out
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6)
    assert np.isnan(m["IoU"][3]) and np.isnan(m["Acc"][3])


def test_metrics_sum_counts_over_images_and_score_a_class_only_predicted():
    # Image 1: class 1 predicted but never labelled -> IoU 0 counts in mIoU, Acc is undefined (left out).
    s1 = segment.area_stats(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), 3)
    # Image 2: all right.
    s2 = segment.area_stats(torch.tensor([[2, 2, 0]]), torch.tensor([[2, 2, 0]]), 3)
    m = segment.metrics(s1 + s2)
    # class 0: inter 2, union 3; class 1: inter 0, union 1; class 2: inter 2, union 2 (dataset-wide sums)
    assert m["mIoU"] == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert m["mAcc"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert m["aAcc"] == pytest.approx(100 * 4 / 5)


# -------------------------------------------------------------------------------------------- sliding window
def test_windows_by_hand_and_full_coverage():
    assert segment.windows(20, 50, 32, 21) == [(0, 20, 0, 32), (0, 20, 18, 50)]
    assert segment.windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    for h, w, crop, stride in [(20, 50, 32, 21), (50, 20, 32, 21), (33, 33, 32, 21), (64, 100, 32, 21),
                               (10, 10, 32, 21), (512, 2048, 512, 341), (700, 513, 512, 341)]:
        count = torch.zeros(h, w)
        for y1, y2, x1, x2 in segment.windows(h, w, crop, stride):
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
            count[y1:y2, x1:x2] += 1
        assert count.min() >= 1, (h, w)


@pytest.mark.parametrize("size", [(20, 50), (45, 70), (31, 31)])
def test_sliding_window_of_a_per_pixel_model_equals_one_full_pass(size):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Tanh(), torch.nn.Conv2d(8, 5, 1)).eval()
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        full = net(image)
        slid = segment.slide_inference(net, image, crop=32, stride=21, chunk=3)
    assert slid.shape == full.shape
    torch.testing.assert_close(slid, full, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ data
def test_label_mapping():
    raw = torch.tensor([[0, 1, 2], [150, 75, 0]], dtype=torch.uint8)
    assert data.reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 74, 255]]


def test_crop_rule_by_hand():
    ok = data.crop_is_varied
    assert not ok(torch.tensor([0] * 75 + [1] * 25), 0.75)  # exactly 75%: too much
    assert ok(torch.tensor([0] * 74 + [1] * 26), 0.75)
    assert not ok(torch.tensor([3] * 10), 0.75)  # one class only
    assert not ok(torch.tensor([255] * 50 + [0] * 50), 0.75)  # ignored pixels are not a class
    assert ok(torch.tensor([255] * 90 + [0] * 7 + [1] * 3), 0.75)  # 70% of the scored pixels


def _half_dominated_mask():
    """16x32: left half class 0; right half class 1 on top, 2 below. A 16x16 crop at left L is varied
    (class 0 < 75%) iff L >= 5."""
    label = torch.zeros(16, 32, dtype=torch.uint8)
    label[:8, 16:], label[8:, 16:] = 1, 2
    return label


def test_crop_retries_until_no_class_dominates_and_image_moves_with_mask():
    label = _half_dominated_mask()
    image = tv_tensors.Image(label.expand(3, -1, -1).clone())  # the image encodes the label: they must agree
    crops = {}
    for ratio in (0.75, 1.0):
        pipeline = v2.Compose([data.RandomCropVaried(16, ratio), v2.RandomHorizontalFlip()])
        varied = []
        for s in range(40):
            torch.manual_seed(s)
            img, mask = pipeline(image, tv_tensors.Mask(label))
            assert mask.shape == (16, 16) and torch.equal(img[0], mask)
            varied.append(data.crop_is_varied(mask, 0.75))
        crops[ratio] = varied
    assert all(crops[0.75])
    assert not all(crops[1.0])  # without the rule, class-0-dominated crops do occur


def test_train_pipeline_pads_image_with_zero_and_labels_with_255():
    label = _half_dominated_mask()[:, :16]  # 16x16, classes 0/1... only class 0: no varied crop exists
    image = tv_tensors.Image(torch.full((3, 16, 16), 200, dtype=torch.uint8))
    t = data.segment_train_transform(crop=24, scale=(16, 16), ratio_range=(1.0, 1.0), cat_max_ratio=0.75)
    torch.manual_seed(0)
    img, mask = t(image, tv_tensors.Mask(label))
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32 and mask.shape == (24, 24)
    assert (mask[16:] == 255).all() and (mask[:, 16:] == 255).all() and (mask[:16, :16] == 0).all()
    assert (img[:, 16:] == 0).all() and (img[:, :, 16:] == 0).all()


def test_rescale_size_keeps_ratio_like_mmcv():
    assert data.rescale_size(480, 640, (2048, 512)) == (512, 683)  # short side to 512
    assert data.rescale_size(200, 1600, (2048, 512)) == (256, 2048)  # long side capped at 2048


def test_saturation_matches_hsv():
    torch.manual_seed(0)
    rgb = torch.rand(3, 5, 7) * 255
    for factor in (0.5, 1.4, 3.0):
        out = data.scale_saturation(rgb, factor)
        for y in range(5):
            for x in range(7):
                h, s, v = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
                expected = colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)
                assert out[:, y, x].tolist() == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------------------------------- model
def tiny_segmenter(img_size=512, patch=16, num_classes=7, depth=2):
    backbone = model.vit("tiny", depth=depth, img_size=img_size, patch_size=patch, shared_rel_pos=False,
                         embed_dim=64, num_heads=2)
    return model.UperNetSegmenter(backbone, num_classes, channels=32, aux_channels=16)


def test_upernet_shapes_and_strides_at_512():
    torch.manual_seed(0)
    net = tiny_segmenter().eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        feats = net.features(x)
        assert [tuple(f.shape) for f in feats] == [(1, 64, 128, 128), (1, 64, 64, 64), (1, 64, 32, 32),
                                                   (1, 64, 16, 16)]  # strides 4, 8, 16, 32
        assert net.decode_head(feats).shape == (1, 7, 128, 128)  # stride 4
        assert net.aux_head(feats[2]).shape == (1, 7, 32, 32)  # stride 16
        logits = net(x)
    assert logits.shape == (1, 7, 512, 512)
    with pytest.raises(ValueError, match="512px"):
        net(torch.randn(1, 3, 256, 256))


def test_out_indices_and_layer_decay_keep_head_at_scale_one():
    assert model.default_out_indices(12) == [3, 5, 7, 11]
    assert model.default_out_indices(24) == [7, 11, 15, 23]
    net = tiny_segmenter(img_size=64, patch=16, depth=2)
    scales, decays = {}, {}
    name_of = {id(p): name for name, p in net.named_parameters()}
    for g in common.param_groups(net, 0.05, 0.75, 2):
        for p in g["params"]:
            scales[name_of[id(p)]], decays[name_of[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert scales["backbone.patch_embed.weight"] == pytest.approx(0.75 ** 3)
    assert scales["backbone.blocks.0.mlp.fc1.weight"] == pytest.approx(0.75 ** 2)
    assert scales["backbone.blocks.1.attn.rel_pos.table"] == pytest.approx(0.75)
    for name in ("decode_head.cls.1.weight", "aux_head.conv.0.weight", "fpn1.0.weight", "fpn2.weight",
                 "decode_head.ppm.0.1.1.weight"):
        assert scales[name] == 1.0, name
    assert decays["decode_head.fpn_bottleneck.0.weight"] == 0.05
    assert decays["decode_head.fpn_bottleneck.1.weight"] == 0.0  # BatchNorm
    assert decays["backbone.blocks.0.attn.rel_pos.table"] == 0.05  # 2-D: decayed, as the official rule
    assert decays["backbone.cls_token"] == 0.0
    assert not any(n.startswith("backbone.norm") for n in scales)  # features are taken before the final norm


def test_aux_loss_weighted_0_4_and_ignored_pixels_count_as_zero():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 5, 4, 6), torch.randn(2, 5, 4, 6)
    labels = torch.randint(0, 5, (2, 4, 6))
    labels[0, :2] = 255
    total, main, aux_loss = segment.seg_loss(logits, aux, labels, 0.4)

    def by_hand(z):  # -log softmax at the label, summed over scored pixels, divided by all pixels (mmseg 0.11)
        logp = z.log_softmax(1).permute(0, 2, 3, 1).reshape(-1, 5)
        flat = labels.reshape(-1)
        keep = flat != 255
        return -logp[keep, flat[keep]].sum() / flat.numel()
    torch.testing.assert_close(main, by_hand(logits))
    torch.testing.assert_close(aux_loss, by_hand(aux))
    torch.testing.assert_close(total, by_hand(logits) + 0.4 * by_hand(aux))


def test_poly_schedule_like_mmcv():
    assert segment.poly_lr(0, 100, 10, 1.0, 1.0, 0.0) == pytest.approx(1e-6)
    assert segment.poly_lr(5, 100, 10, 1.0, 1.0, 0.0) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert segment.poly_lr(10, 100, 10, 1.0, 1.0, 0.0) == pytest.approx(0.9)
    assert segment.poly_lr(100, 100, 10, 1.0, 1.0, 0.0) == 0.0


def test_pretraining_checkpoint_converts_to_segmenter(pretrain_ckpt):
    cfg = settings(segment, init_from=pretrain_ckpt, crop_size=96,  # 12x12 patches of 8 px: tables resized from 8x8
                           num_classes=14, channels=32)
    from conftest import resized_rel_pos_table_by_hand
    net, args, head = segment.build_segmenter(cfg, common.Dist("cpu"))
    ckpt = common.load_checkpoint(pretrain_ckpt)
    state = ckpt["model"]
    assert args["img_size"] == 96 and not args["shared_rel_pos"] and head["out_indices"] == [0, 0, 0, 1]
    assert net.backbone.rel_pos is None and net.backbone.mask_token is None
    for i, block in enumerate(net.backbone.blocks):
        expected = resized_rel_pos_table_by_hand(state[f"blocks.{i}.attn.rel_pos.table"] + state["rel_pos.table"],
                                                 (8, 8), (12, 12))
        torch.testing.assert_close(block.attn.rel_pos.table.data, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.backbone.patch_embed.weight.data, state["patch_embed.weight"])
    torch.testing.assert_close(net.backbone.blocks[1].mlp.fc2.weight.data, state["blocks.1.mlp.fc2.weight"])


def test_a_linear_probe_checkpoint_gives_its_backbone_and_the_segmenter_says_what_it_built(pretrain_ckpt, tmp_path,
                                                                                          capsys):
    """A probe's weights are its backbone's (backbone.*) beside BatchNorm and head: the segmenter takes the
    backbone (it trained a random one before, silently). The printed line says the checkpoint's depth, 2, where
    the settings say 6."""
    import finetune
    ckpt = common.load_checkpoint(pretrain_ckpt)
    args = dict(ckpt["model_args"], mask_token=False, out_dim=0, shared_rel_pos=False)
    probe = finetune.LinearProbe(model.VisionTransformer(**args), -1, 10)
    torch.manual_seed(3)
    for p in probe.backbone.parameters():
        torch.nn.init.normal_(p)  # weights that only a real load reproduces
    common.save_checkpoint({"model": probe.state_dict(), "model_args": args, "probe": {"block": -1, "num_classes": 10},
                            "classes": [str(i) for i in range(10)], "stage": "finetune"}, str(tmp_path / "probe.pt"))
    cfg = settings(segment, init_from=str(tmp_path / "probe.pt"), crop_size=64, num_classes=14, channels=32,
                   model="tiny", depth=6)
    net, built, _ = segment.build_segmenter(cfg, common.Dist("cpu"))
    assert built["depth"] == 2 and "depth 2" in capsys.readouterr().out
    for name, value in probe.backbone.state_dict().items():
        if not name.startswith("norm."):  # the segmenter reads block outputs: no final norm
            assert torch.equal(net.backbone.state_dict()[name], value), name


def test_a_checkpoint_that_would_leave_the_backbone_untrained_is_refused_naming_file_and_contents(tmp_path):
    """Weights under names the backbone does not have (here a wrapper's prefix) would leave every block at random
    init: refused, naming the file and what it holds, rather than training from scratch silently."""
    net = model.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mask_token=True,
                                  out_dim=8)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mask_token=True, out_dim=8)
    common.save_checkpoint({"model": {f"student.{k}": v for k, v in net.state_dict().items()}, "model_args": args},
                           str(tmp_path / "wrapped.pt"))
    cfg = settings(segment, init_from=str(tmp_path / "wrapped.pt"), crop_size=32, num_classes=3, channels=16)
    with pytest.raises(SystemExit, match=rf"init_from='{tmp_path / 'wrapped.pt'}': the checkpoint leaves .* at random "
                                         rf"init, e.g. .*it holds student"):
        segment.build_segmenter(cfg, common.Dist("cpu"))


def test_a_stop_during_an_evaluation_ends_it_and_the_rerun_evaluates(tmp_path, monkeypatch):
    """A long evaluation does not make a stop wait: it ends at the next image, and returns None (not a score)."""
    class Stop:
        def __init__(self):
            self.calls = 0

        def now(self, sync_point=True):
            self.calls += 1
            return self.calls > 1  # asked for while the first image was scored
    images = [(torch.randn(3, 24, 24), torch.randint(0, 3, (24, 24))) for _ in range(5)]
    seen = []
    net = torch.nn.Conv2d(3, 3, 1)
    monkeypatch.setattr(segment, "slide_inference", lambda *args: seen.append(1) or torch.zeros(1, 3, 24, 24))
    assert segment.evaluate(net, images, common.Dist("cpu"), 3, crop_size=16, stride=8, stop=Stop()) is None
    assert len(seen) == 1  # one image scored of five
    assert segment.evaluate(net, images, common.Dist("cpu"), 3, crop_size=16, stride=8)["mIoU"] >= 0


# -------------------------------------------------------------------------------------------------- bad input
def _write_pair(root, split, name, label, image=True):
    for sub in ("images", "annotations"):
        os.makedirs(os.path.join(root, sub, split), exist_ok=True)
    if image:
        Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(os.path.join(root, "images", split, name + ".jpg"))
    if label is not None:
        Image.fromarray(label).save(os.path.join(root, "annotations", split, name + ".png"))


def test_image_without_annotation_is_named(tmp_path):
    _write_pair(tmp_path, "training", "a", np.ones((8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "training" / "b.jpg")
    with pytest.raises(FileNotFoundError, match="b.jpg needs .*annotations/training/b.png"):
        data.ADE20K(str(tmp_path), "training", 150, None)


def test_label_above_num_classes_is_an_error(tmp_path):
    label = np.ones((8, 8), np.uint8)
    label[3, 3] = 151
    _write_pair(tmp_path, "validation", "x", label)
    ds = data.ADE20K(str(tmp_path), "validation", 150, data.segment_eval_transform((16, 8)))
    with pytest.raises(ValueError, match=r"x\.png has label 151 > num_classes=150"):
        ds[0]


@pytest.mark.parametrize("split", ["training", "validation"])
def test_label_map_of_another_size_than_its_image_is_an_error(tmp_path, split):
    """A 10x8 label map for an 8x8 image: per-pixel labels would be scored against the wrong pixels."""
    _write_pair(tmp_path, split, "y", np.ones((8, 10), np.uint8), image=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / split / "y.jpg")
    ds = data.ADE20K(str(tmp_path), split, 150, data.segment_eval_transform((16, 8)))  # checked before any transform
    with pytest.raises(ValueError, match=r"y\.png is 10x8 but its image .*y\.jpg is 8x8"):
        ds[0]


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected the ADE20K layout"):
        data.find_root(str(tmp_path / "nowhere"))
    # The script stops with that message (no traceback) before creating anything.
    cfg = settings(segment, data_dir=str(tmp_path / "nowhere"), demo_data="", device="cpu", micro_batch_size=16,
                           out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="nowhere' does not exist; expected the ADE20K layout"):
        segment.main(cfg)
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def odd_demo(demo_root, tmp_path_factory):
    """The demo's ADE20K folder with 39 validation images (an odd count, for the 2-process evaluation)."""
    root = str(tmp_path_factory.mktemp("ade_odd") / "ADEChallengeData2016")
    shutil.copytree(os.path.join(demo_root, "ADEChallengeData2016"), root)
    last = sorted(os.listdir(os.path.join(root, "images", "validation")))[-1]
    os.remove(os.path.join(root, "images", "validation", last))
    return root


def seg_args(data, out, *extra):
    """The demo config on a 2-block tiny backbone, 32-px crops (48-px eval images: 2x2 sliding windows)."""
    return ["segment.py", "config/segment_demo.py", "--demo_data=''", f"--data_dir={data}", f"--out_dir={out}",
            "--crop_size=32", "--scale=(128, 48)", "--eval_stride=21", "--channels=32", "--aux_channels=16",
            "--batch_size=8", "--micro_batch_size=4", "--workers=0", "--iters=4", "--warmup_iters=2",
            "--eval_interval=4", "--log_interval=1", "--micro_batch_bn=True", *extra]  # accumulation: BN over 4


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}, [r for r in records if "mIoU" in r]


def test_demo_trains_evaluates_resumes_and_evaluates_on_2_processes(odd_demo, pretrain_ckpt, tmp_path):
    whole, split, dist2 = tmp_path / "whole", tmp_path / "split", tmp_path / "dist2"
    env = {"OMP_NUM_THREADS": "1"}  # as the 2-process evaluation below: argmax ties break alike at one thread
    run_script(seg_args(odd_demo, whole, f"--init_from={pretrain_ckpt}"), env=env)
    losses, evals = read_log(whole)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert len(evals) == 1 and evals[0]["iter"] == 4 and 0 <= evals[0]["mIoU"] <= 100
    assert len(evals[0]["IoU"]) == 14
    assert os.path.isfile(whole / "best.pt") and os.path.isfile(whole / "ckpt.pt")
    assert "optimizer" not in common.load_checkpoint(str(whole / "best.pt"))  # weights only, as fine-tuning's
    assert "optimizer" in common.load_checkpoint(str(whole / "ckpt.pt"))  # what a rerun resumes from

    # Stop after 2 iterations (mid-epoch, with gradient accumulation), then resume: iterations 3 and 4 repeat
    # the uninterrupted run's losses.
    run_script(seg_args(odd_demo, split, f"--init_from={pretrain_ckpt}", "--max_iters=2"), env=env)
    proc = run_script(seg_args(odd_demo, split, f"--init_from={pretrain_ckpt}"), env=env)
    assert "resuming from" in proc.stdout and "at iteration 2" in proc.stdout
    resumed, resumed_evals = read_log(split)
    assert sorted(resumed) == [1, 2, 3, 4]
    for it in (3, 4):
        assert resumed[it] == pytest.approx(losses[it], rel=1e-5, abs=1e-6), it
    assert resumed_evals[0]["mIoU"] == pytest.approx(evals[0]["mIoU"], abs=1e-9)

    # The final checkpoint on 2 Gloo processes (20 + 19 images) scores exactly what one process scored.
    run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                *seg_args(odd_demo, dist2, "--eval_only", f"--init_from={whole / 'ckpt.pt'}")], env=env)
    _, dist_evals = read_log(dist2)
    assert len(dist_evals) == 1
    for key in ("mIoU", "mAcc", "aAcc"):
        assert dist_evals[0][key] == pytest.approx(evals[0][key], abs=1e-9), key
    np.testing.assert_allclose(dist_evals[0]["IoU"], evals[0]["IoU"], atol=1e-9)


@pytest.mark.cuda
def test_demo_on_gpu_with_bf16_and_compile(demo_root, tmp_path):
    run_script(seg_args(os.path.join(demo_root, "ADEChallengeData2016"), tmp_path, "--compile", "--device=cuda"))
    losses, evals = read_log(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert len(evals) == 1 and 0 <= evals[0]["mIoU"] <= 100


def test_sigterm_mid_epoch_then_rerun_gives_bit_identical_weights(odd_demo, tmp_path, monkeypatch, capsys):
    """SIGTERM at iteration 3 (mid-epoch, 2 micro-batches an iteration, 2 workers), then a rerun: the final
    weights, BatchNorm statistics and evaluation equal an uninterrupted run's."""
    from conftest import assert_same_weights, stage_settings, stopped_run_exit_code
    torch.set_num_threads(1)

    def settings(out):
        return stage_settings(segment, "config/segment_demo.py", demo_data="", data_dir=odd_demo, out_dir=str(out),
                              depth=2, crop_size=32, scale=(128, 48), eval_stride=21, channels=32, aux_channels=16,
                              batch_size=8, micro_batch_size=4, workers=2, iters=6, warmup_iters=2, eval_interval=6,
                              ckpt_interval=100, log_interval=1, micro_batch_bn=True, device="cpu")
    whole = segment.main(settings(tmp_path / "whole"))
    code = stopped_run_exit_code(monkeypatch, 3, lambda: segment.main(settings(tmp_path / "split")))
    assert code == 130 and common.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["step"] == 3
    assert f"stopped: saved {tmp_path / 'split' / 'ckpt.pt'}; run the same command to resume" in capsys.readouterr().out
    split = segment.main(settings(tmp_path / "split"))
    assert_same_weights(tmp_path / "whole" / "ckpt.pt", tmp_path / "split" / "ckpt.pt")
    assert split["mIoU"] == whole["mIoU"]
    losses, _ = read_log(tmp_path / "split")
    assert losses == read_log(tmp_path / "whole")[0]


def test_class_names_come_from_the_datasets_own_table(tmp_path):
    """ADEChallengeData2016/objectInfo150.txt (tab-separated, synonyms after a comma) names the classes; without
    it, or with another count, they are numbered."""
    (tmp_path / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
                                                "2\t0.1072\t6046\t612\tbuilding, edifice\n3\t0.0878\t8265\t796\tsky\n")
    assert data.class_names(str(tmp_path), 3) == ["wall", "building", "sky"]
    assert data.class_names(str(tmp_path), 4) == ["class 0", "class 1", "class 2", "class 3"]
    assert data.class_names(str(tmp_path / "nowhere"), 2) == ["class 0", "class 1"]
