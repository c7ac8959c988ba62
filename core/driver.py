"""The one run driver of every stack's ``train``: the run directory's lock and files, the
epoch loop, Ctrl-C, the final report. What a run is (flags, config.json, what a resume
may change) is ``core.config``'s.

A stack supplies only what is its own (a ``Stack`` subclass): its flags, building the
model state, training one epoch, logits for a split, and saving/loading its state. The
driver does the rest the same way for all three:

- the run directory (``core.rundir``): locked for the life of the training; a fresh run
  needs an empty folder;
- the validation split (``--val``, ``data.validation``) held out of the training split
  before any stack sees it, evaluated with the test split;
- after each epoch a line of metrics.jsonl, and every ``save_every`` epochs (and at the
  last), in this order: metrics.json (history so far), state.safetensors (the resume
  point, one atomic file carrying its epoch), model.safetensors, state.json. A kill
  between any two writes resumes consistently: --resume takes the epoch from
  state.safetensors and the first that-many entries of the history (the epochs trained
  after it are trained again, to the same numbers);
- Ctrl-C and SIGTERM (``data.errors.run_cli`` turns both into KeyboardInterrupt) stop
  after the last completed epoch with the command that resumes the run;
- several processes (``Stack.processes``: torchrun's ranks, JAX's hosts): every process
  trains, only process 0 locks and writes the run directory and prints; the others read
  it (``--resume``), so it must be on a file system every process sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data.cache import content_fingerprint, load_cifake
from data.degrade import DegradeFeed
from data.errors import EXIT_INTERRUPTED, UserError
from data.validation import hold_out, split_digest

from .atomic import append_line, atomic_write_bytes, atomic_write_json
from .config import configure, resume_config
from .metrics import classification_report, final_report
from .rundir import field, prepare, read_history, read_json, unlock

class NonFiniteLoss(Exception):
    """A training step produced a non-finite loss (``step`` 1-based within the epoch)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step, self.loss = step, loss


class Stack:
    """What one stack supplies. ``name`` is config.json's "stack" and the module whose
    ``train`` runs it; ``models`` the models it trains; ``default_model`` the one used
    when neither --model nor --preset says (None: one of them is required)."""
    name = ""
    description = ""
    models: tuple = ()
    default_model: str | None = None
    resume_flags: frozenset = frozenset()  # its own flags allowed with --resume
    checks: dict = {}                      # config key -> core.flags checker, its own flags

    def add_flags(self, ap: argparse.ArgumentParser) -> None:
        """Add the stack's own flags, with their defaults (the shared ones are the driver's)."""

    def processes(self) -> tuple[int, int]:
        """(this process's index, the number of processes) of the training: (0, 1) unless
        the stack was started as one of several (torchrun, several JAX hosts). Called once,
        before the run directory is touched; it may start the stack's distributed runtime."""
        return 0, 1

    def configure(self, cfg: dict) -> None:
        """Derive and check what follows from the configuration (layer sizes, ...)."""

    def build(self, cfg: dict, ds) -> dict:
        """Set up for training on ``ds`` with fresh weights; return runtime facts for
        config.json (device, versions)."""
        raise NotImplementedError

    def load(self, path: Path) -> int:
        """Replace the fresh state with the resume point in ``path``; its epoch_completed."""
        raise NotImplementedError

    def train_epoch(self, epoch: int, progress) -> dict:
        """One epoch (0-based) -> {"lr", "train_loss", "train_acc"}. ``progress(images
        done, last loss)`` after each step or chunk; NonFiniteLoss before a bad step."""
        raise NotImplementedError

    def compile(self, epoch: int) -> None:
        """Compile ahead what training from ``epoch`` (0-based) will run, without training;
        a no-op for eager stacks. The driver times it apart (metrics.json's
        ``compile_seconds``), so that epoch seconds are training alone."""

    def logits(self, split) -> np.ndarray:
        """Eval-mode logits of a whole split, in stored order."""
        raise NotImplementedError

    def set_train_images(self, images: np.ndarray) -> None:
        """Train the coming epochs on ``images`` (same order and labels as the training
        split; the resize-and-compress augmentation's copy of it)."""
        raise UserError(f"{self.name} cannot train on augmented copies of the images (--degrade)")

    def save_state(self, path: Path, epoch: int) -> None:
        raise NotImplementedError

    def save_model(self, path: Path) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------ the run
