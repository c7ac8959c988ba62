"""What the studies that train (reproduce, recipe, sweep) share: their flag types, and one
resumable way to run a stack's own training command into a run directory.

- ``parse_seeds("0,1,2") -> (0, 1, 2)``; ``epochs_scale`` and ``device``: argparse types.
- ``read_json_or_none(path)``: a file a study wrote or a run left half-done; ``None`` when it
  is missing or not a JSON object (a run that is not finished is resumed, not an error).
- ``run_or_resume(tag, stack, run_dir, fresh, log, ...)``: ``python -m <stack>.train`` into
  ``run_dir``, started with ``fresh`` or resumed from its last completed epoch; 'done',
  'skipped' (already complete) or 'failed'.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from core import flags
from data.errors import UserError


def epochs_scale(s: str) -> float:
    """``--epochs-scale``: a factor in (0, 1] applied to every run's epochs (a miniature)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epochs-scale must be a number, got {s!r}") from None
    if not (0 < v <= 1):
        raise argparse.ArgumentTypeError(f"--epochs-scale must be in (0, 1], got {v}")
    return v


def device(s: str) -> str:
    """``--device``: the stacks' one vocabulary (core.flags.device), as an argparse type."""
    try:
        return flags.device(s)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated seeds, each checked as ``--seed`` is; no repeats."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise UserError(f"--seeds must be comma-separated seeds like 0,1,2, got {text!r}")
    seeds = tuple(flags.seed(t) for t in parts)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def read_json_or_none(path: Path) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def launch(cmd: list[str], log: Path) -> int:
    """Run one training command to its end, its output appended to ``log``; its exit status."""
    with open(log, "a") as lf:
        lf.write(f"\n# {datetime.now(timezone.utc).isoformat()} {' '.join(cmd)}\n")
        lf.flush()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # the child got the same SIGINT and saves its last epoch
            raise


def run_or_resume(tag: str, stack: str, run_dir: Path, fresh: list[str], log: Path,
                  cache_dir: str | None = None, device: str | None = None) -> str:
    """Runs ``python -m <stack>.train`` into ``run_dir``: started with the ``fresh`` flags,
    or resumed from its last completed epoch when the folder already holds a run (its own
    config.json fixes the rest). Returns 'done', 'skipped' (already complete) or 'failed'."""
    m = read_json_or_none(run_dir / "metrics.json")
    if m and m.get("complete"):
        return "skipped"
    resume = (run_dir / "config.json").exists()
    cmd = [sys.executable, "-m", f"{stack}.train", *(["--resume"] if resume else fresh),
           "--out", str(run_dir), "--no-progress"]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    if device and stack != "numpy_mlp":
        cmd += ["--device", device]
    print(f"[{tag}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    rc = launch(cmd, log)
    status = "done" if rc == 0 else "failed"
    print(f"[{tag}] {status} in {time.time() - t0:.0f} s (log: {log})", file=sys.stderr,
          flush=True)
    return status
