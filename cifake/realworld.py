"""``python -m cifake.realworld --run RUN_DIR [--out results/realworld]``: how often a trained
detector calls genuine photographs FAKE, for each way of bringing them to 32x32.

The photographs ship inside installed Python packages (nothing is downloaded): the 15
real photographs of scikit-image's ``data/`` folder (``pip install
'cifake-detector[realworld]'``) and matplotlib's ``grace_hopper.jpg``; ``PHOTOS`` lists
them, and the module docstring of each entry says why the package's other images are
left out (drawings, synthetic patterns, microscopy, tiny crops). Every photo is real, so
every FAKE verdict is a false positive.

Each preprocessing is ``data.photo.shrink``: centre square crop, then Pillow's nearest /
box / bilinear / bicubic / lanczos resize to 32x32, each without and with a JPEG
re-encode at CIFAKE's quality (75, 4:2:0); plus the resize ``predict`` did before the
documented pipeline existed (box on the whole image, aspect ratio not kept). The run is
scored with its own stack's loading code (CNN: ``torch_cnn``, or ``jax_port`` with
``--stack jax``; MLP: ``numpy_mlp``). P(FAKE) = 1 - sigmoid(logit); FAKE when >= 0.5.

With ``--data cifake.zip`` it also checks that a preprocessing does not simply hide
fakes: ``--roundtrip`` CIFAKE test images per class are enlarged 8x (Pillow bicubic, a
stand-in for "a 32x32 image the user saved larger") and brought back to 32x32 by each
preprocessing; the table gains the share of REAL and of FAKE images still classified
correctly. A preprocessing that lowers the photos' false-positive rate only by making
everything look REAL shows up here as a low FAKE column.

Writes ``--out``/realworld.{md,csv,json} (the table, and every photo's P(FAKE) per
preprocessing in the JSON) and realworld.png.
"""
from __future__ import annotations

import importlib
import csv
import io
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import UserError, run_cli
from data.photo import CIFAKE_JPEG_QUALITY, FILTERS, PIPELINE, PIPELINE_FILTER, \
    PIPELINE_JPEG_QUALITY, shrink
from core.atomic import atomic_write_bytes, atomic_write_json
from core.flags import ArgumentParser, positive_int
from core.rundir import field, read_json, weights_digest

from bench.files import out_dir, png_bytes
from data.realphotos import PHOTOS, Photo, load_photo

PROG = "python -m cifake.realworld"


@dataclass(frozen=True)
class Prep:
    key: str
    label: str
    filter: str
    jpeg: int | None
    crop: bool = True


def preprocessings() -> list[Prep]:
    """The 5 filters x {no JPEG, JPEG at CIFAKE's quality}, after a centre square crop,
    and predict's former resize (box on the whole image) as a reference row."""
    out = [Prep("box-nocrop", "box, whole image squashed (predict before the pipeline)",
                "box", None, crop=False)]
    for f in FILTERS:
        out.append(Prep(f, f, f, None))
        out.append(Prep(f"{f}+jpeg{CIFAKE_JPEG_QUALITY}", f"{f}, then JPEG q{CIFAKE_JPEG_QUALITY}",
                        f, CIFAKE_JPEG_QUALITY))
    return out


def chosen_key() -> str:
    return PIPELINE_FILTER + (f"+jpeg{PIPELINE_JPEG_QUALITY}" if PIPELINE_JPEG_QUALITY else "")


# ------------------------------------------------------------------ scoring
STACK_MODULES = {"torch": "torch_cnn", "jax": "jax_port", "numpy": "numpy_mlp"}


def load_scorer(run_dir: Path, stack: str):
    """(p_fake(uint8 (B, 32, 32, 3)) -> (B,) float64, description) for a run directory,
    through the stack's own loading code."""
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: not a directory")
    cfg = read_json(run_dir / "config.json")
    family = cfg.get("family")
    if family not in ("cnn", "mlp"):
        raise UserError(f"{run_dir / 'config.json'}: family {family!r} is neither 'cnn' nor 'mlp'")
    if stack == "auto":
        stack = "torch" if family == "cnn" else "numpy"
    if stack not in STACK_MODULES:
        raise UserError(f"--stack {stack!r}: choose auto, torch, jax or numpy")
    if stack == "torch" and family != "cnn":
        raise UserError(f"--stack torch scores CNN runs; {run_dir} holds an MLP")
    if stack == "numpy" and family != "mlp":
        raise UserError(f"--stack numpy scores MLP runs; {run_dir} holds a CNN")
    module = STACK_MODULES[stack]
    # the stack's own Detector, as predict uses it; images arrive already 32x32
    detector = importlib.import_module(f"{module}.predict").Detector.load(run_dir, device="cpu")
    return (lambda b: np.asarray(detector.p_fake_batch(b), np.float64)), module


