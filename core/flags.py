"""The flag vocabulary of every stack's ``train``: one checker per value.

Each checker takes the command-line string *or* the typed value from a run's
config.json and returns the typed value, or raises a one-line UserError naming the flag,
so a value is checked the same way whether it was typed or read back for --resume.
"""
from __future__ import annotations

import argparse
import math
import os

from data.errors import UserError, one_line, project_version

SEED_LIMIT = 2**32          # NumPy's SeedSequence takes any int >= 0; 32 bits is the contract
MAX_EPOCHS = 1_000_000
MAX_BATCH = 10_000_000      # more than any split holds: one batch of everything
MAX_SUBSET = 10_000_000
MAX_HIDDEN = 65_536         # units per MLP hidden layer (3072 x 65536 float64 = 1.6 GB)
MAX_THREADS = 4_096
MAX_WORKERS = 256
MAX_DEVICES = 65_536        # devices of one data-parallel training (a large pod)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that shows each flag's default, and keeps the epilog's line breaks so its
    example stays copy-pastable. A default of None/False is left out (it means 'not
    given' or 'off', which the help text already says), as is one the help text names."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or "default" in text.lower()
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse without prefix matching (``--batch`` is not ``--batch-size``), whose errors
    raise UserError: one line and exit 2 through run_cli, no usage dump; whose --help shows
    defaults; and with --version on every command."""

    def __init__(self, *a, **kw):
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)
        if self.add_help:
            self.add_argument("--version", action="version",
                              version=f"%(prog)s {project_version()}")

    def error(self, message: str):
        raise UserError(message)


def integer(name: str, lo: int, hi: int):
    """An int in [lo, hi]."""
    def check(v) -> int:
        if isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise UserError(f"{name} must be an integer, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{name} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            raise UserError(f"{name} must be {kind}, at most {hi:,}, got {v}")
        return v
    return check


def number(name: str, strictly_positive: bool = False):
    """A finite float >= 0 (> 0 when ``strictly_positive``)."""
    def check(v) -> float:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise UserError(f"{name} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(v) or v < 0 or (strictly_positive and v == 0):
            kind = "positive" if strictly_positive else "non-negative"
            raise UserError(f"{name} must be a finite {kind} number, got {v}")
        return float(v)
    return check


def number_in(name: str, lo: float, hi: float, hi_inclusive: bool = False):
    """A finite float in [lo, hi) (lo >= 0), or [lo, hi] with ``hi_inclusive``."""
    base = number(name)

    def check(v) -> float:
        v = base(v)
        if not (lo <= v <= hi if hi_inclusive else lo <= v < hi):
            raise UserError(f"{name} must be in [{lo:g}, {hi:g}{']' if hi_inclusive else ')'}, "
                            f"got {v:g}")
        return v
    return check


seed = integer("--seed", 0, SEED_LIMIT - 1)
epochs = integer("--epochs", 1, MAX_EPOCHS)
subset = integer("--subset", 1, MAX_SUBSET)
val = integer("--val", 0, MAX_SUBSET)
val_seed = integer("--val-seed", 0, SEED_LIMIT - 1)
eval_every = integer("--eval-every", 1, MAX_EPOCHS)
save_every = integer("--save-every", 1, MAX_EPOCHS)
lr = number("--lr", strictly_positive=True)
decay = number("--decay")
threads = integer("--threads", 1, MAX_THREADS)
workers = integer("--workers", 0, MAX_WORKERS)
devices = integer("--devices", 1, MAX_DEVICES)
_batch = integer("--batch-size", 1, MAX_BATCH)


def batch_size(v) -> int | None:
    """--batch-size N, or 'full' (None in config.json): full-batch gradient descent."""
    if v is None or (isinstance(v, str) and v.strip().lower() == "full"):
        return None
    return _batch(v)


def hidden(v) -> list[int] | None:
    """--hidden 20,7,5 (config.json: [20, 7, 5]); None = the model's own layout."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = [int(t) for t in v.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--hidden must be comma-separated integers like 20,7,5, "
                            f"got {v!r}") from None
    if not isinstance(v, list) or not v:
        raise UserError(f"--hidden must be comma-separated integers like 20,7,5, got {v!r}")
    return [integer("--hidden", 1, MAX_HIDDEN)(h) for h in v]


def printable_path(name: str):
    """A path printed back to the user (in messages, in the resume command): control
    characters such as a newline or a tab are refused, since they would split or garble
    the very line that names it (and a pasted command would not find the folder)."""
    def check(v) -> str:
        v = str(v)
        if not v.isprintable():
            raise UserError(f"{name} must not contain control characters (a newline, a tab, "
                            f"...), got {one_line(repr(v))}")
        return v
    return check


def choice(name: str, options):
    def check(v):
        if v not in options:
            raise UserError(f"{name} must be one of {', '.join(map(str, options))}, got {v!r}")
        return v
    return check


def optional_str(name: str):
    def check(v):
        if v is not None and not isinstance(v, str):
            raise UserError(f"{name} must be a path, got {v!r}")
        return v
    return check


def boolean(name: str):
    def check(v):
        if not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {v!r}")
        return v
    return check


def check_fits_memory(n_params: int, bytes_per_param: int, what: str) -> None:
    """Refuse a model whose weights (plus gradients and a step's temporaries, about four
    copies) cannot fit in this machine's memory, before anything is allocated."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = 4 * n_params * bytes_per_param
    if need > phys:
        raise UserError(f"{what}: {n_params:,} parameters need about {need / 2**30:.1f} GiB, "
                        f"more than this machine's {phys / 2**30:.1f} GiB of memory")


DEVICES = ("auto", "cpu", "gpu")


def device(v) -> str:
    """--device: auto | cpu | gpu, the one vocabulary of every command ('cuda' is a synonym
    of gpu, any case). A device a run recorded ('cuda', 'cpu:0', 'gpu:0') reads back as
    its kind, so a resumed run stays on the kind of device it was trained on. Every command
    uses the first device of its kind, so an index other than 0 is refused rather than
    ignored (CUDA_VISIBLE_DEVICES picks which GPU is first)."""
    if not isinstance(v, str):
        raise UserError(f"--device must be one of auto, cpu, gpu, got {v!r}")
    d, sep, index = v.strip().lower().partition(":")
    d = "gpu" if d == "cuda" else d
    if d in ("cpu", "gpu") and index.isdigit() and index != "0":
        pick = f"CUDA_VISIBLE_DEVICES={index} with " if d == "gpu" else ""
        raise UserError(f"--device {v!r}: a device index is not supported, every command uses "
                        f"the first {d}; use {pick}--device {d}")
    if d not in DEVICES or (sep and (index != "0" or d == "auto")):
        raise UserError(f"--device {v!r}: choose auto, cpu or gpu (cuda is the same as gpu)")
    return d


def positive_int(name: str):
    """An int >= 1 (tools' counts and limits)."""
    return integer(name, 1, 2**62)


def optional(check):
    """``check``, or None (the flag's 'not set')."""
    return lambda v: None if v is None else check(v)
