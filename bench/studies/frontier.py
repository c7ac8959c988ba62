"""``python -m bench.studies.frontier``: test accuracy against training time, every run.

Reads finished runs (a run folder with ``config.json`` and ``metrics.json``, or a pair
``<name>.config.json`` / ``<name>.metrics.json`` as docs/results keeps them) under the
paths given, and writes ``--out``/frontier.{md,csv,png}: one row per run with its stack,
model, what it changed from its preset, the device, the training seconds (the sum of its
epochs' training time: evaluation and compilation excluded) and its last-epoch test
accuracy (validation accuracy beside it where the run held some images out). A run is on
the frontier of its device when no faster run on that device reached a higher test
accuracy. Unfinished runs are listed apart and left out of the table.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from data.errors import UserError, run_cli
from core.atomic import atomic_write_bytes
from core.catalog import DEFAULTS, MLP_HIDDEN, PRESETS, family_of
from core.flags import ArgumentParser
from core.rundir import read_json

from ..files import out_dir, png_bytes

PROG = "python -m bench.studies.frontier"
# what a row names when it differs from the run's preset
KEYS = ("hidden", "epochs", "batch_size", "lr", "schedule", "label_smoothing", "ema_decay",
        "tta", "dropout_p", "degrade")
MARKERS = {"net4": "^"}  # chart markers of models other than the original CNNs (dots)
COLUMNS = ("device", "stack", "model", "run", "epochs", "train_s", "val_acc", "test_acc",
           "frontier")


def find_runs(paths) -> list[tuple[Path, Path]]:
    """(config, metrics) file pairs under ``paths``, each found once, in path order."""
    pairs = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such file or folder")
        for cfg in sorted([p] if p.is_file() else p.rglob("*config.json")):
            if cfg.name == "config.json":
                met = cfg.with_name("metrics.json")
            elif cfg.name.endswith(".config.json"):
                met = cfg.with_name(cfg.name[:-len("config.json")] + "metrics.json")
            else:
                continue
            if met.exists() and (cfg, met) not in pairs:
                pairs.append((cfg, met))
    return pairs


def value(v) -> str:
    """A config value as a row names it: 0.002 -> "0.002", [64, 32, 16] -> "64-32-16"."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "-".join(map(str, v))
    return str(v)


def describe(cfg: dict) -> str:
    """The preset and what the run changed from it: "v3-recipe, epochs 50, dropout_p 0"."""
    preset = cfg.get("preset")
    base = {**DEFAULTS.get(cfg.get("family"), {}), **PRESETS.get(preset, {})}
    if base.get("hidden") is None and cfg.get("model") in MLP_HIDDEN:
        base["hidden"] = list(MLP_HIDDEN[cfg["model"]])  # an MLP's own layout
    changed = [f"{k} {value(cfg[k])}" for k in KEYS
               if k in cfg and k in base and cfg[k] != base[k]]
    if cfg.get("val"):
        changed.append(f"val {cfg['val']}")
    return ", ".join([preset or cfg.get("model", "?"), *changed])


def row(cfg_path: Path, met_path: Path) -> dict | None:
    """One run's row, or None when the run did not finish."""
    cfg, met = read_json(cfg_path), read_json(met_path)
    hist = met.get("history")
    if not met.get("complete") or not isinstance(hist, list) or not hist:
        return None
    vals = [h["val_acc"] for h in hist if "val_acc" in h]
    missing = [k for k in ("stack", "model") if k not in cfg]
    if missing:
        raise UserError(f"{cfg_path}: no {missing[0]!r} in a run's config")
    try:
        return {"device": cfg.get("device_kind", "?"), "stack": cfg["stack"],
                "model": cfg["model"], "run": describe(cfg), "epochs": len(hist),
                "train_s": round(sum(float(h["seconds"]) for h in hist), 1),
                "val_acc": vals[-1] if vals else None,
                "test_acc": float(met["final"]["test_acc"]), "frontier": False}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{met_path}: no {e} in a finished run's metrics") from None


def mark_frontier(rows: list[dict]) -> None:
    """Per device: on the frontier when no faster run there has a higher test accuracy."""
    best: dict[str, float] = {}
    for r in sorted(rows, key=lambda r: (r["train_s"], -r["test_acc"])):
        if r["test_acc"] > best.get(r["device"], -1.0):
            r["frontier"], best[r["device"]] = True, r["test_acc"]


def markdown(rows: list[dict], unfinished: list[str]) -> str:
    lines = ["| device | stack | run | epochs | training s | val % (last) | test % | frontier |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = "—" if r["val_acc"] is None else f"{r['val_acc']:.2f}"
        lines.append(f"| {r['device']} | {r['stack']} | {r['run']} | {r['epochs']} | "
                     f"{r['train_s']:,.0f} | {val} | {r['test_acc']:.2f} | "
                     f"{'yes' if r['frontier'] else ''} |")
    if unfinished:
        lines += ["", "Unfinished, left out: " + ", ".join(unfinished)]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for dev in sorted({r["device"] for r in rows}):
        pts = sorted((r for r in rows if r["device"] == dev), key=lambda r: r["train_s"])
        sc = ax.scatter([r["train_s"] for r in pts], [r["test_acc"] for r in pts], s=18,
                        label=dev, alpha=0.7)
        for model, marker in MARKERS.items():  # the models beyond v3 drawn over it
            mine = [r for r in pts if r["model"] == model]
            if mine:
                ax.scatter([r["train_s"] for r in mine], [r["test_acc"] for r in mine], s=40,
                           marker=marker, color=sc.get_facecolor()[0], label=f"{dev}: {model}")
        front = [r for r in pts if r["frontier"]]
        ax.step([r["train_s"] for r in front], [r["test_acc"] for r in front], where="post",
                color=sc.get_facecolor()[0], alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (sum of epochs, log scale)")
    ax.set_ylabel("test accuracy, last epoch (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders, or folders that hold runs")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--no-chart", action="store_true", help="skip frontier.png")
    ap.add_argument("--family", choices=("cnn", "mlp", "all"), default="all",
                    help="only the runs of this model family (default all)")
    args = ap.parse_args(argv)
    out = out_dir(args.out)
    rows, unfinished = [], []
    for cfg, met in find_runs(args.paths):
        model = read_json(cfg).get("model")
        if args.family != "all" and model is not None and family_of(model) != args.family:
            continue  # finished or not: another family's run is not this table's
        r = row(cfg, met)
        (rows.append(r) if r else unfinished.append(str(met)))
    if not rows:
        raise UserError(f"no finished {'' if args.family == 'all' else args.family + ' '}"
                        f"run under {', '.join(args.paths)}")
    mark_frontier(rows)
    rows.sort(key=lambda r: (r["device"], r["train_s"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "frontier.csv", buf.getvalue().encode())
    md = markdown(rows, unfinished)
    atomic_write_bytes(out / "frontier.md", md.encode())
    if not args.no_chart:
        atomic_write_bytes(out / "frontier.png", chart(rows))
    print(md, end="")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
