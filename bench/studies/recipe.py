"""python -m bench.studies.recipe: the v3 recipe's ablation, one ingredient added at a time.

The same v3 network throughout; each run with a stack's own entry point (``--backend
jax``: jax_port, the default; ``spec`` or ``torch``: torch_cnn) in a subprocess, one after
the other, resumably (``bench.studies.reproduce``'s runner: a finished run is not run again, an
interrupted one resumes), in this order:

    reference   the original v3 preset as it is (50 epochs, Adam at a constant 1e-3): the
                original's accuracy and training time on this machine and stack
    v3-30       the same for 30 epochs
    onecycle    + one-cycle learning rate (the v3-recipe's schedule)
    ema         + moving average of the weights
    recipe      + flip test-time averaging: ``--preset v3-recipe`` itself, on every seed of
                ``--seeds`` (the ladder above runs on the first)
    smoothing   the recipe + label smoothing 0.1: an ingredient measured and left out of
                the preset (first seed)

and writes into ``--out`` (default ``results/recipe``)::

    table.md, table.csv   per run: test and de-duplicated test accuracy at the last epoch,
                          epochs, training seconds, and the first epoch (and training
                          seconds) whose test accuracy reached the original's 96.47%
    recipe.json           the same as data, the recipe's mean ± std over the seeds, and each
                          seed's time to the original's accuracy as a fraction of the
                          reference's training time
    runs/<stack>-<rung>-s<seed>/, <stack>-<rung>-s<seed>.log

Training seconds are the sum of the epochs' training time as each run recorded it
(evaluation excluded, and a JAX run's compilation too: it is done ahead of the first epoch
and reported apart as ``compile s``), as in ``bench.studies.side_by_side``. ``--epochs-scale`` and
``--subset`` make a quick miniature, labelled as such everywhere. The study reports what it
measured; the project's goals for these figures, and whether they are met, are in
docs/results.md.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from core.atomic import atomic_write_bytes, atomic_write_json
from core.catalog import DEFAULTS, ONECYCLE_KEYS, ORIGINAL, PRESETS
from data.errors import run_cli
from core.flags import ArgumentParser, positive_int

from . import launcher, reproduce
from ..files import out_dir, png_bytes
from .side_by_side import run_summary

PROG = "python -m bench.studies.recipe"
BACKENDS = ("jax", "spec", "torch")
BASE, RECIPE = "v3", "v3-recipe"
TARGET = ORIGINAL[BASE][3]            # the original's v3 test accuracy, %
# The ladder after the 30-epoch original: each rung adds the recipe's values of these keys.
INGREDIENTS = (
    ("onecycle", "+ one-cycle learning rate", ("lr", "schedule", *ONECYCLE_KEYS)),
    ("ema", "+ moving average of the weights (EMA)", ("ema_decay",)),
    ("recipe", "+ flip test-time averaging (= v3-recipe)", ("tta",)),
)
# Ingredients measured and left out of the preset: the recipe with one change, first seed.
TRIED = (
    ("smoothing", "v3-recipe + label smoothing 0.1 (measured, not adopted)",
     {"label_smoothing": 0.1}),
)
# config.json keys that define a run; one made with other values must not stand for a rung
DEFINING = ("model", "batch_size", "lr", "epochs", "subset", "seed", "eval_every", "degrade",
            "schedule", *ONECYCLE_KEYS, "label_smoothing", "ema_decay", "tta",
            "dropout_p")


def parse_args(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                        epilog=f"example:\n  {PROG} --data cifake.zip --device gpu\n  {PROG} "
                               f"--data cifake-mini.zip --subset 200 --epochs-scale 0.1   "
                               f"# a labelled miniature")
    ap.add_argument("--backend", default="jax", choices=BACKENDS,
                    help="jax = jax_port; spec or torch = torch_cnn")
    ap.add_argument("--data", help="Kaggle cifake zip or folder (default: $CIFAKE_PATH)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="results/recipe")
    ap.add_argument("--seeds", default="0,1,2",
                    help="comma-separated seeds of the final recipe; the ladder runs on the "
                         "first")
    ap.add_argument("--epochs-scale", type=launcher.epochs_scale, default=1.0,
                    help="multiply every run's epochs (at least 1): a miniature")
    ap.add_argument("--subset", type=positive_int("--subset"),
                    help="first N images per class of each split: a miniature")
    ap.add_argument("--device", type=launcher.device, default=None,
                    help="auto | cpu | gpu (cuda = gpu) (default: the stack's auto)")
    ap.add_argument("--plots-only", action="store_true",
                    help="only rebuild the tables from the run directories present")
    args = ap.parse_args(argv)
    args.seeds = launcher.parse_seeds(args.seeds)
    return args


def rungs() -> list[tuple[str, str, dict]]:
    """(rung, description, its settings: the preset keys it trains with), in order."""
    base = {**PRESETS[BASE]}
    out = [("reference", f"original v3 ({base['epochs']} epochs, constant lr)", dict(base))]
    settings = {**base, "epochs": PRESETS[RECIPE]["epochs"]}
    out.append(("v3-30", f"original v3, {settings['epochs']} epochs", dict(settings)))
    for name, desc, keys in INGREDIENTS:
        settings.update({k: PRESETS[RECIPE][k] for k in keys})
        out.append((name, desc, dict(settings)))
    # the ladder ends at the preset itself (a preset key no rung adds would break that)
    assert _same(settings, PRESETS[RECIPE]), "the ladder does not end at the v3-recipe preset"
    for name, desc, change in TRIED:
        out.append((name, desc, {**settings, **change}))
    return out


def _same(a: dict, b: dict) -> bool:
    """The same training configuration, unset keys taken at their defaults."""
    return {**DEFAULTS["cnn"], **a} == {**DEFAULTS["cnn"], **b}


def scaled(epochs: int, scale: float) -> int:
    return max(1, round(epochs * scale))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def train_flags(args, rung: str, settings: dict, seed: int) -> list[str]:
    """The fresh run's flags: the recipe rung is the v3-recipe preset itself; the others are
    the v3 preset with the rung's settings given explicitly."""
    preset = RECIPE if _same(settings, PRESETS[RECIPE]) else BASE
    flags_ = ["--preset", preset, "--seed", str(seed)]
    for key, value in settings.items():
        if key not in ("model", "epochs") and value != PRESETS[preset].get(key):
            flags_ += [_flag(key), str(value)]
    epochs = scaled(settings["epochs"], args.epochs_scale)
    if epochs != PRESETS[preset]["epochs"]:
        flags_ += ["--epochs", str(epochs)]
    if args.data:
        flags_ += ["--data", args.data]
    if args.subset:
        flags_ += ["--subset", str(args.subset)]
    return flags_


