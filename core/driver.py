"""The one run driver of every stack's ``train``: configuration, resume, the run
directory's lock and files, the epoch loop, Ctrl-C, the final report.

A stack supplies only what is its own (a ``Stack`` subclass): its flags, building the
model state, training one epoch, logits for a split, and saving/loading its state. The
driver does the rest the same way for all three:

- configuration: defaults < preset < explicit flags, by feeding the family's defaults and
  the preset to ``parser.set_defaults``; every value checked by ``core.flags``;
- resume: ``--resume --out RUN`` reloads RUN/config.json; only ``--epochs``, the cache
  and the device/progress flags may be given with it, anything else (``--data``,
  ``--preset``, the recipe's flags, ...) or a run of another stack is refused before
  anything is written; a one-cycle run's ``--epochs`` cannot change either (its schedule
  spans the epochs it was started with);
- the run directory (``core.rundir``): locked for the life of the training; a fresh run
  needs an empty folder;
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

from . import flags
from .atomic import append_line, atomic_write_bytes, atomic_write_json
from data.cache import content_fingerprint, load_cifake
from .catalog import (DEFAULTS, DROPOUT_MODELS, MODELS, ONECYCLE_DEFAULTS, ONECYCLE_KEYS,
                      PRESETS, RECIPE_DEFAULTS, family_of, presets_for)
from data.degrade import DegradeFeed, check_probability
from data.errors import EXIT_INTERRUPTED, UserError
from .init import INIT_SCHEME
from data.validation import hold_out, split_digest
from .metrics import classification_report, final_report
from .recipe import SCHEDULES, TTA_MODES, WARMUP_SHAPES
from .rundir import check_init_scheme, field, prepare, read_history, read_json, unlock

# flags that may be given with --resume: they do not change what the run computes
RESUME_FLAGS = {"out", "resume", "epochs", "cache_dir", "no_progress", "device", "tensorboard",
                "save_every"}
# what a run's config.json must hold to be resumed
REQUIRED = ("model", "preset", "seed", "epochs", "batch_size", "lr", "subset", "data",
            "cache_dir")
# parser destinations that are not part of a run's configuration
NOT_CONFIG = {"out", "resume", "no_progress", "tensorboard"}
# configuration keys that runs made before their flag existed do not have (each read with
# the value that reproduces what those runs did); every other flag's key must be there
ADDED_LATER = {"eval_every", "save_every", "degrade", "device", "devices", *RECIPE_DEFAULTS}


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


# ------------------------------------------------------------------ configuration
CHECKS = {"seed": flags.seed, "epochs": flags.epochs, "batch_size": flags.batch_size,
          "lr": flags.lr, "decay": flags.decay, "subset": flags.optional(flags.subset),
          "eval_every": flags.eval_every, "save_every": flags.save_every,
          "hidden": flags.hidden, "val": flags.val, "val_seed": flags.val_seed,
          "data": flags.optional_str("--data"), "cache_dir": flags.optional_str("--cache-dir"),
          "model": flags.choice("--model", MODELS),
          "preset": flags.choice("--preset", (None, *PRESETS)),
          "dtype": flags.choice("--dtype", ("float32", "float64")),
          "device": flags.device, "degrade": check_probability,
          # the recipe's (None: not set, e.g. an MLP run of a stack that has the flags)
          "schedule": flags.optional(flags.choice("--schedule", SCHEDULES)),
          "warmup_frac": flags.optional(flags.number_in("--warmup-frac", 0.0, 1.0)),
          "warmup_shape": flags.optional(flags.choice("--warmup-shape", WARMUP_SHAPES)),
          "div_factor": flags.optional(flags.number_in("--div-factor", 1.0, 1e6, True)),
          "final_div_factor": flags.optional(flags.number_in("--final-div-factor", 1.0, 1e6,
                                                             True)),
          "label_smoothing": flags.optional(flags.number_in("--label-smoothing", 0.0, 1.0)),
          "ema_decay": flags.optional(flags.number_in("--ema-decay", 0.0, 1.0)),
          "tta": flags.optional(flags.choice("--tta", TTA_MODES)),
          "dropout_p": flags.optional(flags.number_in("--dropout-p", 0.0, 1.0))}


def build_parser(stack: Stack) -> argparse.ArgumentParser:
    presets = presets_for(stack.models)
    mlp = any(family_of(m) == "mlp" for m in stack.models)
    cnn = any(family_of(m) == "cnn" for m in stack.models)
    first = next((p for p in ("baseline", "mlp4-mini") if p in presets), sorted(presets)[0])
    ap = flags.ArgumentParser(
        prog=f"python -m {stack.name}.train", description=stack.description,
        epilog=f"example:\n  python -m {stack.name}.train --preset {first} --data cifake.zip "
               f"--out runs/detector")
    ap.add_argument("--data", help="Kaggle cifake zip or its extracted folder "
                                   "(default: $CIFAKE_PATH, then a kagglehub download)")
    ap.add_argument("--cache-dir", help="decoded-image cache folder "
                                        "(default: ~/.cache/cifake-detector)")
    ap.add_argument("--out", help="run directory (default: runs/<stack>-<preset or model>)")
    ap.add_argument("--preset", choices=sorted(presets), help="a configuration of the original "
                    "project (or v3-robust, v3-recipe: beyond it); explicit flags override its "
                    "values")
    ap.add_argument("--model", choices=stack.models,
                    help=f"network (default: the preset's"
                         f"{', else ' + stack.default_model if stack.default_model else ''})")
    ap.add_argument("--seed", type=flags.seed, help="random seed in [0, 2**32) (default 0)")
    ap.add_argument("--epochs", type=flags.epochs, help="passes over the training set")
    ap.add_argument("--batch-size", type=flags.batch_size,
                    help="images per step" + (", or 'full' for full-batch gradient descent "
                                              "(MLPs)" if mlp else ""))
    ap.add_argument("--lr", type=flags.lr,
                    help="learning rate (lr0 of the decay schedule where there is one; the "
                         "peak of --schedule onecycle)")
    if mlp:
        ap.add_argument("--decay", type=flags.decay,
                        help="MLPs: lr = lr0 / (1 + decay * epoch); 0 keeps lr constant")
        ap.add_argument("--hidden", type=flags.hidden, help="MLP hidden sizes, comma-separated "
                        "(mlp2: one, e.g. 7; mlp4: three, e.g. 20,7,5)")
        ap.add_argument("--dtype", choices=("float32", "float64"),
                        help="MLP float type (default float32)")
    if cnn:
        add_recipe_flags(ap)
    ap.add_argument("--eval-every", type=flags.eval_every,
                    help="evaluate the test set every K epochs (default: the preset's, else 1; "
                         "the last epoch is always evaluated)")
    ap.add_argument("--save-every", type=flags.save_every,
                    help="write the run's checkpoints and metrics.json every K epochs (default: "
                         "the preset's, else 1; the last epoch is always written; a kill loses "
                         "at most K - 1 epochs, which --resume trains again)")
    if cnn:
        ap.add_argument("--degrade", type=check_probability,
                        help="CNNs: probability, per training image and epoch, of a random "
                             "enlarge / shrink / JPEG round trip (data.degrade; default 0, "
                             "the v3-robust preset's 0.5)")
    ap.add_argument("--subset", type=flags.subset,
                    help="use only the first N images per class of each split (quick runs)")
    ap.add_argument("--val", type=flags.val,
                    help="hold out N training images as a validation split (stratified by "
                         "class, never a copy of a trained-on image), evaluated with the test "
                         "split and reported beside it (default 0: train on every image, as "
                         "the original presets do)")
    ap.add_argument("--val-seed", type=flags.val_seed,
                    help="seed of the validation draw, independent of --seed, so every "
                         "training seed is validated on the same images (default 0)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last completed epoch (with "
                         "--epochs to extend it)")
    ap.add_argument("--device", type=flags.device, default="auto",
                    help="where to train: auto (a GPU when the stack's library sees one), cpu, "
                         "or gpu (cuda is the same)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (one line per evaluated epoch is still printed)")
    ap.add_argument("--tensorboard", action="store_true",
                    help="also write each epoch's scalars for TensorBoard into RUN/tensorboard/ "
                         "(needs the 'tensorboard' extra: tensorboardX)")
    stack.add_flags(ap)
    return ap


def add_recipe_flags(ap: argparse.ArgumentParser) -> None:
    """The recipe's ingredients (CNN models; core/recipe.py has the formulas)."""
    ap.add_argument("--schedule", choices=SCHEDULES,
                    help="CNNs: Adam's step size per step, constant (the original) or onecycle "
                         "(warm-up to --lr, then a cosine down; default: the preset's, else "
                         "constant)")
    ap.add_argument("--warmup-frac", type=CHECKS["warmup_frac"],
                    help=f"onecycle: fraction of the run's steps spent warming up (default "
                         f"{ONECYCLE_DEFAULTS['warmup_frac']})")
    ap.add_argument("--warmup-shape", choices=WARMUP_SHAPES,
                    help=f"onecycle: the warm-up's curve (default "
                         f"{ONECYCLE_DEFAULTS['warmup_shape']}, as optax.cosine_onecycle_schedule)")
    ap.add_argument("--div-factor", type=CHECKS["div_factor"],
                    help=f"onecycle: the first step's lr is --lr / this (default "
                         f"{ONECYCLE_DEFAULTS['div_factor']:g})")
    ap.add_argument("--final-div-factor", type=CHECKS["final_div_factor"],
                    help=f"onecycle: the last lr is --lr / (div-factor * this) (default "
                         f"{ONECYCLE_DEFAULTS['final_div_factor']:g})")
    ap.add_argument("--label-smoothing", type=CHECKS["label_smoothing"],
                    help="CNNs: eps in [0, 1); the training target is y (1 - eps) + eps / 2 "
                         "(default: the preset's, else 0)")
    ap.add_argument("--ema-decay", type=CHECKS["ema_decay"],
                    help="CNNs: decay per step of a moving average of the weights, which is "
                         "then what is evaluated and saved; 0 = none (default: the preset's, "
                         "else 0)")
    ap.add_argument("--tta", choices=TTA_MODES,
                    help="CNNs: test-time augmentation; flip averages the logits of each image "
                         "and its mirror image, in evaluation and predict (default: the "
                         "preset's, else none)")
    ap.add_argument("--dropout-p", type=CHECKS["dropout_p"],
                    help="dropout and v3: probability in [0, 1) of zeroing an fc1 activation "
                         "in training (default 0.5, the original's; 0 = no dropout)")


