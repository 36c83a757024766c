"""Draw the curves of one or more runs' log.jsonl as a PNG, with PIL alone (it comes with torchvision).

    python plot.py out/pretrain/log.jsonl                          # -> out/pretrain/curves.png
    python plot.py out/a/log.jsonl out/b/log.jsonl --keys=loss --out=a_vs_b.png

One panel per logged number (all of them but step, epoch and time, or --keys), plotted against the step; one
coloured line per log file, named in the legend below the panels. ablation.py draws its curves with draw().
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw

PANEL_W, PANEL_H = 400, 260  # pixels per panel
LEFT, RIGHT, TOP, BOTTOM = 64, 14, 26, 34  # the plot area's margins inside a panel
LEGEND_ROW = 18  # pixels per legend line
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
BACKGROUND, INK = "white", "black"
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


def curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, finite values only; x is the step (segment.py: iter) where logged, else the
    record's index."""
    points = [(r.get("step", r.get("iter", i)), r[key]) for i, r in enumerate(records)
              if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [float(x) for x, _ in points], [float(y) for _, y in points]


def numeric_keys(records: list[dict]) -> list[str]:
    keys = []
    for r in records:
        keys += [k for k, v in r.items() if k not in keys and k not in NOT_CURVES
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.1 * abs(lo) or 1.0
    return (lo - pad, hi + pad) if lo == hi else (lo, hi)  # a constant: a line across the middle


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def draw_panel(canvas: ImageDraw.ImageDraw, left: int, top: int, title: str, series: list[tuple]):
    """One panel at (left, top): title, axes with the data ranges at their ends, one line per series."""
    x0, y0, x1, y1 = left + LEFT, top + TOP, left + PANEL_W - RIGHT, top + PANEL_H - BOTTOM
    canvas.text((x0, top + 6), title, fill=INK)
    canvas.rectangle((x0, y0, x1, y1), outline=INK)
    xs = [x for _, _, sx, _ in series for x in sx]
    ys = [y for _, _, _, sy in series for y in sy]
    if not xs:
        canvas.text((x0 + 8, y0 + 8), "no finite values", fill=INK)
        return
    (xlo, xhi), (ylo, yhi) = _span(xs), _span(ys)
    for v, y in ((yhi, y0), (ylo, y1)):
        canvas.text((left + 4, y - 6), _fmt(v), fill=INK)
    canvas.text((x0, y1 + 6), _fmt(xlo), fill=INK)
    canvas.text((x1 - 6 * len(_fmt(xhi)), y1 + 6), _fmt(xhi), fill=INK)
    canvas.text(((x0 + x1) // 2 - 12, y1 + 18), "step", fill=INK)

    def pixel(x, y):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
    for _, colour, sx, sy in series:
        points = [pixel(x, y) for x, y in zip(sx, sy)]
        if len(points) > 1:
            canvas.line(points, fill=colour, width=2, joint="curve")
        for px, py in points if len(points) < 30 else ():  # few points: mark each
            canvas.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)


def draw(panels: list[tuple[str, list[tuple]]], columns: int = 3) -> Image.Image:
    """panels: [(title, [(label, colour, xs, ys), ...]), ...] -> the picture. Each distinct label is one
    legend entry, in the colour of its first series."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    legend = {}
    for _, series in panels:
        for label, colour, _, _ in series:
            legend.setdefault(label, colour)
    per_row = max(1, columns * PANEL_W // 160)
    legend_h = math.ceil(len(legend) / per_row) * LEGEND_ROW + 6 if legend else 0
    image = Image.new("RGB", (columns * PANEL_W, rows * PANEL_H + legend_h), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels):
        draw_panel(canvas, (i % columns) * PANEL_W, (i // columns) * PANEL_H, title, series)
    for i, (label, colour) in enumerate(legend.items()):
        x, y = 8 + (i % per_row) * 160, rows * PANEL_H + (i // per_row) * LEGEND_ROW
        canvas.rectangle((x, y + 5, x + 14, y + 9), fill=colour)
        canvas.text((x + 20, y + 1), label[:22], fill=INK)
    return image


def plot_logs(paths: list[str], out: str, keys: list[str] | None = None) -> str:
    """One panel per key, one line per log file; returns the PNG's path."""
    logs = [read_log(p) for p in paths]
    keys = keys or list(dict.fromkeys(k for records in logs for k in numeric_keys(records)))
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