def plan(args) -> list[dict]:
    """Every run, in order: {rung, description, seed, settings, run_dir name}."""
    runs = []
    for rung, desc, settings in rungs():
        for seed in (args.seeds if rung == "recipe" else args.seeds[:1]):
            runs.append({"rung": rung, "description": desc, "seed": seed,
                         "settings": settings})
    return runs


def _mean_std(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(records: list[dict]) -> dict:
    """The recipe over its complete seeds (mean ± sample std), and per seed the training
    seconds it took to first reach TARGET as a fraction of the reference's whole training
    time -- only where every run ran on one kind of device (seconds on a GPU against a
    CPU's say nothing about the recipe)."""
    final = [r for r in records if r["rung"] == "recipe"]
    done = [r for r in final if r.get("status") == "complete"]
    ref = next((r for r in records if r["rung"] == "reference"), {})
    out = {"seeds": [r["seed"] for r in done],
           "test_acc": _mean_std([r["test_acc"] for r in done]),
           "test_dedup_acc": _mean_std([r["test_dedup_acc"] for r in done]),
           "train_seconds": _mean_std([r["train_seconds"] for r in done]),
           "reference_train_seconds": ref.get("train_seconds")
           if ref.get("status") == "complete" else None}
    # seconds compare only on one kind of device (a finished run is reused, and a resumed
    # one may have moved)
    devices = sorted({r.get("device_label") or "?" for r in done + ([ref] if ref else [])
                      if r.get("status") == "complete"})
    out["devices"] = devices
    ref_s = out["reference_train_seconds"]
    out["fraction_to_target"] = {
        str(r["seed"]): None if r["seconds_to_target"] is None else r["seconds_to_target"] / ref_s
        for r in done} if ref_s and len(devices) == 1 else None
    return out


def collect(run_dir: Path, item: dict, status: str) -> dict:
    s = run_summary(run_dir, TARGET)
    hist = s.get("history") or []
    return {"rung": item["rung"], "description": item["description"], "seed": item["seed"],
            "run": status, "status": s["status"], "run_dir": str(run_dir),
            "epochs": s.get("epochs"), "test_acc": s.get("test_acc"),
            "test_dedup_acc": s.get("test_dedup_acc"),
            "train_seconds": sum(float(h.get("seconds") or 0.0) for h in hist) if hist else None,
            "compile_seconds": _compile_seconds(run_dir),
            "wall_seconds": s.get("wall_seconds"), "device": s.get("device"),
            "device_label": s.get("device_label"),
            "epoch_to_target": s.get("epoch_to_original"),
            "seconds_to_target": s.get("seconds_to_original")}


def _compile_seconds(run_dir: Path) -> float | None:
    """The run's compilation ahead of training (JAX), or None where it recorded none (an
    eager stack records ~0; a run made before this was recorded has its compilation inside
    its first epoch)."""
    try:
        v = json.loads((run_dir / "metrics.json").read_text()).get("compile_seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _f(v, nd=2) -> str:
    if v is None:
        return "—"
    return f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def _reached(r: dict) -> str:
    if r["status"] == "missing":
        return "—"
    if r["epoch_to_target"] is None:
        return "never"
    return f"epoch {r['epoch_to_target']} ({r['seconds_to_target']:,.1f} s)"


def _pm(ms: dict, unit: str, nd=2) -> str:
    if ms["mean"] is None:
        return "not measured"
    return _f(ms["mean"], nd) + ("" if ms["std"] is None else f" ± {_f(ms['std'], nd)}") \
        + f" {unit} (n={ms['n']})"


COLUMNS = ["rung", "description", "seed", "status", "epochs", "test_acc", "test_dedup_acc",
           "train_seconds", "compile_seconds", "wall_seconds", "epoch_to_target",
           "seconds_to_target", "device"]


def _fraction_line(summary: dict) -> str:
    """Each seed's training seconds to TARGET over the reference's whole training time."""
    f = summary["fraction_to_target"]
    if f is None:
        why = (f"runs on several devices: {', '.join(summary['devices'])}"
               if len(summary["devices"]) > 1 else "no complete reference run")
        return f"Time to {TARGET}% against the reference: not measured ({why})."
    parts = [f"seed {sd}: " + ("never" if v is None else f"{v:.2f} x") for sd, v in f.items()]
    return (f"Time to {TARGET}% as a fraction of the reference's training seconds "
            f"({_f(summary['reference_train_seconds'], 1)} s): {'; '.join(parts) or '—'}.")


def write_tables(out: Path, records: list[dict], summary: dict, label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in records:
        w.writerow(["" if r.get(k) is None else r[k] for k in COLUMNS])
    atomic_write_bytes(out / "table.csv", buf.getvalue().encode())
    lines = [f"# {label}", "",
             f"| rung | what | seed | device | status | epochs | test % | dedup test % | "
             f"training s | compile s | first epoch ≥ {TARGET}% (training s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['rung']} | {r['description']} | {r['seed']} | "
                     f"{r.get('device_label') or '—'} | {r['status']} | "
                     f"{_f(r['epochs'])} | {_f(r['test_acc'])} | {_f(r['test_dedup_acc'])} | "
                     f"{_f(r['train_seconds'], 1)} | {_f(r.get('compile_seconds'), 1)} | "
                     f"{_reached(r)} |")
    lines += ["", f"**v3-recipe over seeds {', '.join(map(str, summary['seeds'])) or '—'}** "
              f"(mean ± sample std): test {_pm(summary['test_acc'], '%')}, dedup test "
              f"{_pm(summary['test_dedup_acc'], '%')}, training "
              f"{_pm(summary['train_seconds'], 's', 1)}.", "", _fraction_line(summary),
              "", "Test accuracies are the last epoch's. Training seconds: the epochs' training "
              "time summed (evaluation excluded; compilation, done ahead of the first epoch, "
              "excluded and shown as compile s; '—' where a run did not record it, and its "
              "first epoch then holds it).", ""]
    atomic_write_bytes(out / "table.md", "\n".join(lines).encode())


def write_plot(out: Path, records: list[dict], label: str) -> None:
    """curves.png: each run's test accuracy against its training seconds, the target line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r in records:
        hist = (run_summary(Path(r["run_dir"]), TARGET).get("history") or [])
        pts, t = [], 0.0
        for h in hist:
            t += float(h.get("seconds") or 0.0)
            if h.get("test_acc") is not None:
                pts.append((t, h["test_acc"]))
        if pts:
            ax.plot(*zip(*pts), lw=1.2, marker=".", ms=3,
                    label=f"{r['rung']} s{r['seed']}: {r['description']}")
    ax.axhline(TARGET, color="gray", ls=":", lw=1, label=f"original v3 test ({TARGET}%)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 90))
    ax.set_xlabel("training seconds (summed epochs)"), ax.set_ylabel("test accuracy %")
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    atomic_write_bytes(out / "curves.png", png_bytes(fig))


def main(argv=None) -> int:
    args = parse_args(argv)
    stack = reproduce.STACK_OF[("spec" if args.backend == "torch" else args.backend, "cnn")]
    out = out_dir(args.out)
    out_dir(out / "runs")
    miniature = args.epochs_scale != 1.0 or args.subset is not None
    label = f"v3 recipe ablation ({stack}), full CIFAKE"
    if miniature:
        label = (f"MINIATURE (epochs x{args.epochs_scale}"
                 f"{f', {args.subset} images/class' if args.subset else ''}) of the v3 recipe "
                 f"ablation ({stack}) — not a result")
    items = plan(args)
    for item in items:  # all before the first run: a stale folder must not cost a run's time
        item["name"] = f"{stack}-{item['rung']}-s{item['seed']}"
        settings = {**DEFAULTS["cnn"], **item["settings"]}
        want = {k: settings[k] for k in DEFINING if k in settings}
        want.update(epochs=scaled(want["epochs"], args.epochs_scale), subset=args.subset,
                    seed=item["seed"])
        reproduce.check_settings(out / "runs" / item["name"], want,
                                 f"rung {item['rung']} (seed {item['seed']})")
    records, failed = [], []
    for item in items:
        run_dir = out / "runs" / item["name"]
        status = "present"
        if not args.plots_only:
            status = launcher.run_or_resume(
                item["name"], stack, run_dir,
                train_flags(args, item["rung"], item["settings"], item["seed"]),
                out / f"{item['name']}.log", args.cache_dir, args.device)
            if status == "failed":
                failed.append(item["name"])
        records.append(collect(run_dir, item, status))
    summary = summarise(records)
    write_tables(out, records, summary, label)
    if any(r["status"] != "missing" for r in records):
        write_plot(out, records, label)
    atomic_write_json(out / "recipe.json", {
        "label": label, "miniature": miniature, "stack": stack, "target": TARGET,
        "command": " ".join([PROG] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rungs": [{"rung": r, "description": d, "settings": s} for r, d, s in rungs()],
        "runs": records, "summary": summary})
    return reproduce.finish(out, failed, "runs")


if __name__ == "__main__":
    run_cli(main, prog="bench.studies.recipe")
