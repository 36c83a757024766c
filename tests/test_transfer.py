"""eval_transfer.py: every dataset reader on a miniature copy of its real layout, recipes, bad input, and the
demo end to end (table, skipping finished datasets, resuming a dataset killed mid-run)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

import common
import eval_transfer
from conftest import ROOT, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: a second thread buys little, and costs a lot on a busy machine


def write_image(path, label, index=0):
    """A solid 8x8 image whose red channel encodes its label and green channel its index."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (20 * label, 10 * index, 0)).save(path)


def label_of(image):
    return round(np.asarray(image)[..., 0].mean() / 20)


def index_of(image):
    return round(np.asarray(image)[..., 1].mean() / 10)


def pairs(dataset):
    """(label read from the pixels, label the reader gave, index read from the pixels) for every sample."""
    out = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        out.append((label_of(image), label, index_of(image)))
    return out


def check(dataset):
    for from_pixels, given, _ in pairs(dataset):
        assert from_pixels == given


# ----------------------------------------------------------------------------------------------- iNaturalist
def write_inat(root, year, drop_image=None):
    """Categories with non-contiguous ids listed out of order; val lists them in another order."""
    cats = [{"id": 9, "name": "Zeta"}, {"id": 2, "name": "Alpha"}, {"id": 5, "name": "Mu"}]
    label = {2: 0, 5: 1, 9: 2}  # sorted ids -> 0..C-1
    splits = {"train": [(2, 0), (5, 1), (9, 2), (9, 3), (2, 4)], "val": [(5, 5), (9, 6)]}
    for split, items in splits.items():
        images, annotations = [], []
        for image_id, (cid, index) in enumerate(items, start=100 if split == "val" else 0):
            file_name = f"train_val{year}/Plantae/{cid}/{split}_{index}.jpg"
            if file_name != drop_image:
                write_image(os.path.join(root, file_name), label[cid], index)
            images.append({"id": image_id, "file_name": file_name, "width": 8, "height": 8})
            annotations.append({"id": 1000 + image_id, "image_id": image_id, "category_id": cid})
        categories = cats if split == "train" else cats[::-1]
        with open(os.path.join(root, f"{split}{year}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


@pytest.mark.parametrize("year", [2018, 2019])
def test_inat_reader_keeps_the_official_split_and_sorts_category_ids(tmp_path, year):
    write_inat(tmp_path, year)
    train, val, classes = eval_transfer.DATASETS[f"inat{year}"](str(tmp_path))
    assert classes == ["Alpha", "Mu", "Zeta"]  # ids 2, 5, 9
    assert [(l, i) for _, l, i in pairs(train)] == [(0, 0), (1, 1), (2, 2), (2, 3), (0, 4)]
    assert [(l, i) for _, l, i in pairs(val)] == [(1, 5), (2, 6)]  # val images stay val, in file order
    check(train), check(val)


def test_inat_missing_annotation_file_names_what_was_expected(tmp_path):
    write_inat(tmp_path / "inat2018", 2018)  # <data_root>/<name>
    os.remove(tmp_path / "inat2018" / "val2018.json")
    with pytest.raises(FileNotFoundError) as e:
        eval_transfer.load_dataset("inat2018", str(tmp_path), "")
    message = str(e.value)
    assert str(tmp_path / "inat2018") in message
    assert "train2018.json, val2018.json" in message and "missing: val2018.json" in message
    assert "github.com/visipedia/inat_comp" in message


def test_inat_annotation_pointing_to_a_missing_image_is_an_error(tmp_path):
    missing = "train_val2018/Plantae/9/train_3.jpg"
    write_inat(tmp_path, 2018, drop_image=missing)
    with pytest.raises(FileNotFoundError) as e:
        eval_transfer.DATASETS["inat2018"](str(tmp_path))
    assert str(tmp_path / missing) in str(e.value) and "train2018.json" in str(e.value)


# ------------------------------------------------------------------------------------------ torchvision sets
def test_flowers102_trains_on_train_plus_val_and_tests_on_test(tmp_path):
    base = tmp_path / "flowers-102"
    labels = [3, 1, 2, 3, 1, 2, 102]  # 1-based, image_00001 .. image_00007
    for i, label in enumerate(labels, start=1):
        write_image(str(base / "jpg" / f"image_{i:05d}.jpg"), (label - 1) % 12, i)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    sio.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]), "tstid": np.array([5, 6, 7])})
    train, test, classes = eval_transfer.load_flowers102(str(tmp_path))
    assert len(classes) == 102
    assert [(i, l) for _, l, i in pairs(train)] == [(1, 2), (2, 0), (3, 1), (4, 2)]
    assert [(i, l) for _, l, i in pairs(test)] == [(5, 0), (6, 1), (7, 101)]


