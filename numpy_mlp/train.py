"""Train the NumPy MLP: ``python -m numpy_mlp.train [--preset NAME] [flags]``.

Gradient descent on the mean binary cross-entropy, by hand (see ``model``):
each epoch visits the training set in ``data.batching.epoch_order(seed, epoch)``
(reshuffled every epoch) in batches of ``--batch-size`` images, with learning
rate ``lr0 / (1 + decay * epoch)`` (epoch 0-based). ``--batch-size full`` is
full-batch gradient descent: one step per epoch over the whole training set,
in the natural order (the full-batch gradient is a sum over all images, so a
shuffle would change only rounding, at the cost of copying the set every epoch).

Run directory (``--out``, default ``runs/numpy_mlp-<preset or model>``):
config.json, metrics.json, model.safetensors (canonical names, written at the
end of every epoch), state.safetensors (the weights of the last completed epoch,
with that epoch number in its metadata: one atomic file, so a kill at any
moment leaves a consistent resume point) and state.json. ``--resume`` continues
from the last completed epoch and ends bit-identical to an uninterrupted run:
all randomness derives from (seed, epoch) and plain gradient descent has no
optimizer state.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from data import load_cifake, run_cli
from data.batching import batch_slices, epoch_order
from data.errors import UserError
from data.init import INIT_SCHEME
from data.runs import (atomic_write_json, check_init_scheme, classification_report, common_parser,
                       prepare_out_dir, read_json, resolve_config)

from . import checkpoint
from .model import (DTYPES, MODELS, as_float_batch, backward, cost, forward, images_to_X,
                    init_params, layer_dims_for, lr_at, predict_logits, update)
from .presets import PRESETS

PROG = "numpy_mlp.train"
STACK = "numpy_mlp"

# Used when neither a preset nor a flag sets a value. Units: lr per step (lr0 of the
# decay schedule), decay per epoch, batch_size in images, eval_every in epochs.
DEFAULTS = {
    "stack": STACK, "model": "mlp2", "preset": None, "hidden": None, "dtype": "float32",
    "seed": 0, "epochs": 100, "batch_size": 128, "lr": 0.01, "decay": 0.0,
    "eval_every": None, "data": None, "cache_dir": None, "subset": None,
}
# Flags --resume may change on an existing run (extending it); any other explicit
# flag must agree with the run's config.json.
RESUMABLE_OVERRIDES = {"epochs"}


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step, self.loss = step, loss


# ------------------------------------------------------------------ the epoch
def take_columns(X: np.ndarray, idx) -> np.ndarray:
    """X[:, idx], gathering whole rows of the underlying C-ordered (m, n_in) array
    when X is its transpose (the layout ``images_to_X`` and the trainer use)."""
    if isinstance(idx, slice) or not X.flags.f_contiguous:
        return X[:, idx]
    return X.T[idx].T


def train_epoch(params: dict, X: np.ndarray, Y: np.ndarray, order: np.ndarray | None,
                batch_size: int | None, lr: float, on_step=None):
    """One epoch of gradient descent -> (params, mean_loss, acc).

    X: (n_in, n) float in [0, 1], or uint8 pixels (scaled per batch in the params'
    dtype); Y: (1, n) or (n,) of 0/1; order: permutation of range(n) to visit
    (None = natural order, no gather); batch_size: images per step (None = full
    batch); lr: this epoch's learning rate. mean_loss is the mean of the steps'
    mean BCE; acc (%) counts each image as classified by the weights *before*
    its step (accuracy "as trained"). ``on_step(images, loss)`` is called after
    every step. Raises NonFiniteLoss (1-based step) before applying a bad step.
    """
    dtype = params["W1"].dtype
    Y = np.asarray(Y).reshape(1, -1)
    n = Y.shape[1]
    total_loss, correct, steps = 0.0, 0, 0
    for step, s in enumerate(batch_slices(n, batch_size), 1):
        idx = s if order is None else order[s]
        Xb = as_float_batch(take_columns(X, idx), dtype)
        Yb = Y[:, idx].astype(dtype)
        # overflow/NaN is detected just below and reported as one error line,
        # so NumPy's RuntimeWarnings would only add noise
        with np.errstate(over="ignore", invalid="ignore"):
            logits, caches = forward(Xb, params)
            loss = cost(logits, Yb)
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        params = update(params, backward(logits, Yb, caches), lr)
        total_loss += loss
        correct += int(((logits > 0) == (Yb > 0.5)).sum())
        steps += 1
        if on_step is not None:
            on_step(Yb.shape[1], loss)
    return params, total_loss / max(steps, 1), 100.0 * correct / max(n, 1)


# ------------------------------------------------------------------ CLI
def parse_hidden(s: str) -> list[int]:
    try:
        sizes = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--hidden must be comma-separated integers like 20,7,5, got {s!r}") \
            from None
    if not sizes or any(h <= 0 for h in sizes):
        raise UserError(f"--hidden sizes must be positive integers, got {s!r}")
    return sizes


def build_parser():
    from data.runs import positive_int
    ap = common_parser(PROG, "Train the NumPy MLP detector on CIFAKE.", PRESETS, decay=True)
    ap.add_argument("--model", choices=MODELS, help="mlp2 (3072-7-1) or mlp4 (3072-20-7-5-1)")
    ap.add_argument("--hidden", type=str, help="hidden layer sizes, comma-separated "
                    "(mlp2: one, e.g. 7; mlp4: three, e.g. 20,7,5)")
    ap.add_argument("--dtype", choices=DTYPES, help="float32 (fast, default) or float64")
    ap.add_argument("--eval-every", type=positive_int("--eval-every"),
                    help="evaluate the test set every K epochs (default: the preset's, else 1; "
                         "the last epoch is always evaluated)")
    return ap


def _explicit(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def resolve(args, argv: list[str]) -> dict:
    cfg = resolve_config(args, PRESETS, DEFAULTS)
    if args.batch_size is None and _explicit(argv, "--batch-size"):
        cfg["batch_size"] = None  # '--batch-size full' (None is otherwise "not given")
    if isinstance(cfg["hidden"], str):
        cfg["hidden"] = parse_hidden(cfg["hidden"])
    cfg["layer_dims"] = layer_dims_for(cfg["model"], cfg["hidden"])
    cfg["hidden"] = cfg["layer_dims"][1:-1]
    cfg["init"] = INIT_SCHEME
    if cfg["eval_every"] is None:
        cfg["eval_every"] = 1
    return cfg


def _resume_config(args, argv: list[str], out: Path) -> dict:
    cfg = read_json(out / "config.json")
    check_init_scheme(cfg, out / "config.json")
    fresh = resolve(args, argv)
    for key, flag in (("model", "--model"), ("hidden", "--hidden"), ("dtype", "--dtype"),
                      ("seed", "--seed"), ("batch_size", "--batch-size"), ("lr", "--lr"),
                      ("decay", "--decay"), ("eval_every", "--eval-every"),
                      ("subset", "--subset"), ("preset", "--preset"), ("data", "--data")):
        if _explicit(argv, flag) and key not in RESUMABLE_OVERRIDES:
            want = fresh[key] if key != "data" else str(Path(args.data).expanduser().resolve())
            if key == "preset" and want is None:
                continue
            if want != cfg.get(key):
                raise UserError(f"--resume: {flag} {want} differs from the run's "
                                f"{cfg.get(key)} ({out / 'config.json'}); only --epochs may change")
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.cache_dir is not None:
        cfg["cache_dir"] = args.cache_dir
    return cfg


def _versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__}


def _eval_reports(params, ds) -> dict:
    reports = {}
    for name, split in (("train", ds.train), ("test", ds.test), ("test_dedup",
                                                                  ds.test_deduplicated())):
        X = split.images.reshape(len(split), -1).T  # uint8 view, scaled per chunk
        reports[name] = classification_report(predict_logits(X, params), split.labels)
    return reports


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        out = prepare_out_dir(args.out, resume=True)
        cfg = _resume_config(args, argv, out)
    else:
        cfg = resolve(args, argv)
        out = Path(args.out or f"runs/{STACK}-{cfg['preset'] or cfg['model']}")
    dtype = np.dtype(cfg["dtype"])
    layer_dims = cfg["layer_dims"]

    # Data first (a bad --data path fails before anything is written), then the run dir.
    ds = load_cifake(cfg["data"], cfg["cache_dir"], subset=cfg["subset"],
                     verbose=not args.no_progress)
    if not args.resume:
        out = prepare_out_dir(out, resume=False)
        # the dataset actually used (resolved from --data / $CIFAKE_PATH / download)
        cfg["data"] = ds.manifest.get("source", {}).get("path", cfg["data"])
        cfg["n_train"], cfg["n_test"] = len(ds.train), len(ds.test)
        cfg["versions"] = _versions()
        atomic_write_json(out / "config.json", cfg)

    # Start point: fresh He init, or the last completed epoch of the run.
    history: list[dict] = []
    start = 0
    if args.resume:
        params, meta = checkpoint.load(out / "state.safetensors")
        start = int(meta.get("epoch_completed", -1))
        if start < 0 or meta["layer_dims"] != layer_dims or str(params["W1"].dtype) != str(dtype):
            raise UserError(f"{out / 'state.safetensors'}: does not match {out / 'config.json'}")
        if start > cfg["epochs"]:
            raise UserError(f"--resume: {out} already completed {start} epochs, more than "
                            f"--epochs {cfg['epochs']}")
        if (out / "metrics.json").exists():
            history = [h for h in read_json(out / "metrics.json").get("history", [])
                       if h["epoch"] <= start]
    else:
        params = init_params(layer_dims, cfg["seed"], dtype)

    # Training data: uint8 columns converted per batch; full-batch mode converts once
    # (float32: 1.2 GB for the full 100k set) since every epoch uses all of it.
    n = len(ds.train)
    U = ds.train.images.reshape(n, -1)
    X_train = images_to_X(ds.train.images, dtype) if cfg["batch_size"] is None else U.T
    Y_train = ds.train.labels.reshape(1, -1)
    X_test = ds.test.images.reshape(len(ds.test), -1).T

    epochs, bs = cfg["epochs"], cfg["batch_size"]
    steps_per_epoch = len(batch_slices(n, bs))
    from tqdm import tqdm
    bar = tqdm(total=(epochs - start) * steps_per_epoch, disable=args.no_progress,
               file=sys.stderr, unit="step", dynamic_ncols=True, mininterval=0.5,
               desc=f"{STACK} {cfg['preset'] or cfg['model']}")
    t_run = time.perf_counter()
    prior_wall = 0.0
    if args.resume and (out / "metrics.json").exists():
        prior_wall = float(read_json(out / "metrics.json").get("wall_seconds", 0.0))

    def write_metrics(final=None, complete=False):
        atomic_write_json(out / "metrics.json", {
            "history": history, "final": final, "complete": complete,
            "wall_seconds": prior_wall + time.perf_counter() - t_run})

    try:
        for epoch in range(start, epochs):
            lr = lr_at(cfg["lr"], cfg["decay"], epoch)
            order = None if bs is None else epoch_order(cfg["seed"], epoch, n)
            t0 = time.perf_counter()
            stats = {"images": 0}

            def on_step(images, loss):
                stats["images"] += images
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}",
                                img_s=f"{stats['images'] / (time.perf_counter() - t0):.0f}",
                                refresh=False)
            try:
                params, loss, acc = train_epoch(params, X_train, Y_train, order, bs, lr, on_step)
            except NonFiniteLoss as e:
                raise UserError(f"non-finite loss ({e.loss}) at epoch {epoch + 1}, step {e.step} "
                                f"(lr {lr:g} too large?); the last good checkpoint "
                                f"(epoch {epoch}) is kept in {out}") from None
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_acc": acc,
                   "seconds": seconds, "images_per_s": n / seconds}
            if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == epochs:
                rep = classification_report(predict_logits(X_test, params), ds.test.labels)
                row["test_loss"], row["test_acc"] = rep["loss"], rep["accuracy"]
                msg = (f"epoch {epoch + 1}/{epochs}: lr {lr:.4g} train loss {loss:.4f} "
                       f"acc {acc:.2f}% | test loss {rep['loss']:.4f} acc {rep['accuracy']:.2f}% "
                       f"| {n / seconds:.0f} img/s")
                (bar.write(msg, file=sys.stderr) if not args.no_progress
                 else print(msg, file=sys.stderr))
            history.append(row)
            # Order matters for kill-safety: weights, then history, then the resume point.
            meta = {"epoch_completed": str(epoch + 1)}
            checkpoint.save(out / "model.safetensors", params, cfg["model"], layer_dims, meta)
            write_metrics()
            checkpoint.save(out / "state.safetensors", params, cfg["model"], layer_dims, meta)
            atomic_write_json(out / "state.json", {"epoch_completed": epoch + 1,
                                                   "epochs": epochs, "seed": cfg["seed"]})
    except KeyboardInterrupt:
        bar.close()
        done = len(history)
        print(f"interrupted: epoch {done} is saved in {out}; resume with: "
              f"python -m {PROG} --out {out} --resume", file=sys.stderr)
        return 130
    bar.close()

    reports = _eval_reports(params, ds)
    final = {**reports, "train_acc": reports["train"]["accuracy"],
             "test_acc": reports["test"]["accuracy"],
             "gap_pp": reports["train"]["accuracy"] - reports["test"]["accuracy"],
             "test_loss": reports["test"]["loss"], "test_auc": reports["test"]["roc_auc"]}
    write_metrics(final, complete=True)
    print(f"done: train {final['train_acc']:.2f}% test {final['test_acc']:.2f}% "
          f"(gap {final['gap_pp']:.2f} pp, test dedup {reports['test_dedup']['accuracy']:.2f}%) "
          f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