def train(stack: Stack, argv: list[str] | None = None) -> int:
    """Run ``python -m <stack>.train`` with ``argv``; returns the exit status."""
    cfg, out, resume, bars, given = configure(stack, argv)
    rank, world = stack.processes()
    primary = rank == 0  # the one process that locks, writes and prints
    bars = bars and primary
    if resume:
        if primary:
            out = prepare(out, resume=True)
        elif not (out / "config.json").is_file():
            raise UserError(f"--resume: process {rank} of {world} does not see "
                            f"{out / 'config.json'}; the run directory must be on a file "
                            f"system every process sees")
        cfg = resume_config(stack, given, out)
    ds = load_cifake(cfg["data"], cfg["cache_dir"], subset=cfg["subset"], verbose=bars)
    fingerprint = content_fingerprint(ds.manifest)
    ds = _hold_out(cfg, ds, resume)
    if resume:
        for key, n in (("n_train", len(ds.train)), ("n_test", len(ds.test))):
            if cfg.get(key) != n:
                raise UserError(f"--resume: {cfg['data']} now gives {n:,} images for "
                                f"{key[2:]}, the run was trained on {cfg[key]}")
        if cfg.get("data_fingerprint") != fingerprint:
            raise UserError(f"--resume: the images of {cfg['data']} changed since the run "
                            f"started (another content fingerprint); resuming would train one "
                            f"run on two datasets: start a new run (another --out)")
    else:
        if primary:
            out = prepare(out, resume=False)
        # the dataset actually used (resolved from --data / $CIFAKE_PATH / download)
        cfg["data"] = ds.manifest.get("source", {}).get("path", cfg["data"])
        cfg["n_train"], cfg["n_test"] = len(ds.train), len(ds.test)
        cfg["data_fingerprint"] = fingerprint
    try:
        return _run(stack, cfg, ds, out, resume, bars, bool(given.get("tensorboard")), primary)
    finally:
        if primary:
            unlock(out)


def _hold_out(cfg: dict, ds, resume: bool):
    """``ds`` with ``cfg["val"]`` training images held out as ``ds.val`` (none for 0); a
    fresh run records which images, a resume refuses another draw."""
    if not cfg["val"]:
        return ds
    train, val = hold_out(ds.train, cfg["val"], cfg["val_seed"])
    digest = split_digest(val)
    if resume and cfg.get("val_digest") != digest:
        raise UserError("--resume: this version holds out other validation images than the "
                        "run recorded (val_digest); resuming would validate one run on two "
                        "splits: start a new run (another --out)")
    cfg["val_digest"] = digest
    return dataclasses.replace(ds, train=train, val=val)


def _resume_point(stack: Stack, out: Path) -> tuple[int, list[dict], float]:
    """(epoch completed, its history, wall seconds so far) of the run in ``out``."""
    if not (out / "state.safetensors").exists():
        return 0, [], 0.0  # killed before its first epoch: start it again
    start = stack.load(out / "state.safetensors")
    history, wall = read_history(out / "metrics.json")
    history = [h for h in history if h["epoch"] <= start]
    if [h["epoch"] for h in history] != list(range(1, start + 1)):
        raise UserError(f"{out / 'metrics.json'}: history does not hold epochs 1-{start}, "
                        f"which {out / 'state.safetensors'} completed")
    if (out / "state.json").exists():
        wall = float(field(read_json(out / "state.json"), "wall_seconds", (int, float),
                           out / "state.json", required=False, default=wall))
    return start, history, wall


TENSORBOARD_SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                       "lr", "images_per_s")


