"""Score images with a trained CNN.

Command: ``python -m torch_cnn.predict --run RUN_DIR IMAGE_OR_FOLDER... [--output FILE.csv]``
(``--help`` for the rest). Python::

    from torch_cnn.predict import Detector
    det = Detector.load("runs/detector")            # device="auto" | "cpu" | "gpu"
    det.predict(["a.jpg", pil_image, uint8_array])  # -> [{"index", "path", "p_fake", "label", ...}]

RUN_DIR holds config.json (for the model name) and model.safetensors (canonical CNN
names: written by torch_cnn or the JAX port). Inputs, batching, records and output
files are ``core.predict``'s, the same in every stack. P(FAKE) = 1 - sigmoid(logit).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.errors import UserError, run_cli
from core.predict import DetectorBase, predict_cli
from core.recipe import tta_of
from core.rundir import read_run_config

from . import checkpoint
from .model import MODELS, build_model, with_tta
from .pipeline import resolve_device, to_input

PROG = "python -m torch_cnn.predict"


def load_run(run_dir: str | Path) -> torch.nn.Module:
    """The model of a run directory, in eval mode on the CPU, with the run's test-time
    augmentation (config.json's "tta"; runs without the key had none)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"--run {run}: not a directory")
    cfg = read_run_config(run / "config.json")
    name = cfg.get("model")
    if cfg.get("family", "cnn") != "cnn" or name not in MODELS:
        raise UserError(f"{run / 'config.json'}: model {name!r} is not a CNN of this family "
                        f"({', '.join(MODELS)})")
    tta = tta_of(cfg, run / "config.json")
    model = build_model(name)
    checkpoint.load_into(run / "model.safetensors", model)
    return with_tta(model, tta).eval()


def p_fake(model: torch.nn.Module, images_u8_nhwc: np.ndarray) -> np.ndarray:
    """P(FAKE) per image (float64), = 1 - sigmoid(logit) = sigmoid(-logit)."""
    dev = next(model.parameters()).device
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images_u8_nhwc)).to(dev)
        logits = model(to_input(x))
    return torch.sigmoid(-logits.double()).cpu().numpy()


class Detector(DetectorBase):
    """A trained CNN run (either CNN stack's), scoring images with PyTorch."""

    stack = "torch_cnn"

    def __init__(self, model: torch.nn.Module, run_dir, config: dict, device: torch.device):
        super().__init__(run_dir, config, str(device))
        self.model = model

    @classmethod
    def load(cls, run_dir, device: str = "auto") -> "Detector":
        dev = resolve_device(device)
        model = load_run(run_dir).to(dev)
        return cls(model, run_dir, read_run_config(Path(run_dir) / "config.json"), dev)

    def p_fake_batch(self, images: np.ndarray) -> np.ndarray:
        return p_fake(self.model, images)


def main(argv: list[str] | None = None) -> int:
    return predict_cli(argv, PROG, "P(FAKE) for images with a trained CIFAKE CNN (PyTorch).",
                       Detector.load)


if __name__ == "__main__":
    run_cli(main, prog="torch_cnn.predict")
