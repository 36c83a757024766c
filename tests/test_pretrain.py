"""pretrain.py end to end (subprocesses, as a user runs it) and its data pipeline."""
import json
import os
import random
import shutil

import pytest
import torch

import common
import data
import teacher
from conftest import RANDOM_TEACHER, ROOT, run_script, tiny_pretrain_args


def digest_of(path):
    return common.weights_digest(common.load_checkpoint(str(path))["model"])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_demo_run_writes_a_complete_checkpoint(pretrain_ckpt):
    ckpt = common.load_checkpoint(pretrain_ckpt)  # weights_only=True
    assert ckpt["step"] == 2 and ckpt["config"]["max_steps"] == 2 and ckpt["config"]["depth"] == 2
    assert ckpt["model_args"]["out_dim"] == 64 and ckpt["model_args"]["mask_token"]
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "model_args", "code"}
    assert len(ckpt["optimizer"]["state"]) == len([k for k in ckpt["model"] if "index" not in k])
    log = read_log(os.path.dirname(pretrain_ckpt))
    assert len(log) == 1 and log[0]["step"] == 2 and 0 < log[0]["loss"] < 10


def test_the_demo_config_runs_and_a_random_teacher_is_announced_loudly(demo_root, tmp_path):
    proc = run_script(tiny_pretrain_args(demo_root, tmp_path, "--max_steps=1"))
    assert "RANDOMLY INITIALISED" in proc.stderr
    assert "model              = 'tiny'" in proc.stdout  # the resolved configuration is printed
    assert read_log(tmp_path)[0]["step"] == 1