class _RunFiles:
    """The run directory as training goes; only the primary process writes it."""

    def __init__(self, out: Path, cfg: dict, history: list[dict], wall_before: float,
                 compile_seconds: float, primary: bool):
        self.out, self.cfg, self.history, self.primary = out, cfg, history, primary
        # compilation ahead of the first epoch, summed over the run's sessions (a resume
        # compiles again); in no epoch's seconds
        self.compile_seconds = compile_seconds
        self.saved = history[-1]["epoch"] if history else 0
        self.t_start, self.wall_before, self.writer = time.time(), wall_before, None

    def open(self, tensorboard: bool) -> None:
        if not self.primary:
            return
        atomic_write_json(self.out / "config.json", self.cfg)
        # metrics.jsonl: one line per epoch, appended as training goes (for pandas and
        # plotting tools); rewritten whole here so a resumed run's log holds exactly its
        # kept epochs
        atomic_write_bytes(self.out / "metrics.jsonl", "".join(
            json.dumps(r, allow_nan=False) + "\n" for r in self.history).encode())
        if tensorboard:  # a viewer's copy of the history: metrics.json stays the record
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def wall(self) -> float:
        return self.wall_before + time.time() - self.t_start

    def write_metrics(self, final=None) -> None:
        atomic_write_json(self.out / "metrics.json", {
            "history": self.history, "final": final, "complete": final is not None,
            "wall_seconds": self.wall(), "compile_seconds": self.compile_seconds})

    def epoch_done(self, stack: Stack, row: dict) -> None:
        self.history.append(row)
        if not self.primary:
            return
        append_line(self.out / "metrics.jsonl", json.dumps(row, allow_nan=False))
        if self.writer is not None:
            for key in TENSORBOARD_SCALARS:
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], row["epoch"])
            self.writer.flush()
        # the run directory every save_every epochs: rewriting metrics.json and both
        # checkpoints is ~10 ms, which a 0.1 s full-batch epoch should not pay each time
        epoch, epochs = row["epoch"], self.cfg["epochs"]
        if epoch % self.cfg["save_every"] == 0 or epoch == epochs:
            self.write_metrics()
            stack.save_state(self.out / "state.safetensors", epoch)
            stack.save_model(self.out / "model.safetensors")
            atomic_write_json(self.out / "state.json", {
                "epoch_completed": epoch, "epochs": epochs, "model": self.cfg["model"],
                "seed": self.cfg["seed"], "wall_seconds": self.wall()})
            self.saved = epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _run(stack: Stack, cfg: dict, ds, out: Path, resume: bool, bars: bool,
         tensorboard: bool = False, primary: bool = True) -> int:
    cfg.update(stack.build(cfg, ds))
    start, history, wall_before = _resume_point(stack, out) if resume else (0, [], 0.0)
    epochs = cfg["epochs"]
    if start > epochs:
        raise UserError(f"--resume: {out} already completed {start} epochs, more than "
                        f"--epochs {epochs}")
    files = _RunFiles(out, cfg, history, wall_before,
                      _compile_seconds(out) if resume else 0.0, primary)
    files.open(tensorboard)
    if start and primary:
        print(f"resuming {out} after epoch {start}", file=sys.stderr)
    feed = _degrade_feed(cfg, ds)
    epoch = start
    try:
        if start < epochs and type(stack).compile is not Stack.compile:  # eager stacks: 0
            t0 = time.perf_counter()
            stack.compile(start)
            files.compile_seconds += time.perf_counter() - t0
        for epoch in range(start, epochs):
            files.epoch_done(stack, _train_epoch(stack, cfg, ds, out, epoch, bars, primary, feed))
    except KeyboardInterrupt:
        if primary:
            print(f"interrupted during epoch {epoch + 1}; epoch {files.saved} is saved in "
                  f"{out}; resume with: python -m {stack.name}.train --out {out} --resume",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        files.close()
        if feed is not None:
            feed.close()
    final = final_report(stack.logits, ds)  # every process: evaluation may be shared
    if primary:
        files.write_metrics(final)
        auc = "n/a" if final["test_auc"] is None else f"{final['test_auc']:.4f}"
        val = "" if final.get("val_acc") is None else f"val {final['val_acc']:.2f}% "
        print(f"done: train {final['train_acc']:.2f}% {val}test {final['test_acc']:.2f}% "
              f"(gap {final['gap_pp']:.2f} pp, test AUC {auc}, dedup test "
              f"{final['test_dedup']['accuracy']:.2f}%) -> {out}", file=sys.stderr)
    return 0


def _degrade_feed(cfg: dict, ds) -> DegradeFeed | None:
    """The resize-and-compress copies of the training images (--degrade), prepared one
    epoch ahead. Every process of a multi-process run makes the same copies; those on one
    host share its cores (torchrun says how many processes it started here)."""
    if not cfg.get("degrade"):
        return None
    return DegradeFeed(ds.train.images, cfg["seed"], cfg["degrade"], cfg["epochs"],
                       workers=max(1, (os.cpu_count() or 1) // _local_processes()))


def _compile_seconds(out: Path) -> float:
    path = out / "metrics.json"
    if not path.exists():  # killed before its first save
        return 0.0
    return float(field(read_json(path), "compile_seconds", (int, float), path))


def _local_processes() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _train_epoch(stack: Stack, cfg: dict, ds, out: Path, epoch: int, bars: bool,
                 primary: bool = True, feed: DegradeFeed | None = None) -> dict:
    from tqdm import tqdm
    epochs, n = cfg["epochs"], len(ds.train)
    bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, disable=not bars,
               leave=False, dynamic_ncols=True, unit="img", mininterval=0.5)
    t0 = time.perf_counter()
    if feed is not None:
        # drawn from (seed, 1-based epoch) like the CNNs' other per-epoch streams; the
        # wait for the copy (prepared while the previous epoch trained) is part of the
        # epoch's training time
        stack.set_train_images(feed.get(epoch + 1))

    def progress(done: int, loss: float) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}",
                        img_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
    try:
        stats = stack.train_epoch(epoch, progress)
    except NonFiniteLoss as e:
        raise UserError(f"non-finite loss ({e.loss}) in training at epoch {epoch + 1}, step "
                        f"{e.step}; the last good checkpoint (epoch {epoch}) is kept in {out}; "
                        f"try a smaller --lr") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    row = {"epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["train_loss"],
           "train_acc": stats["train_acc"], "seconds": seconds,
           "images_per_s": n / max(seconds, 1e-9)}
    if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == epochs:
        line = f"epoch {epoch + 1}/{epochs}: lr {row['lr']:.4g} train loss " \
               f"{row['train_loss']:.4f} acc {row['train_acc']:.2f}%"
        for name, split in (("val", ds.val), ("test", ds.test)):
            if split is None:
                continue
            rep = classification_report(stack.logits(split), split.labels)
            row[f"{name}_loss"], row[f"{name}_acc"] = rep["loss"], rep["accuracy"]
            line += f" | {name} loss {rep['loss']:.4f} acc {rep['accuracy']:.2f}%"
        if primary:
            print(f"{line} | {row['images_per_s']:.0f} img/s", file=sys.stderr)
    return row
