"""``python -m bench.speed.gpu --data PATH``: every GPU measurement of the project in one command.

On a machine with one GPU it runs, one after the other, each in its own process:

1. the bench's GPU rows (``bench.compare --devices gpu``: training/eval images/s, budget
   accuracy, parity on the GPU);
2. a full 50-epoch v3 training with the JAX port (``jax_port.train --preset v3``);
3. the same with the torch spec on CUDA (``torch_cnn.train --preset v3 --device cuda``,
   the device-resident pipeline).

and writes everything under ``--out`` (default ``results/gpu``): each step's log, the bench
files, both run directories, and ``summary.md`` / ``summary.json`` with, per training,
the summed per-epoch training seconds (JAX compiles ahead of the first epoch: its
compilation is given apart, not in any epoch; the first epoch is also given apart), the
median epoch, the whole command's wall time, and the final train / test /
de-duplicated test accuracy. Each step has a time limit (``--limit-*``, seconds) so the
whole command ends in about 8 minutes; a step past its limit is stopped, reported as such,
and its run directory stays resumable. Exit status: 0 only if every step succeeded.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from data.errors import UserError, run_cli
from core.atomic import atomic_write_bytes, atomic_write_json
from core.flags import ArgumentParser, positive_int

from ..files import out_dir

PROG = "python -m bench.speed.gpu"


def parse_args(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="Kaggle cifake zip or folder")
    ap.add_argument("--cache-dir", help="decoded-image cache folder")
    ap.add_argument("--out", default="results/gpu", help="output folder (default results/gpu)")
    ap.add_argument("--epochs", type=positive_int("--epochs"), default=50,
                    help="v3 epochs per training (default 50, the original's)")
    ap.add_argument("--subset", type=positive_int("--subset"),
                    help="first N images per class (a smoke test; labelled in the summary)")
    ap.add_argument("--bench-args", default="",
                    help="extra arguments for bench.compare, e.g. '--quick' (one string)")
    ap.add_argument("--limit-bench", type=positive_int("--limit-bench"), default=200)
    ap.add_argument("--limit-jax", type=positive_int("--limit-jax"), default=150)
    ap.add_argument("--limit-torch", type=positive_int("--limit-torch"), default=300)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: bench,jax,torch")
    return ap.parse_args(argv)


def run_step(name: str, cmd: list[str], out: Path, limit: int) -> dict:
    log = out / f"{name}.log"
    print(f"[{name}] {' '.join(cmd[1:])} (limit {limit} s)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=limit)
            status = "done" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the trainers save their last epoch and exit
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            status = f"stopped at its {limit} s limit"
    wall = time.perf_counter() - t0
    print(f"[{name}] {status} in {wall:.1f} s (log: {log})", file=sys.stderr, flush=True)
    return {"step": name, "command": cmd[1:], "status": status, "wall_seconds": round(wall, 2)}


def training_summary(run_dir: Path) -> dict:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
        c = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    hist = m.get("history") or []
    secs = [float(h["seconds"]) for h in hist if "seconds" in h]
    f = m.get("final") or {}
    return {
        "device": c.get("device"), "device_kind": c.get("device_kind"),
        "epochs_done": len(hist), "complete": bool(m.get("complete")),
        "train_seconds_sum": round(sum(secs), 2) if secs else None,
        "compile_seconds": (round(float(m["compile_seconds"]), 2)
                            if isinstance(m.get("compile_seconds"), (int, float)) else None),
        "first_epoch_seconds": round(secs[0], 2) if secs else None,
        "train_seconds_without_first": round(sum(secs[1:]), 2) if len(secs) > 1 else None,
        "median_epoch_seconds": round(statistics.median(secs[1:] or secs), 3) if secs else None,
        "images_per_s_median": round(statistics.median(
            [h["images_per_s"] for h in hist[1:] or hist if "images_per_s" in h]), 1) if hist else None,
        "run_wall_seconds": m.get("wall_seconds"),
        "train_acc": f.get("train_acc"), "test_acc": f.get("test_acc"), "gap_pp": f.get("gap_pp"),
        "test_dedup_acc": (f.get("test_dedup") or {}).get("accuracy"),
        "last_test_acc": next((h.get("test_acc") for h in reversed(hist) if "test_acc" in h), None),
    }


def gpu_name() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def write_summary(out: Path, args, steps: list[dict], runs: dict) -> None:
    doc = {"schema": "cifake-gpu/1", "date": datetime.now(timezone.utc).isoformat(),
           "gpu": gpu_name(), "python": platform.python_version(), "argv": sys.argv[1:],
           "epochs": args.epochs, "subset": args.subset, "steps": steps, "trainings": runs}
    atomic_write_json(out / "summary.json", doc)
    lines = [f"# GPU run, {doc['date'][:16]} UTC", "", f"GPU: {doc['gpu']}", "",
             f"Command: `{PROG} {' '.join(sys.argv[1:])}`"
             + (f" — **smoke test on {args.subset} images per class**" if args.subset else ""), "",
             "| step | status | wall s |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['wall_seconds']:.1f} |" for s in steps]
    lines += ["", f"v3, {args.epochs} epochs (training seconds = sum of the per-epoch training "
                  "times, evaluation and JAX's compilation, done ahead of the first epoch, "
                  "excluded; compile s is that compilation):", "",
              "| stack | device | epochs done | train s (sum) | compile s | first epoch s | rest s "
              "| median epoch s | img/s median | train % | test % | gap pp | dedup test % |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, nd=2):
        return "—" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else str(v))
    for stack, r in runs.items():
        lines.append(f"| {stack} | {r.get('device_kind') or r.get('device') or '—'} | "
                     f"{f(r.get('epochs_done'))} | {f(r.get('train_seconds_sum'))} | "
                     f"{f(r.get('compile_seconds'))} | {f(r.get('first_epoch_seconds'))} | "
                     f"{f(r.get('train_seconds_without_first'))} | "
                     f"{f(r.get('median_epoch_seconds'), 3)} | {f(r.get('images_per_s_median'), 0)} | "
                     f"{f(r.get('train_acc'))} | {f(r.get('test_acc'))} | {f(r.get('gap_pp'))} | "
                     f"{f(r.get('test_dedup_acc'))} |")
    atomic_write_bytes(out / "summary.md", ("\n".join(lines) + "\n").encode())


def check_resumable(run_dir: Path, args) -> bool:
    """True if ``run_dir`` holds a v3 run of this call's data and subset to continue; False
    if there is none; UserError if it holds another training."""
    if not (run_dir / "state.json").exists():
        return False
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / 'config.json'}: unreadable ({e}); use another --out") \
            from None
    theirs = {"preset": cfg.get("preset"), "subset": cfg.get("subset"),
              "data": os.path.realpath(str(cfg.get("data")))}
    ours = {"preset": "v3", "subset": args.subset, "data": os.path.realpath(args.data)}
    for key in theirs:
        if theirs[key] != ours[key]:
            raise UserError(f"{run_dir} holds a training with {key} {theirs[key]!r}, not this "
                            f"call's {ours[key]!r}; use another --out (or remove it)")
    return True


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"bench", "jax", "torch"}:
        raise UserError(f"--skip: unknown step(s) {sorted(skip - {'bench', 'jax', 'torch'})}")
    if skip == {"bench", "jax", "torch"}:
        raise UserError("--skip: every step skipped, nothing to measure")
    out = out_dir(args.out)
    py = [sys.executable, "-m"]
    common = ["--data", args.data] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    train = common + ["--epochs", str(args.epochs), "--no-progress"] \
        + (["--subset", str(args.subset)] if args.subset else [])
    steps, runs = [], {}
    if "bench" not in skip:
        steps.append(run_step("bench", py + ["bench.compare", "--devices", "gpu", *common,
                                             "--out", str(out / "bench"), *args.bench_args.split()],
                              out, args.limit_bench))
    trainings = [(name, mod, extra, limit) for name, mod, extra, limit in (
        ("jax", "jax_port", [], args.limit_jax),
        ("torch", "torch_cnn", ["--device", "cuda"], args.limit_torch)) if name not in skip]
    # a run left by an earlier call is continued only if it is this call's training (checked
    # before anything runs): its summary is reported under this call's labels
    resuming = {mod: check_resumable(out / f"{mod}-v3", args) for _, mod, _, _ in trainings}
    for name, mod, extra, limit in trainings:
        run_dir = out / f"{mod}-v3"
        if resuming[mod]:
            # a resume takes its configuration from the run; only these flags may be given
            cmd = py + [f"{mod}.train", "--out", str(run_dir), "--resume", *extra,
                        "--epochs", str(args.epochs), "--no-progress"] \
                + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        else:
            cmd = py + [f"{mod}.train", "--preset", "v3", "--out", str(run_dir), *extra, *train]
        steps.append(run_step(name, cmd, out, limit))
        runs[mod] = training_summary(run_dir)
    write_summary(out, args, steps, runs)
    print((out / "summary.md").read_text())
    return 0 if all(s["status"] == "done" for s in steps) else 1


if __name__ == "__main__":
    run_cli(main, prog=PROG)
