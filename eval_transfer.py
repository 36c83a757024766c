"""Transfer learning: fine-tune one checkpoint on each of several datasets in turn (finetune.py's loop), and
write the paper-style table of results.

    python eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=inat2018,flowers102,cars
    python eval_transfer.py config/transfer_demo.py                                # offline demo, CPU, minutes
    torchrun --nproc_per_node=8 eval_transfer.py --init_from=... --datasets=inat2019 --model=large

Each dataset is fine-tuned with its recipe, <recipe_dir>/transfer_<name>.py (finetune.py settings; finetune.py's
defaults where the file is absent). Any finetune.py setting given here, on the command line or in a config file,
applies to every dataset after its recipe (e.g. --model=large --batch_size=512). Results go to
out_dir/results.md and out_dir/results.json; each dataset's checkpoints and log to out_dir/<name>/. Running
the command again skips finished datasets and resumes an interrupted one from its own checkpoint.

The shipped recipes are untuned and NOT the DTM paper's values (its appendix settings are not available to us).
Each is finetune.py's ImageNet-1K recipe (BEiT v2 ViT-B: lr 5e-4 at batch 1024, scaled linearly with the batch,
layer decay 0.65, drop path 0.1, weight decay 0.05, RandAugment, MixUp 0.8, CutMix 1.0, label smoothing 0.1,
erasing 0.25, 224 px: the pre-training resolution, 100 epochs) except:
- Flowers, Cars, Aircraft, Pets, CUB and folder:<path>: batch 256 with 10 warmup epochs (a batch of 1024 would
  leave a handful of steps per epoch on a few-thousand-image training set);
- Food-101: 50 epochs with 5 warmup (about 3,700 steps at batch 1024, between the fine-grained sets and iNat);
- iNaturalist 2018/2019: 5 warmup epochs (20 would be a fifth of the run on a fraction of ImageNet-1K's size);
  100 epochs is the usual iNaturalist schedule for masked-image-modelling models, not verified against a paper.
"""
import json
import os

import torch
from torchvision import datasets as tv

import common
import data
import finetune  # the one script another script imports: its training loop, fit, runs every dataset
from configurator import ConfigError, configure, parse_args, settings, settings_of
from demo_data import make_demo_dataset

# ------------------------------------------------------------------------------------------------- settings
init_from = ""  # the checkpoint to transfer (pretrain.py or finetune.py); '' = random init (a baseline)
datasets = "flowers102"  # comma-separated names: see DATASETS below, or folder:<path>
data_root = "data/transfer"  # dataset <name> is read from <data_root>/<name> in its own published layout
demo_data = "data/demo"  # demo_coarse and demo_fine read (and if missing generate) the demo dataset here
out_dir = "out/transfer"
recipe_dir = "config"  # <recipe_dir>/transfer_<name>.py holds each dataset's fine-tuning recipe
device = "auto"
# Settings that belong to this script, not to the per-dataset fine-tuning runs.
OWN = ("init_from", "datasets", "data_root", "demo_data", "out_dir", "recipe_dir", "device")
# Any other finetune.py setting may be given too; it applies to every dataset after the dataset's recipe.
# (eval_only, data_dir and the splits are this script's business, not the user's.)
NOT_OVERRIDABLE = ("eval_only", "data_dir", "train_split", "val_split")
FINETUNE_DEFAULTS = {k: v for k, v in settings_of(vars(finetune)).items() if k not in OWN + NOT_OVERRIDABLE}
globals().update(FINETUNE_DEFAULTS)  # each is a setting of this script too (--help shows finetune.py's comments)
RULES = {k: v for k, v in finetune.RULES.items() if k in FINETUNE_DEFAULTS}  # checked by configure()
# Settings a rerun may change without changing a result: the others must match a finished dataset's.
SYSTEM = ("workers", "device", "compile", "log_interval", "wandb_log", "wandb_project", "wandb_run_name",
          "tensorboard", "out_dir")


# ----------------------------------------------------------------------------------------------- datasets
class Samples(torch.utils.data.Dataset):
    """(PIL image, label) from a list of (path, label); every image is checked to exist up front."""

    def __init__(self, samples: list, source: str):
        missing = [path for path, _ in samples if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(samples)} images listed in {source} are missing, "
                                    f"e.g. {missing[0]!r}")
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return data.load_sample(self.samples, i)  # 16-bit images scaled, unreadable ones skipped with a warning


def _require(root: str, name: str, files: list[str], url: str):
    """Stop with a message naming the folder, the files it should hold and where to get them."""
    missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(
            f"dataset {name!r} not found: looked in {root!r} for {', '.join(files)}; missing: {', '.join(missing)}. "
            f"The dataset is published at {url} (see README.md, 'Transfer learning', for the layout)")


