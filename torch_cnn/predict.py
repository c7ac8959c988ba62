"""Score images with a trained CNN: ``python -m torch_cnn.predict --run RUN_DIR IMAGE... [--json]``.

Loads RUN_DIR/config.json (for the model name) and RUN_DIR/model.safetensors
(canonical CNN names: written by torch_cnn or the JAX port). Each image is
brought to 32x32 RGB by ``data.images.load_image_for_model``; one line per image:

    PATH  P(FAKE)=0.9731  FAKE  (resized from 640x480)

P(FAKE) = 1 - sigmoid(logit); verdict FAKE when P(FAKE) >= 0.5. ``--json``
prints a JSON list of {"path", "p_fake", "verdict", "resized", "original_size"}.
A file that cannot be read gets its own "error: ..." line on stderr; the others
are still scored, and the exit status is 1 if any failed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.errors import UserError, run_cli
from data.images import score_images
from data.flags import ArgumentParser
from data.rundir import read_json

from . import checkpoint
from .model import MODELS, build_model
from .pipeline import to_input

PROG = "python -m torch_cnn.predict"


def load_run(run_dir: str | Path) -> torch.nn.Module:
    """The model of a run directory, in eval mode on the CPU."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run {run}: not a directory")
    cfg = read_json(run / "config.json")
    name = cfg.get("model")
    if cfg.get("family", "cnn") != "cnn" or name not in MODELS:
        raise UserError(f"{run / 'config.json'}: model {name!r} is not a CNN of this family "
                        f"({', '.join(MODELS)})")
    model = build_model(name)
    checkpoint.load_into(run / "model.safetensors", model)
    return model.eval()


def p_fake(model: torch.nn.Module, images_u8_nhwc: np.ndarray) -> np.ndarray:
    """P(FAKE) per image (float64), = 1 - sigmoid(logit) = sigmoid(-logit)."""
    with torch.inference_mode():
        logits = model(to_input(torch.from_numpy(np.ascontiguousarray(images_u8_nhwc))))
    return torch.sigmoid(-logits.double()).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=PROG, description="P(FAKE) for images with a trained CIFAKE CNN.")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size/mode)")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = ap.parse_args(argv)
    model = load_run(args.run)

    return score_images(args.images, lambda batch: p_fake(model, batch), args.json)


if __name__ == "__main__":
    run_cli(main, prog="torch_cnn.predict")