def test_the_demo_config_without_its_teacher_names_the_command_that_trains_it(demo_root, tmp_path):
    """Run where the teacher demo has not been run: the demo stops at once, naming the missing checkpoint and
    the command that writes it, and writes nothing (not even out_dir)."""
    proc = run_script([os.path.join(ROOT, "pretrain.py"), os.path.join(ROOT, "config", "pretrain_demo.py"),
                       f"--demo_data={demo_root}", f"--data_dir={demo_root}/train", "--workers=0"], cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "teacher='out/demo_teacher/demo_coarse/ckpt.pt' does not exist" in proc.stderr
    assert "python eval_transfer.py config/transfer_demo_teacher.py" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_resume_gives_the_same_next_epoch(demo_root, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script(tiny_pretrain_args(demo_root, whole))
    steps_per_epoch = read_log(whole)[0]["step"]
    run_script(tiny_pretrain_args(demo_root, split, f"--max_steps={steps_per_epoch}"))  # stops after epoch 1
    assert [r["epoch"] for r in read_log(split)] == [0]
    proc = run_script(tiny_pretrain_args(demo_root, split))
    assert "resuming from" in proc.stdout
    a, b = read_log(whole), read_log(split)
    assert [r["epoch"] for r in b] == [0, 1]
    assert a[1]["loss"] == b[1]["loss"] and a[1]["step"] == b[1]["step"]
    assert a[0]["loss"] == b[0]["loss"]
    assert digest_of(whole / "ckpt.pt") == digest_of(split / "ckpt.pt")


def test_gradient_accumulation_equals_one_big_batch(demo_root, tmp_path, monkeypatch):
    """2 micro-batches of 8 accumulated equal 1 batch of 16 after two SGD steps (token-wise loss: a mean over
    equal micro-batches). A loss not divided by the number of micro-batches, or a dropped micro-batch, moves
    nearly every weight."""
    import pretrain
    from conftest import stage_settings
    from pretrain_with_sgd import sgd_instead_of_adamw
    monkeypatch.setattr(common, "adamw", sgd_instead_of_adamw)
    weights = {}
    for micro in (16, 8):
        out = tmp_path / f"micro{micro}"
        pretrain.main(stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                                     out_dir=str(out), depth=2, epochs=1, warmup_epochs=0, batch_size=16,
                                     micro_batch_size=micro, max_steps=2, grad_clip=0.0, dtm=False, lr=20.0,
                                     workers=0, device="cpu", **RANDOM_TEACHER))
        weights[micro] = common.load_checkpoint(str(out / "ckpt.pt"))["model"]
    init = pretrain_init_weights(pretrain)
    moved = 0
    for key, big in weights[16].items():
        torch.testing.assert_close(weights[8][key], big, rtol=1e-4, atol=1e-6)
        if key in init and big.is_floating_point():
            moved += int(((big - init[key]).abs() > 1e-4 * (1 + init[key].abs())).sum())
    assert moved > 0.5 * sum(t.numel() for k, t in init.items() if t.is_floating_point())  # the test can see it


def pretrain_init_weights(pretrain):
    """The student's weights before any step, as main makes them (same seed, same teacher, same order)."""
    from conftest import stage_settings
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", depth=2, **RANDOM_TEACHER)
    common.seed_everything(cfg.seed)
    net = teacher.build_teacher(cfg.teacher, cfg.teacher_pretrained, cfg.teacher_overrides, torch.device("cpu"))
    args = pretrain.model_args(cfg.model, net.out_dim, cfg.img_size, cfg.patch_size, cfg.depth)
    from model import VisionTransformer
    return VisionTransformer(**args).state_dict()


def test_torchrun_two_processes_on_gloo_equal_one_process_on_the_same_global_batch(demo_root, tmp_path):
    """2 processes x 2 micro-batches of 4 (gloo, CPU) against 1 process x 1 batch of 16, two steps, the
    token-wise loss (DTM's schedules are drawn per rank): the same 16 images per step, split into disjoint
    shards, so the same weights. Overlapping shards (both ranks on the same images) give other weights."""
    from conftest import free_port
    args = ["--dtm=False", "--max_steps=2", "--warmup_epochs=0", "--grad_clip=0.0", "--lr=20.0"]
    sgd = os.path.join("tests", "pretrain_with_sgd.py")  # an update linear in the gradient (see there)
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", sgd,
                       *tiny_pretrain_args(demo_root, tmp_path / "ddp", "--micro_batch_size=4", *args)[1:]])
    digests = {line.split()[1]: line.split()[-1] for line in proc.stdout.splitlines() if "weights sha256" in line}
    assert set(digests) == {"0:", "1:"}
    assert digests["0:"] == digests["1:"]  # both replicas ended with bit-identical weights
    assert sorted(os.listdir(tmp_path / "ddp")) == ["ckpt.pt", "curves.png", "log.jsonl", "run.lock"]  # rank 0 writes
    assert len(read_log(tmp_path / "ddp")) == 1
    assert digest_of(tmp_path / "ddp" / "ckpt.pt") == digests["0:"]
    assert proc.stdout.count("configuration:") == 1  # printed once
    run_script([sgd, *tiny_pretrain_args(demo_root, tmp_path / "one", "--micro_batch_size=16", *args)[1:]])
    ddp = common.load_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))
    one = common.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
    assert ddp["step"] == one["step"] == 2
    for key in one["model"]:
        torch.testing.assert_close(ddp["model"][key], one["model"][key], rtol=1e-4, atol=1e-6)
    assert read_log(tmp_path / "ddp")[0]["loss"] == pytest.approx(read_log(tmp_path / "one")[0]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def good_checkpoint(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    run_script(tiny_pretrain_args(demo_root, out, "--max_steps=1"))
    return out


@pytest.fixture()
def good_run(good_checkpoint, tmp_path):
    """An out_dir with a good checkpoint, and a check that the test's failed run left it untouched."""
    out = tmp_path / "out"
    shutil.copytree(good_checkpoint, out)
    before = results_in(out)
    yield out
    assert results_in(out) == before


def results_in(out_dir):
    """The bytes of every file in out_dir except run.lock (which holds the pid of the latest run)."""
    return {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir) if name != "run.lock"}


def test_missing_and_empty_data_dir_are_clear_errors(demo_root, good_run, tmp_path):
    missing = tmp_path / "nope"
    proc = run_script(tiny_pretrain_args(demo_root, good_run, f"--data_dir={missing}"), check=False)
    assert proc.returncode != 0 and f"data folder '{missing}' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    proc = run_script(tiny_pretrain_args(demo_root, good_run, f"--data_dir={empty}"), check=False)
    assert proc.returncode != 0 and f"no images in '{empty}'" in proc.stderr


def test_unknown_key_is_a_clear_error(demo_root, good_run):
    proc = run_script(tiny_pretrain_args(demo_root, good_run, "--num_schedule=3"), check=False)
    assert proc.returncode != 0 and "unknown setting 'num_schedule'" in proc.stderr
    assert "did you mean num_schedules" in proc.stderr


def test_non_finite_loss_stops_and_keeps_the_checkpoint(demo_root, good_run):
    proc = run_script(tiny_pretrain_args(demo_root, good_run, "--lr=1e30", "--warmup_epochs=0", "--grad_clip=0.0",
                                         "--max_steps=5", "--log_interval=1"), check=False)
    assert proc.returncode != 0 and "non-finite loss" in proc.stderr


def test_unreachable_teacher_weights_say_how_to_pass_a_file(demo_root, good_run):
    proc = run_script(tiny_pretrain_args(demo_root, good_run, "--teacher_pretrained=/no/such/weights.bin"),
                      check=False)
    assert proc.returncode != 0 and "--teacher_pretrained=/path/to/" in proc.stderr


def test_offline_openai_teacher_fails_fast_with_the_same_advice(monkeypatch, tmp_path):
    """Without the hub and without cached weights, open_clip looks in the local cache only (the hub's offline
    mode, which fails at once instead of after ~50 s of retries), and the message says how to pass a file."""
    import huggingface_hub.constants
    import open_clip
    assert teacher.hub_unreachable("no-such-host.invalid", timeout=2.0)
    monkeypatch.setattr(teacher, "hub_unreachable", lambda: True)  # offline, also on machines that are not
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    create_model, offline_during_load = open_clip.create_model, []

    def spy(*args, **kwargs):
        offline_during_load.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        return create_model(*args, **kwargs)
    monkeypatch.setattr(open_clip, "create_model", spy)
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(SystemExit, match="--teacher_pretrained=/path/to/open_clip_model.bin"):
        teacher.ClipTeacher("ViT-B-16-quickgelu", "openai", {"vision_cfg": {"layers": 1, "width": 64,
                                                                               "head_width": 64}})
    assert offline_during_load == [True]  # the cache only: no retries against an unreachable hub
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline  # the hub's own setting is put back


def test_a_finished_run_says_so_and_trains_nothing(pretrain_ckpt, demo_root, tmp_path, capsys):
    import pretrain
    from conftest import stage_settings
    done = str(tmp_path / "done")
    shutil.copytree(os.path.dirname(pretrain_ckpt), done)
    before = digest_of(os.path.join(done, "ckpt.pt"))
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                         out_dir=done, depth=2, epochs=2, warmup_epochs=1, batch_size=16,
                         micro_batch_size=16, workers=0, max_steps=2, device="cpu", **RANDOM_TEACHER)
    pretrain.main(cfg)  # as the conftest run that wrote it (tiny_pretrain_args, --max_steps=2)
    out = capsys.readouterr().out
    assert "at step 2" in out and "finished: nothing to train" in out
    assert digest_of(os.path.join(done, "ckpt.pt")) == before