class _Given(argparse.Namespace):
    """A namespace on which every attribute 'exists', so argparse fills in no defaults:
    what is set on it afterwards is exactly what the command line gave."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping attributes
            raise AttributeError(name)
        return _UNSET


_UNSET = object()


def explicit_flags(ap: argparse.ArgumentParser, argv: list[str]) -> dict:
    return dict(vars(ap.parse_args(argv, namespace=_Given())))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_config(stack: Stack, cfg: dict, where: str = "") -> None:
    """Every value checked once, whether typed or read from a run's config.json."""
    for key, check in {**CHECKS, **stack.checks}.items():
        if key in cfg:
            try:
                cfg[key] = check(cfg[key])
            except UserError as e:
                raise UserError(f"{where}{e}") from None
    if cfg["model"] not in stack.models:
        raise UserError(f"{where}model {cfg['model']!r} is not one of this stack's "
                        f"({', '.join(stack.models)})")
    if family_of(cfg["model"]) == "cnn":
        if cfg.get("batch_size", 1) is None:
            raise UserError(f"{where}--batch-size full applies to the MLP models only")
        if cfg.get("hidden") is not None:
            raise UserError(f"{where}--hidden applies to the MLP models only")
        if cfg.get("decay"):
            raise UserError(f"{where}--decay applies to the MLP models only")
        if cfg.get("dtype", "float32") != "float32":
            raise UserError(f"{where}--dtype float64 applies to the MLP models only")
        _check_recipe(cfg, where)
    else:
        if cfg.get("degrade"):
            raise UserError(f"{where}--degrade applies to the CNN models only")
        for key, default in RECIPE_DEFAULTS.items():
            if cfg.get(key) not in (None, default):
                raise UserError(f"{where}{_flag(key)} applies to the CNN models only")
            cfg.pop(key, None)


