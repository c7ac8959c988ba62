"""``python -m cifake.battery --run RUN_DIR [--data cifake.zip] [--out DIR] [--limit N]``:
a trained detector's accuracy and ROC-AUC on CIFAKE's test split under common image
degradations, each next to its clean figure.

The conditions are ``data.perturb.BATTERY``: the test images as stored; a JPEG round
trip at quality 90, 75, 50 and 30; shrinking by 0.5 and 0.75 and enlarging back, with
Pillow's bilinear and with its nearest filter; a Gaussian blur of sigma 0.5 and 1.0
pixels; Gaussian noise of sigma 2 and 5 (of 255) from a fixed seed. ``data/perturb.py``
defines each one exactly. Any run directory of any stack is scored through the
``Detector`` that ``predict`` uses (``cifake.stacks.load_detector``: the stack that
trained the run unless ``--stack`` says otherwise), batch by batch: P(FAKE) = 1 -
sigmoid(logit), FAKE when >= 0.5. ROC-AUC is that of P(FAKE) with FAKE as the positive
class (``core.metrics.roc_auc``: rank-based, ties counted half).

``--limit N`` scores the first N test images (file-name order), stratified by class, and
says so in every output. ``--split val`` scores the validation images the run held out of
the training split instead (a run trained with ``--val N``: the same draw, checked against
the ``val_digest`` its config.json recorded), so that a choice made for robustness -- how
strongly to augment, which run to keep -- is made without reading the test split. When
the run directory holds a ``cifake.realworld`` result (realworld.json), its real-photo
false-positive rate through predict's own pipeline is reported beside the table.

Writes battery.csv, battery.md, battery.png and battery.json (what the web page reads;
battery-val.* for ``--split val``, beside the test split's, never over them) into the run
directory, or ``--out``; each file appears whole or not at all, and nothing is written
before every image has been scored.
"""
from __future__ import annotations

import base64
import csv
import html
import importlib.util
import io
import json
import os
import signal
import sys
import time
from collections import deque
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data.cache import content_fingerprint
from data.errors import UserError, run_cli
from data.validation import hold_out, split_digest
from data.perturb import BATTERY, NOISE_SEED, Perturbation, timed_apply
from core.atomic import atomic_write_bytes
from core.flags import MAX_WORKERS, ArgumentParser, integer, positive_int
from core.metrics import roc_auc
from core.predict import DEFAULT_THRESHOLD, add_device_flag
from core.rundir import read_json
from bench.files import out_dir, png_bytes

from .realworld import run_summary
from .stacks import STACKS, load_detector

PROG = "python -m cifake.battery"
DEFAULT_BATCH = 512
FILES = ("battery.md", "battery.csv", "battery.png", "battery.json")  # written in this order
SPLITS = ("test", "val")
MAX_PNG_BYTES = 4 * 2**20  # a chart larger than this is not ours: the page leaves it out


def file_names(split: str) -> tuple[str, ...]:
    """The outputs of a battery on ``split``: battery.* (test), battery-val.* (val)."""
    return FILES if split == "test" else tuple(f.replace("battery", f"battery-{split}", 1)
                                               for f in FILES)


