"""python -m bench.studies.reproduce: rebuild the original seven-row results table.

Runs each row's preset with a stack's own entry point (``python -m
<stack>.train --preset ROW``) in a subprocess, one after the other, then
writes into ``--out`` (default ``results/reproduce-spec`` for the spec stacks,
``results/reproduce-jax`` for the port: where ``bench.studies.side_by_side`` looks)::

    table.md, table.csv       train / test / gap per row next to the original and the difference,
                              de-duplicated-test accuracy, ROC-AUC, wall time, device
    curves_<row>.png          loss and accuracy per epoch, train vs test
    bars.png                  the rows, ours vs the original
    runs/<stack>-<row>/       each row's run directory (config, metrics, weights); seeds
                              other than 0 (``--seeds``) in runs/<stack>-<row>-s<seed>/
    reproduce.json            everything above as data, with the command and date

Resumable: a row whose run finished is not run again; an interrupted row is
resumed (``--resume``) from its last completed epoch. ``--epochs-scale`` and
``--subset`` produce a quick miniature, labelled as such in every output.

Backends: ``spec`` (default: numpy_mlp for the MLP rows, torch_cnn for the CNN
rows), ``numpy`` (MLP rows only), ``torch`` (CNN rows only), ``jax`` (all rows).
"""
from __future__ import annotations

import csv
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

from core.atomic import atomic_write_bytes, atomic_write_json
from core.catalog import ORIGINAL, PRESETS, ROWS, parse_rows

from ..files import out_dir, png_bytes
from .launcher import device, epochs_scale, parse_seeds, read_json_or_none, run_or_resume
from data.errors import UserError, run_cli
from core.flags import ArgumentParser, positive_int

STACK_OF = {("spec", "mlp"): "numpy_mlp", ("spec", "cnn"): "torch_cnn",
            ("numpy", "mlp"): "numpy_mlp", ("torch", "cnn"): "torch_cnn",
            ("jax", "mlp"): "jax_port", ("jax", "cnn"): "jax_port"}
BACKENDS = ("spec", "numpy", "torch", "jax")


def default_out(backend: str) -> str:
    """Where a backend's table goes unless --out says: the two folders bench.studies.side_by_side
    reads by default, so the two backends' tables do not overwrite each other."""
    return "results/reproduce-jax" if backend == "jax" else "results/reproduce-spec"


def parse_args(argv):
    ap = ArgumentParser(prog="python -m bench.studies.reproduce", description=__doc__.split("\n")[0],
                        epilog="example:\n  python -m bench.studies.reproduce --data cifake.zip "
                               "--epochs-scale 0.01 --subset 500   # a quick, labelled miniature")
    ap.add_argument("--backend", default="spec", choices=BACKENDS)
    ap.add_argument("--rows", default="all",
                    help=f"comma-separated rows (default all): {','.join(ROWS)}")
    ap.add_argument("--data", help="Kaggle cifake zip or folder (default: $CIFAKE_PATH)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", help="output folder (default results/reproduce-jax for --backend "
                                  "jax, else results/reproduce-spec)")
    ap.add_argument("--epochs-scale", type=epochs_scale, default=1.0,
                    help="multiply each preset's epochs (at least 1): a miniature of the table")
    ap.add_argument("--subset", type=positive_int("--subset"),
                    help="first N images per class of each split: a miniature of the table")
    ap.add_argument("--device", type=device, default=None,
                    help="auto | cpu | gpu (cuda = gpu) for the torch and JAX rows (default: "
                         "each stack's auto); the NumPy rows always run on the CPU")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated seeds to run each row with (default 0); seed 0's "
                         "run is runs/<stack>-<row>, seed S's runs/<stack>-<row>-sS")
    ap.add_argument("--plots-only", action="store_true",
                    help="only rebuild the table and plots from the run directories present")
    args = ap.parse_args(argv)
    args.rows = parse_rows(args.rows)
    args.seeds = parse_seeds(args.seeds)
    return args


def run_name(stack: str, row: str, seed: int = 0) -> str:
    """The run directory's name under runs/ for ``row`` trained by ``stack`` with ``seed``."""
    return f"{stack}-{row}" + (f"-s{seed}" if seed else "")


def scaled_epochs(row: str, scale: float) -> int:
    return max(1, round(ORIGINAL[row][2] * scale))


def is_miniature(args) -> bool:
    return args.epochs_scale != 1.0 or args.subset is not None