def _read_json(path: str):
    """A JSON file's content; a truncated or invalid file is named in the error."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); is it truncated or of another format?") from None


def load_inat(root: str, year: int):
    """iNaturalist 2018/2019 from the official annotation files train20XX.json and val20XX.json (COCO-style:
    images, annotations, categories; file_name is relative to root). The official val split is the eval split;
    labels are the category ids in ascending order, 0..C-1, the same for both files."""
    files = [f"train{year}.json", f"val{year}.json"]
    _require(root, f"inat{year}", files, f"https://github.com/visipedia/inat_comp/tree/master/{year}")
    train, val = (_read_json(os.path.join(root, f)) for f in files)
    for key in ("images", "annotations", "categories"):
        for name, ann in zip(files, (train, val)):
            if key not in ann:
                raise ValueError(f"{os.path.join(root, name)} has no {key!r} entry: not an iNaturalist annotation file")
    category_ids = sorted({c["id"] for c in train["categories"]} | {c["id"] for c in val["categories"]})
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    names = {c["id"]: c.get("name", str(c["id"])) for c in train["categories"] + val["categories"]}

    def samples(ann, name):
        path_of = {im["id"]: os.path.join(root, im["file_name"]) for im in ann["images"]}
        return Samples([(path_of[a["image_id"]], label_of[a["category_id"]]) for a in ann["annotations"]],
                       os.path.join(root, name))
    return samples(train, files[0]), samples(val, files[1]), [names[c] for c in category_ids]


def _torchvision(cls, root: str, name: str, files: list[str], url: str, splits: tuple, **kwargs):
    """A torchvision dataset read from root with its own splits (several joined into one where given)."""
    _require(root, name, files, url)
    parts = []
    for split_names in splits:
        sets = [cls(root, split=s, **kwargs) for s in split_names]
        for s in sets:
            _check_files(s, name)
        parts.append(sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets))
    first = parts[0].datasets[0] if isinstance(parts[0], torch.utils.data.ConcatDataset) else parts[0]
    return parts[0], parts[1], list(first.classes)


def _check_files(dataset, name: str):
    """The images a torchvision dataset lists must exist (it would otherwise fail mid-epoch)."""
    paths = getattr(dataset, "_image_files", None) or getattr(dataset, "_images", None) or \
        [p for p, _ in getattr(dataset, "_samples", [])]
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: {len(missing)} of the {len(paths)} images its annotation files "
                                f"list are missing, e.g. {missing[0]!r}")


class Flowers102(tv.Flowers102):
    """torchvision's Flowers102, checking that the .mat files exist rather than their md5 sums (which only
    the published files have: this also reads re-saved or miniature copies)."""

    def _check_integrity(self):
        return self._images_folder.is_dir() and all((self._base_folder / f).is_file()
                                                    for f, _ in (self._file_dict["label"], self._file_dict["setid"]))


def load_flowers102(root):
    files = ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"]
    return _torchvision(Flowers102, root, "flowers102", files, "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                        (("train", "val"), ("test",)))


def load_cars(root):
    files = ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
             "stanford_cars/cars_train", "stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test"]
    return _torchvision(tv.StanfordCars, root, "cars", files,
                        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline now; mirrors exist, e.g. on "
                        "Kaggle; cars_test_annos_withlabels.mat comes from the devkit's eval tools)",
                        (("train",), ("test",)))


def load_aircraft(root):
    data = "fgvc-aircraft-2013b/data/"
    files = [data + f for f in ("images", "variants.txt", "images_variant_trainval.txt", "images_variant_test.txt")]
    return _torchvision(tv.FGVCAircraft, root, "aircraft", files,
                        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/", (("trainval",), ("test",)),
                        annotation_level="variant")


def load_pets(root):
    files = ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
             "oxford-iiit-pet/annotations/test.txt"]
    return _torchvision(tv.OxfordIIITPet, root, "pets", files, "https://www.robots.ox.ac.uk/~vgg/data/pets/",
                        (("trainval",), ("test",)))


def load_food101(root):
    files = ["food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"]
    return _torchvision(tv.Food101, root, "food101", files,
                        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", (("train",), ("test",)))


def _read_table(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def load_cub200(root):
    """CUB-200-2011: images.txt (id, path), image_class_labels.txt (id, class 1..200), train_test_split.txt
    (id, 1 = train), classes.txt (class, name), images under CUB_200_2011/images/."""
    base = os.path.join(root, "CUB_200_2011")
    files = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images"]
    _require(base, "cub200", files, "https://www.vision.caltech.edu/datasets/cub_200_2011/")
    paths = {i: os.path.join(base, "images", p) for i, p in _read_table(os.path.join(base, "images.txt"))}
    labels = {i: int(c) - 1 for i, c in _read_table(os.path.join(base, "image_class_labels.txt"))}
    is_train = {i: t == "1" for i, t in _read_table(os.path.join(base, "train_test_split.txt"))}
    classes = [" ".join(name) for _, *name in _read_table(os.path.join(base, "classes.txt"))]
    source = os.path.join(base, "images.txt")
    train = Samples([(paths[i], labels[i]) for i in paths if is_train[i]], source)
    test = Samples([(paths[i], labels[i]) for i in paths if not is_train[i]], source)
    return train, test, classes


def load_folder(path):
    return data.image_folders(path, "train", "val")


def load_demo(root, fields):
    """The generated demo dataset (demo_data.make_demo_dataset) labelled by `fields` of labels.json: ('texture',)
    is a coarse 4-class labelling, ('shape', 'texture') a fine 40-class one."""
    make_demo_dataset(root)
    records = _read_json(os.path.join(root, "labels.json"))
    names = sorted({"/".join(r[f] for f in fields) for r in records})
    label_of = {n: i for i, n in enumerate(names)}

    def samples(split):
        return Samples([(os.path.join(root, r["file"]), label_of["/".join(r[f] for f in fields)])
                        for r in records if r["split"] == split], os.path.join(root, "labels.json"))
    return samples("train"), samples("val"), names


DATASETS = {  # name -> loader(root) where root = <data_root>/<name>
    "inat2018": lambda root: load_inat(root, 2018),
    "inat2019": lambda root: load_inat(root, 2019),
    "flowers102": load_flowers102,
    "cars": load_cars,
    "aircraft": load_aircraft,
    "pets": load_pets,
    "food101": load_food101,
    "cub200": load_cub200,
}
DEMO = {"demo_coarse": ("texture",), "demo_fine": ("shape", "texture")}


def load_dataset(name: str, data_root_: str, demo_data_: str):
    """(train, eval, class names) of a dataset by name; the eval split is the official val or test split."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:"):])
    if name in DEMO:
        return load_demo(demo_data_, DEMO[name])
    if name not in DATASETS:
        raise ValueError(unknown_dataset(name))
    return DATASETS[name](os.path.join(data_root_, name))


