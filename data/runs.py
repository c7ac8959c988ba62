"""What every stack's ``train``/``predict`` share: the flag vocabulary, run directories,
atomic files, checked safetensors, and evaluation metrics.

Run directory contract (numpy_mlp, torch_cnn and jax_port alike)::

    RUN_DIR/config.json        the resolved configuration (stack, model, preset, every hyperparameter)
    RUN_DIR/metrics.json       {"history": [per-epoch dicts], "final": {...}, "complete": bool}
    RUN_DIR/model.safetensors  weights under canonical names (see each stack's README section);
                               metadata: {"format": FORMAT, "family": "mlp"|"cnn", "model": NAME}
    RUN_DIR/state.safetensors  what --resume needs beyond the weights (optimizer tensors)
    RUN_DIR/state.json         epoch completed, RNG/bookkeeping, as JSON

Every file is written to a temporary name in the same folder, fsynced and
renamed, so a kill at any moment leaves either the previous file or the new
one, never half of one. Nothing is ever unpickled.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT = "cifake-detector/1"


# ------------------------------------------------------------------ flags
def positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return parse


def nonneg_float(name: str, strictly_positive: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0 or (strictly_positive and v == 0):
            kind = "positive" if strictly_positive else "non-negative"
            raise argparse.ArgumentTypeError(f"{name} must be a finite {kind} number, got {s}")
        return v
    return parse


def batch_size_arg(s: str) -> int | None:
    """--batch-size N, or 'full' for full-batch mode (None)."""
    if s.lower() == "full":
        return None
    return positive_int("--batch-size")(s)


def project_version() -> str:
    """The installed distribution's version (pyproject's), for every command's --version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cifake-detector")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed with pip)"


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
    """argparse whose errors raise UserError: one line and exit 2 through run_cli, no usage
    dump; whose --help shows defaults; and with --version on every command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument("--version", action="version",
                              version=f"%(prog)s {project_version()}")

    def error(self, message: str):
        raise UserError(message)


def common_parser(prog: str, description: str, presets: dict, decay: bool) -> argparse.ArgumentParser:
    """The flag vocabulary all three stacks share. Defaults of None mean 'from the preset'."""
    first = next((p for p in ("baseline", "mlp4-mini") if p in presets), sorted(presets)[0])
    ap = ArgumentParser(prog=prog, description=description, epilog=(
        f"example:\n  {prog if prog.startswith('python') else 'python -m ' + prog} --preset {first} --data cifake.zip --out runs/detector"))
    ap.add_argument("--data", help="Kaggle cifake zip or its extracted folder "
                                   "(default: $CIFAKE_PATH, then a kagglehub download)")
    ap.add_argument("--cache-dir", help="decoded-image cache folder (default: ~/.cache/cifake-detector)")
    ap.add_argument("--out", help="run directory (default: runs/<stack>-<preset or model>)")
    ap.add_argument("--preset", choices=sorted(presets), help="a configuration of the original "
                    "project; explicit flags override its values")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    ap.add_argument("--epochs", type=positive_int("--epochs"), help="passes over the training set")
    ap.add_argument("--batch-size", type=batch_size_arg,
                    help="images per step, or 'full' for full-batch gradient descent")
    ap.add_argument("--lr", type=nonneg_float("--lr", strictly_positive=True),
                    help="learning rate (lr0 of the decay schedule where there is one)")
    if decay:
        ap.add_argument("--decay", type=nonneg_float("--decay"),
                        help="lr = lr0 / (1 + decay * epoch); 0 keeps lr constant")
    ap.add_argument("--subset", type=positive_int("--subset"),
                    help="use only the first N images per class of each split (quick runs)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last completed epoch")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def resolve_config(args: argparse.Namespace, presets: dict, defaults: dict) -> dict:
    """defaults < preset < explicit flags. Returns a plain dict (JSON-able)."""
    cfg = dict(defaults)
    if args.preset:
        cfg.update(presets[args.preset])
        cfg["preset"] = args.preset
    for k, v in vars(args).items():
        if v is not None and k in cfg and k != "preset":
            cfg[k] = v
    return cfg


# ------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Test-only fault injection (tests/test_interrupts.py). Inert unless the environment
# variable is set; no user-facing flag reaches it. CIFAKE_FAULT_KILL_IN_WRITE=NAME[@K]
# makes this process SIGKILL itself in the middle of its K-th (default 1st) atomic write
# of a file named NAME: half of the temp file is written and flushed, the rename has not
# happened. It simulates a power cut / OOM kill during a checkpoint write, so the tests
# can check that the previous file survives intact and --resume still works.
FAULT_ENV = "CIFAKE_FAULT_KILL_IN_WRITE"
_fault_writes: dict[str, int] = {}


def _maybe_fault(path: Path, f, data: bytes) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if path.name != name:
        return
    _fault_writes[name] = _fault_writes.get(name, 0) + 1
    if _fault_writes[name] != int(nth or 1):
        return
    import signal
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    An OS failure (disk full mid-run, folder removed, quota) becomes a one-line
    UserError: the temp file is removed and the previous ``path`` is untouched, so a
    run can continue with --resume once the cause is fixed.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp creates 0600; a plain open() would give 0666 minus the umask, which is
        # what the user (a group sharing runs) expects of the renamed file
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            _maybe_fault(path, f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); files already saved "
                            f"there are intact (fix the cause, then continue with --resume)") \
                from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_text_writer(path: str | os.PathLike, newline: str | None = None):
    """A text file written as it goes (so its size need not fit in memory) that appears
    at ``path`` only when the ``with`` block completes: temp file in the same folder,
    fsync, rename, as ``atomic_write_bytes``. An exception or Ctrl-C inside the block
    removes the temp file and leaves any previous ``path`` untouched. The temp file is
    created on entry, so an unwritable folder is refused before any work is done."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); nothing was written "
                            f"there") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def check_init_scheme(cfg: dict, config_path: str | os.PathLike) -> None:
    """Refuse to resume a run whose initial weights came from another init scheme: its
    continuation would silently belong to neither scheme's trajectory."""
    from .init import INIT_SCHEME
    if cfg.get("init") != INIT_SCHEME:
        raise UserError(f"--resume: {config_path} was started with init scheme "
                        f"{cfg.get('init')!r}, this version draws {INIT_SCHEME!r}; "
                        f"start a new run (another --out)")


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except OSError as e:  # permission denied, a directory, an I/O error: not a JSON problem
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """NumPy arrays -> .safetensors, atomically."""
    from safetensors.numpy import save
    # np.ascontiguousarray turns a 0-d array into shape (1,); scalars such as BatchNorm's
    # num_batches_tracked must keep shape (), so only copy what is not C-contiguous.
    def contiguous(v):
        a = np.asarray(v)
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    data = save({k: contiguous(v) for k, v in tensors.items()},
                metadata={"format": FORMAT, **(metadata or {})})
    atomic_write_bytes(path, data)