def _struct(rows, fields):
    return np.array(rows, dtype=[(f, "O") for f in fields])


def test_stanford_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"], dtype=object)
    os.makedirs(base / "devkit")
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    rows = {"train": [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)], "test": [("00001.jpg", 2), ("00002.jpg", 3)]}
    for split, items in rows.items():
        for i, (fname, cls) in enumerate(items):
            write_image(str(base / f"cars_{split}" / fname), cls - 1, i)
    sio.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _struct(rows["train"], ("fname", "class"))})
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _struct(rows["test"], ("fname", "class"))})
    train, test, classes = eval_transfer.load_cars(str(tmp_path))
    assert classes == list(names)
    assert [l for _, l, _ in pairs(train)] == [2, 0, 1] and [l for _, l, _ in pairs(test)] == [1, 2]
    check(train), check(test)


def test_fgvc_aircraft_variants(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Boeing 717"]  # variant names may contain spaces
    os.makedirs(data)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    splits = {"trainval": [("1025794", 2), ("0056978", 0), ("1340192", 1)], "test": [("0062765", 1), ("2232213", 2)]}
    for split, items in splits.items():
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {variants[c]}\n" for i, c in items))
        for k, (image_id, c) in enumerate(items):
            write_image(str(data / "images" / f"{image_id}.jpg"), c, k)
    train, test, classes = eval_transfer.load_aircraft(str(tmp_path))
    assert classes == variants
    assert [l for _, l, _ in pairs(train)] == [2, 0, 1] and [l for _, l, _ in pairs(test)] == [1, 2]
    check(train), check(test)


def test_oxford_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    splits = {"trainval": [("Abyssinian_1", 1), ("american_bulldog_10", 2), ("Abyssinian_2", 1), ("basset_hound_3", 3)],
              "test": [("basset_hound_7", 3), ("Abyssinian_9", 1)]}
    os.makedirs(base / "annotations")
    for split, items in splits.items():
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{n} {c} 1 1\n" for n, c in items))
        for k, (n, c) in enumerate(items):
            write_image(str(base / "images" / f"{n}.jpg"), c - 1, k)
    train, test, classes = eval_transfer.load_pets(str(tmp_path))
    assert classes == ["Abyssinian", "American Bulldog", "Basset Hound"]
    assert [l for _, l, _ in pairs(train)] == [0, 1, 0, 2] and [l for _, l, _ in pairs(test)] == [2, 0]
    check(train), check(test)


def test_food101(tmp_path):
    meta = tmp_path / "food-101" / "meta"
    os.makedirs(meta)
    splits = {"train": {"waffles": ["waffles/11", "waffles/12"], "apple_pie": ["apple_pie/13"]},
              "test": {"apple_pie": ["apple_pie/21"], "waffles": ["waffles/22"]}}
    classes = ["apple_pie", "waffles"]
    for split, items in splits.items():
        (meta / f"{split}.json").write_text(json.dumps(items))
        for c, files in items.items():
            for f in files:
                write_image(str(tmp_path / "food-101" / "images" / f"{f}.jpg"), classes.index(c), int(f[-2:]) % 25)
    train, test, got = eval_transfer.load_food101(str(tmp_path))
    assert got == classes and len(train) == 3 and len(test) == 2
    assert sorted((i, l) for _, l, i in pairs(train)) == [(11, 1), (12, 1), (13, 0)]
    check(train), check(test)


def test_cub200_from_its_text_files(tmp_path):
    base = tmp_path / "CUB_200_2011"
    os.makedirs(base)
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    rows = [(1, "001.Black_footed_Albatross/a_1.jpg", 1, 1), (2, "002.Laysan_Albatross/b_2.jpg", 2, 0),
            (3, "003.Sooty_Albatross/c_3.jpg", 3, 1), (4, "001.Black_footed_Albatross/a_4.jpg", 1, 0),
            (5, "003.Sooty_Albatross/c_5.jpg", 3, 1)]
    (base / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, start=1)))
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    for i, p, c, _ in rows:
        write_image(str(base / "images" / p), c - 1, i)
    train, test, got = eval_transfer.load_cub200(str(tmp_path))
    assert got == classes
    assert [(i, l) for _, l, i in pairs(train)] == [(1, 0), (3, 2), (5, 2)]
    assert [(i, l) for _, l, i in pairs(test)] == [(2, 1), (4, 0)]


