"""finetune.py: optimizer groups, checkpoint conversion, accuracy counting (1 and 2 processes), MixUp/CutMix
targets, end-to-end runs (demo config, resume, linear probing), bad input, and real CIFAR-10 images."""
import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import data
import finetune
from conftest import ROOT, run_script
from configurator import settings
from model import VisionTransformer, load_backbone

TINY = dict(model="tiny", depth=2, img_size=64, patch_size=8)  # the conftest pre-training checkpoint's model
TINY_ARGS = dict(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3)  # the same, as model arguments


# ------------------------------------------------------------------------------------------ optimizer groups
BLOCK_PARAMS = {  # name within a block -> weight decay applies (only the matrices)
    "gamma_1": False, "gamma_2": False, "norm1.weight": False, "norm1.bias": False, "attn.q_bias": False,
    "attn.v_bias": False, "attn.qkv.weight": True, "attn.proj.weight": True, "attn.proj.bias": False,
    "attn.rel_pos.table": True, "norm2.weight": False, "norm2.bias": False, "mlp.fc1.weight": True,
    "mlp.fc1.bias": False, "mlp.fc2.weight": True, "mlp.fc2.bias": False,
}


def test_layer_decay_scales_and_weight_decay_exemptions():
    net = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3,
                            shared_rel_pos=False, block_rel_pos=True)
    # decay 0.5, 2 blocks: scale 0.5 ** (3 - layer id): embeddings 0.125, block 0 0.25, block 1 0.5, head 1.
    expected = {"cls_token": (0.125, 0.0), "patch_embed.weight": (0.125, 0.05), "patch_embed.bias": (0.125, 0.0),
                "fc_norm.weight": (1.0, 0.0), "fc_norm.bias": (1.0, 0.0), "head.weight": (1.0, 0.05),
                "head.bias": (1.0, 0.0)}
    for block, scale in ((0, 0.25), (1, 0.5)):
        for name, decays in BLOCK_PARAMS.items():
            expected[f"blocks.{block}.{name}"] = (scale, 0.05 if decays else 0.0)
    groups = common.param_groups(net, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    name_of = {id(p): name for name, p in net.named_parameters()}
    got = {name_of[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert got == expected
    optimizer = common.adamw(groups, lr=1.0, betas=(0.9, 0.999))
    common.set_lr(optimizer, 2.0)  # each group's lr is the base lr times its scale
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.25, 0.5, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ conversion
def _classifier(**kw):
    cfg = settings(finetune, **{**TINY, **kw})
    return finetune.build_model(finetune.model_args(cfg, num_classes=10), None, cfg.init_scale)


def test_pretraining_checkpoint_converts_into_the_classifier(pretrain_ckpt, tmp_path):
    ckpt = common.load_checkpoint(pretrain_ckpt)
    g = torch.Generator().manual_seed(0)  # non-zero tables, so the sum below is not trivially right
    for k in [k for k in ckpt["model"] if k.endswith("rel_pos.table")]:
        ckpt["model"][k] = torch.randn(ckpt["model"][k].shape, generator=g)
    path = str(tmp_path / "pre.pt")
    torch.save(ckpt, path)
    state, shared = ckpt["model"], ckpt["model"]["rel_pos.table"]

    messages = []
    net = _classifier()
    finetune.init_model(net, path, log=messages.append)
    assert messages == ["loaded backbone: missing keys ['fc_norm.weight', 'fc_norm.bias', 'head.weight', "
                        "'head.bias']; unexpected keys none"]
    for i, block in enumerate(net.blocks):
        assert torch.equal(block.attn.rel_pos.table, state[f"blocks.{i}.attn.rel_pos.table"] + shared)
    for k, v in net.state_dict().items():  # everything else is the checkpoint's, unchanged
        if not k.startswith(("fc_norm", "head")) and not k.endswith("rel_pos.table"):
            assert torch.equal(v, state[k]), k
    torch.manual_seed(0)
    unscaled = _classifier(init_scale=1.0)
    torch.manual_seed(0)
    scaled = _classifier()  # BEiT's init_scale 0.001 on the new head's trunc-normal(0.02) weights
    assert torch.equal(scaled.head.weight, unscaled.head.weight * 0.001)
    assert unscaled.head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # normal(0.02), not cut at 1 std

    bigger = _classifier(img_size=96)  # 8x8 -> 12x12 patches: tables are resized after the sum
    finetune.init_model(bigger, path, log=lambda *_: None)
    from conftest import resized_rel_pos_table_by_hand
    expect = resized_rel_pos_table_by_hand(state["blocks.1.attn.rel_pos.table"] + shared, (8, 8), (12, 12))
    assert bigger.blocks[1].attn.rel_pos.table.shape == (23 * 23 + 3, 3)
    torch.testing.assert_close(bigger.blocks[1].attn.rel_pos.table.data, expect, rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_size_is_refused_with_the_shapes(pretrain_ckpt):
    net = _classifier(model="small")  # width 384 against the checkpoint's 192
    with pytest.raises(SystemExit) as e:
        finetune.init_model(net, pretrain_ckpt, log=lambda *_: None)
    assert pretrain_ckpt in str(e.value)
    assert "patch_embed.weight: checkpoint (192, 3, 8, 8) vs model (384, 3, 8, 8)" in str(e.value)


# -------------------------------------------------------------------------------------------------- accuracy
LOGITS = torch.tensor([[6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6],
                       [1, 2, 3, 4, 5, 6], [0, 0, 9, 0, 0, 0], [3, 1, 4, 2, 5, 9]], dtype=torch.float32)
LABELS = torch.tensor([0, 4, 5, 5, 0, 2, 3])
# label rank among the logits: 1, 5, 6, 1, 6, 1, 5 -> top-1 hits 3 of 7, top-5 hits 5 of 7.


class FixedLogits(torch.nn.Module):
    """'Images' are sample indices; the logits are looked up."""

    def forward(self, x):
        return LOGITS[x[:, 0].long()]


def _index_dataset():
    return torch.utils.data.TensorDataset(torch.arange(7, dtype=torch.float32)[:, None], LABELS)


def _hand_loss():
    total = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / 7


def test_top1_top5_match_hand_computed_values():
    dist_ = common.Dist("cpu")
    loader = data.data_loader(_index_dataset(), 3, dist_, train=False, workers=0)
    metrics = finetune.evaluate(FixedLogits(), loader, dist_)
    assert metrics["samples"] == 7
    assert metrics["top1"] == pytest.approx(100 * 3 / 7)
    assert metrics["top5"] == pytest.approx(100 * 5 / 7)
    assert metrics["loss"] == pytest.approx(_hand_loss(), rel=1e-6)


def _eval_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist_ = common.Dist("cpu")
    loader = data.data_loader(_index_dataset(), 2, dist_, train=False, workers=0)
    seen = sorted(int(i) for images, _ in loader for i in images[:, 0])
    metrics = finetune.evaluate(FixedLogits(), loader, dist_)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"metrics": metrics, "seen": seen}, f)
    dist_.close()


def test_two_process_gloo_evaluation_counts_each_sample_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_eval_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["seen"] == [0, 2, 4, 6] and ranks[1]["seen"] == [1, 3, 5]  # 7 samples, no duplicates
    dist_ = common.Dist("cpu")
    single = finetune.evaluate(FixedLogits(), data.data_loader(_index_dataset(), 2, dist_, False, 0), dist_)
    for r in ranks:  # every rank gets the all-reduced counts
        assert r["metrics"]["samples"] == 7
        assert r["metrics"]["top1"] == pytest.approx(single["top1"])
        assert r["metrics"]["top5"] == pytest.approx(single["top5"])
        assert r["metrics"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------- mixup / cutmix
def test_mixup_cutmix_targets_are_distributions_and_f_cross_entropy_is_their_soft_cross_entropy():
    K, s, B = 5, 0.1, 4
    mix = finetune.make_targets(settings(finetune, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, smoothing=s), K)
    labels = torch.tensor([0, 1, 2, 4])
    kinds = set()
    for seed in range(16):
        torch.manual_seed(seed)
        images = torch.arange(1, B + 1, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 64, 64).clone()
        mixed, targets = mix(images, labels)
        assert targets.shape == (B, K)
        assert torch.all(targets >= 0) and torch.allclose(targets.sum(1), torch.ones(B))
        for i in range(B):  # recover the mixing weight from the image, then rebuild the target by hand
            own, other = float(i + 1), float((i - 1) % B + 1)  # torchvision mixes each sample with the previous
            values = mixed[i].unique()
            if all(v in (own, other) for v in values.tolist()):  # CutMix: a pasted box, never nothing
                pasted = (mixed[i, 0] == other)
                rows, cols = pasted.any(1), pasted.any(0)
                assert pasted.any() and pasted[rows][:, cols].all(), "CutMix pastes one non-empty rectangle"
                lam, kinds = (mixed[i] == own).float().mean().item(), kinds | {"cutmix"}
            else:  # MixUp: one blended value, strictly between the two
                lam, kinds = (values.item() - other) / (own - other), kinds | {"mixup"}
                assert len(values) == 1 and 0 < lam < 1
            expect = np.full(K, s / K)
            expect[labels[i]] += (1 - s) * lam
            expect[labels[(i - 1) % B]] += (1 - s) * (1 - lam)
            assert np.allclose(targets[i].numpy(), expect, atol=1e-5)
        logits = torch.randn(B, K)
        by_hand = np.mean([sum(-t * (l - math.log(sum(math.exp(x) for x in row))) for t, l in zip(trow, row))
                           for trow, row in zip(targets.tolist(), logits.tolist())])
        assert F.cross_entropy(logits, targets).item() == pytest.approx(by_hand, rel=1e-5)  # as the loop uses it
    assert kinds == {"mixup", "cutmix"}  # both were drawn


# ------------------------------------------------------------------------------------------------ end to end
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: a second thread buys little, and costs a lot on a busy machine


def _demo_args(demo_root, pretrain_ckpt, out_dir, *extra):
    return ["finetune.py", "config/finetune_demo.py", f"--demo_data={demo_root}", f"--data_dir={demo_root}",
            f"--init_from={pretrain_ckpt}", f"--out_dir={out_dir}", "--depth=2", "--epochs=2",
            "--batch_size=16", "--micro_batch_size=16", "--workers=0", *extra]


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo_run(demo_root, pretrain_ckpt, tmp_path_factory):
    """The demo config, uninterrupted: 2 epochs of 7 steps (120 images, batch 16)."""
    out = str(tmp_path_factory.mktemp("ft_demo"))
    proc = run_script(_demo_args(demo_root, pretrain_ckpt, out), env=ONE_THREAD)
    return out, proc


def test_demo_config_end_to_end(demo_run):
    out, proc = demo_run
    assert "missing keys ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" in proc.stdout
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["step"] == 14
    for r in log:
        assert math.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= r["val_top5"] <= 100
    last, best = common.load_checkpoint(os.path.join(out, "ckpt.pt")), common.load_checkpoint(os.path.join(out, "best.pt"))
    assert last["epoch"] == 2 and last["step"] == 14 and last["metrics"]["samples"] == 40
    assert best["metrics"]["top1"] == max(r["val_top1"] for r in log) == last["best_top1"]
    assert set(last) >= {"model", "optimizer", "step", "epoch", "config", "model_args", "code"}
    assert "optimizer" not in best  # best.pt: weights only (a run resumes from ckpt.pt), as segment.py's
    assert Image.open(os.path.join(out, "curves.png")).size[0] > 0  # drawn from log.jsonl at the end


def test_a_finished_run_says_so_and_trains_nothing(demo_run, demo_root, pretrain_ckpt, tmp_path, capsys):
    from conftest import stage_settings
    done = str(tmp_path / "done")
    shutil.copytree(demo_run[0], done)
    before = (common.weights_digest(common.load_checkpoint(os.path.join(done, "ckpt.pt"))["model"]), _log(done))
    cfg = stage_settings(finetune, "config/finetune_demo.py", demo_data="", data_dir=demo_root,
                         init_from=pretrain_ckpt, out_dir=done, depth=2, epochs=2, batch_size=16,
                         micro_batch_size=16, workers=0, device="cpu")
    finetune.main(cfg)
    assert "finished: nothing to train" in capsys.readouterr().out
    assert (common.weights_digest(common.load_checkpoint(os.path.join(done, "ckpt.pt"))["model"]), _log(done)) == before


def test_resume_gives_the_same_next_epoch_loss(demo_run, demo_root, pretrain_ckpt, tmp_path):
    full, _ = demo_run
    out = str(tmp_path / "resumed")
    run_script(_demo_args(demo_root, pretrain_ckpt, out, "--max_steps=7"), env=ONE_THREAD)  # stops after epoch 0
    assert len(_log(out)) == 1 and common.load_checkpoint(os.path.join(out, "ckpt.pt"))["epoch"] == 1
    proc = run_script(_demo_args(demo_root, pretrain_ckpt, out), env=ONE_THREAD)
    assert "resuming from" in proc.stdout
    resumed, uninterrupted = _log(out), _log(full)
    assert [r["epoch"] for r in resumed] == [0, 1]
    for key in ("train_loss", "val_loss", "val_top1"):  # same machine, same thread count: bit-identical
        assert resumed[1][key] == uninterrupted[1][key], key


def test_eval_only_reproduces_the_logged_accuracy_without_a_train_folder(demo_run, demo_root, pretrain_ckpt,
                                                                        tmp_path):
    """eval_only, given the val split alone, writes a result whose top-1 / top-5 (and the best epoch's logged
    ones) equal a count made here: best.pt's weights in a plain VisionTransformer, each image's logits sorted."""
    out, _ = demo_run
    shutil.copytree(os.path.join(demo_root, "val"), tmp_path / "data" / "val")  # the val split alone
    cfg = settings(finetune, **TINY, init_from=os.path.join(out, "best.pt"), data_dir=str(tmp_path / "data"),
                            out_dir=str(tmp_path / "eval"), eval_only=True, workers=0, micro_batch_size=16,
                            device="cpu")
    _, val, classes = data.image_folders(demo_root, "train", "val")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run that logged it: the same sums, bit for bit
    try:
        finetune.main(cfg)
        best_ckpt = common.load_checkpoint(os.path.join(out, "best.pt"))
        net = VisionTransformer(**best_ckpt["model_args"]).eval()
        net.load_state_dict(best_ckpt["model"])
        transform = data.finetune_eval_transform(cfg.img_size, cfg.crop_pct)
        top1 = top5 = 0
        with torch.no_grad():
            for start in range(0, len(val), 16):
                batch = [val[i] for i in range(start, min(start + 16, len(val)))]
                uint8 = torch.stack([transform(image) for image, _ in batch])
                logits = net(common.normalize(uint8, common.IMAGENET_MEAN, common.IMAGENET_STD))
                for row, (_, label) in zip(logits, batch):
                    ranked = row.argsort(descending=True).tolist()
                    top1 += ranked[0] == label
                    top5 += label in ranked[:5]
    finally:
        torch.set_num_threads(threads)
    expected = (100 * top1 / len(val), 100 * top5 / len(val), len(val))
    assert len(val) == 40 and 0 < top1 < 40  # a count that can go wrong either way
    (result,) = _log(tmp_path / "eval")  # the result file, as segment.py's eval_only writes it
    assert result["eval_only"] == cfg.init_from
    assert (result["top1"], result["top5"], result["samples"]) == expected
    best = max(_log(out), key=lambda r: r["val_top1"])
    assert (best["val_top1"], best["val_top5"]) == pytest.approx(expected[:2])
    with pytest.raises(SystemExit, match="not a fine-tuned checkpoint"):
        finetune.evaluate_checkpoint(settings(finetune, **TINY, init_from=pretrain_ckpt), val, classes,
                                     common.Dist("cpu"))


def test_linear_probe_leaves_the_backbone_bit_identical(demo_root, pretrain_ckpt, tmp_path):
    out = str(tmp_path / "probe")
    run_script(_demo_args(demo_root, pretrain_ckpt, out, "--linear_probe", "--probe_epochs=1",
                          "--probe_warmup_epochs=0"), env=ONE_THREAD)
    probe = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    reference = VisionTransformer(**probe["model_args"])  # the backbone as converted, before any training
    load_backbone(reference, common.load_checkpoint(pretrain_ckpt), log=lambda *_: None)
    for k, v in reference.state_dict().items():
        assert torch.equal(probe["model"][f"backbone.{k}"], v), k
    assert probe["model_args"]["num_classes"] == 0 and probe["probe"] == {"block": -1, "num_classes": 10}
    assert probe["model"]["bn.running_var"].ne(1).any()  # the probe itself did train
    assert "bn.weight" not in probe["model"]  # BatchNorm without affine parameters


@pytest.mark.cuda
def test_demo_on_gpu_with_bf16_compile_and_fused_adamw(demo_root, pretrain_ckpt, tmp_path):
    """The GPU path (bf16 autocast, torch.compile, fused AdamW, MixUp/CutMix on device tensors), one epoch."""
    out = str(tmp_path / "gpu")
    run_script(_demo_args(demo_root, pretrain_ckpt, out, "--device=cuda", "--compile", "--max_steps=7"))
    log = _log(out)
    assert len(log) == 1 and math.isfinite(log[0]["train_loss"]) and 0 <= log[0]["val_top1"] <= 100
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 7


# ----------------------------------------------------------------------------------------------- bad input
def _write_images(root, names):
    for name in names:
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(os.path.join(root, name))


def test_val_classes_differing_from_train_classes_is_an_error(tmp_path):
    _write_images(tmp_path, ["train/cat/0.png", "train/dog/0.png", "val/cat/0.png", "val/owl/0.png"])
    with pytest.raises(SystemExit) as e:
        data.image_folders(str(tmp_path), "train", "val")
    assert "only in val/: ['owl']" in str(e.value) and "only in train/: ['dog']" in str(e.value)
    assert str(tmp_path / "val") in str(e.value)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_imagenet")
    proc = run_script(["finetune.py", f"--data_dir={missing}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"],
                      check=False, timeout=120)
    assert proc.returncode != 0
    assert f"data_dir {missing!r} does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out")  # refused before out_dir is made


# ------------------------------------------------------------------------------------------------ real data
def test_from_scratch_on_cifar10_beats_chance(cifar10, tmp_path):
    """A 2-block tiny ViT from random init, 200 train images per class (symlinks: nothing is copied)."""
    classes = sorted(os.listdir(os.path.join(cifar10, "train")))
    for split, source, per_class in (("train", "train", 200), ("val", "test", 50)):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            for name in sorted(os.listdir(os.path.join(cifar10, source, c)))[:per_class]:
                os.symlink(os.path.join(cifar10, source, c, name), tmp_path / split / c / name)
    run_script(["finetune.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--model=tiny",
                "--depth=2", "--img_size=32", "--patch_size=8", "--init_from=", "--epochs=4", "--warmup_epochs=1",
                "--batch_size=50", "--micro_batch_size=50", "--lr=0.02", "--drop_path=0.0", "--randaug_ops=0",
                "--mixup=0", "--cutmix=0", "--erase_prob=0", "--smoothing=0", "--layer_decay=1.0",
                "--crop_scale=(0.5, 1.0)", "--crop_pct=1.0", "--workers=0", "--device=cpu"], env=ONE_THREAD)
    top1 = _log(tmp_path / "out")[-1]["val_top1"]
    assert top1 > 20.0, f"val top-1 {top1} after 4 epochs (chance: 10; 28-31 measured)"


# ---------------------------------------------------------------------------------- stops and exact resume
def _fit_settings(demo_root, pretrain_ckpt, out, **kw):
    """The full fine-tuning augmentation (RandAugment, erasing, MixUp/CutMix, drop path), 2 micro-batches a step."""
    given = dict(TINY, init_from=pretrain_ckpt, out_dir=str(out), epochs=1, warmup_epochs=1, batch_size=16,
                 micro_batch_size=8, workers=0, crop_scale=(0.5, 1.0), device="cpu")
    return settings(finetune, **{**given, **kw})


def test_sigterm_mid_epoch_then_rerun_gives_bit_identical_weights(demo_root, pretrain_ckpt, tmp_path, monkeypatch,
                                                                   capsys):
    from conftest import assert_same_weights, stopped_run_exit_code
    folders = data.image_folders(demo_root, "train", "val")
    torch.set_num_threads(1)
    whole = finetune.fit(_fit_settings(demo_root, pretrain_ckpt, tmp_path / "whole"), *folders, common.Dist("cpu"))
    code = stopped_run_exit_code(monkeypatch, 3, lambda: finetune.fit(
        _fit_settings(demo_root, pretrain_ckpt, tmp_path / "split"), *folders, common.Dist("cpu")))
    assert code == 130 and common.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["step"] == 3
    assert f"stopped: saved {tmp_path / 'split' / 'ckpt.pt'}; run the same command to resume" in capsys.readouterr().out
    split = finetune.fit(_fit_settings(demo_root, pretrain_ckpt, tmp_path / "split"), *folders, common.Dist("cpu"))
    assert_same_weights(tmp_path / "whole" / "ckpt.pt", tmp_path / "split" / "ckpt.pt")
    assert split == whole


@pytest.mark.parametrize("how", ["sigterm", "killed"])
def test_stop_during_the_final_evaluation_then_rerun_gives_the_same_results(demo_root, pretrain_ckpt, tmp_path,
                                                                           monkeypatch, how):
    """SIGTERM during the last evaluation lets it finish; a process killed during it leaves the epoch marked
    unevaluated, and the rerun evaluates it. Either way: the log, best.pt and the result of a run that did not stop."""
    import signal
    from conftest import assert_same_weights
    folders = data.image_folders(demo_root, "train", "val")
    torch.set_num_threads(1)
    whole = finetune.fit(_fit_settings(demo_root, pretrain_ckpt, tmp_path / "whole", workers=2), *folders,
                         common.Dist("cpu"))
    evaluate = finetune.evaluate

    def stopped_evaluate(*args):
        if how == "killed":
            raise KeyboardInterrupt  # as if killed: nothing after this point runs
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args)
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "evaluate", stopped_evaluate)
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            finetune.fit(_fit_settings(demo_root, pretrain_ckpt, tmp_path / "split", workers=2), *folders,
                         common.Dist("cpu"))
    rerun = finetune.fit(_fit_settings(demo_root, pretrain_ckpt, tmp_path / "split", workers=2), *folders,
                         common.Dist("cpu"))
    assert rerun == whole and "top1" in rerun
    for key in ("val_top1", "val_top5", "val_loss", "best_top1", "train_loss"):
        assert [r[key] for r in _log(tmp_path / "split")] == [r[key] for r in _log(tmp_path / "whole")], key
    assert_same_weights(tmp_path / "whole" / "best.pt", tmp_path / "split" / "best.pt")