def row_flags(args, row: str, seed: int = 0) -> list[str]:
    """What a fresh run of ``row`` is started with (besides --out and the shared flags)."""
    flags_ = ["--preset", row] + (["--seed", str(seed)] if seed else [])
    if args.data:
        flags_ += ["--data", args.data]
    if args.epochs_scale != 1.0:
        flags_ += ["--epochs", str(scaled_epochs(row, args.epochs_scale))]
    if args.subset:
        flags_ += ["--subset", str(args.subset)]
    return flags_


# config.json keys that define a row's result; a run directory made with other values
# (an older preset, another --epochs-scale) must not be reused or resumed as this row.
_DEFINING = ("model", "batch_size", "lr", "decay", "epochs", "hidden", "subset", "seed")


def check_settings(run_dir: Path, want: dict, what: str) -> None:
    """UserError if ``run_dir`` holds a run whose config.json differs from ``want`` in a key
    both have: a run made with other settings must not stand for (or be resumed as)
    ``what``."""
    cfg = read_json_or_none(run_dir / "config.json")
    if cfg is None:
        return
    diff = [f"{k} {cfg[k]!r} (now {v!r})" for k, v in want.items() if k in cfg and cfg[k] != v]
    if diff:
        raise UserError(f"{run_dir} was made with other settings than {what} now uses: "
                        f"{', '.join(diff)}; delete it (or use another --out) to rerun it")


def check_not_stale(args, row: str, stack: str, run_dir: Path, seed: int = 0) -> None:
    """UserError if ``run_dir`` holds a run of ``row`` made with different settings than the
    row's current preset, this command's --epochs-scale / --subset and ``seed``."""
    want = dict(PRESETS[row], seed=seed)
    want["epochs"] = scaled_epochs(row, args.epochs_scale)
    want["subset"] = args.subset
    check_settings(run_dir, {k: want[k] for k in _DEFINING if k in want}, f"row {row}")


def run_row(args, row: str, stack: str, run_dir: Path, log: Path, seed: int = 0) -> str:
    """Runs (or resumes) one row. Returns 'done', 'skipped' (already complete) or 'failed'."""
    tag = row + (f" seed {seed}" if seed else "")
    return run_or_resume(tag, stack, run_dir, row_flags(args, row, seed), log, args.cache_dir,
                         args.device)


def collect(args, row: str, stack: str, run_dir: Path, status: str, seed: int = 0) -> dict:
    family, desc, epochs, o_test, o_train = ORIGINAL[row]
    rec = {"row": row, "description": desc, "backend": stack, "seed": seed, "status": status,
           "run_dir": str(run_dir), "original_test": o_test, "original_train": o_train,
           "original_gap": round(o_train - o_test, 2), "original_epochs": epochs}
    m = read_json_or_none(run_dir / "metrics.json")
    c = read_json_or_none(run_dir / "config.json") or {}
    if not m or not m.get("final"):
        return rec
    f = m["final"]
    rec.update({
        "epochs": len(m.get("history", [])),
        "train_acc": f.get("train_acc"), "test_acc": f.get("test_acc"), "gap_pp": f.get("gap_pp"),
        "test_dedup_acc": (f.get("test_dedup") or {}).get("accuracy"),
        "test_auc": f.get("test_auc"), "wall_seconds": m.get("wall_seconds"),
        "device": c.get("device", "cpu"), "complete": bool(m.get("complete")),
        "history": m.get("history", []),
    })
    if rec["test_acc"] is not None:
        rec["diff_test_pp"] = round(rec["test_acc"] - o_test, 2)
    return rec


def _fmt(v, nd=2):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


COLUMNS = ["row", "description", "backend", "seed", "epochs", "train_acc", "test_acc", "gap_pp",
           "original_test", "original_train", "original_gap", "diff_test_pp", "test_dedup_acc",
           "test_auc", "wall_seconds", "device", "status"]


