"""Score images with a trained run of either family, in JAX.

Command: ``python -m jax_port.predict --run RUN_DIR IMAGE_OR_FOLDER... [--output FILE.csv]``
(``--help`` for the rest). Python::

    from jax_port.predict import Detector
    det = Detector.load("runs/detector")            # device="auto" | "cpu" | "gpu"
    det.predict(["a.jpg", pil_image, uint8_array])  # -> [{"index", "path", "p_fake", "label", ...}]

RUN_DIR may come from any stack of the family (numpy_mlp or jax_port for an MLP,
torch_cnn or jax_port for a CNN): the weights are read from RUN_DIR/model.safetensors
under canonical names. Inputs, batching, records and output files are
``core.predict``'s, the same in every stack.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data import run_cli
from data.errors import UserError
from core import flags
from core.predict import DetectorBase, predict_cli
from core.recipe import tta_of
from core.rundir import read_run_config

PROG = "python -m jax_port.predict"


def jax_device(device: str):
    """'auto' | 'cpu' | 'gpu' (or 'cuda') -> a jax.Device; a GPU asked for and absent is an
    error rather than a silent fall back to the CPU."""
    import jax
    d = flags.device(device)
    if d == "cpu":
        return jax.devices("cpu")[0]
    if d == "auto":
        return jax.devices()[0]  # JAX's default backend: its GPU when it has one
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        gpus = []
    if not gpus:
        raise UserError("--device gpu: JAX sees no GPU (use --device cpu or auto; a GPU "
                        "needs JAX's CUDA build)")
    return gpus[0]


def _bucket(n: int) -> int:
    """Batch sizes are padded to a power of two: each distinct shape is compiled once,
    so a page or script that scores 1, 3, 7, ... images reuses a handful of programs."""
    return 1 << max(0, (n - 1).bit_length())


class Detector(DetectorBase):
    """A trained run of either family (any stack's), scoring images with JAX."""

    stack = "jax_port"

    def __init__(self, step_cfg, variables, run_dir, config: dict, device):
        super().__init__(run_dir, config, str(device))
        self.step_cfg, self.variables, self._device = step_cfg, variables, device

    @classmethod
    def load(cls, run_dir, device: str = "auto") -> "Detector":
        run = Path(run_dir)
        if not run.is_dir():
            raise UserError(f"--run {run}: not a directory")
        cfg = read_run_config(run / "config.json")
        import jax
        if cfg.get("dtype") == "float64":  # an MLP trained in float64 is scored in float64
            jax.config.update("jax_enable_x64", True)
        dev = jax_device(device)
        from . import checkpoint
        from .steps import StepConfig
        spec, variables, _ = checkpoint.load(run / "model.safetensors", cfg.get("model"))
        # the weights' dtype (any parameter's: net4's nest by module)
        dtype = np.asarray(jax.tree_util.tree_leaves(variables["params"])[0]).dtype
        step_cfg = StepConfig.of(spec, dtype=dtype, tta=tta_of(cfg, run / "config.json"))
        return cls(step_cfg, jax.device_put(variables, dev), run, cfg, dev)

    def p_fake_batch(self, images: np.ndarray) -> np.ndarray:
        import jax

        from . import steps
        n = len(images)
        b = _bucket(n)
        if b > n:
            images = np.concatenate([images, np.zeros((b - n,) + images.shape[1:], images.dtype)])
        with jax.default_device(self._device):
            logits = np.asarray(steps.logits(self.step_cfg, self.variables, images),
                                np.float64)[:n]
        return 0.5 * (1.0 - np.tanh(logits / 2))  # 1 - sigmoid(logit), no overflow


def main(argv: list[str] | None = None) -> int:
    return predict_cli(argv, PROG, "P(FAKE) for images with a trained run, in JAX.",
                       Detector.load)


if __name__ == "__main__":
    run_cli(main, prog="jax_port.predict")