def test_best_pt_holds_the_best_epoch_not_the_last(demo_root, pretrain_ckpt, tmp_path, monkeypatch):
    """Evaluations scripted to peak at the first of two epochs: best.pt holds that epoch's weights (its step, its
    score), ckpt.pt the last epoch's, and the two differ."""
    folders = data.image_folders(demo_root, "train", "val")
    scripted = iter([50.0, 30.0])
    monkeypatch.setattr(finetune, "evaluate", lambda *args: {"top1": next(scripted), "top5": 90.0, "loss": 1.0,
                                                               "samples": 40})
    cfg = _fit_settings(demo_root, pretrain_ckpt, tmp_path / "out", epochs=2, micro_batch_size=16)
    result = finetune.fit(cfg, *folders, common.Dist("cpu"))
    steps_per_epoch = len(folders[0]) // 16
    best, last = (common.load_checkpoint(str(tmp_path / "out" / name)) for name in ("best.pt", "ckpt.pt"))
    assert (best["step"], best["epoch"], best["metrics"]["top1"]) == (steps_per_epoch, 1, 50.0)
    assert (last["step"], last["epoch"], last["metrics"]["top1"]) == (2 * steps_per_epoch, 2, 30.0)
    assert result["top1"] == 30.0 and result["best_top1"] == 50.0
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_a_segmentation_checkpoint_gives_its_backbone_without_a_wall_of_unexpected_keys(tmp_path):
    """A segmenter's ckpt.pt holds backbone.*, the UperNet and auxiliary heads: fine-tuning takes the backbone and
    reports only the classifier's new parts as missing (it listed ~100 unexpected keys before)."""
    import model
    backbone = model.VisionTransformer(**dict(TINY_ARGS, shared_rel_pos=False))
    torch.manual_seed(4)
    for p in backbone.parameters():
        torch.nn.init.normal_(p)
    segmenter = model.UperNetSegmenter(backbone, 3, channels=16, aux_channels=8)
    common.save_checkpoint({"model": segmenter.state_dict(), "backbone_args": dict(TINY_ARGS, shared_rel_pos=False),
                            "head_args": {"num_classes": 3}, "stage": "segment"}, str(tmp_path / "seg.pt"))
    messages = []
    net = _classifier()
    finetune.init_model(net, str(tmp_path / "seg.pt"), log=messages.append)
    assert messages == ["loaded backbone: missing keys ['fc_norm.weight', 'fc_norm.bias', 'head.weight', "
                        "'head.bias']; unexpected keys none"]
    for name, value in segmenter.backbone.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
