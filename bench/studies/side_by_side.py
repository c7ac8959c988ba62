"""``python -m bench.studies.side_by_side``: the reproduction table with the spec stacks and the JAX
port side by side.

Reads the run directories that ``python -m bench.studies.reproduce --backend spec`` and
``--backend jax`` left (``<dir>/runs/<stack>-<row>/``) and writes into ``--out``:

    side_by_side.md, side_by_side.csv   per row: the original test (train, gap); spec and JAX
                                        train / test / gap, de-duplicated test, ROC-AUC,
                                        median seconds per epoch; the JAX - spec test
                                        difference; and the time to the original's accuracy
    compare_<row>.png                   both stacks' train and test accuracy per epoch, overlaid
    side_by_side.json                   everything above as data
    seeds.md                            where a row was also run with other seeds (``bench.studies.reproduce
                                        --seeds``): each stack's last-epoch test accuracy per seed,
                                        mean ± sample std, and the JAX - spec difference of the
                                        means with its standard error

"Time to the original's accuracy" is the first epoch whose test accuracy is at or above the
original row's test accuracy, and the training seconds summed over the epochs up to and
including it (per-epoch training time as each run recorded it; evaluation excluded).
"never" where no evaluated epoch reached it. Rows whose runs are missing or unfinished are
shown as such, never filled in.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from data.errors import run_cli
from core.atomic import atomic_write_bytes, atomic_write_json
from core.flags import ArgumentParser
from core.catalog import ORIGINAL, ROWS, parse_rows

from ..files import out_dir, png_bytes
from .reproduce import run_name

PROG = "python -m bench.studies.side_by_side"
SPEC_STACK = {"mlp": "numpy_mlp", "cnn": "torch_cnn"}


def parse_args(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="results/reproduce-spec",
                    help="bench.studies.reproduce --out of the spec backend (default results/reproduce-spec)")
    ap.add_argument("--jax", default="results/reproduce-jax",
                    help="bench.studies.reproduce --out of the jax backend (default results/reproduce-jax)")
    ap.add_argument("--out", default="results/reproduce-side-by-side", help="output folder")
    ap.add_argument("--rows", default="all", help=f"comma-separated rows: {','.join(ROWS)}")
    ap.add_argument("--machine", default="", help="a few words on the machine, for the title")
    args = ap.parse_args(argv)
    args.rows = parse_rows(args.rows)
    return args


def _read(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def time_to(history: list[dict], target: float) -> tuple[int | None, float | None]:
    """(first epoch with test_acc >= target, training seconds up to it) or (None, None)."""
    total = 0.0
    for h in history:
        total += float(h.get("seconds") or 0.0)
        acc = h.get("test_acc")
        if acc is not None and acc >= target:
            return int(h["epoch"]), total
    return None, None


LAST = 10  # evaluated epochs in the "last epochs" summary


def last_tests(hist: list[dict]) -> dict:
    """Mean, min and max test accuracy over the last LAST evaluated epochs: a constant
    learning rate leaves the test curve swinging by about a point from epoch to epoch, so
    one final epoch can mislead when two runs are compared."""
    tail = [h["test_acc"] for h in hist if h.get("test_acc") is not None][-LAST:]
    if not tail:
        return {"last_test_mean": None, "last_test_min": None, "last_test_max": None}
    return {"last_test_mean": statistics.fmean(tail), "last_test_min": min(tail),
            "last_test_max": max(tail)}


def run_summary(run_dir: Path, target: float, original_epochs: int | None = None) -> dict:
    m, c = _read(run_dir / "metrics.json"), _read(run_dir / "config.json") or {}
    if m is None:
        return {"status": "missing"}
    hist = m.get("history") or []
    f = m.get("final") or {}
    secs = [float(h["seconds"]) for h in hist if h.get("seconds") is not None]
    ep, t = time_to(hist, target)
    status = "complete" if m.get("complete") else f"unfinished ({len(hist)} epochs)"
    # a run of another size than the original row (bench.studies.reproduce --subset/--epochs-scale)
    # says so in its status, and is not compared with a run of another size
    size = []
    if c.get("subset") is not None:
        size.append(f"subset {c['subset']}/class")
    if original_epochs is not None and c.get("epochs") not in (None, original_epochs):
        size.append(f"{c['epochs']} of {original_epochs} epochs")
    return {
        "status": status + (f", {', '.join(size)}" if size else ""),
        "full_size": not size, "size": (c.get("subset"), c.get("epochs")),
        "epochs": len(hist), "device": c.get("device"), "hidden": c.get("hidden"),
        # the accelerator's name where the stack recorded one ("cpu" / "cuda" otherwise;
        # numpy_mlp runs written before it recorded its device ran on the CPU)
        "device_label": c.get("device_kind") or (c.get("device") or "").split(":")[0]
        or ("cpu" if c.get("stack") == "numpy_mlp" else None),
        **last_tests(hist),
        "train_acc": f.get("train_acc"), "test_acc": f.get("test_acc"), "gap_pp": f.get("gap_pp"),
        "test_dedup_acc": (f.get("test_dedup") or {}).get("accuracy"),
        "test_auc": f.get("test_auc"), "wall_seconds": m.get("wall_seconds"),
        "median_epoch_seconds": statistics.median(secs) if secs else None,
        "epoch_to_original": ep, "seconds_to_original": t, "history": hist}


def collect(args) -> list[dict]:
    records = []
    for row in args.rows:
        family, desc, epochs, o_test, o_train = ORIGINAL[row]
        spec_stack = SPEC_STACK[family]
        rec = {"row": row, "description": desc, "original_epochs": epochs,
               "original_test": o_test, "original_train": o_train,
               "original_gap": round(o_train - o_test, 2),
               "spec_stack": spec_stack,
               "spec": run_summary(Path(args.spec) / "runs" / f"{spec_stack}-{row}", o_test,
                                   epochs),
               "jax": run_summary(Path(args.jax) / "runs" / f"jax_port-{row}", o_test, epochs)}
        a, b = rec["spec"].get("test_acc"), rec["jax"].get("test_acc")
        same_size = rec["spec"].get("size") == rec["jax"].get("size")
        rec["jax_minus_spec_test_pp"] = None if a is None or b is None or not same_size \
            else b - a
        records.append(rec)
    return records


def is_full_size(records: list[dict]) -> bool:
    """True if every run found is of the original rows' size (no --subset, all epochs)."""
    return all(r[side].get("full_size", True) for r in records for side in ("spec", "jax"))


