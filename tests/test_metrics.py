"""Optional wandb and TensorBoard logging (plot.Metrics): fake packages injected through sys.modules must
receive exactly the numbers of log.jsonl, at their steps; a missing package is an error naming the setting."""
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import common
import data
import plot
from configurator import settings

SKIPPED = ("step", "iter", "time")  # the x axis and the wall clock are not curves


class FakeWandb(types.ModuleType):
    """What Metrics uses of wandb: init() -> run with log(data, step) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def finish(self):
        self.finished += 1


def fake_tensorboard():
    """A torch.utils.tensorboard module whose SummaryWriter records add_scalar calls."""
    module = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        writers = []

        def __init__(self, log_dir):
            self.log_dir, self.scalars, self.closed = log_dir, [], False
            SummaryWriter.writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True
    module.SummaryWriter = SummaryWriter
    return module


@pytest.fixture()
def fakes(monkeypatch):
    wandb, tensorboard = FakeWandb(), fake_tensorboard()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return wandb, tensorboard.SummaryWriter.writers


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def expected_calls(records):
    """Per log.jsonl record: its numbers (not bools, lists or strings) and its step (segment.py: iter)."""
    out = []
    for r in records:
        numbers = {k: v for k, v in r.items() if type(v) in (int, float) and k not in SKIPPED}
        out.append((numbers, r.get("step", r.get("iter"))))
    return out


def check_received(out_dir, wandb, writers, project, run_name):
    calls = expected_calls(read_log(out_dir))
    assert len(calls) >= 2 and all(numbers for numbers, _ in calls)
    assert wandb.logged == calls and wandb.finished == 1
    assert wandb.inits[0]["project"] == project and wandb.inits[0]["name"] == run_name
    (writer,) = writers
    assert writer.log_dir == os.path.join(out_dir, "tb") and writer.closed
    assert writer.scalars == [(k, v, step) for numbers, step in calls for k, v in numbers.items()]
    assert Image.open(os.path.join(out_dir, "curves.png")).format == "PNG"


def test_pretraining_sends_wandb_and_tensorboard_the_numbers_of_log_jsonl(demo_root, tmp_path, fakes):
    import pretrain
    from conftest import RANDOM_TEACHER, stage_settings
    wandb, writers = fakes
    out = str(tmp_path / "run")
    torch.set_num_threads(1)
    cfg = stage_settings(pretrain, "config/pretrain_demo.py", demo_data="", data_dir=f"{demo_root}/train",
                         out_dir=out, depth=2, epochs=2, warmup_epochs=1, batch_size=16, micro_batch_size=16,
                         workers=0, max_steps=9, device="cpu", wandb_log=True, wandb_project="p",
                         tensorboard=True, **RANDOM_TEACHER)
    pretrain.main(cfg)
    assert [r["step"] for r in read_log(out)] == [7, 9]  # the epoch's end and the last step
    check_received(out, wandb, writers, "p", "run")  # wandb_run_name '': the out_dir's name
    assert wandb.inits[0]["config"]["lr"] == cfg.lr


def test_segmentation_sends_iterations_and_evaluations_and_the_finished_rerun_says_so(demo_root, tmp_path, fakes,
                                                                                       capsys):
    import segment
    from conftest import stage_settings
    wandb, writers = fakes
    out = str(tmp_path / "seg")
    torch.set_num_threads(1)
    cfg = stage_settings(segment, "config/segment_demo.py", demo_data="",
                         data_dir=os.path.join(demo_root, "ADEChallengeData2016"), out_dir=out, depth=2,
                         crop_size=32, scale=(128, 48), eval_stride=21, channels=32, aux_channels=16, batch_size=4,
                         micro_batch_size=4, workers=0, iters=2, warmup_iters=1, eval_interval=2, log_interval=1,
                         device="cpu", wandb_log=True, wandb_run_name="seg run", tensorboard=True)
    segment.main(cfg)
    records = read_log(out)
    assert [r.get("iter") for r in records] == [1, 2, 2, None]  # 2 iterations, the evaluation, the result
    assert "IoU" in records[2] and "final_mIoU" in records[3]
    check_received(out, wandb, writers, "dtm", "seg run")
    bar = capsys.readouterr().err
    assert "iter: " in bar and "2/2" in bar  # one bar over all iterations

    segment.main(cfg)  # again: everything is done
    assert "finished: nothing to train" in capsys.readouterr().out
    assert [r.get("iter") for r in read_log(out)] == [1, 2, 2, None, None]  # only the result, reported again


@pytest.mark.parametrize("setting,module,package", [("wandb_log", "wandb", "wandb"),
                                                     ("tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_is_an_error_naming_the_setting(tmp_path, monkeypatch, setting, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when it is not installed
    cfg = SimpleNamespace(wandb_log=False, wandb_project="dtm", wandb_run_name="", tensorboard=False)
    setattr(cfg, setting, True)
    with pytest.raises(SystemExit, match=f"{setting}=True needs the {package} package.*pip install {package}"):
        plot.Metrics(str(tmp_path), cfg)
    plot.Metrics(str(tmp_path), SimpleNamespace(**{**vars(cfg), setting: False}))  # off: never imported


def test_a_missing_package_stops_fine_tuning_before_it_trains(demo_root, pretrain_ckpt, tmp_path, monkeypatch):
    import finetune
    monkeypatch.setitem(sys.modules, "wandb", None)
    folders = data.image_folders(demo_root, "train", "val")
    cfg = settings(finetune, model="tiny", depth=2, img_size=64, patch_size=8, init_from=pretrain_ckpt,
                            out_dir=str(tmp_path / "ft"), batch_size=16, micro_batch_size=16, workers=0,
                            device="cpu", wandb_log=True)
    with pytest.raises(SystemExit, match="wandb_log=True needs the wandb package"):
        finetune.fit(cfg, *folders, common.Dist("cpu"))
    assert not os.path.exists(tmp_path / "ft" / "ckpt.pt")


def test_metrics_off_by_default_and_only_rank_0_writes(tmp_path, fakes):
    import finetune
    import pretrain
    import segment
    for module in (pretrain, finetune, segment):
        assert (module.wandb_log, module.tensorboard) == (False, False), module.__name__
    wandb, writers = fakes
    cfg = SimpleNamespace(wandb_log=True, wandb_project="dtm", wandb_run_name="", tensorboard=True)
    other_rank = plot.Metrics(str(tmp_path), cfg, is_main=False)
    other_rank.log({"step": 1, "loss": 0.5})
    other_rank.close()
    assert wandb.inits == [] and writers == [] and not os.listdir(tmp_path)


def test_a_resumed_run_logs_into_the_same_wandb_run_and_another_out_dir_into_a_new_one(tmp_path, fakes):
    wandb, _ = fakes
    cfg = SimpleNamespace(wandb_log=True, wandb_project="dtm", wandb_run_name="", tensorboard=False)
    for out in ("a", "a", "b"):  # the second "a" is a restart of the first
        os.makedirs(tmp_path / out, exist_ok=True)
        plot.Metrics(str(tmp_path / out), cfg).close()
    ids = [init["id"] for init in wandb.inits]
    assert ids[0] == ids[1] != ids[2] and all(init["resume"] == "allow" for init in wandb.inits)
    assert open(tmp_path / "a" / "wandb_id.txt").read() == ids[0]