def test_corrupt_jpeg_is_skipped_with_a_warning(demo_root, tmp_path):
    mixed = tmp_path / "data" / "mixed"
    mixed.mkdir(parents=True)
    for name in sorted(data.ImageFolder(os.path.join(demo_root, "train")).samples)[:7]:
        shutil.copy(name[0], mixed)
    bad = mixed / "broken.jpg"  # with 7 good images, one batch of 8 must read it
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    proc = run_script(tiny_pretrain_args(demo_root, tmp_path / "out", f"--data_dir={mixed.parent}", "--epochs=1",
                                         "--micro_batch_size=8", "--batch_size=8"))
    assert f"skipping unreadable image {bad}" in proc.stderr
    assert read_log(tmp_path / "out")[0]["step"] == 1


def smooth_l1_by_hand(pred, target, beta):
    d = (pred - target).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def group_means_by_hand(x, groups):
    """x [B, N, C], groups [B, N]: every token replaced by the mean of the tokens that share its group id."""
    same = (groups[:, :, None] == groups[:, None, :]).to(x.dtype)  # [B, N, N]
    return same @ x / same.sum(-1, keepdim=True)


def test_one_step_of_main_minimises_the_objective_of_the_method(demo_root, pretrain_ckpt, tmp_path, monkeypatch):
    """One optimizer step of pretrain.main with a checkpoint of this project as the teacher (DTM on): every loss
    main computes equals the objective built here by hand for that very batch: the teacher (the checkpoint's
    weights, loaded here on their own) sees the full image, the student the image with the mask token at the
    masked patches, the two morphed with groups matched on the teacher's tokens, smooth-L1 (beta 2) over EVERY
    patch (visible and masked), averaged over the schedules."""
    import morph
    import pretrain
    from conftest import stage_settings
    from model import VisionTransformer
    ckpt = common.load_checkpoint(pretrain_ckpt)
    teacher = VisionTransformer(**ckpt["model_args"]).eval()
    teacher.load_state_dict(ckpt["model"])  # strict: every weight of the file
    mean = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    seen = []
    step_loss = pretrain.dtm_step_loss

    def spy(net, teacher_net, images, masks, schedules, loss, beta, *rest):
        got = step_loss(net, teacher_net, images, masks, schedules, loss, beta, *rest)
        with torch.no_grad():
            x = (images.float() / 255 - mean) / std
            targets = teacher(x)  # the full image, no mask
            pred = net(x, masks)  # mask token at the masked patches
            per_schedule = []
            for groups in morph.morph_groups(targets, schedules):  # matched on the teacher's tokens
                per_token = smooth_l1_by_hand(group_means_by_hand(pred, groups),
                                              group_means_by_hand(targets, groups), 2.0)
                per_schedule.append(per_token.mean())  # over every patch of every image, every channel
            seen.append((got.item(), torch.stack(per_schedule).mean().item(), masks.clone(), schedules.clone()))
        return got
    monkeypatch.setattr(pretrain, "dtm_step_loss", spy)
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                         out_dir=str(tmp_path), teacher=pretrain_ckpt, depth=2, epochs=1, batch_size=16,
                         micro_batch_size=16, max_steps=1, workers=0, drop_path=0.0, beta=2.0, loss="smooth_l1",
                         dtm=True, num_schedules=2, device="cpu")
    pretrain.main(cfg)
    assert len(seen) == 2  # the step, and the check of the saved weights
    for got, expected, masks, schedules in seen:
        assert got == pytest.approx(expected, rel=1e-5)
        assert masks.shape == (16, 64) and (masks.sum(1) == cfg.num_masked).all()  # 26 of 64 patches masked
        assert schedules.shape[0] == 2 and schedules.sum() > 0  # DTM really merges
    assert common.load_checkpoint(str(tmp_path / "ckpt.pt"))["model_args"]["out_dim"] == 64  # the teacher's width