def seed_runs(base: Path, stack: str, row: str) -> dict[int, Path]:
    """{seed: run directory} of every run of ``row`` by ``stack`` under ``base``/runs."""
    found = {}
    runs = base / "runs"
    if (runs / run_name(stack, row)).is_dir():
        found[0] = runs / run_name(stack, row)
    prefix = run_name(stack, row) + "-s"
    for d in sorted(runs.glob(prefix + "*")) if runs.is_dir() else []:
        tail = d.name[len(prefix):]
        if d.is_dir() and tail.isdigit() and str(int(tail)) == tail and int(tail) > 0:
            found[int(tail)] = d
    return found


def _spread(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": mean, "std": std,
            "sem": None if std is None else std / n ** 0.5}


def collect_seeds(args) -> list[dict]:
    """Rows with more than one finished seed on either stack: last-epoch test accuracy per
    seed, per stack mean ± sample std, and JAX - spec of the means with its standard error
    (sqrt(sem_spec^2 + sem_jax^2)). Unfinished runs are listed, never averaged."""
    out = []
    for row in args.rows:
        family, desc, _, o_test, _ = ORIGINAL[row]
        rec = {"row": row, "description": desc, "original_test": o_test}
        for side, base, stack in (("spec", Path(args.spec), SPEC_STACK[family]),
                                  ("jax", Path(args.jax), "jax_port")):
            per_seed = {}
            for seed, d in seed_runs(base, stack, row).items():
                summ = run_summary(d, o_test)
                per_seed[seed] = {"status": summ["status"], "test_acc": summ.get("test_acc"),
                                  "test_dedup_acc": summ.get("test_dedup_acc"),
                                  "device": summ.get("device_label")}
            done = [v["test_acc"] for v in per_seed.values()
                    if v["status"] == "complete" and v["test_acc"] is not None]
            rec[side] = {"stack": stack, "seeds": per_seed, **_spread(done)}
        if max(rec["spec"]["n"], rec["jax"]["n"]) < 2:
            continue
        a, b = rec["spec"], rec["jax"]
        rec["jax_minus_spec_mean_pp"] = (None if a["mean"] is None or b["mean"] is None
                                         else b["mean"] - a["mean"])
        rec["se_difference_pp"] = (None if a["sem"] is None or b["sem"] is None
                                   else (a["sem"] ** 2 + b["sem"] ** 2) ** 0.5)
        out.append(rec)
    return out


