"""The console commands of ``[project.scripts]`` (pyproject.toml).

Each runs the same code as its ``python -m`` form -- the module's ``main`` through
``run_cli``, exactly as its ``if __name__ == "__main__"`` block does -- so the two can
never disagree:

    cifake-train --stack S ...    python -m {numpy_mlp,torch_cnn,jax_port}.train ...
    cifake-predict [--stack S]    python -m {numpy_mlp,torch_cnn,jax_port}.predict ...
    cifake-bench                  python -m bench.compare
    cifake-reproduce              python -m bench.studies.reproduce
    cifake-prepare                python -m data.prepare
    cifake-export                 python -m torch_cnn.export
    cifake-demo                   python -m cifake.demo

``cifake-train`` and ``cifake-predict`` only add the choice of stack; every other flag
(and ``--help`` after ``--stack``) is the stack's own.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from data.errors import UserError, run_cli
from core.flags import ArgumentParser
from data.errors import project_version
from .stacks import STACKS, stack_of_run

_ABOUT = {
    "train": ("Train a CIFAKE detector with one of the three stacks.",
              "cifake-train --stack torch --preset baseline --data cifake.zip --out runs/detector",
              None),
    "predict": ("P(FAKE) for images and folders with a trained run.",
                "cifake-predict --run runs/detector photos/ --output scores.csv",
                "the stack that trained --run (its config.json)"),
}


def _help_parser(kind: str) -> argparse.ArgumentParser:
    description, example, default = _ABOUT[kind]
    ap = ArgumentParser(
        prog=f"cifake-{kind}", description=description,
        epilog=f"example:\n  {example}\n\nevery other flag is the stack's: "
               f"cifake-{kind} --stack torch --help")
    ap.add_argument("--stack", choices=list(STACKS), required=default is None,
                    help="numpy = numpy_mlp, torch = torch_cnn, jax = jax_port"
                         + (f" (default: {default})" if default else ""))
    return ap


def _run_dir(argv: list[str]) -> str:
    ap = ArgumentParser(add_help=False)
    ap.add_argument("--run")
    ns, _ = ap.parse_known_args(argv)
    if not ns.run:
        raise UserError("--run RUN_DIR is required (cifake-predict --help)")
    return ns.run


def dispatch(kind: str, argv: list[str] | None = None) -> int:
    """``cifake-{kind} [--stack S] ARGS`` -> ``<stack>.{kind}.main(ARGS)``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = ArgumentParser(prog=f"cifake-{kind}", add_help=False, allow_abbrev=False)
    pre.add_argument("--stack", choices=list(STACKS))
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    ns, rest = pre.parse_known_args(argv)
    if ns.stack is None:
        if ns.help:
            _help_parser(kind).print_help()
            return 0
        if kind == "predict":
            ns.stack = stack_of_run(_run_dir(rest))
        else:
            raise UserError(f"--stack is required: {', '.join(STACKS)} (cifake-{kind} --help)")
    module = importlib.import_module(f"{STACKS[ns.stack]}.{kind}")
    return module.main(rest + (["--help"] if ns.help else []))


def train() -> None:
    run_cli(lambda argv: dispatch("train", argv), prog="cifake-train")


def predict() -> None:
    run_cli(lambda argv: dispatch("predict", argv), prog="cifake-predict")


def bench() -> None:
    from bench import compare
    run_cli(compare.main, prog=compare.PROG)


def reproduce() -> None:
    from bench.studies import reproduce as r
    run_cli(r.main, prog="bench.studies.reproduce")


def prepare() -> None:
    p = importlib.import_module("data.prepare")  # `data.prepare` the attribute is a function
    run_cli(p.main, prog="data.prepare")


def export() -> None:
    from torch_cnn import export as e
    run_cli(e.main, prog="torch_cnn.export")


def demo() -> None:
    from . import demo as d
    run_cli(d.main, prog="cifake.demo")
