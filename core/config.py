"""What a run is: every ``train`` command's flags, its configuration (defaults < preset <
explicit flags, each value checked by ``core.flags``), and what a resume may change.

- configuration: the family's defaults and the preset fed to ``parser.set_defaults``, so
  an explicit flag always wins; config.json records the result with ``run_format``;
- resume: ``--resume --out RUN`` reloads RUN/config.json; only ``--epochs``, the cache
  and the device/progress flags may be given with it, anything else (``--data``,
  ``--preset``, the recipe's flags, ``--val``, ...) or a run of another stack is refused
  before anything is written; a one-cycle run's ``--epochs`` cannot change either (its
  schedule spans the epochs it was started with); a run folder of another format
  (``core.rundir.RUN_FORMAT``) is refused with one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from data.degrade import check_probability
from data.errors import UserError

from . import flags
from .catalog import (DEFAULTS, DROPOUT_MODELS, MODELS, ONECYCLE_DEFAULTS, ONECYCLE_KEYS,
                      PRESETS, RECIPE_DEFAULTS, family_of, presets_for)
from .init import INIT_SCHEME
from .recipe import SCHEDULES, TTA_MODES, WARMUP_SHAPES
from .rundir import RUN_FORMAT, check_init_scheme, field, read_run_config

if TYPE_CHECKING:
    from .driver import Stack

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
    ap.add_argument("--out", type=flags.printable_path("--out"),
                    help="run directory (default: runs/<stack>-<preset or model>)")
    ap.add_argument("--preset", choices=sorted(presets), help="a configuration of the original "
                    "project (or v3-robust, v3-recipe, net4: beyond it); explicit flags override "
                    "its values")
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
    cfg["run_format"] = RUN_FORMAT
    return cfg


def resume_config(stack: Stack, given: dict, out: Path) -> dict:
    path = out / "config.json"
    cfg = read_run_config(path)
    if cfg.get("stack") != stack.name:
        raise UserError(f"--resume: {path} is a run of {cfg.get('stack')!r}, not of "
                        f"{stack.name}; resume it with its own stack")
    check_init_scheme(cfg, path)
    for key in REQUIRED:
        field(cfg, key, object, path)
    # every flag's value is recorded (an MLP run has none of the CNN recipe's)
    recorded = set(vars(build_parser(stack).parse_args([]))) - NOT_CONFIG
    if family_of(field(cfg, "model", str, path)) == "mlp":
        recorded -= set(RECIPE_DEFAULTS)
    for key in sorted(recorded):
        if key not in cfg:  # (its type is check_config's)
            raise UserError(f"{path}: '{key}' missing")
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