def run_summary(run_dir: Path) -> dict:
    """What identifies the scored model, without machine paths: name, config, progress,
    test accuracy, weights digest."""
    cfg = read_json(run_dir / "config.json")
    out = {"run": run_dir.name, "stack": cfg.get("stack"), "model": cfg.get("model"),
           "preset": cfg.get("preset"), "epochs": cfg.get("epochs"), "seed": cfg.get("seed")}
    mpath = run_dir / "metrics.json"
    if mpath.is_file():
        m = read_json(mpath)
        hist = m.get("history") or []
        out["epochs_completed"] = len(hist)
        out["complete"] = bool(m.get("complete"))
        last = hist[-1] if hist else {}
        fin = m.get("final") or {}
        out["test_acc"] = fin.get("test_acc", fin.get("test_accuracy", last.get("test_acc")))
        out["train_acc"] = fin.get("train_acc", fin.get("train_accuracy", last.get("train_acc")))
    out["model_sha256"] = weights_digest(run_dir)
    return out


def evaluate(p_fake, photos: list[Photo], preps: list[Prep]) -> dict:
    """Every photo through every preprocessing, scored in one batch per preprocessing."""
    images = [load_photo(p) for p in photos]
    colour = np.array([p.colour for p in photos])
    rows = []
    for prep in preps:
        batch = np.stack([shrink(im, prep.filter, prep.jpeg, crop=prep.crop) for im in images])
        pf = np.asarray(p_fake(batch), np.float64).reshape(-1)
        fake = pf >= 0.5
        rows.append({"key": prep.key, "label": prep.label, "filter": prep.filter,
                     "jpeg_quality": prep.jpeg, "crop": prep.crop,
                     "n": len(photos), "n_fake": int(fake.sum()),
                     "fpr": float(fake.mean()), "mean_p_fake": float(pf.mean()),
                     "n_colour": int(colour.sum()), "n_fake_colour": int(fake[colour].sum()),
                     "fpr_colour": float(fake[colour].mean()) if colour.any() else None,
                     "chosen": prep.key == chosen_key(),
                     "p_fake": {p.path.rsplit("/", 1)[-1]: float(v) for p, v in zip(photos, pf)}})
    return {"rows": rows}


ROUNDTRIP_SCALE = 8  # 32 -> 256 px


def roundtrip(p_fake, ds_test, per_class: int, preps: list[Prep], seed: int = 0) -> dict:
    """CIFAKE test images enlarged ROUNDTRIP_SCALE x and shrunk back by each preprocessing:
    the share of each class still classified correctly (and with no round trip at all)."""
    rng = np.random.default_rng(seed)
    out = {"per_class": per_class, "scale": ROUNDTRIP_SCALE}
    picks = {}
    for label, cls in enumerate(("FAKE", "REAL")):
        idx = np.flatnonzero(ds_test.labels == label)
        picks[cls] = rng.choice(idx, min(per_class, idx.size), replace=False)
    big = {cls: [Image.fromarray(a).resize((32 * ROUNDTRIP_SCALE,) * 2, Image.Resampling.BICUBIC)
                 for a in ds_test.images[idx]] for cls, idx in picks.items()}

    def accuracy(batches):
        acc = {}
        for cls, batch in batches.items():
            pf = np.asarray(p_fake(batch), np.float64).reshape(-1)
            acc[cls] = float(np.mean(pf >= 0.5) if cls == "FAKE" else np.mean(pf < 0.5))
        return acc
    out["original"] = accuracy({cls: ds_test.images[idx] for cls, idx in picks.items()})
    out["rows"] = {prep.key: accuracy({cls: np.stack([shrink(im, prep.filter, prep.jpeg,
                                                              crop=prep.crop) for im in ims])
                                       for cls, ims in big.items()})
                   for prep in preps}
    return out


