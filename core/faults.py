"""Test-only fault injection for the kill-safety tests; inert unless its environment
variable is set, and no user-facing flag reaches it.

``CIFAKE_FAULT_KILL_IN_WRITE=NAME[@K]`` makes this process SIGKILL itself in the middle of
its K-th (default 1st) atomic write of a file named NAME: half of the temp file is written
and flushed, the rename has not happened. It simulates a power cut or an OOM kill during a
checkpoint write, so the tests can check that the previous file survives intact and
--resume still works.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

FAULT_ENV = "CIFAKE_FAULT_KILL_IN_WRITE"
_fault_writes: dict[str, int] = {}


def maybe_fault(path: Path, f, data: bytes) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if path.name != name:
        return
    _fault_writes[name] = _fault_writes.get(name, 0) + 1
    if _fault_writes[name] != int(nth or 1):
        return
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