def write_tables(out: Path, records: list[dict], label: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in records:
        w.writerow([r.get(k, "") if r.get(k) is not None else "" for k in COLUMNS])
    atomic_write_bytes(out / "table.csv", buf.getvalue().encode())
    lines = [f"# {label}", "",
             "| row | backend | seed | epochs | train % | test % | gap pp | original test % "
             "(train %, gap) | Δ test pp | dedup test % | ROC-AUC | wall s | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        orig = f"{r['original_test']:.2f} ({r['original_train']:.2f}, {r['original_gap']:.2f})"
        lines.append(
            f"| {r['description']} | {r['backend']} | {r.get('seed', 0)} | "
            f"{_fmt(r.get('epochs'))} | "
            f"{_fmt(r.get('train_acc'))} | {_fmt(r.get('test_acc'))} | {_fmt(r.get('gap_pp'))} | "
            f"{orig} | {_fmt(r.get('diff_test_pp'))} | {_fmt(r.get('test_dedup_acc'))} | "
            f"{_fmt(r.get('test_auc'), 4)} | {_fmt(r.get('wall_seconds'), 0)} | "
            f"{r.get('device', '—')} |")
    lines.append("")
    atomic_write_bytes(out / "table.md", "\n".join(lines).encode())


def write_plots(out: Path, records: list[dict], label: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for r in records:
        h = r.get("history") or []
        if not h:
            continue
        seed = r.get("seed", 0)
        ep = [e["epoch"] for e in h]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        a1.plot(ep, [e.get("train_loss") for e in h], label="train")
        te = [(e["epoch"], e["test_loss"]) for e in h if e.get("test_loss") is not None]
        if te:
            a1.plot(*zip(*te), label="test", marker=".")
        a1.set_xlabel("epoch"), a1.set_ylabel("BCE loss"), a1.legend()
        a2.plot(ep, [e.get("train_acc") for e in h], label="train")
        ta = [(e["epoch"], e["test_acc"]) for e in h if e.get("test_acc") is not None]
        if ta:
            a2.plot(*zip(*ta), label="test", marker=".")
        a2.axhline(r["original_test"], color="gray", ls="--", lw=1, label="original test")
        a2.set_xlabel("epoch"), a2.set_ylabel("accuracy %"), a2.legend()
        fig.suptitle(f"{r['description']} ({r['backend']}{f', seed {seed}' if seed else ''})"
                     f" — {label}", fontsize=9)
        fig.tight_layout()
        name = f"curves_{r['row']}" + (f"-s{seed}" if seed else "") + ".png"
        atomic_write_bytes(out / name, png_bytes(fig))
        written.append(name)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(records))
    ax.bar([x - 0.2 for x in xs], [r["original_test"] for r in records], 0.4, label="original",
           color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [r.get("test_acc") or 0 for r in records], 0.4, label="ours",
           color="#3a6ea5")
    ax.set_xticks(list(xs), [r["row"] + (f" s{r['seed']}" if r.get("seed") else "")
                             for r in records], fontsize=8)
    ax.set_ylim(50, 100)
    ax.set_ylabel("test accuracy %")
    ax.set_title(label, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(out / "bars.png", png_bytes(fig))
    written.append("bars.png")
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    out = out_dir(args.out or default_out(args.backend))
    out_dir(out / "runs")
    label = "CIFAKE results, full presets"
    if is_miniature(args):
        label = (f"MINIATURE (epochs x{args.epochs_scale}"
                 f"{f', {args.subset} images/class' if args.subset else ''}) — not comparable "
                 f"with the original")
    records, failed = [], []
    for row in args.rows:
        family = ORIGINAL[row][0]
        stack = STACK_OF.get((args.backend, family))
        if stack is None:
            print(f"[{row}] skipped: backend '{args.backend}' has no {family.upper()} models",
                  file=sys.stderr)
            continue
        for seed in args.seeds:
            name = run_name(stack, row, seed)
            run_dir = out / "runs" / name
            # before running AND before tabulating: a stale run must not stand for the row
            check_not_stale(args, row, stack, run_dir, seed)
            status = "present"
            if not args.plots_only:
                status = run_row(args, row, stack, run_dir, out / f"{name}.log", seed)
                if status == "failed":
                    failed.append(row + (f" (seed {seed})" if seed else ""))
            records.append(collect(args, row, stack, run_dir, status, seed))
    if not records:
        raise UserError("no rows to run for this backend")
    write_tables(out, records, label)
    plots = write_plots(out, records, label)
    atomic_write_json(out / "reproduce.json", {
        "label": label, "miniature": is_miniature(args),
        "command": " ".join(["python -m bench.studies.reproduce"] + (argv if argv is not None
                                                              else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [{k: v for k, v in r.items() if k != "history"} for r in records],
        "plots": plots})
    return finish(out, failed, "rows")


def finish(out: Path, failed: list[str], what: str) -> int:
    """Print ``out``/table.md and which runs failed; the command's exit status."""
    print((out / "table.md").read_text())
    if failed:
        print(f"{what} that failed: {', '.join(failed)} (see their logs in {out}); rerun the "
              f"same command to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main, prog="bench.studies.reproduce")