def test_clip_teacher_targets_are_projected_ln_post_patch_tokens():
    torch.manual_seed(0)
    clip = teacher.ClipTeacher("ViT-B-16-quickgelu", "", {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1,
                                        "head_width": 32}, "text_cfg": {"width": 32, "heads": 1, "layers": 1}}).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    v = clip.visual
    x = common.normalize(images, teacher.CLIP_MEAN, teacher.CLIP_STD)
    x = v.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(2, 1, -1), x], 1) + v.positional_embedding
    x = v.ln_post(v.transformer(v.ln_pre(x)))
    expected = x[:, 1:] @ v.proj
    with torch.no_grad():
        torch.testing.assert_close(clip(images), expected)
    assert clip(images).shape == (2, 16, 32)


def test_block_masking_counts_and_blocks():
    random.seed(0)
    masking = data.BlockMasking(14, 75, 16)
    counts = [int(masking().sum()) for _ in range(300)]
    assert max(counts) == 75 and sum(counts) / len(counts) > 72  # BEiT's rule can stop a little short
    mask = masking().view(14, 14)
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    padded = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert ((neighbours > 0) & mask).sum() >= 0.9 * mask.sum()


def test_cifar10_images_through_the_pretraining_pipeline(cifar10):
    images = data.ImageFolder(os.path.join(cifar10, "test"))
    assert len(images.classes) == 10 and len(images) == 10000
    dataset = data.MaskedImages(images, 32, data.BlockMasking(4, 6, 2))
    for i in (0, 5000, 9999):
        image, mask, jitter = dataset[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert image.float().std() > 5  # a real photo, not a blank
        assert mask.shape == (16,) and 1 <= mask.sum() <= 6
        assert jitter.shape == (7,) and jitter.dtype == torch.float32
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[1].shape == (8, 16) and batch[2].shape == (8, 7)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_rerun_gives_bit_identical_weights(demo_root, tmp_path, monkeypatch, workers, capsys):
    """Stopped by SIGTERM at step 3 of a 7-step epoch (2 micro-batches a step), then run again: the weights at
    the epoch's end equal an uninterrupted run's bit for bit (crops, masks, drop path, schedules by position)."""
    import pretrain
    from conftest import assert_same_weights, stage_settings, stopped_run_exit_code
    torch.set_num_threads(1)

    def settings(out):
        return stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                              out_dir=str(out), depth=2, epochs=1, warmup_epochs=1, batch_size=16,
                              micro_batch_size=8, workers=workers, drop_path=0.1, device="cpu", **RANDOM_TEACHER)
    pretrain.main(settings(tmp_path / "whole"))
    code = stopped_run_exit_code(monkeypatch, 3, lambda: pretrain.main(settings(tmp_path / "split")))
    assert code == 130 and common.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["step"] == 3
    stopped = f"stopped: saved {tmp_path / 'split' / 'ckpt.pt'}; run the same command to resume"
    assert stopped in capsys.readouterr().out
    pretrain.main(settings(tmp_path / "split"))
    assert_same_weights(tmp_path / "whole" / "ckpt.pt", tmp_path / "split" / "ckpt.pt")
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in whole] == [7]
    assert split[0]["loss"] == pytest.approx(whole[0]["loss"], rel=1e-6)  # the epoch's mean survives the stop


