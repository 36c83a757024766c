"""A run's numbers: log.jsonl (and, if asked, Weights & Biases and TensorBoard) and its curves, drawn with PIL
alone (no plotting package). Every stage logs through Metrics and draws out_dir/curves.png at its end;

    python plot.py out/pretrain/log.jsonl                          # -> out/pretrain/curves.png
    python plot.py out/a/log.jsonl out/b/log.jsonl --keys=loss --out=a_vs_b.png

draws one panel per logged number (all of them but step, epoch and time, or --keys) against the step, one
coloured line per log file, named in the legend below the panels.
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw

import common


def optional_import(module: str, setting: str, package: str):
    """Import an optional package that `setting` asks for, or stop with an error naming both."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"{setting}=True needs the {package} package, which is not installed ({e}): "
                         f"pip install {package}, or leave {setting}=False") from None


def wandb_run_id(out_dir: str) -> str:
    """The wandb run id of out_dir, made once and kept in out_dir/wandb_id.txt: a resumed run (same out_dir)
    goes on logging into the same wandb run instead of starting a new one."""
    path = os.path.join(out_dir, "wandb_id.txt")
    if not os.path.isfile(path):
        common.atomic_write(path, lambda f: f.write(os.urandom(8).hex().encode()))
    with open(path) as f:
        return f.read().strip()


class Metrics:
    """A run's numbers: each record goes to out_dir/log.jsonl (with the code version, code_version) and, where
    the settings ask (cfg.wandb_log, cfg.tensorboard), to Weights & Biases (one run per out_dir, resumed with
    it) and TensorBoard (out_dir/tb), on rank 0 only. close() draws log.jsonl into out_dir/curves.png.
    wandb and tensorboard are optional and imported only when asked for."""

    def __init__(self, out_dir: str, cfg, is_main: bool = True, script: str = ""):
        self.out_dir, self.is_main, self.wandb, self.tensorboard = out_dir, is_main, None, None
        sources = [p for p in (script, os.path.join(common.ROOT, "morph.py")) if p]
        self.code = common.code_version(*sources) if is_main else ""
        if is_main and getattr(cfg, "wandb_log", False):
            wandb = optional_import("wandb", "wandb_log", "wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(
                os.path.abspath(out_dir)), config=vars(cfg), dir=out_dir, id=wandb_run_id(out_dir), resume="allow")
        if is_main and getattr(cfg, "tensorboard", False):
            writer = optional_import("torch.utils.tensorboard", "tensorboard", "tensorboard").SummaryWriter
            self.tensorboard = writer(os.path.join(out_dir, "tb"))

    def log(self, record: dict):
        """Append `record` to log.jsonl; its numbers (not time, nor lists such as per-class IoU) also go to
        wandb and TensorBoard, at its step (or iter)."""
        if not self.is_main:
            return
        common.log_json(os.path.join(self.out_dir, "log.jsonl"), {**record, "code": self.code})
        step = record.get("step", record.get("iter"))
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("step", "iter", "time")}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def close(self):
        """Finish the wandb run, close TensorBoard, draw out_dir/curves.png from log.jsonl."""
        if not self.is_main:
            return
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        log = os.path.join(self.out_dir, "log.jsonl")
        if os.path.isfile(log):
            plot_logs([log], os.path.join(self.out_dir, "curves.png"))


PANEL_W, PANEL_H = 400, 260  # pixels per panel of a curves picture
LEFT, RIGHT, TOP, BOTTOM = 64, 14, 26, 34  # the plot area's margins inside a panel
LEGEND_ROW = 18  # pixels per legend line
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
NOT_CURVES = ("step", "iter", "epoch", "time")


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl file (one JSON object per line)."""
    if not os.path.isfile(path):
        raise SystemExit(f"log file {path!r} does not exist")
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path!r} is not a JSON-lines log: line {e.doc!r:.60}: {e}") from None


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, finite values only; x is the step (segment.py: iter) where logged, else the
    record's index."""
    points = [(r.get("step", r.get("iter", i)), r[key]) for i, r in enumerate(records)
              if is_number(r.get(key)) and math.isfinite(r[key])]
    return [float(x) for x, _ in points], [float(y) for _, y in points]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return (lo - (0.1 * abs(lo) or 1.0), hi + (0.1 * abs(lo) or 1.0)) if lo == hi else (lo, hi)  # a constant: middle