def write_seeds(out: Path, seeds: list[dict], title: str) -> None:
    lines = [f"# Seeds: {title}", "",
             "Last-epoch test accuracy (%) of every finished run of a row, per seed; mean ± "
             "sample standard deviation per stack; JAX − spec of the means ± its standard "
             "error. Unfinished runs are shown, not averaged.", "",
             "| row | original test % | stack | per seed | mean ± std | JAX − spec (± se) pp |",
             "|---|---|---|---|---|---|"]
    for r in seeds:
        for i, side in enumerate(("spec", "jax")):
            s = r[side]
            # the device of each seed where the stack's seeds ran on several
            mixed = len({v["device"] for v in s["seeds"].values()}) > 1
            per = ", ".join(
                f"s{seed}: {_f(v['test_acc'])}"
                + (f" ({v['device'] or '?'})" if mixed else "")
                + ("" if v["status"] == "complete" else f" ({v['status']})")
                for seed, v in sorted(s["seeds"].items())) or "—"
            ms = "—" if s["mean"] is None else (f"{s['mean']:.2f}" + (
                "" if s["std"] is None else f" ± {s['std']:.2f}") + f" (n = {s['n']})")
            diff = ""
            if i == 1 and r["jax_minus_spec_mean_pp"] is not None:
                diff = f"{r['jax_minus_spec_mean_pp']:+.2f}" + (
                    "" if r["se_difference_pp"] is None else f" ± {r['se_difference_pp']:.2f}")
            lines.append(f"| {r['description'] if i == 0 else ''} | "
                         f"{_f(r['original_test']) if i == 0 else ''} | {s['stack']} | {per} | "
                         f"{ms} | {diff} |")
    lines.append("")
    atomic_write_bytes(out / "seeds.md", "\n".join(lines).encode())


def _f(v, nd=2) -> str:
    if v is None:
        return "—"
    return f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def _last(s: dict) -> str:
    if s.get("last_test_mean") is None:
        return "—"
    return f"{s['last_test_mean']:.2f} ({s['last_test_min']:.2f}–{s['last_test_max']:.2f})"


def _reach(s: dict) -> str:
    if s.get("status") == "missing":
        return "—"
    if s.get("epoch_to_original") is None:
        return "never"
    return f"epoch {s['epoch_to_original']} ({s['seconds_to_original']:,.0f} s)"


COLUMNS = ["row", "original_test", "original_train", "original_gap",
           "spec_stack", "spec_device", "spec_status", "spec_train", "spec_test", "spec_gap", "spec_dedup",
           "spec_auc", "spec_last_mean", "spec_last_min", "spec_last_max", "spec_epoch_s", "spec_epoch_to_original", "spec_seconds_to_original",
           "jax_device", "jax_status", "jax_train", "jax_test", "jax_gap", "jax_dedup", "jax_auc",
           "jax_last_mean", "jax_last_min", "jax_last_max", "jax_epoch_s", "jax_epoch_to_original", "jax_seconds_to_original",
           "jax_minus_spec_test_pp"]


def _flat(r: dict) -> dict:
    out = {k: r[k] for k in ("row", "original_test", "original_train", "original_gap",
                             "spec_stack", "jax_minus_spec_test_pp")}
    for side in ("spec", "jax"):
        s = r[side]
        out.update({f"{side}_device": s.get("device_label"), f"{side}_status": s.get("status"), f"{side}_train": s.get("train_acc"),
                    f"{side}_test": s.get("test_acc"), f"{side}_gap": s.get("gap_pp"),
                    f"{side}_dedup": s.get("test_dedup_acc"), f"{side}_auc": s.get("test_auc"),
                    f"{side}_last_mean": s.get("last_test_mean"),
                    f"{side}_last_min": s.get("last_test_min"),
                    f"{side}_last_max": s.get("last_test_max"),
                    f"{side}_epoch_s": s.get("median_epoch_seconds"),
                    f"{side}_epoch_to_original": s.get("epoch_to_original"),
                    f"{side}_seconds_to_original": s.get("seconds_to_original")})
    return out