def test_image_folder_dataset(tmp_path):
    for split, items in {"train": [("ant", 0), ("bee", 1), ("bee", 2)], "val": [("ant", 3), ("bee", 4)]}.items():
        for c, i in items:
            write_image(str(tmp_path / split / c / f"{i}.png"), ["ant", "bee"].index(c), i)
    train, val, classes = eval_transfer.load_dataset(f"folder:{tmp_path}", "", "")
    assert classes == ["ant", "bee"] and len(train) == 3 and len(val) == 2
    check(train), check(val)
    assert eval_transfer.slug(f"folder:{tmp_path}/") == f"folder_{tmp_path.name}"


def test_demo_labellings(demo_root):
    records = json.load(open(os.path.join(demo_root, "labels.json")))
    coarse = eval_transfer.load_dataset("demo_coarse", "", demo_root)
    fine = eval_transfer.load_dataset("demo_fine", "", demo_root)
    assert coarse[2] == ["checker", "hstripes", "noise", "vstripes"]
    assert len(fine[2]) == len({(r["shape"], r["texture"]) for r in records})
    assert (len(coarse[0]), len(coarse[1])) == (120, 40) == (len(fine[0]), len(fine[1]))
    train = [r for r in records if r["split"] == "train"]
    for k in (0, 7, 119):
        assert coarse[2][coarse[0].samples[k][1]] == train[k]["texture"]
        assert fine[2][fine[0].samples[k][1]] == f"{train[k]['shape']}/{train[k]['texture']}"


def test_missing_dataset_names_the_folder_files_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        eval_transfer.load_dataset("pets", str(tmp_path), "")
    message = str(e.value)
    assert str(tmp_path / "pets") in message and "oxford-iiit-pet/annotations/trainval.txt" in message
    assert "robots.ox.ac.uk/~vgg/data/pets" in message


# -------------------------------------------------------------------------------------------------- recipes
def test_recipe_then_user_settings_take_precedence(tmp_path):
    (tmp_path / "transfer_cars.py").write_text("epochs = 7\nlr = 0.1\n")
    base = {"init_from": "x.pt", "epochs": 100, "lr": 5e-4}
    cfg, path = eval_transfer.dataset_settings("cars", base, {"epochs": 3}, str(tmp_path), "out")
    assert (cfg.epochs, cfg.lr, cfg.init_from, cfg.out_dir) == (3, 0.1, "x.pt", os.path.join("out", "cars"))
    assert path == str(tmp_path / "transfer_cars.py")
    cfg, path = eval_transfer.dataset_settings("pets", base, {}, str(tmp_path), "out")  # no recipe file
    assert (cfg.epochs, path) == (100, "")
    (tmp_path / "transfer_pets.py").write_text("epocks = 7\n")
    with pytest.raises(SystemExit) as e:
        eval_transfer.dataset_settings("pets", base, {}, str(tmp_path), "out")
    assert "transfer_pets.py" in str(e.value) and "epocks" in str(e.value)