def draw_panel(canvas: ImageDraw.ImageDraw, left: int, top: int, title: str, series: list[tuple]):
    """One panel at (left, top): title, axes with the data ranges at their ends, one line per series."""
    x0, y0, x1, y1 = left + LEFT, top + TOP, left + PANEL_W - RIGHT, top + PANEL_H - BOTTOM
    canvas.text((x0, top + 6), title, fill="black")
    canvas.rectangle((x0, y0, x1, y1), outline="black")
    xs, ys = [x for *_, sx, _ in series for x in sx], [y for *_, sy in series for y in sy]
    if not xs:
        canvas.text((x0 + 8, y0 + 8), "no finite values", fill="black")
        return
    (xlo, xhi), (ylo, yhi) = _span(xs), _span(ys)
    label = lambda v: f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"
    for text, xy in ((label(yhi), (left + 4, y0 - 6)), (label(ylo), (left + 4, y1 - 6)), (label(xlo), (x0, y1 + 6)),
                     (label(xhi), (x1 - 6 * len(label(xhi)), y1 + 6)), ("step", ((x0 + x1) // 2 - 12, y1 + 18))):
        canvas.text(xy, text, fill="black")
    for _, colour, sx, sy in series:
        points = [(x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))
                  for x, y in zip(sx, sy)]
        if len(points) > 1:
            canvas.line(points, fill=colour, width=2, joint="curve")
        for px, py in points if len(points) < 30 else ():  # few points: mark each
            canvas.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)


def draw(panels: list[tuple[str, list[tuple]]], columns: int = 3) -> Image.Image:
    """panels: [(title, [(label, colour, xs, ys), ...]), ...] -> the picture, with a legend below: each distinct
    label once, in the colour of its first series."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    legend = {}
    for _, series in panels:
        for label, colour, _, _ in series:
            legend.setdefault(label, colour)
    per_row = max(1, columns * PANEL_W // 160)
    legend_h = math.ceil(len(legend) / per_row) * LEGEND_ROW + 6 if legend else 0
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H + legend_h), "white")
    canvas = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels):
        draw_panel(canvas, (i % columns) * PANEL_W, (i // columns) * PANEL_H, title, series)
    for i, (label, colour) in enumerate(legend.items()):
        x, y = 8 + (i % per_row) * 160, rows * PANEL_H + (i // per_row) * LEGEND_ROW
        canvas.rectangle((x, y + 5, x + 14, y + 9), fill=colour)
        canvas.text((x + 20, y + 1), label[:22], fill="black")
    return image


def plot_logs(paths: list[str], out: str, keys: list[str] | None = None) -> str:
    """One panel per logged number (all but step, epoch and time, or `keys`), one line per log file; returns
    the PNG's path."""
    logs = [read_log(p) for p in paths]
    keys = keys or list(dict.fromkeys(k for records in logs for r in records for k, v in r.items()
                                      if k not in NOT_CURVES and is_number(v)))
    if not keys:
        raise SystemExit(f"no numbers to plot in {', '.join(paths)}")
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    panels = [(key, [(label, COLOURS[i % len(COLOURS)], *curve(records, key))
                     for i, (label, records) in enumerate(zip(labels, logs))]) for key in keys]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    draw(panels).save(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files of pretrain.py, finetune.py, segment.py, ...")
    parser.add_argument("--out", default="", help="the PNG; default: curves.png next to the first log")
    parser.add_argument("--keys", default="", help="comma-separated numbers to plot; default: all of them")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.logs[0]), "curves.png")
    keys = [k for k in args.keys.split(",") if k] or None
    print(f"wrote {plot_logs(args.logs, out, keys)}")


if __name__ == "__main__":
    main()
