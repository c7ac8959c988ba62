"""The run directory: preparing it, locking it for the life of a training, and reading
its JSON files back (bounded and type-checked).

Contract (numpy_mlp, torch_cnn and jax_port alike)::

    RUN_DIR/config.json        the resolved configuration (stack, model, preset, every hyperparameter)
    RUN_DIR/metrics.json       {"history": [per-epoch dicts], "final": {...}, "complete": bool,
                               "wall_seconds": float}
    RUN_DIR/metrics.jsonl      the same history rows, one JSON object per line, appended each epoch
    RUN_DIR/model.safetensors  weights under canonical names (see each stack's README section);
                               metadata: {"format": FORMAT, "family": "mlp"|"cnn", "model": NAME}
    RUN_DIR/state.safetensors  what --resume needs: the weights and optimizer tensors of the last
                               completed epoch, that epoch in its metadata (one atomic file)
    RUN_DIR/state.json         {"epoch_completed", "epochs", "model", "seed", "wall_seconds"}
    RUN_DIR/.lock              holds the pid of the training that has the folder
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from data.errors import DataError, UserError
from data.images import read_file_bounded

RUN_FILES = ("config.json", "metrics.json", "metrics.jsonl", "model.safetensors",
             "state.safetensors", "state.json")
LOCK = ".lock"
MAX_JSON_BYTES = 64 * 2**20  # a 7000-epoch history is ~2 MB; more is not a run file
_held: dict[Path, int] = {}  # run directory -> fd of its lock, kept open for the process


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a regular file of bounded size (a FIFO or /dev/zero in its place
    is refused up front, not read), or a one-line UserError naming the file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: missing")
    try:
        data = read_file_bounded(str(path), max_bytes)
    except DataError as e:
        raise UserError(str(e)) from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def field(obj: dict, key: str, types, path, required: bool = True, default=None):
    """``obj[key]``, checked to be one of ``types`` (bool never counts as a number)."""
    if key not in obj:
        if required:
            raise UserError(f"{path}: '{key}' missing")
        return default
    v = obj[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise UserError(f"{path}: '{key}' has the wrong type ({v!r})")
    if not isinstance(v, types):
        raise UserError(f"{path}: '{key}' has the wrong type ({type(v).__name__} {v!r})")
    return v


def weights_digest(run_dir: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of the run's model.safetensors: what names the
    weights a result was computed from (a battery, a real-photo check)."""
    h = hashlib.sha256()
    with open(Path(run_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_history(path: Path) -> tuple[list[dict], float]:
    """(history, wall_seconds) of a metrics.json; every row a dict with a positive int epoch."""
    m = read_json(path)
    history = field(m, "history", list, path)
    for row in history:
        if not isinstance(row, dict) or isinstance(row.get("epoch"), bool) \
                or not isinstance(row.get("epoch"), int) or row["epoch"] < 1:
            raise UserError(f"{path}: a history entry without a positive integer 'epoch'")
    wall = field(m, "wall_seconds", (int, float), path, required=False, default=0.0)
    return history, float(wall)


RUN_FORMAT = 2  # config.json's "run_format": what this version writes, and all it reads


def read_run_config(path: str | os.PathLike) -> dict:
    """A run's config.json, refused with one line when it is of another run format (a
    folder written by another version: its keys and their meaning may differ)."""
    cfg = read_json(path)
    if cfg.get("run_format") != RUN_FORMAT:
        raise UserError(f"{path}: a run folder of run format {cfg.get('run_format', 1)!r}, "
                        f"this version reads format {RUN_FORMAT} only; train it again with "
                        f"this version, or use the version that wrote it")
    return cfg


def check_init_scheme(cfg: dict, config_path: str | os.PathLike) -> None:
    """Refuse to resume a run whose initial weights came from another init scheme: its
    continuation would silently belong to neither scheme's trajectory."""
    from .init import INIT_SCHEME
    if cfg.get("init") != INIT_SCHEME:
        raise UserError(f"--resume: {config_path} was started with init scheme "
                        f"{cfg.get('init')!r}, this version draws {INIT_SCHEME!r}; "
                        f"start a new run (another --out)")


def lock(out: Path) -> None:
    """Hold an exclusive lock on ``out`` until this process ends; a second training on
    the same folder gets a one-line error naming the holder's pid."""
    out = out.resolve()
    if out in _held:
        return
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot lock {out} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{out} is in use by another training (pid {holder}); wait for it "
                        f"to end or choose another --out") from None
    # the pid is only a note for the error above; the lock itself is the flock
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[out] = fd


def unlock(out: Path) -> None:
    fd = _held.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)


def prepare(out: str | os.PathLike, resume: bool, min_free_mb: int = 50) -> Path:
    """Create (fresh run) or find (--resume) the run directory, writable, with disk space,
    and lock it. A fresh run needs an empty folder; --resume needs a run's config.json."""
    out = Path(out)
    if resume and not os.path.lexists(out / "config.json"):
        raise UserError(f"--resume: {out} holds no run to resume (no config.json)")
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
    lock(out)
    # temp files of writes killed half-way (core.atomic's ".NAME.cifake-xxxx.tmp"): never
    # read, and the run is locked, so deleting them is safe; keeps killed-and-resumed runs tidy
    for stale in out.glob(".*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    free_mb = shutil.disk_usage(out).free / 2**20
    if free_mb < min_free_mb:
        raise UserError(f"output directory {out} has only {free_mb:.0f} MiB free "
                        f"(need at least {min_free_mb} MiB)")
    if not resume:
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if any(name in RUN_FILES for name in present):
            raise UserError(f"{out} already holds a run; pass --resume to continue it or "
                            f"choose another --out")
        if present:
            raise UserError(f"{out} is not empty ({', '.join(present[:3])}); a new run needs "
                            f"an empty or new folder")
    return out