def _open_safetensors(path: Path):
    from safetensors import safe_open
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb"):  # says "permission denied" instead of a parser's message
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise UserError(f"{path}: not a valid .safetensors file ({type(e).__name__}: {e})") \
            from None


def read_safetensors_header(path: str | os.PathLike
                            ) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """(name -> (shape, dtype name), metadata) of a .safetensors file, from its header
    alone: no tensor data is read, so a checkpoint padded with a huge tensor costs nothing."""
    path = Path(path)
    with _open_safetensors(path) as f:
        try:
            meta = dict(f.metadata() or {})
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (tuple(int(d) for d in sl.get_shape()), _dtype_name(sl.get_dtype()))
        except Exception as e:
            raise UserError(f"{path}: not a valid .safetensors file "
                            f"({type(e).__name__}: {e})") from None
    return header, meta


# safetensors' dtype codes -> NumPy names (the loader returns NumPy arrays of these)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
              "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _dtype_name(code: str) -> str:
    return _ST_DTYPES.get(str(code).upper(), str(code).lower())


def load_safetensors(path: str | os.PathLike,
                     expected: dict[str, tuple[tuple[int, ...], str]] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a .safetensors file as NumPy arrays, validating names, shapes, dtypes and values.

    ``expected``: name -> (shape, dtype name or None). Missing, extra or mis-shaped
    tensors raise UserError naming the file and the tensor, checked from the header
    *before* any tensor is read. A floating tensor holding NaN or inf is refused too:
    no stack ever saves one (training stops at the first non-finite loss), so it can
    only be a corrupt or diverged file, and it would score every image as NaN.
    """
    path = Path(path)
    header, meta = read_safetensors_header(path)
    if expected is not None:
        missing = sorted(set(expected) - set(header))
        extra = sorted(set(header) - set(expected))
        if missing or extra:
            raise UserError(f"{path}: checkpoint does not fit this model "
                            f"(missing {missing[:4]}, unexpected {extra[:4]})")
        for k, (shape, dtype) in expected.items():
            got_shape, got_dtype = header[k]
            if got_shape != tuple(shape):
                raise UserError(f"{path}: tensor '{k}' has shape {got_shape}, "
                                f"this model needs {tuple(shape)}")
            if dtype is not None and got_dtype != dtype:
                raise UserError(f"{path}: tensor '{k}' has dtype {got_dtype}, expected {dtype}")
    try:
        with _open_safetensors(path) as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid .safetensors file ({type(e).__name__}: {e})") \
            from None
    for k, t in tensors.items():
        if t.dtype.kind == "f" and not np.isfinite(t).all():
            bad = int((~np.isfinite(t)).sum())
            raise UserError(f"{path}: tensor '{k}' holds {bad:,} non-finite values (NaN/inf): "
                            f"the file is corrupt or the run diverged")
    return tensors, meta


def check_uniform_float(path, tensors: dict[str, np.ndarray]) -> str:
    """All tensors float32, or all float64 (MLP checkpoints keep their training dtype).

    Returns the dtype name; otherwise a UserError naming the first offending tensor.
    """
    first = next(iter(tensors))
    want = str(tensors[first].dtype)
    for k, t in tensors.items():
        d = str(t.dtype)
        if d not in ("float32", "float64") or d != want:
            raise UserError(f"{path}: tensor '{k}' has dtype {d}; tensors must all be float32 "
                            f"or all float64 (tensor '{first}' is {want})")
    return want


def prepare_out_dir(out: str | os.PathLike, resume: bool, min_free_mb: int = 50) -> Path:
    """Create/validate the run directory *before* any training starts.

    Fails early when the folder is not writable or the disk is nearly full,
    when --resume is given without a run to resume, or when a finished or
    unrelated run would be overwritten without --resume.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out} is not writable ({e.strerror})") from None
    # temp files of writes killed half-way (atomic_write_bytes' ".NAME.xxxx.tmp"): never
    # read, so deleting them is safe; keeps killed-and-resumed runs tidy
    for stale in out.glob(".*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    free_mb = shutil.disk_usage(out).free / 2**20
    if free_mb < min_free_mb:
        raise UserError(f"output directory {out} has only {free_mb:.0f} MiB free "
                        f"(need at least {min_free_mb} MiB)")
    has_state = (out / "state.json").exists()
    if resume and not has_state:
        raise UserError(f"--resume: {out} holds no run to resume (no state.json)")
    if resume:
        # Refuse a damaged or foreign resume point before any work, whether or not the
        # stack reads state.json later (read_json raises a one-line UserError).
        read_json(out / "state.json")
    if not resume and (has_state or (out / "metrics.json").exists()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        f"another --out")
    return out


# ------------------------------------------------------------------ metrics
def bce_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against 0/1 labels, computed stably."""
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction). Label 1 is positive."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_report(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy (%), BCE loss, ROC-AUC and confusion matrix from logits of P(REAL).

    Non-finite logits (NaN/inf: weights that diverged, e.g. a learning rate far too large
    when an epoch has a single step, so the training loss never saw it) raise UserError:
    no number in such a report means anything, and metrics.json (strict JSON) could not
    hold it. Callers evaluate before saving an epoch, so the last good checkpoint stays.
    """
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    bad = int((~np.isfinite(z)).sum())
    if bad:
        raise UserError(f"evaluation produced {bad:,} non-finite logits (NaN/inf) out of "
                        f"{len(z):,}: the model diverged; try a smaller --lr")
    pred = (z > 0).astype(np.int64)  # sigmoid(z) > 0.5
    cm = np.zeros((2, 2), np.int64)
    np.add.at(cm, (y, pred), 1)
    auc = roc_auc(z, y)
    return {
        "accuracy": float(100.0 * (pred == y).mean()) if len(y) else float("nan"),
        "loss": bce_from_logits(z, y),
        "roc_auc": None if math.isnan(auc) else auc,
        # rows: true class, columns: predicted class, in label order (FAKE, REAL)
        "confusion": cm.tolist(),
        "n": int(len(y)),
    }
