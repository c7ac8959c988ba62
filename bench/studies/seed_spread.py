"""``python -m bench.studies.seed_spread``: the bench's accuracy budget over many seeds, per backend.

One seed's budget accuracy (a few epochs on a small subset) swings by several points with
the seed, so two backends that compute the same function can look different at any one
seed. This runs exactly the bench's budget (``bench.speed.worker``: the spec's initial weights
for the seed, ``--budget-epochs`` epochs on the first ``--budget-subset`` training images
per class, scored on the whole test split) for seeds 0..N-1 on each backend, in one
process per backend, and reports mean ± standard deviation, the standard error of each
mean, and whether the two means differ by more than two standard errors (of the
difference). Writes ``--out``/seed_spread.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from data.errors import UserError, run_cli
from core.atomic import atomic_write_bytes, atomic_write_json
from core.flags import ArgumentParser, positive_int

from ..files import out_dir
PROG = "python -m bench.studies.seed_spread"
WORKER_TAG = "SEED_SPREAD_RESULT "


def parse_args(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="Kaggle cifake zip or folder")
    ap.add_argument("--cache-dir")
    ap.add_argument("--backends", default="torch-device,jax-cnn")
    ap.add_argument("--model", default="v3")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--seeds", type=positive_int("--seeds"), default=8, help="seeds 0..N-1")
    ap.add_argument("--budget-epochs", type=positive_int("--budget-epochs"), default=3)
    ap.add_argument("--budget-subset", type=positive_int("--budget-subset"), default=2000,
                    help="training images per class")
    ap.add_argument("--out", default="results/seed_spread")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args) -> int:
    """One backend, every seed, in this process (compilation is paid once)."""
    import numpy as np

    from data import load_cifake
    from core.metrics import classification_report
    from bench.speed.backends import make_backend, spec_init_weights
    ds = load_cifake(args.data, args.cache_dir, verbose=False)
    bset = ds.train.subset_per_class(args.budget_subset)
    b = make_backend(args.backend, args.model, args.device, seed=0)
    for seed in range(args.seeds):
        b.set_seed(seed)
        if getattr(b, "runner", None) is not None:
            b.runner.chunk_batches = 50  # as the bench and jax_port's CLI train
        b.init(seed, spec_init_weights(args.model, seed))
        h = b.put(bset)
        t0 = time.perf_counter()
        for e in range(args.budget_epochs):
            b.train_epoch(h, e)
        secs = time.perf_counter() - t0
        rep = classification_report(np.asarray(b.logits(b.put(ds.test))), ds.test.labels)
        print(WORKER_TAG + json.dumps({"seed": seed, "test_accuracy": rep["accuracy"],
                                       "test_auc": rep["roc_auc"], "train_seconds": secs}),
              flush=True)
    return 0


def _z(z) -> str:
    return "undefined" if z is None else f"{z:.2f}"


def summarize(accs: list[float]) -> dict:
    """Mean, sample std and standard error of the mean; one seed has no spread (None, not
    0: a zero would make any difference look significant)."""
    n = len(accs)
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "sem": std / math.sqrt(n) if n > 1 else None,
            "min": min(accs), "max": max(accs)}


def compare(a: dict, b: dict) -> dict | None:
    """b's mean - a's, with the standard error of the difference of two independent means
    and whether it exceeds two of them; None where either has fewer than two seeds (no
    spread to judge by)."""
    if a["sem"] is None or b["sem"] is None:
        return None
    se = math.sqrt(a["sem"] ** 2 + b["sem"] ** 2)
    diff = b["mean"] - a["mean"]
    return {"diff_pp": diff, "se_of_diff_pp": se, "z": diff / se if se else None,
            "differ_by_more_than_2_se": abs(diff) > 2 * se}


def _pp(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    backends = [b for b in args.backends.split(",") if b]
    out = out_dir(args.out)
    per = {}
    for be in backends:
        cmd = [sys.executable, "-m", "bench.studies.seed_spread", "--worker", "--backend", be,
               "--data", args.data, "--model", args.model, "--device", args.device,
               "--seeds", str(args.seeds), "--budget-epochs", str(args.budget_epochs),
               "--budget-subset", str(args.budget_subset)]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
        print(f"[{be}] seeds 0..{args.seeds - 1}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows = [json.loads(line[len(WORKER_TAG):]) for line in proc.stdout.splitlines()
                if line.startswith(WORKER_TAG)]
        if proc.returncode != 0 or len(rows) != args.seeds:
            raise UserError(f"{be}: worker failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip().splitlines()[-1:] or ['no output']}")
        per[be] = {"runs": rows, **summarize([r["test_accuracy"] for r in rows])}
        print(f"[{be}] {per[be]['mean']:.2f} ± {_pp(per[be]['std'])} %", file=sys.stderr)
    verdict = compare(*(per[x] for x in backends)) if len(backends) == 2 else None
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([PROG] + (argv if argv is not None else sys.argv[1:])),
           "model": args.model, "device": args.device, "budget_epochs": args.budget_epochs,
           "budget_subset_per_class": args.budget_subset, "backends": per, "comparison": verdict}
    atomic_write_json(out / "seed_spread.json", doc)
    lines = [f"# Budget accuracy over seeds 0..{args.seeds - 1} ({args.model}, {args.device}, "
             f"{args.budget_epochs} epochs on {args.budget_subset} images/class, whole test split)",
             "", f"Command: `{doc['command']}`", "",
             "| backend | mean % | std pp | sem pp | min % | max % | per seed % |",
             "|---|---|---|---|---|---|---|"]
    for be, s in per.items():
        per_seed = ", ".join(f"{r['test_accuracy']:.2f}" for r in s["runs"])
        lines.append(f"| {be} | {s['mean']:.2f} | {_pp(s['std'])} | {_pp(s['sem'])} | {s['min']:.2f} | "
                     f"{s['max']:.2f} | {per_seed} |")
    if verdict:
        lines += ["", f"{backends[1]} − {backends[0]}: {verdict['diff_pp']:+.2f} pp, standard error "
                      f"of the difference {verdict['se_of_diff_pp']:.2f} pp (z = {_z(verdict['z'])}): "
                      + ("**the means differ by more than two standard errors**"
                         if verdict["differ_by_more_than_2_se"]
                         else "within two standard errors")]
    atomic_write_bytes(out / "seed_spread.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