def write_tables(out: Path, records: list[dict], title: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in records:
        flat = _flat(r)
        w.writerow(["" if flat[k] is None else flat[k] for k in COLUMNS])
    atomic_write_bytes(out / "side_by_side.csv", buf.getvalue().encode())
    lines = [f"# {title}", "",
             "| row | original test % (train, gap) | stack | device | status | train % | test % "
             f"| gap pp | dedup test % | ROC-AUC | test, last {LAST} epochs: mean (min–max) "
             "| s/epoch | reached original test | JAX − spec test pp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        orig = f"{r['original_test']:.2f} ({r['original_train']:.2f}, {r['original_gap']:.2f})"
        for i, (side, name) in enumerate((("spec", r["spec_stack"]), ("jax", "jax_port"))):
            s = r[side]
            lines.append(
                f"| {r['description'] if i == 0 else ''} | {orig if i == 0 else ''} | {name} | "
                f"{s.get('device_label') or '—'} | {s.get('status')} | {_f(s.get('train_acc'))} | {_f(s.get('test_acc'))} | "
                f"{_f(s.get('gap_pp'))} | {_f(s.get('test_dedup_acc'))} | {_f(s.get('test_auc'), 4)} | "
                f"{_last(s)} | "
                f"{_f(s.get('median_epoch_seconds'), 2)} | {_reach(s)} | "
                f"{_f(r['jax_minus_spec_test_pp']) if i == 1 else ''} |")
    lines += ["", f"Test, last {LAST} epochs: over the last {LAST} evaluated epochs, a guard "
              "against reading one epoch of a swinging curve. "
              "s/epoch: median training seconds per epoch (evaluation excluded), on the "
              "row's device: compare speeds only between runs on the same device. Reached "
              "original test: first epoch whose test accuracy ≥ the original row's, with the "
              "training seconds summed up to it.", ""]
    atomic_write_bytes(out / "side_by_side.md", "\n".join(lines).encode())


def write_plots(out: Path, records: list[dict], title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for r in records:
        if not (r["spec"].get("history") or r["jax"].get("history")):
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        for side, name, color in (("spec", r["spec_stack"], "#3a6ea5"), ("jax", "jax_port", "#d1495b")):
            h = r[side].get("history") or []
            if not h:
                continue
            ax.plot([e["epoch"] for e in h], [e.get("train_acc") for e in h], color=color, lw=1,
                    ls="--", label=f"{name} train")
            te = [(e["epoch"], e["test_acc"]) for e in h if e.get("test_acc") is not None]
            if te:
                ax.plot(*zip(*te), color=color, lw=1.5, marker="." if len(te) < 60 else None,
                        label=f"{name} test")
        ax.axhline(r["original_test"], color="gray", ls=":", lw=1, label="original test")
        ax.set_xlabel("epoch"), ax.set_ylabel("accuracy %")
        ax.set_title(f"{r['description']} — {title}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"compare_{r['row']}.png"
        atomic_write_bytes(out / name, png_bytes(fig))
        written.append(name)
    return written


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = out_dir(args.out)
    records = collect(args)
    size = "full CIFAKE" if is_full_size(records) else \
        "includes runs smaller than the original rows (see status; not compared across sizes)"
    title = f"spec stacks vs JAX port, {size}, seed 0" + (f", {args.machine}" if args.machine else "")
    write_tables(out, records, title)
    plots = write_plots(out, records, title)
    seeds = collect_seeds(args)
    if seeds:
        write_seeds(out, seeds, title.replace(", seed 0", ""))
    atomic_write_json(out / "side_by_side.json", {
        "title": title, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([PROG] + (argv if argv is not None else sys.argv[1:])),
        "rows": [{**r, "spec": {k: v for k, v in r["spec"].items() if k != "history"},
                  "jax": {k: v for k, v in r["jax"].items() if k != "history"}} for r in records],
        "plots": plots, "seeds": seeds})
    print((out / "side_by_side.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
