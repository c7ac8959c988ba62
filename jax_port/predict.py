"""Score images with a trained run: ``python -m jax_port.predict --run RUN_DIR IMAGE... [--json]``.

RUN_DIR may come from any stack of the family (numpy_mlp or jax_port for an MLP,
torch_cnn or jax_port for a CNN): the weights are read from RUN_DIR/model.safetensors
under canonical names. One line per image: path, P(FAKE) (4 decimals), verdict
(P(FAKE) >= 0.5 -> FAKE), "(resized from WxH)" for images that are not 32x32.
An unreadable image gets its own error line on stderr; the others are still scored,
and the exit status is 1 if any failed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data import run_cli
from data.images import score_images
from data.flags import ArgumentParser
from data.rundir import read_json

PROG = "jax_port.predict"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog=f"python -m {PROG}", description="P(FAKE) for each image, with a JAX model.")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("images", nargs="+", metavar="IMAGE")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = read_json(run / "config.json")
    if cfg.get("dtype") == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)

    from . import checkpoint
    from .steps import Trainer
    spec, variables, meta = checkpoint.load(run / "model.safetensors", cfg.get("model"))
    dtype = np.asarray(variables["params"][next(iter(variables["params"]))]["kernel"]).dtype
    trainer = Trainer(spec, lr=1.0, batch_size=1, dtype=dtype)

    def p_fake_batch(batch):
        logits = np.asarray(trainer.logits(variables, batch), np.float64)
        return 0.5 * (1.0 - np.tanh(logits / 2))  # 1 - sigmoid(logit), no overflow
    return score_images(args.images, p_fake_batch, args.json)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