def test_shipped_recipes_are_valid_finetune_settings():
    for name in [*eval_transfer.DATASETS, "folder:x"]:
        cfg, path = eval_transfer.dataset_settings(name, {}, {}, os.path.join(ROOT, "config"), "out")
        assert path and cfg.img_size == 224 and cfg.epochs > 0


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_dataset_name_fails_before_any_work(tmp_path):
    proc = run_script(["eval_transfer.py", "--datasets=flowers102,imagenet22k", f"--out_dir={tmp_path / 'out'}"],
                      check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown dataset 'imagenet22k'" in proc.stderr and "inat2018" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------------------------- end to end
def _demo_args(demo_root, pretrain_ckpt, out_dir):
    return ["eval_transfer.py", "config/transfer_demo.py", f"--init_from={pretrain_ckpt}", f"--demo_data={demo_root}",
            f"--out_dir={out_dir}", "--depth=2", "--epochs=3", "--batch_size=16", "--micro_batch_size=16"]


def command_line(args: list[str]) -> dict:
    """--key=value arguments as the overrides configurator.settings takes (values as the command line parses them)."""
    from configurator import _parse_value
    return {a[2:].partition("=")[0]: _parse_value(a.partition("=")[2]) for a in args}


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def killed_then_rerun(demo_root, pretrain_ckpt, tmp_path_factory):
    """Run the demo, kill it during the second dataset (after its first epoch), run it again, then once more."""
    out = str(tmp_path_factory.mktemp("transfer_demo"))
    args = _demo_args(demo_root, pretrain_ckpt, out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second_log = os.path.join(out, "demo_fine", "log.jsonl")
    deadline = time.time() + 900  # a guard against a hang only: the demo takes seconds
    while not (os.path.isfile(second_log) and os.path.getsize(second_log)) and proc.poll() is None:
        assert time.time() < deadline, "the demo never reached the second dataset"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything: only end-of-epoch checkpoints survive
    proc.wait()
    killed = {"results": json.load(open(os.path.join(out, "results.json")))["rows"],
              "fine_log": _lines(second_log)}
    resumed = run_script(args, env=ONE_THREAD)
    again = run_script(args, env=ONE_THREAD)
    return out, killed, resumed, again


def test_demo_config_writes_the_table(killed_then_rerun):
    out, _, resumed, _ = killed_then_rerun
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert [r["dataset"] for r in rows] == ["demo_coarse", "demo_fine"]
    table = open(os.path.join(out, "results.md")).read()
    assert table.startswith("| dataset | top-1 | top-5 | best top-1 | epochs | image size | checkpoint |")
    for r in rows:
        ckpt_log = _lines(os.path.join(out, r["dataset"], "log.jsonl"))
        assert r["top1"] == ckpt_log[-1]["val_top1"] and r["top5"] == ckpt_log[-1]["val_top5"]
        assert (r["epochs"], r["img_size"]) == (3, 64) and r["checkpoint"].endswith("ckpt.pt")
        assert f"| {r['dataset']} | {r['top1']:.2f} | {r['top5']:.2f} |" in table
    assert table in resumed.stdout  # printed at the end too


def test_a_run_killed_during_the_second_dataset_resumes_it(killed_then_rerun, demo_root, pretrain_ckpt, tmp_path):
    """The resumed dataset's log equals, value for value, that of the same dataset run without a kill."""
    out, killed, resumed, _ = killed_then_rerun
    assert [r["dataset"] for r in killed["results"]] == ["demo_coarse"]  # the first finished, the second did not
    assert 1 <= len(killed["fine_log"]) < 3
    assert "demo_coarse: finished earlier" in resumed.stdout
    assert f"resuming from {os.path.join(out, 'demo_fine', 'ckpt.pt')}" in resumed.stdout
    fine_log = _lines(os.path.join(out, "demo_fine", "log.jsonl"))
    assert [r["epoch"] for r in fine_log] == [0, 1, 2]  # the killed epochs are not repeated, none is missing
    run_script([*_demo_args(demo_root, pretrain_ckpt, tmp_path), "--datasets=demo_fine"], env=ONE_THREAD)
    whole = _lines(tmp_path / "demo_fine" / "log.jsonl")
    for key in ("epoch", "step", "train_loss", "val_loss", "val_top1", "val_top5", "best_top1"):
        assert [r[key] for r in fine_log] == [r[key] for r in whole], key  # same thread count: bit-identical
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert rows[1] == {**json.load(open(tmp_path / "results.json"))["rows"][0], "checkpoint": rows[1]["checkpoint"]}


def test_a_second_run_skips_finished_datasets(killed_then_rerun):
    out, _, _, again = killed_then_rerun
    assert "demo_coarse: finished earlier" in again.stdout and "demo_fine: finished earlier" in again.stdout
    assert "epoch 0" not in again.stdout and "loaded backbone" not in again.stdout
    assert len(_lines(os.path.join(out, "demo_fine", "log.jsonl"))) == 3


def test_a_rerun_with_other_settings_is_refused_not_answered_with_the_old_result(killed_then_rerun, demo_root,
                                                                                 pretrain_ckpt):
    """A finished dataset is skipped only for the same settings: the same command with --epochs=5 must not print
    the 3-epoch result as its own. Refused before any work, naming what differs; nothing is changed."""
    out, *_ = killed_then_rerun
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("results.json", "results.md")}
    proc = run_script([*_demo_args(demo_root, pretrain_ckpt, out), "--epochs=5"], check=False, env=ONE_THREAD)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"demo_coarse finished in {out} with other settings (epochs differ)" in proc.stderr
    assert "finished earlier" not in proc.stdout
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in before}


