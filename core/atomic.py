"""Atomic files: every file a run writes goes to a temporary name in the same folder, is
fsynced and renamed, so a kill at any moment leaves either the previous file or the new
one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import stat
import tempfile
from pathlib import Path

from data.errors import UserError
from .faults import maybe_fault


def fsync_dir(path: Path) -> None:
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


# Every temp file is named ".NAME.cifake-XXXXXXXX.tmp", beside NAME, and its writer holds
# an exclusive flock on it until the rename: one whose lock is free was left by a write
# that was killed (kill -9, a power cut), which no signal handler can clean up.
TEMP_TAG = "cifake-"


def _temp_pattern(path: Path) -> str:
    return f".{glob.escape(path.name)}.{TEMP_TAG}*.tmp"


def remove_stale_temps(path: Path) -> None:
    """Delete the temp files of ``path`` left by killed writes: ours by name, a regular
    file, and no live process holding its lock (a concurrent writer's file is kept)."""
    for stale in path.parent.glob(_temp_pattern(path)):
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: its writer lives
                os.unlink(stale)
        except OSError:
            pass
        finally:
            os.close(fd)


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path``, locked by this process. A cleaner may take one
    between its creation and the lock (it looks abandoned then): that one is dropped."""
    for _ in range(8):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMP_TAG}", suffix=".tmp",
                                   dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, "its temp files kept being removed by another process")


@contextlib.contextmanager
def _replacing(path: Path, mode: str, if_failed: str, newline: str | None = None):
    """A file object on a temp file beside ``path`` (mode 0666 minus the umask, as a plain
    open() would give), fsynced and renamed onto ``path`` when the block completes. Any
    failure removes the temp file and leaves the previous ``path`` untouched; an OS error
    becomes one UserError line ending in ``if_failed``. Temp files of ``path`` that killed
    writes left behind are removed first."""
    tmp = None
    try:
        remove_stale_temps(path)
        fd, tmp = _locked_temp(path)
        os.fchmod(fd, 0o666 & ~_umask())
        # surrogateescape: a file name that is not UTF-8 (os.fsdecode's lone surrogates)
        # is written back as its own bytes, the path a reader can open, instead of failing
        text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape",
                                       "newline": newline}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while the lock is held: never taken for abandoned
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); {if_failed}") from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    An OS failure (disk full mid-run, folder removed, quota) becomes a one-line
    UserError: the temp file is removed and the previous ``path`` is untouched, so a
    run can continue with --resume once the cause is fixed.
    """
    path = Path(path)
    with _replacing(path, "wb", "files already saved there are intact (fix the cause, "
                                "then continue with --resume)") as f:
        maybe_fault(path, f, data)
        f.write(data)


@contextlib.contextmanager
def atomic_text_writer(path: str | os.PathLike, newline: str | None = None):
    """A text file written as it goes (so its size need not fit in memory) that appears
    at ``path`` only when the ``with`` block completes, as ``atomic_write_bytes``. An
    exception or Ctrl-C inside the block leaves any previous ``path`` untouched. The temp
    file is created on entry, so an unwritable folder is refused before any work is done."""
    with _replacing(Path(path), "w", "nothing was written there", newline) as f:
        yield f


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file, flushed and fsynced: an append-only log that readers
    (pandas, plotting tools) may open while it grows. Not atomic -- a kill can leave half a
    last line -- so its owner rewrites it whole (``atomic_write_bytes``) when it resumes."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); files already saved "
                        f"there are intact (fix the cause, then continue with --resume)") \
            from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())
