"""``python -m bench.studies.sweep``: choose a setting on the validation split.

Trains one stack's preset once per variant and seed, each with ``--val N`` training images
held out (the same images for every variant: ``--val-seed`` is fixed), and writes
``--out``/sweep.{md,csv,json}: per run its train, validation (last epoch, and the mean of
the last tenth of its epochs) and test accuracy; per variant the mean over seeds; and the
variant validation chooses: the highest mean last-epoch validation accuracy. The test
column is read once per finished run and reported, never used to choose.

    python -m bench.studies.sweep --stack jax_port --preset mlp4-mini --val 5000 \\
        --seeds 0,1 --try "--hidden 20,7,5" --try "--hidden 32,16,8" --data cifake.zip \\
        --out results/sweep-mlp4

``--choose battery`` chooses for robustness instead: after each finished run its
robustness battery is scored on the same held-out images (``cifake.battery --split val``,
battery-val.json in the run's folder, scored once), and the variant with the highest mean
validation accuracy over the battery's 13 conditions (the clean images, JPEG, resizing, blur
and noise, each weighted alike) is chosen; the clean and the worst condition's figures are
reported beside it.

Each ``--try`` is a variant: training flags added to the preset's and to ``--common``'s (an
empty string is the preset itself). Runs go to ``--out``/runs/<variant>-s<seed>/, the
command that made each beside it (``<variant>-s<seed>.command.json``). Resumable: a finished
run is not run again, an interrupted one resumes; a folder made by another command is
refused, never mixed in.
"""
from __future__ import annotations

import csv
import io
import re
import shlex
import statistics
import sys
from pathlib import Path

from core.atomic import atomic_write_bytes, atomic_write_json
from core.catalog import PRESETS
from core import flags
from core.flags import ArgumentParser, positive_int
from core.rundir import read_json, weights_digest
from data.errors import UserError, run_cli

from ..files import out_dir
from . import frontier
from .launcher import launch, parse_seeds, read_json_or_none, run_or_resume

PROG = "python -m bench.studies.sweep"
STACKS = ("numpy_mlp", "torch_cnn", "jax_port")
COLUMNS = ("variant", "seed", "status", "epochs", "train_acc", "val_acc", "val_acc_tail",
           "val_loss", "battery_mean", "battery_worst", "battery_worst_key", "test_acc",
           "train_s")
# what each --choose reads off a run's record: the mean over seeds of this key is compared
CRITERIA = {"val": "val_acc", "battery": "battery_mean"}


def slug(variant: str) -> str:
    """A folder name for a variant: "--hidden 32,16,8" -> "hidden-32-16-8"."""
    s = re.sub(r"[^A-Za-z0-9.]+", "-", variant).strip("-")
    return s or "preset"


def fresh_flags(args, variant: str, seed: int) -> list[str]:
    return ["--preset", args.preset, "--data", args.data, "--val", str(args.val),
            "--val-seed", str(args.val_seed), "--seed", str(seed), *shlex.split(args.common),
            *shlex.split(variant)]


def run_one(args, variant: str, seed: int, run_dir: Path) -> str:
    """Runs or resumes one variant and seed; refuses a folder another command made."""
    flags = fresh_flags(args, variant, seed)
    made = {"stack": args.stack, "flags": flags}
    stamp = run_dir.parent / f"{run_dir.name}.command.json"
    old = read_json_or_none(stamp)
    if (run_dir / "config.json").exists() and old != made:
        by = " ".join((old or {}).get("flags") or ["?"])
        raise UserError(f"{run_dir} was made by another command ({by}); "
                        f"delete it or use another --out")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, made)
    return run_or_resume(f"{slug(variant)} seed {seed}", args.stack, run_dir, flags,
                         run_dir.parent / f"{run_dir.name}.log", args.cache_dir, args.device)