@pytest.mark.parametrize("lr", ["1e30", "1e999"])
def test_a_diverging_run_leaves_a_finite_checkpoint_that_trains_again(demo_root, tmp_path, lr):
    """One-step epochs: a checkpoint follows every step, so a huge step (lr 1e30: finite weights of ~1e28 whose
    loss is infinite) must not be saved as the last good one; 1e999 parses as inf and is refused before training."""
    args = ["--batch_size=64", "--micro_batch_size=64", "--warmup_epochs=0", "--grad_clip=0.0", "--log_interval=100"]
    run_script(tiny_pretrain_args(demo_root, tmp_path, *args, "--max_steps=1"))
    proc = run_script(tiny_pretrain_args(demo_root, tmp_path, *args, f"--lr={lr}", "--epochs=4"), check=False)
    refusal = "non-finite loss" if lr == "1e30" else "config error: lr: inf from --lr=1e999 is not a finite number"
    assert proc.returncode != 0 and refusal in proc.stderr
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 1 and all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())
    run_script(tiny_pretrain_args(demo_root, tmp_path, *args, "--epochs=3"))  # the rerun from it trains
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    assert all(0 < r["loss"] < 10 for r in read_log(tmp_path))


def replayed_schedules(seed: int, rank: int, step: int, micro: int, count: int, n_max: int, k_max: int):
    """The schedules of one micro-batch, drawn here independently: Python's random seeded by the 63-bit seed
    SeedSequence mixes from (seed, rank, step, micro-batch), then `count` draws of n ~ U{0..n_max} merges in
    k ~ U{1..k_max} equal rounds (rounded up unless that would merge more than n_max), padded to k_max."""
    import numpy as np
    rng = random.Random(int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1))
    drawn = []
    for _ in range(count):
        n, k = rng.randint(0, n_max), rng.randint(1, k_max)
        r = -(-n // k) if -(-n // k) * k <= n_max else n // k
        drawn.append([r] * k + [0] * (k_max - k))
    return drawn


def test_each_rank_and_micro_batch_draws_its_own_schedules_from_its_position(demo_root, tmp_path):
    """2 processes (gloo) x 2 micro-batches a step, DTM on, 2 steps: the schedules every training call of the loss
    gets equal an independent replay of the draw of its (seed, rank, step, micro-batch), so they differ between
    micro-batches, steps and ranks. Drawing once per step or per run, from a fixed generator, or without the rank
    in the seed, fails here."""
    from conftest import free_port
    log = tmp_path / "schedules"
    run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                os.path.join("tests", "pretrain_recording_schedules.py"),
                *tiny_pretrain_args(demo_root, tmp_path / "out", "--micro_batch_size=4", "--max_steps=2",
                                    "--num_schedules=2", "--n_max=64", "--k_max=8", "--seed=5")[1:]],
               env={"SCHEDULES_LOG": str(log)})
    by_rank = {}
    for rank in (0, 1):
        with open(f"{log}.{rank}") as f:
            calls = [json.loads(line) for line in f]
        training = [c["schedules"] for c in calls if c["training"]]
        expected = [replayed_schedules(5, rank, step, micro, 2, 64, 8) for step in range(2) for micro in range(2)]
        assert training == expected, rank
        by_rank[rank] = training
    assert by_rank[0] != by_rank[1]  # each rank its own
    assert len({json.dumps(s) for s in by_rank[0]}) == 4  # each micro-batch of each step its own


