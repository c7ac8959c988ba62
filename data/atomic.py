"""Atomic files: every file a run writes goes to a temporary name in the same folder, is
fsynced and renamed, so a kill at any moment leaves either the previous file or the new
one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError
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
        with os.fdopen(fd, "wb") as f:
            maybe_fault(path, f, data)
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
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())