def record(variant: str, seed: int, status: str, run_dir: Path) -> dict:
    """One run's row; its accuracies only when it finished (``frontier.row`` reads and
    checks the files: a damaged one is a one-line error, not an unfinished run)."""
    rec = {"variant": variant, "seed": seed, "status": status}
    met = run_dir / "metrics.json"
    base = frontier.row(run_dir / "config.json", met) if met.exists() else None
    if base is None or base["val_acc"] is None:
        return rec
    m = read_json(met)
    vals = [h["val_acc"] for h in m["history"] if "val_acc" in h]
    tail = vals[-max(1, len(vals) // 10):]  # the last tenth of the epochs
    rec.update(epochs=base["epochs"], train_acc=m["final"].get("train_acc"),
               val_acc=base["val_acc"], val_acc_tail=statistics.fmean(tail),
               val_loss=m["history"][-1].get("val_loss"), test_acc=base["test_acc"],
               train_s=base["train_s"])
    return rec


def battery_on_val(args, run_dir: Path) -> dict:
    """The run's robustness battery on its validation images (battery-val.json), scored
    once per weights: ``battery_mean`` = the mean accuracy over every condition,
    ``battery_worst`` and ``battery_worst_key``: the lowest one's."""
    res_path = run_dir / "battery-val.json"
    res = read_json_or_none(res_path)
    weights = weights_digest(run_dir)
    if res is None or (res.get("run") or {}).get("model_sha256") != weights:
        cmd = [sys.executable, "-m", "cifake.battery", "--run", str(run_dir), "--split", "val",
               "--data", args.data]
        cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        cmd += ["--device", args.device] if args.device else []
        if launch(cmd, run_dir.parent / f"{run_dir.name}.log") != 0:
            raise UserError(f"the validation battery of {run_dir} failed (its log: "
                            f"{run_dir.parent / f'{run_dir.name}.log'})")
        res = read_json(res_path)
    try:
        accs = {r["key"]: float(r["accuracy"]) for r in res["rows"]}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{res_path}: not a cifake.battery result ({e!r})") from None
    worst = min(accs, key=accs.get)
    return {"battery_mean": statistics.fmean(accs.values()), "battery_worst": accs[worst],
            "battery_worst_key": worst}


def choose(records: list[dict], variants: list[str], key: str = "val_acc"
           ) -> tuple[dict, list[str]]:
    """Per variant the mean over its seeds of ``key`` (last-epoch validation accuracy, or
    the validation battery's mean) when all finished; the variants at the top: one is a
    choice, several a tie, none until every run has finished."""
    means = {v: statistics.fmean(r[key] for r in records if r["variant"] == v)
             for v in variants
             if all(key in r for r in records if r["variant"] == v)}
    if len(means) < len(variants):
        return means, []
    top = max(means.values())
    return means, [v for v, m in means.items() if m == top]


def fmt(v, nd=2) -> str:
    return "—" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def name(variant: str) -> str:
    return variant or "(preset)"


def verdict(top: list[str]) -> str:
    if not top:
        return "none yet: some runs have not finished"
    if len(top) > 1:
        return "none: a tie between " + ", ".join(f"`{name(v)}`" for v in top)
    return f"`{name(top[0])}`"


CRITERION_TEXT = {"val": "the highest mean last-epoch validation accuracy",
                  "battery": "the highest mean validation accuracy over the robustness "
                             "battery's conditions"}


def markdown(args, records: list[dict], means: dict, top: list[str]) -> str:
    common = f", with `{args.common}`" if args.common else ""
    battery = args.choose == "battery"
    extra_head = " validation battery % (mean; worst) |" if battery else ""
    lines = [f"# Sweep: {args.stack} --preset {args.preset}{common}, {args.val} images held "
             f"out (--val-seed {args.val_seed})", "",
             f"Chosen on validation ({CRITERION_TEXT[args.choose]}): " + verdict(top) + ".",
             "The test column is read once per finished run and is not used to choose.", "",
             "| variant | seed | train % | validation % (last) | validation % (last tenth) "
             f"| validation loss |{extra_head} test % | training s |",
             "|---|---|---|---|---|---|" + "---|" * battery + "---|---|"]
    for r in records:
        cells = (f" {fmt(r.get('battery_mean'))}; {fmt(r.get('battery_worst'))} "
                 f"({r.get('battery_worst_key', '—')}) |" if battery else "")
        lines.append(f"| {name(r['variant'])} | {r['seed']} | {fmt(r.get('train_acc'))} | "
                     f"{fmt(r.get('val_acc'))} | {fmt(r.get('val_acc_tail'))} | "
                     f"{fmt(r.get('val_loss'), 4)} |{cells} {fmt(r.get('test_acc'))} | "
                     f"{fmt(r.get('train_s'), 0)} |" if "val_acc" in r else
                     f"| {name(r['variant'])} | {r['seed']} | {r['status']} |"
                     + "  |" * (5 + battery))
    what = "validation battery %, mean" if battery else "validation % (last epoch)"
    lines += ["", f"| variant | mean over seeds: {what} |", "|---|---|"]
    lines += [f"| {name(v)} | {m:.2f} |" for v, m in means.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--stack", required=True, choices=STACKS)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--val", required=True, type=positive_int("--val"),
                    help="training images held out for validation (stratified)")
    ap.add_argument("--val-seed", type=flags.val_seed, default=0,
                    help="seed of the held-out draw (default 0)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    ap.add_argument("--try", dest="variants", action="append", required=True,
                    help="training flags of one variant, quoted; repeat per variant")
    ap.add_argument("--common", default="",
                    help="training flags every variant gets, quoted (e.g. \"--epochs 20\")")
    ap.add_argument("--data", required=True, help="CIFAKE zip or folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--choose", choices=tuple(CRITERIA), default="val",
                    help="val (default): the highest mean last-epoch validation accuracy; "
                         "battery: the highest mean validation accuracy over the robustness "
                         "battery's conditions (cifake.battery --split val, per run)")
    args = ap.parse_args(argv)
    args.seeds = parse_seeds(args.seeds)
    if len({slug(v) for v in args.variants}) != len(args.variants):
        raise UserError(f"--try values must differ: {args.variants}")
    out = out_dir(args.out)
    records = []
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = out / "runs" / f"{slug(variant)}-s{seed}"
            rec = record(variant, seed, run_one(args, variant, seed, run_dir), run_dir)
            if args.choose == "battery" and "val_acc" in rec:
                rec.update(battery_on_val(args, run_dir))
            records.append(rec)
    means, top = choose(records, args.variants, CRITERIA[args.choose])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
    atomic_write_bytes(out / "sweep.csv", buf.getvalue().encode())
    atomic_write_json(out / "sweep.json", {"command": sys.argv if argv is None else argv,
                                           "criterion": CRITERIA[args.choose],
                                           "records": records, "means": means,
                                           "chosen": top[0] if len(top) == 1 else None,
                                           "tied": top if len(top) > 1 else []})
    md = markdown(args, records, means, top)
    atomic_write_bytes(out / "sweep.md", md.encode())
    print(md, end="")
    failed = [f"{name(r['variant'])} seed {r['seed']}" for r in records
              if r["status"] == "failed"]
    if failed:
        print(f"{PROG}: failed: {', '.join(failed)} (logs in {out / 'runs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
