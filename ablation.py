"""DTM against token-wise distillation on CIFAR-10, end to end: the ablation to fork.

    python ablation.py                                    # the full experiment (sizes below), one GPU
    python ablation.py --seeds="(0, 1, 2, 3, 4)" --out_dir=out/cifar_5seeds
    python ablation.py --pretrain_args="{'k_max': 4}" --out_dir=out/cifar_k4   # change any stage setting

1. teacher: a ViT trained here from random init, supervised, on CIFAR-10 train (finetune.py);
2. students: pre-trained on CIFAR-10 train images with that teacher's patch tokens as targets (pretrain.py),
   with DTM (dtm=True) and with token-wise distillation (dtm=False): same model, budget and seeds;
3. every student evaluated by linear probing and by fine-tuning (finetune.py), top-1 on CIFAR-10 test;
4. results.md and results.json in out_dir: mean and sample standard deviation over the seeds, every seed's
   value, and curves.png: the loss and accuracy curves of every run;
5. morph.png: the groups DTM's matching finds on the teacher's tokens of real test images (show_morph.py).
Every stage is a subprocess of the stage script with --key=value settings (the commands are printed), in its
own folder under out_dir. Rerunning skips the stages that finished and resumes the one that was interrupted.
Reported top-1 is the last epoch's, not the best: picking the best epoch would select on the test set.

Data: `data_dir`/{train,test}/<class>/*.jpg. If the folder is missing it is written once from torchvision's
CIFAR10 (download=True): the same 50,000 + 10,000 images.
"""
import ast
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import common
import plot
from configurator import configure

# ------------------------------------------------------------------------------------------------- settings
# I/O
out_dir = "out/cifar"
data_dir = "../shared/data/cifar10"  # {train,test}/<class>/*.jpg; written from torchvision's CIFAR10 if missing
train_per_class = 0  # 0: all 5000 training images of a class; N: the first N (linked under out_dir; smoke tests)
test_per_class = 0  # 0: all 1000 test images of a class; N: the first N
# model: teacher and students alike
model = "tiny"  # width 192, 3 heads
depth = 6
img_size = 32  # CIFAR-10's own size
patch_size = 4  # 8 x 8 = 64 tokens
# the experiment
seeds = [0, 1, 2]  # a list: any number of seeds (--seeds="(0, 1, 2, 3, 4)")
methods = ["dtm", "tokenwise"]  # pretrain.py with dtm=True / dtm=False
teacher_epochs = 8
pretrain_epochs = 3
probe_epochs = 2
finetune_epochs = 2
batch_size = 256  # every stage
# any other setting of a stage script, passed on as --key=value, e.g. --pretrain_args="{'num_masked': 32}"
teacher_args = {}
pretrain_args = {}
probe_args = {}
finetune_args = {}
# system
workers = max(0, min(14, (os.cpu_count() or 1) - 2))  # data loading bounds the speed of these small models
device = "auto"

ROOT = os.path.dirname(os.path.abspath(__file__))
EVALS = ("linear_probe", "finetune")
SYSTEM = ("workers", "device")  # settings that may change between a run and its resumption


# --------------------------------------------------------------------------------------------------- data
def cifar10_folder(root: str) -> str:
    """`root`/{train,test}/<class>/<n>.jpg, written from torchvision's CIFAR10 (download=True) if missing.
    JPEG at PIL's default quality (75), numbered per class in the dataset's order: the layout of the copy the
    project's tests use."""
    if all(os.path.isdir(os.path.join(root, split)) for split in ("train", "test")):
        return root
    from torchvision.datasets import CIFAR10
    for split in ("train", "test"):
        data = CIFAR10(os.path.join(root, "download"), train=split == "train", download=True)
        tmp, counts = os.path.join(root, f"{split}.tmp"), {}
        for image, label in data:
            name = data.classes[label]
            os.makedirs(os.path.join(tmp, name), exist_ok=True)
            image.save(os.path.join(tmp, name, f"{counts.setdefault(name, 0):04d}.jpg"))
            counts[name] += 1
        os.replace(tmp, os.path.join(root, split))  # complete or absent: an interrupted write starts again
    return root