def _check_recipe(cfg: dict, where: str) -> None:
    """A constant schedule takes no one-cycle settings (they would be ignored); a one-cycle
    one gets ONECYCLE_DEFAULTS for those not set."""
    if cfg.get("dropout_p") is not None and cfg["model"] not in DROPOUT_MODELS:
        raise UserError(f"{where}--dropout-p applies to the models with a dropout layer only "
                        f"({', '.join(DROPOUT_MODELS)}), not {cfg['model']}")
    if cfg.get("schedule", "constant") == "constant":
        given = [k for k in ONECYCLE_KEYS if cfg.get(k) is not None]
        if given:
            raise UserError(f"{where}{_flag(given[0])} {cfg[given[0]]} applies to "
                            f"--schedule onecycle only (this run's schedule is constant)")
        return
    for key, default in ONECYCLE_DEFAULTS.items():
        if cfg.get(key) is None:
            cfg[key] = default


def fresh_config(stack: Stack, ap, argv: list[str], given: dict) -> dict:
    preset = given.get("preset")
    model = given.get("model") or (PRESETS[preset]["model"] if preset else stack.default_model)
    if model is None:
        raise UserError(f"give --model ({', '.join(stack.models)}) or --preset")
    if preset and PRESETS[preset]["model"] != model:
        raise UserError(f"--model {model} contradicts --preset {preset} "
                        f"(a {PRESETS[preset]['model']} preset)")
    dests = set(vars(ap.parse_args([])))
    defaults = {**DEFAULTS[family_of(model)], "seed": 0, "model": model, **PRESETS.get(preset, {})}
    ap.set_defaults(**{k: v for k, v in defaults.items() if k in dests})
    args = ap.parse_args(argv)
    cfg = {"stack": stack.name, **{k: v for k, v in vars(args).items() if k not in NOT_CONFIG}}
    if cfg.get("schedule") == "constant":
        # a one-cycle preset overridden by --schedule constant: its one-cycle settings go
        # with its schedule (one typed with the flag is still refused, by check_config)
        cfg.update({k: None for k in ONECYCLE_KEYS if k not in given})
    check_config(stack, cfg)
    stack.configure(cfg)
    cfg["init"] = INIT_SCHEME
    return cfg