def unknown_dataset(name: str) -> str:
    return (f"unknown dataset {name!r}; known: {', '.join([*DATASETS, *DEMO])}, or folder:<path> (an ImageFolder "
            f"with train/ and val/)")


def slug(name: str) -> str:
    """A folder name for a dataset's run: folder:/data/x -> folder_x."""
    if name.startswith("folder:"):
        return "folder_" + os.path.basename(os.path.normpath(name[len("folder:"):]))
    return name


# ------------------------------------------------------------------------------------------------ recipes
def recipe(name: str, recipe_dir_: str) -> tuple[dict, str]:
    """The finetune.py settings in <recipe_dir>/transfer_<name>.py ({} and '' if there is none)."""
    base = "folder" if name.startswith("folder:") else name
    path = os.path.join(recipe_dir_, f"transfer_{base}.py")
    if not os.path.isfile(path):
        return {}, ""
    try:
        return parse_args([path], settings_of(vars(finetune)), finetune.RULES), path
    except ConfigError as e:
        raise SystemExit(f"recipe {path}: {e}") from None


def dataset_settings(name: str, base: dict, overrides: dict, recipe_dir_: str, out: str):
    """finetune.py settings for one dataset: this script's base < the dataset's recipe < what the user set.
    Returns them and the recipe's path ('' if none)."""
    own, path = recipe(name, recipe_dir_)
    return settings(finetune, **{**base, **own, **overrides, "out_dir": os.path.join(out, slug(name))}), path


def comparable(values: dict) -> dict:
    """The settings that decide a dataset's result (not SYSTEM's), as results.json stores them."""
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in SYSTEM}))


def check_same_settings(name: str, cfg, rows: list[dict], out: str):
    """A dataset finished (a row of results.json) or begun (its ckpt.pt) with other settings is refused: its
    result would be reported for settings it was not trained with."""
    row = next((r for r in rows if r["dataset"] == name), None)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if row:
        before = row.get("settings")  # None: a row written before settings were recorded
    elif os.path.isfile(ckpt_path):
        before = comparable(common.load_checkpoint(ckpt_path)["config"])
    else:
        return  # not begun: nothing to compare with
    now = comparable(vars(cfg))
    if before != now:
        differ = ["not recorded"] if before is None else \
            sorted(k for k in set(now) | set(before) if before.get(k) != now.get(k))
        what = "finished" if row else "was begun"
        raise SystemExit(f"{name} {what} in {out} with other settings ({', '.join(differ[:8])} "
                         f"differ): its result would not be that of these settings. Choose another out_dir, or "
                         f"rerun with the settings it was run with")