def first_per_class(root: str, out: str, per_split: dict) -> str:
    """An ImageFolder copy of `root` with the first N images of each class per split, as symlinks (no image
    is copied); N = 0 links the whole class."""
    for split, n in per_split.items():
        for name in sorted(os.listdir(os.path.join(root, split))):
            files = sorted(os.listdir(os.path.join(root, split, name)))
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
            for f in files[:n or None]:
                link = os.path.join(out, split, name, f)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(root, split, name, f)), link)
    return out


# ------------------------------------------------------------------------------------------------- stages
def stage_settings(cfg, data: str) -> list[tuple[str, str, dict]]:
    """Every stage in order: (folder under out_dir, script, settings)."""
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    shape = dict(model=cfg.model, depth=cfg.depth, img_size=cfg.img_size, patch_size=cfg.patch_size)
    system = dict(batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device)
    # Supervised from scratch and fine-tuning: a short schedule wants light augmentation (crops, flips,
    # label smoothing) and no RandAugment, MixUp, CutMix or erasing; crop_pct=1: evaluate the whole image.
    supervised = dict(data_dir=data, val_split="test", warmup_epochs=1, lr=4e-3, drop_path=0.1,
                      crop_scale=(0.5, 1.0), crop_pct=1.0, randaug_ops=0, mixup=0.0, cutmix=0.0, erase_prob=0.0,
                      smoothing=0.1, **shape, **system)
    out_dir = cfg.out_dir
    teacher_ckpt = os.path.join(out_dir, "teacher", "ckpt.pt")
    stages = [("teacher", "finetune.py", dict(supervised, out_dir=os.path.join(out_dir, "teacher"), init_from="",
                                              epochs=cfg.teacher_epochs, layer_decay=1.0, seed=0) | cfg.teacher_args)]
    for method in cfg.methods:
        for seed in cfg.seeds:
            run = f"{method}_seed{seed}"
            student = os.path.join(out_dir, run, "pretrain", "ckpt.pt")
            stages.append((f"{run}/pretrain", "pretrain.py", dict(
                data_dir=os.path.join(data, "train"), out_dir=os.path.dirname(student), teacher=teacher_ckpt,
                dtm=method == "dtm", epochs=cfg.pretrain_epochs, warmup_epochs=1, lr=3e-3,
                num_masked=round(tokens * 75 / 196), min_block=4, n_max=tokens, k_max=8,  # the official 75 of 196
                seed=seed, **shape, **system) | cfg.pretrain_args))
            stages.append((f"{run}/linear_probe", "finetune.py", dict(
                data_dir=data, val_split="test", out_dir=os.path.join(out_dir, run, "linear_probe"),
                init_from=student, linear_probe=True, probe_epochs=cfg.probe_epochs, probe_warmup_epochs=1,
                probe_lr=0.1, crop_scale=(0.5, 1.0), crop_pct=1.0, seed=seed, **shape, **system) | cfg.probe_args))
            stages.append((f"{run}/finetune", "finetune.py", dict(
                supervised, out_dir=os.path.join(out_dir, run, "finetune"), init_from=student,
                epochs=cfg.finetune_epochs, layer_decay=0.75, seed=seed) | cfg.finetune_args))
    return stages


def read_log(folder: str) -> list[dict]:
    return plot.read_log(os.path.join(folder, "log.jsonl"))


def as_text(value) -> str:
    """A setting as the configurator reads it back: plain strings bare (readable commands), the rest as repr."""
    if isinstance(value, str):
        try:
            ast.literal_eval(value)  # e.g. '1' or 'True': bare, it would come back as another type
        except (ValueError, SyntaxError):
            return value
    return repr(value)