def resume_config(stack: Stack, given: dict, out: Path) -> dict:
    path = out / "config.json"
    cfg = read_json(path)
    if cfg.get("stack") != stack.name:
        raise UserError(f"--resume: {path} is a run of {cfg.get('stack')!r}, not of "
                        f"{stack.name}; resume it with its own stack")
    check_init_scheme(cfg, path)
    for key in REQUIRED:
        field(cfg, key, object, path)
    for key in sorted(set(vars(build_parser(stack).parse_args([]))) - NOT_CONFIG - ADDED_LATER):
        if key not in cfg:  # (its type is check_config's)
            raise UserError(f"{path}: '{key}' missing")
    cfg.setdefault("eval_every", 1)  # runs that predate --eval-every evaluated every epoch
    cfg.setdefault("save_every", 1)  # and those that predate --save-every saved every epoch
    if family_of(cfg["model"]) == "cnn":
        for key, default in RECIPE_DEFAULTS.items():  # runs that predate the recipe had none
            cfg.setdefault(key, default)
    check_config(stack, cfg, f"{path}: ")
    if cfg.get("schedule", "constant") != "constant" and given.get("epochs", cfg["epochs"]) \
            != cfg["epochs"]:
        raise UserError(f"--epochs {given['epochs']}: {path} follows a one-cycle schedule "
                        f"spread over its {cfg['epochs']} epochs, which a resume cannot change; "
                        f"start a new run (another --out)")
    for key in given.keys() & (RESUME_FLAGS | stack.resume_flags) - NOT_CONFIG:
        cfg[key] = given[key]
    # the stack's own checks see the flags given with the resume too
    derived = dict(cfg)
    try:
        stack.configure(derived)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    changed = [k for k in derived if k in cfg and derived[k] != cfg[k]]
    if changed:
        raise UserError(f"{path}: '{changed[0]}' is {cfg[changed[0]]!r}, but the rest of the "
                        f"configuration implies {derived[changed[0]]!r}")
    return derived  # (what the stack derives, e.g. layer sizes, is there even if not recorded)