# ------------------------------------------------------------------ scoring
def stratified_first(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` images, each class in proportion to its share of the
    split (largest remainder; a tie goes to the lower label), in split order. None or a
    limit >= the split's size: every index."""
    labels = np.asarray(labels).reshape(-1)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=2)
    quota = counts * limit / counts.sum()
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:limit - int(take.sum())]] += 1
    idx = [np.flatnonzero(labels == c)[:take[c]] for c in range(len(counts))]
    return np.sort(np.concatenate(idx))


def _checked(p: np.ndarray, n: int, key: str) -> np.ndarray:
    p = np.asarray(p, np.float64).reshape(-1)
    if p.shape != (n,):  # a bug in a stack, not the user's input
        raise AssertionError(f"p_fake_batch returned {p.shape} for {n} images")
    if not (np.isfinite(p) & (p >= 0) & (p <= 1)).all():
        raise UserError(f"condition {key}: the model's output is not a probability; its "
                        f"weights are probably corrupt or diverged")
    return p


class _Ready:
    """A result computed in this process, where the others are futures."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def perturbed(images: np.ndarray, indices: np.ndarray, batch_size: int,
              conditions: tuple[Perturbation, ...], seed: int = NOISE_SEED, workers: int = 1):
    """Yield (start, condition, perturbed batch, seconds perturbing) batch by batch, each
    batch's conditions in order. ``workers`` > 1: the perturbations run in that many
    processes, two batches ahead of the caller; the arrays are the same either way."""
    starts = range(0, len(images), batch_size)

    def tasks(lo):
        return [(c, images[lo:lo + batch_size], indices[lo:lo + batch_size], seed)
                for c in conditions]
    if workers <= 1:
        for lo in starts:
            for t in tasks(lo):
                yield (lo, t[0], *timed_apply(t))
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    # "spawn", not fork: the parent may hold torch's or JAX's threads. Workers ignore
    # Ctrl-C: the parent turns it into one line and shuts them down
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))

    def submit(lo):
        return lo, [_Ready((t[1], 0.0)) if t[0].kind == "clean" else pool.submit(timed_apply, t)
                    for t in tasks(lo)]

    def drain(item):
        lo, futures = item
        for c, f in zip(conditions, futures):
            yield (lo, c, *f.result())
    try:
        pending = deque()
        for lo in starts:
            pending.append(submit(lo))
            if len(pending) == 2:
                yield from drain(pending.popleft())
        while pending:
            yield from drain(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def score(p_fake_batch, images: np.ndarray, indices: np.ndarray, batch_size: int,
          conditions: tuple[Perturbation, ...] = BATTERY, progress: bool = False,
          seed: int = NOISE_SEED, workers: int = 1) -> tuple[dict[str, np.ndarray], dict]:
    """P(FAKE) of every image under every condition, and the seconds spent perturbing
    (summed over worker processes) and in the model for each: ({key: (N,) float64},
    {key: {"perturb_s", "score_s"}}). ``images`` (N, 32, 32, 3) uint8; ``indices`` their
    positions in the split (the noise's key)."""
    from tqdm import tqdm
    n = len(images)
    out = {c.key: np.empty(n, np.float64) for c in conditions}
    secs = {c.key: {"perturb_s": 0.0, "score_s": 0.0} for c in conditions}
    bar = tqdm(total=n * len(conditions), desc="battery", unit="img", unit_scale=True,
               file=sys.stderr, disable=not progress)
    batches = perturbed(images, indices, batch_size, conditions, seed, workers)
    with bar, closing(batches):
        for lo, c, x, perturb_s in batches:
            t0 = time.perf_counter()
            out[c.key][lo:lo + len(x)] = _checked(p_fake_batch(x), len(x), c.key)
            secs[c.key]["perturb_s"] += perturb_s
            secs[c.key]["score_s"] += time.perf_counter() - t0
            bar.update(len(x))
    return out, secs


def _auc(p_fake: np.ndarray, labels: np.ndarray) -> float | None:
    auc = roc_auc(p_fake, labels == 0)  # FAKE (label 0) is the positive class
    return None if np.isnan(auc) else auc


def condition_rows(p_fake: dict[str, np.ndarray], labels: np.ndarray,
                   conditions: tuple[Perturbation, ...] = BATTERY,
                   threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """One row per condition: accuracy, per-class accuracy and ROC-AUC, and the change from
    the first condition (the clean one): ``acc_drop_pp`` = clean - this, in points."""
    y = np.asarray(labels).reshape(-1)
    fake, real = y == 0, y == 1

    def pct(mask):
        return float(100 * mask.mean()) if mask.size else None
    rows = []
    for c in conditions:
        p = p_fake[c.key]
        said_fake = p >= threshold
        rows.append({"key": c.key, "label": c.label, "kind": c.kind, "value": c.value,
                     "filter": c.filter or None, "n": int(len(p)),
                     "accuracy": pct(said_fake == fake), "fake_right": pct(said_fake[fake]),
                     "real_right": pct(~said_fake[real]), "roc_auc": _auc(p, y),
                     "mean_p_fake": float(p.mean()) if len(p) else None})
    clean = rows[0]
    for r in rows:
        r["acc_drop_pp"] = clean["accuracy"] - r["accuracy"]
        r["auc_drop"] = (None if r["roc_auc"] is None or clean["roc_auc"] is None
                         else clean["roc_auc"] - r["roc_auc"])
    return rows


def realworld_summary(run_dir: Path) -> dict | None:
    """The run's real-photo false-positive rate through predict's pipeline, from the
    realworld.json ``cifake.realworld --out RUN`` wrote; None when there is none."""
    path = run_dir / "realworld.json"
    if not path.is_file():
        return None
    try:
        doc = read_json(path)
        row = next(r for r in doc["rows"] if r.get("chosen"))
        n_fake, n = int(row["n_fake"]), int(row["n"])
        return {"n_fake": n_fake, "n": n, "fpr": n_fake / n if n else None,
                "preprocessing": str(doc.get("pipeline") or row["key"])}
    except (UserError, AttributeError, KeyError, StopIteration, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a cifake.realworld result ({err})") from None


# ------------------------------------------------------------------ outputs
def _f(v, fmt: str, none: str = "n/a") -> str:
    return none if v is None else format(v, fmt)


def _scope(result: dict) -> str:
    d = result["data"]
    which = (f"the first {d['n']:,} of {d['n_split']:,} (--limit {d['limit']:,}, stratified)"
             if d["n"] < d["n_split"] else f"all {d['n']:,}")
    return f"{which} {_images(d)} ({d['n_fake']:,} FAKE, {d['n_real']:,} REAL)"


def _images(d: dict) -> str:
    """What the scored images are, in words."""
    if d.get("split", "test") == "test":
        return "CIFAKE test images"
    return (f"validation images (held out of CIFAKE's training split: --val {d['n_split']:,}, "
            f"--val-seed {d['val_seed']})")


def _realworld_line(result: dict) -> str:
    rw = result.get("realworld")
    if not rw:
        return ("Real-photo false-positive rate: not measured for this run "
                "(`python -m cifake.realworld --run RUN --out RUN`).")
    rate = "" if rw["fpr"] is None else f" ({100 * rw['fpr']:.0f}%)"
    return (f"Real-photo false-positive rate (cifake.realworld, {rw['preprocessing']}): "
            f"{rw['n_fake']} / {rw['n']} genuine photographs called FAKE{rate}.")


def table_md(result: dict) -> str:
    r, t = result["run"], result["timing"]
    acc, n_test = "", result["data"].get("run_n_test")
    if isinstance(r.get("test_acc"), (int, float)):
        acc = f", CIFAKE test {r['test_acc']:.2f}%" + (
            f" on its {n_test:,} test images" if isinstance(n_test, int) else "")
    note = ("" if result["data"]["same_as_run"] is not False else
            " **These images are not the data the run was trained on (another content "
            "fingerprint).**")
    lines = [f"Run `{r['run']}` ({r.get('stack')} {r.get('model')}, preset {r.get('preset')}, "
             f"seed {r.get('seed')}{acc}; weights sha256 {r['model_sha256']}), scored with "
             f"{result['scored_with']} on {_scope(result)}.{note} FAKE when P(FAKE) >= "
             f"{result['threshold']:g}; ROC-AUC of P(FAKE), FAKE positive. Drop = clean - "
             f"perturbed.", "", _realworld_line(result), "",
             "| condition | accuracy % | drop (pp) | ROC-AUC | AUC drop | FAKE caught % | "
             "REAL right % | mean P(FAKE) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | {row['accuracy']:.2f} | {row['acc_drop_pp']:+.2f} | "
                     f"{_f(row['roc_auc'], '.4f')} | {_f(row['auc_drop'], '+.4f')} | "
                     f"{_f(row['fake_right'], '.2f')} | {_f(row['real_right'], '.2f')} | "
                     f"{row['mean_p_fake']:.3f} |")
    lines += ["", f"Definitions: `data/perturb.py` (noise seed {result['noise_seed']}). "
              f"{t['predictions']:,} predictions in {t['seconds']:.1f} s "
              f"({t['perturb_s']:.1f} s perturbing, {t['score_s']:.1f} s in the model; "
              f"batch {result['batch_size']}, {result['device']})."]
    return "\n".join(lines) + "\n"


def table_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["condition", "kind", "value", "filter", "n", "accuracy", "acc_drop_pp",
                "roc_auc", "auc_drop", "fake_right", "real_right", "mean_p_fake",
                "clean_accuracy", "clean_roc_auc", "realworld_fpr"])
    clean = result["rows"][0]
    rw = (result.get("realworld") or {}).get("fpr")
    for row in result["rows"]:
        w.writerow([row["key"], row["kind"], f"{row['value']:g}", row["filter"] or "", row["n"],
                    f"{row['accuracy']:.4f}", f"{row['acc_drop_pp']:.4f}",
                    _f(row["roc_auc"], ".6f", ""), _f(row["auc_drop"], ".6f", ""),
                    _f(row["fake_right"], ".4f", ""), _f(row["real_right"], ".4f", ""),
                    f"{row['mean_p_fake']:.6f}", f"{clean['accuracy']:.4f}",
                    _f(clean["roc_auc"], ".6f", ""), _f(rw, ".4f", "")])
    return buf.getvalue()


def figure_png(result: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    y = np.arange(len(rows))
    names = [row["key"] for row in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    a1.barh(y, [row["accuracy"] for row in rows], color="tab:blue", label="accuracy")
    a1.plot([_nan(row["fake_right"]) for row in rows], y, "rx", label="FAKE caught")
    a1.plot([_nan(row["real_right"]) for row in rows], y, "k.", label="REAL right")
    a1.axvline(rows[0]["accuracy"], color="grey", ls="--", lw=1)
    for i, row in enumerate(rows):
        a1.text(1, i, f"{row['accuracy']:.1f}%, drop {row['acc_drop_pp']:+.1f} pp", va="center",
                fontsize=7, color="white" if row["accuracy"] > 25 else "black")
    a1.set_xlim(0, 100)
    a1.set_xlabel(f"% of {result['data'].get('split', 'test')} images")
    a1.legend(loc="upper left", bbox_to_anchor=(0, -0.09), ncol=3, fontsize=8)
    a1.set_yticks(y, names)
    a1.invert_yaxis()
    aucs = np.array([_nan(row["roc_auc"]) for row in rows])
    a2.barh(y, aucs - 0.5, left=0.5, color="tab:green")  # from chance level
    for i, row in enumerate(rows):
        if row["roc_auc"] is not None:
            a2.text(0.505, i, f"{row['roc_auc']:.4f}", va="center", fontsize=7, color="white")
    if rows[0]["roc_auc"] is not None:
        a2.axvline(rows[0]["roc_auc"], color="grey", ls="--", lw=1)
    finite = aucs[np.isfinite(aucs)]
    a2.set_xlim(min(0.5, *finite) - 0.01 if finite.size else 0.49, 1)
    a2.set_xlabel("ROC-AUC of P(FAKE) (bars from chance, 0.5)")
    rw = result.get("realworld")
    extra = f"; real photos called FAKE {rw['n_fake']}/{rw['n']}" if rw else ""
    fig.suptitle(f"run {result['run']['run']}: {result['data']['n']:,} {_images(result['data'])}"
                 f"{extra}; dashed = clean")
    fig.tight_layout()
    return png_bytes(fig)


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def battery_html(path_or_run_dir) -> str:
    """A small HTML block for the web page: the battery's table and chart, from a run
    directory (its battery.json) or a battery.json; a run never measured gets one line
    saying how to measure it. A file that is not a battery result is a UserError."""
    e = html.escape
    path = Path(path_or_run_dir)
    if path.is_dir():
        if not (path / "battery.json").is_file():
            return ("Robustness to JPEG, resizing, blur and noise has <b>not been measured</b> "
                    f"for this run: <code>{PROG} --run {e(str(path))} --data cifake.zip</code> "
                    "measures it.")
        path = path / "battery.json"
    try:
        return _battery_block(read_json(path), path.parent / "battery.png")
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a cifake.battery result ({err!r})") from None


def _battery_block(doc: dict, png: Path) -> str:
    e = html.escape
    rows = doc["rows"]
    head = (f"<p>Robustness on {e(_scope(doc))}: clean accuracy "
            f"<b>{float(rows[0]['accuracy']):.2f}%</b>, ROC-AUC "
            f"{e(_f(rows[0]['roc_auc'], '.4f'))}. {e(_realworld_line(doc).replace('`', ''))}</p>")
    cells = "".join(
        f"<tr><td>{e(str(r['label']))}</td><td>{float(r['accuracy']):.2f}</td>"
        f"<td>{float(r['acc_drop_pp']):+.2f}</td><td>{e(_f(r['roc_auc'], '.4f'))}</td>"
        f"<td>{e(_f(r['fake_right'], '.1f'))}</td><td>{e(_f(r['real_right'], '.1f'))}</td></tr>"
        for r in rows)
    table = ("<table class=\"battery\"><thead><tr><th>condition</th><th>accuracy %</th>"
             "<th>drop (pp)</th><th>ROC-AUC</th><th>FAKE caught %</th><th>REAL right %</th>"
             f"</tr></thead><tbody>{cells}</tbody></table>")
    img = ""
    if png.is_file() and png.stat().st_size <= MAX_PNG_BYTES:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        img = (f"<img class=\"battery\" alt=\"accuracy and ROC-AUC per condition\" "
               f"src=\"data:image/png;base64,{data}\">")
    return head + table + img


# ------------------------------------------------------------------ command
def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description="A run's accuracy and ROC-AUC on CIFAKE's test "
                        "split under JPEG, resizing, blur and noise, next to the clean figures.",
                        epilog=f"example:\n  {PROG} --run runs/detector --data cifake.zip")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("--data", help="Kaggle cifake zip or folder (default: $CIFAKE_PATH, then "
                                   "a kagglehub download)")
    ap.add_argument("--cache-dir", help="the decoded dataset's cache folder")
    ap.add_argument("--out", help="output folder (default: the run directory)")
    ap.add_argument("--stack", choices=list(STACKS),
                    help="stack that scores (default: the one that trained --run)")
    add_device_flag(ap)
    ap.add_argument("--split", choices=SPLITS, default="test",
                    help="test (default): CIFAKE's test split, written to battery.*; val: "
                         "the validation images the run held out (--val N), written to "
                         "battery-val.*, for choices that must not read the test split")
    ap.add_argument("--limit", type=positive_int("--limit"), metavar="N",
                    help="score only the first N images of the split, stratified by class "
                         "(default: all)")
    ap.add_argument("--batch-size", type=positive_int("--batch-size"), default=DEFAULT_BATCH,
                    metavar="B", help="images perturbed and scored at once")
    ap.add_argument("--workers", type=integer("--workers", 0, MAX_WORKERS), default=0, metavar="W",
                    help="processes that perturb the images while the model scores (0 = one "
                         "per CPU core, up to 8; 1 = all in this process); the results do "
                         "not depend on it")
    return ap