# ---------------------------------------------------------------------------------------------- results
def read_results(path: str) -> list[dict]:
    """The rows of an earlier run's results.json ([] if there is none)."""
    if not os.path.isfile(path):
        return []
    try:
        results = _read_json(path)
    except ValueError as e:
        raise SystemExit(f"{e}; move it away to start the table anew") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise SystemExit(f"{path} holds no 'rows' list: not a results.json of eval_transfer.py; move it away")
    return results["rows"]


def write_results(out: str, rows: list[dict]):
    """results.json and results.md, each replaced atomically."""
    lines = ["| dataset | top-1 | top-5 | best top-1 | epochs | image size | checkpoint |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['best_top1']:.2f} | {r['epochs']} | "
                     f"{r['img_size']} | {r['checkpoint'] or 'random init'} |")
    for name, text in (("results.json", json.dumps({"rows": rows}, indent=1)), ("results.md", "\n".join(lines) + "\n")):
        common.atomic_write(os.path.join(out, name), lambda f: f.write(text.encode()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main
def dataset_runs(cfg) -> dict:
    """{dataset name: (its finetune.py cfg, its recipe's path)} for every dataset cfg names, in order."""
    base = {k: getattr(cfg, k) for k in (*FINETUNE_DEFAULTS, "init_from", "device")}  # finetune.py settings
    overrides = {k: getattr(cfg, k) for k in cfg.given if k in FINETUNE_DEFAULTS}  # the user's: over each recipe
    names = [n.strip() for n in cfg.datasets.split(",") if n.strip()]
    if not names:
        raise SystemExit(f"datasets={cfg.datasets!r} names no dataset; e.g. --datasets=flowers102,cars")
    for name in names:  # fail before any training on a misspelt name
        if not (name.startswith("folder:") or name in DATASETS or name in DEMO):
            raise SystemExit(unknown_dataset(name))
    return {name: dataset_settings(name, base, overrides, cfg.recipe_dir, cfg.out_dir) for name in names}


def main(cfg):
    runs = dataset_runs(cfg)
    if cfg.init_from and not os.path.isfile(cfg.init_from):
        raise SystemExit(f"init_from={cfg.init_from!r} does not exist (a checkpoint of pretrain.py or finetune.py; "
                         f"'' fine-tunes from random initialisation)")
    out = cfg.out_dir
    rows = read_results(os.path.join(out, "results.json"))
    for r in rows:
        if r["checkpoint"] != cfg.init_from:
            raise SystemExit(f"{out}/results.json holds results of checkpoint {r['checkpoint']!r}, not of "
                             f"{cfg.init_from!r}; choose another out_dir")
    for name, (run, _) in runs.items():
        check_same_settings(name, run, rows, out)
    dist_ = common.Dist(cfg.device)
    try:
        with common.OutDirLock(out, dist_.is_main):  # writable, and this run's alone
            if dist_.is_main and any(n in DEMO for n in runs):
                make_demo_dataset(cfg.demo_data)  # once, before other ranks read it
            dist_.barrier()
            for name, (run, path) in runs.items():
                if any(r["dataset"] == name for r in rows):
                    dist_.print(f"{name}: finished earlier with the same settings (in {out}/results.json), skipping")
                    continue
                rows.append(transfer(name, run, path, cfg, dist_))
                if dist_.is_main:
                    write_results(out, rows)
            if dist_.is_main:
                print("\n" + write_results(out, rows), flush=True)
    finally:
        dist_.close()


def transfer(name: str, run, recipe_path: str, cfg, dist_: common.Dist) -> dict:
    """Fine-tune on one dataset (finetune.fit, in its own locked out_dir); its row of the results table."""
    train, val, classes = load(name, cfg)
    given = sorted(k for k in cfg.given if k in FINETUNE_DEFAULTS)
    dist_.print(f"\n{name}: {len(train)} training and {len(val)} eval images, {len(classes)} classes; recipe "
                f"{recipe_path or 'finetune.py defaults'}" + (f", then {', '.join(given)} as given" if given else ""))
    with common.OutDirLock(run.out_dir, dist_.is_main):
        metrics = finetune.fit(run, train, val, classes, dist_)
    if not metrics["epochs"]:
        raise SystemExit(f"{name}: max_steps={run.max_steps} stopped training before the end of the first epoch, "
                         f"which is evaluated first: there is no result to record. Leave max_steps=0 or raise it "
                         f"past the first epoch.")
    return {"dataset": name, "top1": metrics["top1"], "top5": metrics["top5"], "best_top1": metrics["best_top1"],
            "epochs": metrics["epochs"], "img_size": run.img_size, "checkpoint": cfg.init_from,
            "settings": comparable(vars(run))}


def load(name: str, cfg):
    try:
        return load_dataset(name, cfg.data_root, cfg.demo_data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(configure(globals(), rules=RULES))
