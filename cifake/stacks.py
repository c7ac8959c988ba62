"""Which stack scores a run directory, for the commands that accept any run."""
from __future__ import annotations

import importlib
from pathlib import Path

from data.errors import UserError
from core.rundir import read_run_config
# short name (what --stack takes) -> package
STACKS = {"numpy": "numpy_mlp", "torch": "torch_cnn", "jax": "jax_port"}


def stack_of_run(run_dir: str | Path) -> str:
    """The short name of the stack that trained ``run_dir`` (config.json's "stack")."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run {run}: not a directory")
    cfg = read_run_config(run / "config.json")
    for short, package in STACKS.items():
        if cfg.get("stack") == package:
            return short
    raise UserError(f"{run / 'config.json'}: 'stack' is {cfg.get('stack')!r}, not one of "
                    f"{', '.join(STACKS.values())}; give --stack")


def load_detector(run_dir: str | Path, stack: str | None = None, device: str = "auto"):
    """``<stack>.predict.Detector.load(run_dir, device)``; stack None = ``stack_of_run``."""
    stack = stack or stack_of_run(run_dir)
    if stack not in STACKS:
        raise UserError(f"--stack {stack!r}: choose {', '.join(STACKS)}")
    module = importlib.import_module(f"{STACKS[stack]}.predict")
    return module.Detector.load(run_dir, device)