def test_an_interrupted_dataset_is_not_resumed_with_other_settings(demo_root, pretrain_ckpt, tmp_path):
    """A dataset begun (its ckpt.pt) but not finished, rerun with another lr: refused, not continued with it."""
    import configurator
    args = _demo_args(demo_root, pretrain_ckpt, tmp_path)
    cfg = configurator.settings(eval_transfer, *args[1:2], **command_line([*args[2:], "--datasets=demo_coarse"]))
    run, _ = eval_transfer.dataset_runs(cfg)["demo_coarse"]
    common.save_checkpoint({"config": vars(run), "stage": "finetune"}, os.path.join(run.out_dir, "ckpt.pt"))
    changed = configurator.settings(eval_transfer, *args[1:2], **command_line([*args[2:], "--datasets=demo_coarse",
                                                                               "--lr=0.01"]))
    with pytest.raises(SystemExit, match=r"demo_coarse was begun in .* with other settings \(lr differ\)"):
        eval_transfer.main(changed)


def test_sigterm_during_the_final_evaluation_then_rerun_reports_the_final_epoch(demo_root, pretrain_ckpt, tmp_path,
                                                                               monkeypatch):
    """SIGTERM while the last epoch is evaluated: the rerun's table holds that epoch's result (not an earlier
    epoch's, no KeyError), the same as a run that was not stopped."""
    import signal
    import torch
    import finetune
    from configurator import settings

    def run(out):
        args = [os.path.join(ROOT, "config", "transfer_demo.py"), f"--init_from={pretrain_ckpt}", "--depth=2",
                f"--demo_data={demo_root}", f"--out_dir={out}", "--datasets=demo_coarse", "--epochs=2",
                "--batch_size=16", "--micro_batch_size=16", "--device=cpu"]
        eval_transfer.main(settings(eval_transfer, *args[:1], **command_line(args[1:])))
        return json.load(open(os.path.join(out, "results.json")))["rows"]
    torch.set_num_threads(1)
    whole = run(tmp_path / "whole")
    evaluate, calls = finetune.evaluate, []

    def evaluate_then_stop(*args):
        calls.append(1)
        if len(calls) == 2:  # the second and last epoch's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args)
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "evaluate", evaluate_then_stop)
        with pytest.raises(SystemExit):
            run(tmp_path / "split")
    split = run(tmp_path / "split")
    assert split == whole and len(split) == 1
    assert _lines(tmp_path / "split" / "demo_coarse" / "log.jsonl")[-1]["epoch"] == 1


def test_max_steps_before_the_first_evaluation_is_refused_and_after_it_records_the_epochs_evaluated(
        demo_root, pretrain_ckpt, tmp_path):
    """max_steps cuts a smoke run short: before the first evaluation there is no result (a clear error, no row);
    after it, the row says how many epochs were evaluated instead of the schedule's length."""
    import torch
    from configurator import settings
    steps_per_epoch = len(eval_transfer.load_dataset("demo_coarse", "", demo_root)[0]) // 16

    def run(max_steps):
        args = [os.path.join(ROOT, "config", "transfer_demo.py"), f"--init_from={pretrain_ckpt}", "--depth=2",
                f"--demo_data={demo_root}", f"--out_dir={tmp_path / str(max_steps)}", "--datasets=demo_coarse",
                "--epochs=3", "--batch_size=16", "--micro_batch_size=16", "--device=cpu", f"--max_steps={max_steps}"]
        eval_transfer.main(settings(eval_transfer, *args[:1], **command_line(args[1:])))
        return json.load(open(tmp_path / str(max_steps) / "results.json"))["rows"]
    torch.set_num_threads(1)
    with pytest.raises(SystemExit, match="max_steps=1 stopped training before the end of the first epoch"):
        run(1)
    assert not os.path.exists(tmp_path / "1" / "results.json")
    rows = run(steps_per_epoch + 1)
    assert [(r["dataset"], r["epochs"]) for r in rows] == [("demo_coarse", 1)]
