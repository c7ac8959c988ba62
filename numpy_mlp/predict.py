"""Score images with a trained MLP: ``python -m numpy_mlp.predict --run RUN_DIR IMAGE... [--json]``.

Loads RUN_DIR/config.json and RUN_DIR/model.safetensors (canonical MLP names, so a
JAX-port MLP run works too). For each image prints ``path  P(FAKE)  verdict``
(FAKE when P(FAKE) >= 0.5), adding "(resized from WxH)" when the image was not
32x32. A file that cannot be read gets its own error line on stderr; the others
are still scored, and the exit status is 1 if any failed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data import run_cli
from data.errors import UserError
from data.images import score_images
from data.flags import ArgumentParser
from data.rundir import read_json

from . import checkpoint
from .model import forward, images_to_X, sigmoid

PROG = "numpy_mlp.predict"


def load_run(run_dir) -> tuple[dict, dict]:
    """(params, config) of a run directory, validated."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run: {run} is not a directory")
    cfg = read_json(run / "config.json")
    params, meta = checkpoint.load(run / "model.safetensors")
    if meta["layer_dims"][0] != 32 * 32 * 3 or meta["layer_dims"][-1] != 1:
        raise UserError(f"{run / 'model.safetensors'}: layer_dims {meta['layer_dims']} do not "
                        f"map a 32x32x3 image to one logit")
    # config.json and the weights must describe the same network: refuse, don't guess
    if cfg.get("model") != meta.get("model") or (
            "layer_dims" in cfg and list(cfg["layer_dims"]) != meta["layer_dims"]):
        raise UserError(f"{run}: config.json describes model {cfg.get('model')!r} "
                        f"{cfg.get('layer_dims', '')}, but model.safetensors holds "
                        f"{meta.get('model')!r} {meta['layer_dims']}")
    return params, cfg


def p_fake(params: dict, images: np.ndarray) -> np.ndarray:
    """P(FAKE) = 1 - sigmoid(logit), shape (B,), for uint8 images (B, 32, 32, 3); one
    forward pass over the batch, in float64."""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    logit = forward(images_to_X(images, np.float64), p64)[0]
    return sigmoid(-logit)[0]  # 1 - sigmoid(z) = sigmoid(-z), exact for any z


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=PROG, description="P(FAKE) of each image under a trained NumPy MLP.")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    ap.add_argument("images", nargs="+", metavar="IMAGE")
    args = ap.parse_args(argv)
    params, _ = load_run(args.run)

    return score_images(args.images, lambda batch: p_fake(params, batch), args.json)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