# ------------------------------------------------------------------ reading a result back
def read_result(path: str | Path) -> dict:
    """A ``realworld.json`` this command wrote, read back for display (the web page's
    ``--realworld``), its shape checked: every row an object with a string ``key``,
    integer ``n`` and ``n_fake``, a finite ``mean_p_fake`` and a boolean ``chosen``, one
    row chosen; ``roundtrip``, when present, a REAL and a FAKE share per row. Anything else
    is a one-line UserError naming the file."""
    path = Path(path)
    doc = read_json(path)
    rows = field(doc, "rows", list, path)
    if not rows:
        raise UserError(f"{path}: not a cifake.realworld result ('rows' is empty)")
    for k, row in enumerate(rows):
        where = f"{path}: rows[{k}]"
        if not isinstance(row, dict):
            raise UserError(f"{where}: not an object ({type(row).__name__})")
        for key, types in (("key", str), ("n", int), ("n_fake", int), ("chosen", bool)):
            field(row, key, types, where)
        _share(field(row, "mean_p_fake", (int, float), where), f"{where}: 'mean_p_fake'")
    if not any(row["chosen"] for row in rows):
        raise UserError(f"{path}: not a cifake.realworld result (no row is the chosen "
                        f"preprocessing)")
    if doc.get("roundtrip") is not None:
        rt = field(doc, "roundtrip", dict, path)
        for key, shares in field(rt, "rows", dict, f"{path}: roundtrip").items():
            where = f"{path}: roundtrip.rows[{key!r}]"
            if not isinstance(shares, dict):
                raise UserError(f"{where}: not an object ({type(shares).__name__})")
            for cls in ("REAL", "FAKE"):
                _share(field(shares, cls, (int, float), where), f"{where}: '{cls}'")
    return doc


def _share(v: float, where: str) -> float:
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise UserError(f"{where} must be a share in [0, 1], got {v!r}")
    return v


# ------------------------------------------------------------------ outputs
def table_md(result: dict) -> str:
    r = result["run"]
    acc = f", CIFAKE test {r['test_acc']:.2f}%" if isinstance(r.get("test_acc"), (int, float)) else ""
    prog = ""
    if "epochs_completed" in r:
        prog = (f", {r['epochs_completed']}/{r.get('epochs')} epochs"
                + ("" if r.get("complete") else " (training not finished)"))
    rt = result.get("roundtrip")
    lines = [f"Run `{r['run']}` ({r.get('stack')} {r.get('model')}, preset {r.get('preset')}, "
             f"seed {r.get('seed')}{prog}{acc}; weights sha256 {r['model_sha256']}), scored with "
             f"{result['scored_with']} on {result['n_photos']} genuine photographs "
             f"({result['n_colour']} in colour). P(FAKE) >= 0.5 is a FAKE verdict, i.e. a false "
             f"positive. ★ = the documented pipeline ({PIPELINE}).", "",
             "| preprocessing to 32x32 | real photos called FAKE | false-positive rate | "
             "colour photos called FAKE | mean P(FAKE) |"
             + (" CIFAKE round trip: REAL right | FAKE right |" if rt else ""),
             "|---|---|---|---|---|" + ("---|---|" if rt else "")]
    for row in result["rows"]:
        star = " ★" if row["chosen"] else ""
        crop = "centre square, " if row["crop"] else ""
        lines.append(f"| {crop}{row['label']}{star} | {row['n_fake']} / {row['n']} | "
                     f"{100 * row['fpr']:.0f}% | {row['n_fake_colour']} / {row['n_colour']} | "
                     f"{row['mean_p_fake']:.2f} |"
                     + (f" {100 * rt['rows'][row['key']]['REAL']:.1f}% | "
                        f"{100 * rt['rows'][row['key']]['FAKE']:.1f}% |" if rt else ""))
    if rt:
        lines += ["", f"Round trip: {rt['per_class']} CIFAKE test images per class, enlarged "
                  f"{rt['scale']}x with Pillow bicubic, then each preprocessing. Without the round "
                  f"trip the same images are classified {100 * rt['original']['REAL']:.1f}% (REAL) "
                  f"and {100 * rt['original']['FAKE']:.1f}% (FAKE) right."]
    return "\n".join(lines) + "\n"


