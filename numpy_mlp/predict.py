"""Score images with a trained MLP.

Command: ``python -m numpy_mlp.predict --run RUN_DIR IMAGE_OR_FOLDER... [--output FILE.csv]``
(``--help`` for the rest). Python::

    from numpy_mlp.predict import Detector
    det = Detector.load("runs/mlp")
    det.predict(["a.jpg", pil_image, uint8_array])  # -> [{"index", "path", "p_fake", "label", ...}]

RUN_DIR holds config.json and model.safetensors (canonical MLP names, so a JAX-port
MLP run works too). Inputs, batching, records and output files are ``core.predict``'s,
the same in every stack. NumPy runs on the CPU only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data import run_cli
from data.errors import UserError
from core.architecture import check_layer_dims
from core import flags
from core.predict import DetectorBase, predict_cli
from core.rundir import read_run_config

from . import checkpoint
from .layers import sigmoid
from .model import forward, images_to_X

PROG = "python -m numpy_mlp.predict"


def load_run(run_dir) -> tuple[dict, dict]:
    """(params, config) of a run directory, validated."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run: {run} is not a directory")
    cfg = read_run_config(run / "config.json")
    params, meta = checkpoint.load(run / "model.safetensors")
    if meta["layer_dims"][0] != 32 * 32 * 3 or meta["layer_dims"][-1] != 1:
        raise UserError(f"{run / 'model.safetensors'}: layer_dims {meta['layer_dims']} do not "
                        f"map a 32x32x3 image to one logit")
    if "layer_dims" in cfg:
        check_layer_dims(cfg["layer_dims"], str(run / "config.json"))
    # config.json and the weights must describe the same network: refuse, don't guess
    if cfg.get("model") != meta.get("model") or (
            "layer_dims" in cfg and cfg["layer_dims"] != meta["layer_dims"]):
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


class Detector(DetectorBase):
    """A trained MLP run (either MLP stack's), scoring images with NumPy."""

    stack = "numpy_mlp"

    def __init__(self, params: dict, run_dir, config: dict):
        super().__init__(run_dir, config, "cpu")
        # cast once, not per batch: scoring runs in float64 whatever the training dtype
        self.params = {k: v.astype(np.float64) for k, v in params.items()}

    @classmethod
    def load(cls, run_dir, device: str = "auto") -> "Detector":
        if flags.device(device) == "gpu":
            raise UserError("--device gpu: the NumPy MLP runs on the CPU only "
                            "(use --device cpu or auto)")
        params, cfg = load_run(run_dir)
        return cls(params, run_dir, cfg)

    def p_fake_batch(self, images: np.ndarray) -> np.ndarray:
        return p_fake(self.params, images)


def main(argv: list[str] | None = None) -> int:
    return predict_cli(argv, PROG, "P(FAKE) for images with a trained NumPy MLP.",
                       Detector.load)


if __name__ == "__main__":
    run_cli(main, prog="numpy_mlp.predict")