def scored_split(ds, cfg: dict, split: str, run_dir: Path):
    """The images the battery scores: the test split, or the validation images the run
    held out (the draw ``core.driver`` made, checked against the run's ``val_digest``)."""
    if split == "test":
        return ds.test
    n, seed = cfg.get("val") or 0, cfg.get("val_seed", 0)
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"{run_dir / 'config.json'}: the run held out no validation images "
                        f"(val {n!r}); --split val scores the images of a run trained with "
                        f"--val N")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{run_dir / 'config.json'}: val_seed {seed!r} is not an integer")
    _, val = hold_out(ds.train, n, seed)
    if split_digest(val) != cfg.get("val_digest"):
        raise UserError(f"{run_dir / 'config.json'}: these are not the validation images the "
                        f"run held out (its val_digest differs: other data, or another "
                        f"draw); --split val needs the data the run was trained on")
    return val


def _data_block(ds, images, split: str, idx: np.ndarray, limit: int | None, cfg: dict) -> dict:
    labels = images.labels[idx]
    fp = content_fingerprint(ds.manifest)
    run_fp = cfg.get("data_fingerprint")
    out = {"split": split, "n_split": len(images), "limit": limit, "n": int(len(idx)),
           "n_fake": int((labels == 0).sum()), "n_real": int((labels == 1).sum()),
           "fingerprint": fp, "same_as_run": None if run_fp is None else run_fp == fp,
           "run_n_test": cfg.get("n_test")}
    if split == "val":
        out.update(val_seed=cfg.get("val_seed", 0), val_digest=cfg.get("val_digest"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    detector = load_detector(args.run, args.stack, args.device)
    run_dir = Path(args.run)
    realworld = realworld_summary(run_dir)
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("battery.png needs matplotlib: pip install -e \".[bench]\"")
    from data import load_cifake
    # the validation images are drawn from the training split the run saw (its --subset)
    subset = detector.config.get("subset") if args.split == "val" else None
    ds = load_cifake(args.data, args.cache_dir, subset=subset, verbose=False)
    images = scored_split(ds, detector.config, args.split, run_dir)
    idx = stratified_first(images.labels, args.limit)
    out = out_dir(args.out or run_dir)
    t0 = time.perf_counter()
    workers = args.workers or min(os.cpu_count() or 1, 8)
    if len(idx) <= args.batch_size:
        workers = 1  # one batch: nothing to overlap, and starting processes costs seconds
    p_fake, secs = score(detector.p_fake_batch, images.images[idx], idx, args.batch_size,
                         progress=sys.stderr.isatty(), workers=workers)
    seconds = time.perf_counter() - t0
    result = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "run": run_summary(run_dir), "scored_with": detector.stack,
              "device": detector.device, "threshold": DEFAULT_THRESHOLD,
              "noise_seed": NOISE_SEED, "batch_size": args.batch_size, "workers": workers,
              "data": _data_block(ds, images, args.split, idx, args.limit, detector.config),
              "realworld": realworld,
              "rows": condition_rows(p_fake, images.labels[idx]),
              "timing": {"seconds": seconds, "predictions": len(idx) * len(BATTERY),
                         "perturb_s": sum(s["perturb_s"] for s in secs.values()),
                         "score_s": sum(s["score_s"] for s in secs.values()),
                         "per_condition": secs}}
    md = table_md(result)
    names = file_names(args.split)
    blobs = dict(zip(names, (md.encode(), table_csv(result).encode(), figure_png(result),
                             (json.dumps(result, indent=1, allow_nan=False) + "\n").encode())))
    for name in names:  # the JSON last: the web page reads it
        atomic_write_bytes(out / name, blobs[name])
    print(md, end="")
    print(f"wrote {out}/{names[0].rsplit('.', 1)[0]}.{{md,csv,png,json}}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