def table_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["preprocessing", "filter", "jpeg_quality", "centre_crop", "n", "n_fake", "fpr",
                "n_colour", "n_fake_colour", "fpr_colour", "mean_p_fake", "chosen",
                "roundtrip_real_right", "roundtrip_fake_right"])
    rt = (result.get("roundtrip") or {}).get("rows", {})
    for row in result["rows"]:
        w.writerow([row["key"], row["filter"], row["jpeg_quality"] or "", int(row["crop"]),
                    row["n"], row["n_fake"], f"{row['fpr']:.4f}", row["n_colour"],
                    row["n_fake_colour"], f"{row['fpr_colour']:.4f}",
                    f"{row['mean_p_fake']:.4f}", int(row["chosen"]),
                    f"{rt[row['key']]['REAL']:.4f}" if row["key"] in rt else "",
                    f"{rt[row['key']]['FAKE']:.4f}" if row["key"] in rt else ""])
    return buf.getvalue()


def figure_png(result: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    names = [row["key"] + (" *" if row["chosen"] else "") for row in rows]
    photos = list(rows[0]["p_fake"])
    grid = np.array([[row["p_fake"][p] for p in photos] for row in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    y = np.arange(len(rows))
    a1.barh(y, [100 * r["fpr"] for r in rows], color="tab:red", label="false-positive rate %")
    a1.plot([100 * r["mean_p_fake"] for r in rows], y, "ko", label="mean P(FAKE) x 100")
    a1.set_yticks(y, names)
    a1.invert_yaxis()
    a1.set_xlim(0, 100)
    a1.set_xlabel("%")
    a1.legend(loc="lower right", fontsize=8)
    a1.set_title(f"{result['n_photos']} real photos, run {result['run']['run']}")
    im = a2.imshow(grid, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
    a2.set_yticks(y, names)
    a2.set_xticks(np.arange(len(photos)), [p.rsplit(".", 1)[0] for p in photos], rotation=60,
                  ha="right", fontsize=8)
    a2.set_title("P(FAKE) per photo (red: called FAKE)")
    fig.colorbar(im, ax=a2, fraction=0.03)
    fig.tight_layout()
    return png_bytes(fig)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].split(": ", 1)[-1])
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("--out", default="results/realworld", help="output folder")
    ap.add_argument("--stack", default="auto", choices=("auto", "torch", "jax", "numpy"),
                    help="whose loading code scores the run (auto: torch_cnn for CNNs, "
                         "numpy_mlp for MLPs)")
    ap.add_argument("--data", help="Kaggle cifake zip or folder: adds the CIFAKE round-trip "
                                   "columns (without it they are left out)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--roundtrip", type=positive_int("--roundtrip"), default=500,
                    help="CIFAKE test images per class for the round trip (default 500)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    p_fake, scored_with = load_scorer(run_dir, args.stack)
    result = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "run": run_summary(run_dir), "scored_with": scored_with,
              "pipeline": PIPELINE, "chosen": chosen_key(),
              "n_photos": len(PHOTOS), "n_colour": sum(p.colour for p in PHOTOS),
              "photos": [{"package": p.package, "file": p.path, "what": p.what,
                          "colour": p.colour} for p in PHOTOS]}
    result.update(evaluate(p_fake, PHOTOS, preprocessings()))
    if args.data:
        from data import load_cifake
        ds = load_cifake(args.data, args.cache_dir, verbose=False)
        result["roundtrip"] = roundtrip(p_fake, ds.test, args.roundtrip, preprocessings())
    out = out_dir(args.out)
    md = table_md(result)
    atomic_write_bytes(out / "realworld.md", md.encode())
    atomic_write_bytes(out / "realworld.csv", table_csv(result).encode())
    atomic_write_json(out / "realworld.json", result)
    atomic_write_bytes(out / "realworld.png", figure_png(result))
    print(md, end="")
    print(f"wrote {out}/realworld.{{md,csv,json,png}}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