def run_stage(index: int, total: int, name: str, script: str, settings: dict) -> dict:
    """Run one stage in a subprocess unless its done.json says it finished with the same settings; return
    done.json's record. A stage that failed or was interrupted is run again and resumes from its ckpt.pt.
    Ctrl-C or SIGTERM stops the stage the way it stops itself (a checkpoint), then this script, with no traceback."""
    folder = settings["out_dir"]
    done_path = os.path.join(folder, "done.json")
    command = [sys.executable, os.path.join(ROOT, script), *(f"--{k}={as_text(v)}" for k, v in settings.items())]
    compared = json.loads(json.dumps({k: v for k, v in settings.items() if k not in SYSTEM}))  # as done.json has it
    if os.path.isfile(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["settings"] != compared:
            changed = sorted(k for k in set(compared) | set(done["settings"])
                             if done["settings"].get(k) != compared.get(k))
            raise SystemExit(f"{folder} finished with other settings ({', '.join(changed)} differ); choose a new "
                             f"out_dir for new settings (nothing was changed in it)")
        print(f"[{index}/{total}] {name}: done, skipped", flush=True)
        return done
    print(f"\n[{index}/{total}] {name}:\n  {shlex.join(command)}", flush=True)
    start = time.time()
    returncode = run_to_the_end(command)
    if returncode == 130:  # stopped (Ctrl-C, SIGTERM): it saved its checkpoint
        print(f"stopped: stage {name} saved its checkpoint; run the same command to resume (finished stages are "
              f"skipped)", file=sys.stderr, flush=True)
        raise SystemExit(130)
    if returncode != 0:
        raise SystemExit(f"stage {name} failed (exit code {returncode}; its output is above). Rerun the same "
                         f"command to resume: finished stages are skipped")
    last = read_log(folder)[-1]
    done = {"settings": compared, "command": shlex.join(command), "seconds": round(time.time() - start, 1),
            "top1": last.get("val_top1"), "loss": last.get("loss", last.get("train_loss")),
            "epochs": last["epoch"] + 1}
    common.atomic_write(done_path, lambda f: f.write(json.dumps(done, indent=1).encode()))
    return done


def run_to_the_end(command: list[str]) -> int:
    """Run a stage script and return its exit code. SIGTERM or Ctrl-C here is passed on to it as SIGTERM (Ctrl-C
    reaches it from the terminal too), and it is waited for while it saves its checkpoint."""
    child = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop = lambda *_: child.send_signal(signal.SIGTERM)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -------------------------------------------------------------------------------------------------- report
def summarize(results: dict, methods: list, seeds: list) -> dict:
    """{method: {eval: {mean, std, min, max, n, by_seed}}}; std is the sample standard deviation (n - 1)."""
    summary = {}
    for method in methods:
        for ev in EVALS:
            values = [results[f"{method}_seed{s}/{ev}"]["top1"] for s in seeds]
            summary.setdefault(method, {})[ev] = {
                "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values),
                "by_seed": dict(zip(map(str, seeds), values))}
    return summary


def markdown(summary: dict, teacher: dict, minutes: float, seeds: list) -> str:
    """The table: mean ± std per method and evaluation, then every seed's value."""
    head = ["method", *(f"{ev.replace('_', ' ')} top-1 (%)" for ev in EVALS)]
    rows = [head, ["---"] * len(head)]
    for method, evals in summary.items():
        rows.append([method, *(f"{evals[ev]['mean']:.2f} ± {evals[ev]['std']:.2f}" for ev in EVALS)])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    per_seed = ["| method | eval | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                "| --- | --- |" + " --- |" * len(seeds)]
    for method, evals in summary.items():
        for ev in EVALS:
            per_seed.append(f"| {method} | {ev} | " + " | ".join(f"{v:.2f}" for v in evals[ev]["by_seed"].values())
                            + " |")
    return "\n".join([
        f"CIFAR-10 test top-1 of the last epoch, mean ± sample std over seeds {', '.join(map(str, seeds))}; "
        f"teacher (supervised from scratch, seed 0): {teacher['top1']:.2f}. The stages took {minutes:.1f} min.",
        "",
        *lines, "", *per_seed, ""])


def draw_curves(stage_names: list[str], methods: list, out_dir: str):
    """Teacher accuracy, pre-training loss, probe and fine-tuning accuracy of every run, one colour per method.
    The two methods' losses are different quantities (DTM's compares morphed tokens), so only each curve's
    shape compares across methods."""
    colours = {"teacher": plot.COLOURS[2], **{m: plot.COLOURS[i % 2] for i, m in enumerate(methods)}}
    panels = {"teacher: test top-1": [], "pre-training loss": [], "linear probe: test top-1": [],
              "fine-tuning: test top-1": []}
    for name in stage_names:
        method, stage = (name.split("_seed")[0], name.split("/")[1]) if "/" in name else ("teacher", "teacher")
        title, key = {"teacher": ("teacher: test top-1", "val_top1"), "pretrain": ("pre-training loss", "loss"),
                      "linear_probe": ("linear probe: test top-1", "val_top1"),
                      "finetune": ("fine-tuning: test top-1", "val_top1")}[stage]
        panels[title].append((method, colours[method], *plot.curve(read_log(os.path.join(out_dir, name)), key)))
    plot.draw(list(panels.items()), columns=2).save(os.path.join(out_dir, "curves.png"))


def draw_morph(cfg, teacher: str, images: str):
    """morph.png: the teacher's token groups on the first test image of four classes (once)."""
    path = os.path.join(cfg.out_dir, "morph.png")
    if os.path.isfile(path):
        return
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    command = [sys.executable, os.path.join(ROOT, "show_morph.py"), f"--teacher={as_text(teacher)}",
               f"--image={as_text(images)}", f"--tokens={tuple(max(1, tokens // 2 ** i) for i in (1, 2, 3, 4))}",
               "--display_size=128", f"--out={as_text(path)}"]
    print(f"\nthe teacher's token groups:\n  {shlex.join(command)}", flush=True)
    if run_to_the_end(command) != 0:
        raise SystemExit("show_morph.py failed (its output is above); the table and curves are written")


def main(cfg):
    for key in ("seeds", "methods"):
        if not getattr(cfg, key):
            raise SystemExit(f"{key} is empty: give at least one")
    unknown = sorted(set(cfg.methods) - {"dtm", "tokenwise"})
    if unknown:
        raise SystemExit(f"methods: {unknown} unknown; the methods are 'dtm' and 'tokenwise'")
    try:
        data = cifar10_folder(cfg.data_dir)
    except Exception as e:  # offline without the folder: say where the data should be
        raise SystemExit(f"data_dir={cfg.data_dir!r} has no train/ and test/ folders and torchvision could not "
                         f"download CIFAR-10 into it ({e}); put the ImageFolder layout there") from None
    if cfg.train_per_class or cfg.test_per_class:
        data = first_per_class(data, os.path.join(cfg.out_dir, "data"), {"train": cfg.train_per_class,
                                                                          "test": cfg.test_per_class})
    stages = stage_settings(cfg, data)
    results = {name: run_stage(i, len(stages), name, script, settings)
               for i, (name, script, settings) in enumerate(stages, start=1)}
    summary = summarize(results, cfg.methods, cfg.seeds)
    minutes = sum(r["seconds"] for r in results.values()) / 60  # the stages' own time, over all invocations
    report = {"summary": summary, "teacher": results["teacher"], "stages": results, "settings": vars(cfg),
              "stage_minutes": round(minutes, 2)}
    text = json.dumps(report, indent=1)
    common.atomic_write(os.path.join(cfg.out_dir, "results.json"), lambda f: f.write(text.encode()))
    table = markdown(summary, results["teacher"], minutes, cfg.seeds)
    common.atomic_write(os.path.join(cfg.out_dir, "results.md"), lambda f: f.write(table.encode()))
    draw_curves(list(results), cfg.methods, cfg.out_dir)
    draw_morph(cfg, os.path.join(cfg.out_dir, "teacher", "ckpt.pt"), os.path.join(data, "test"))
    print(f"\n{table}\nwrote {cfg.out_dir}/results.md, results.json, curves.png and morph.png")


if __name__ == "__main__":
    main(configure(globals()))