@pytest.mark.parametrize("change, message", [
    ({"k_max": 0}, "k_max=0 with dtm=True: a schedule has k ~ U{1..k_max} matching rounds; give k_max >= 1"),
    ({"img_size": 60}, "img_size=60 is not a multiple of patch_size=8: the patch grid must cover the image, "
                       "e.g. --img_size=56"),
    ({"n_max": 65}, "n_max=65 is more than the 64 tokens a schedule can merge away"),
    ({"num_schedules": 0}, "num_schedules=0 with dtm=True would train token-wise"),
])
def test_settings_that_cannot_work_are_refused_before_any_work(demo_root, tmp_path, change, message):
    """Each was found deep in the run (a randrange error, a tensor-size mismatch) or not at all (n_max silently
    clamped, no schedule: silently token-wise)."""
    import re
    import pretrain
    from conftest import stage_settings
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                         out_dir=str(tmp_path / "out"), **RANDOM_TEACHER, **change)
    with pytest.raises(SystemExit, match=re.escape(message)):
        pretrain.main(cfg)
    assert not os.path.exists(tmp_path / "out")
    if "k_max" in change or "num_schedules" in change:  # the token-wise baseline needs no schedule
        pretrain.check_settings(stage_settings(pretrain, "config/pretrain_demo.py", **RANDOM_TEACHER, **change,
                                               dtm=False))


def test_a_dataset_root_as_data_dir_is_refused_naming_its_train_folder(demo_root, tmp_path):
    """The demo root holds train/, val/ and ADEChallengeData2016/: taken as an ImageFolder, those would be three
    'classes', and the run would train on the val images and the segmentation label maps."""
    import pretrain
    from conftest import stage_settings
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=demo_root,
                         out_dir=str(tmp_path / "out"), **RANDOM_TEACHER)
    with pytest.raises(SystemExit, match=rf"data_dir='{demo_root}' holds the splits train, val as if they were "
                                         rf"classes: pass the training images' folder, e.g. --data_dir={demo_root}/train"):
        pretrain.main(cfg)
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_the_teacher_must_give_the_students_patch_grid():
    class Teacher(torch.nn.Module):  # one token per 8 x 8 patch, whatever the student's patch size
        def forward(self, images):
            return torch.zeros(len(images), (images.shape[-1] // 8) ** 2, 4)
    teacher.check_patch_grid(Teacher(), 64, 8, torch.device("cpu"))  # 64 targets for 64 student tokens
    with pytest.raises(SystemExit, match=r"the teacher gives 64 tokens for a 64px image, the student 16 "
                                         r"\(patch_size=16\): give them the same patch grid"):
        teacher.check_patch_grid(Teacher(), 64, 16, torch.device("cpu"))