def configure(stack: Stack, argv: list[str] | None) -> tuple[dict | None, Path, bool, bool, dict]:
    """-> (config (None when resuming: it is read under the lock), run directory,
    resuming?, progress bars?, the explicit flags). Nothing is written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser(stack)
    given = explicit_flags(ap, argv)
    resume = bool(given.get("resume"))
    if resume:
        if "out" not in given:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        extra = sorted(set(given) - RESUME_FLAGS - stack.resume_flags)
        if extra:
            allowed = sorted(_flag(k) for k in (RESUME_FLAGS | stack.resume_flags) - {"out", "resume"})
            raise UserError(f"--resume continues the run in {given['out']} with its own "
                            f"config.json; {_flag(extra[0])} cannot be given with it (only "
                            f"{', '.join(allowed)} may)")
        out = Path(given["out"])
        cfg = None  # read under the lock
    else:
        cfg = fresh_config(stack, ap, argv, given)
        out = Path(given.get("out") or f"runs/{stack.name}-{cfg['preset'] or cfg['model']}")
    if given.get("tensorboard"):
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs tensorboardX: pip install -e \".[tensorboard]\"") \
                from None
    return cfg, out, resume, not given.get("no_progress", False), given


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
            if cfg.get(key, n) != n:
                raise UserError(f"--resume: {cfg['data']} now gives {n:,} images for "
                                f"{key[2:]}, the run was trained on {cfg[key]}")
        # (runs that predate the fingerprint have none to compare)
        if cfg.get("data_fingerprint", fingerprint) != fingerprint:
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
        raise UserError(f"--resume: this version holds out other validation images than "
                        f"the run recorded (val_digest); resuming would validate one run on "
                        f"two splits: start a new run (another --out)")
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


def _run(stack: Stack, cfg: dict, ds, out: Path, resume: bool, bars: bool,
         tensorboard: bool = False, primary: bool = True) -> int:
    cfg.update(stack.build(cfg, ds))
    start, history, wall_before = _resume_point(stack, out) if resume else (0, [], 0.0)
    # compilation ahead of the first epoch, summed over the run's sessions (a resume compiles
    # again); not in any epoch's seconds. None for a resumed run that never recorded it: its
    # first epoch holds its compilation, and a partial sum would read as the whole.
    compile_seconds = _compile_seconds(out, history) if resume else 0.0
    epochs = cfg["epochs"]
    if start > epochs:
        raise UserError(f"--resume: {out} already completed {start} epochs, more than "
                        f"--epochs {epochs}")
    if primary:
        atomic_write_json(out / "config.json", cfg)
        # metrics.jsonl: one line per epoch, appended as training goes (for pandas and
        # plotting tools); rewritten whole here so a resumed run's log holds exactly its
        # kept epochs
        atomic_write_bytes(out / "metrics.jsonl",
                           "".join(json.dumps(r, allow_nan=False) + "\n" for r in history).encode())
    if start and primary:
        print(f"resuming {out} after epoch {start}", file=sys.stderr)
    t_start = time.time()

    def wall() -> float:
        return wall_before + time.time() - t_start

    def write_metrics(final=None):
        atomic_write_json(out / "metrics.json", {"history": history, "final": final,
                                                 "complete": final is not None,
                                                 "wall_seconds": wall(),
                                                 "compile_seconds": compile_seconds})
    writer = None
    if tensorboard and primary:  # a viewer's copy of the history: metrics.json stays the record
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    feed = None
    if cfg.get("degrade"):
        # every process of a multi-process run makes the same copies; those on one host
        # share its cores (torchrun says how many processes it started here)
        feed = DegradeFeed(ds.train.images, cfg["seed"], cfg["degrade"], epochs,
                           workers=max(1, (os.cpu_count() or 1) // _local_processes()))
    epoch, saved = start, start
    try:
        if start < epochs and type(stack).compile is not Stack.compile:  # eager stacks: 0
            t0 = time.perf_counter()
            stack.compile(start)
            if compile_seconds is not None:
                compile_seconds += time.perf_counter() - t0
        for epoch in range(start, epochs):
            row = _train_epoch(stack, cfg, ds, out, epoch, bars, primary, feed)
            history.append(row)
            if not primary:
                continue
            append_line(out / "metrics.jsonl", json.dumps(row, allow_nan=False))
            if writer is not None:
                for key in TENSORBOARD_SCALARS:
                    if row.get(key) is not None:
                        writer.add_scalar(key, row[key], row["epoch"])
                writer.flush()
            # the run directory every save_every epochs: rewriting metrics.json and both
            # checkpoints is ~10 ms, which a 0.1 s full-batch epoch should not pay each time
            if (epoch + 1) % cfg["save_every"] == 0 or epoch + 1 == epochs:
                write_metrics()
                stack.save_state(out / "state.safetensors", epoch + 1)
                stack.save_model(out / "model.safetensors")
                atomic_write_json(out / "state.json", {
                    "epoch_completed": epoch + 1, "epochs": epochs, "model": cfg["model"],
                    "seed": cfg["seed"], "wall_seconds": wall()})
                saved = epoch + 1
    except KeyboardInterrupt:
        if not primary:
            return EXIT_INTERRUPTED
        print(f"interrupted during epoch {epoch + 1}; epoch {saved} is saved in {out}; "
              f"resume with: python -m {stack.name}.train --out {out} --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if writer is not None:
            writer.close()
        if feed is not None:
            feed.close()
    final = final_report(stack.logits, ds)  # every process: evaluation may be shared
    if not primary:
        return 0
    write_metrics(final)
    auc = "n/a" if final["test_auc"] is None else f"{final['test_auc']:.4f}"
    val = "" if final.get("val_acc") is None else f"val {final['val_acc']:.2f}% "
    print(f"done: train {final['train_acc']:.2f}% {val}test {final['test_acc']:.2f}% "
          f"(gap {final['gap_pp']:.2f} pp, test AUC {auc}, dedup test "
          f"{final['test_dedup']['accuracy']:.2f}%) -> {out}", file=sys.stderr)
    return 0


def _compile_seconds(out: Path, history: list[dict]) -> float | None:
    path = out / "metrics.json"
    if not path.exists():
        return 0.0
    m = read_json(path)
    if "compile_seconds" not in m:
        return None if history else 0.0
    return field(m, "compile_seconds", (int, float, type(None)), path)


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
