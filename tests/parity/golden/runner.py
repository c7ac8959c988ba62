"""Train every preset of one stack for a few epochs on a small fixed subset, through the
stack's public ``train`` entry point, in one process (one import of the framework):
``python -m tests.parity.golden.runner STACK DATA CACHE OUT``. The golden test compares the final
weights with the fingerprints recorded in tests/parity/golden/weights.json."""
from __future__ import annotations

import importlib
import sys

STACK_PRESETS = {
    "numpy_mlp": ("mlp2-full", "mlp4-full", "mlp2-mini", "mlp4-mini"),
    "torch_cnn": ("baseline", "dropout", "v3", "v3-robust", "v3-recipe"),
    "jax_port": ("mlp2-full", "mlp4-full", "mlp2-mini", "mlp4-mini",
                 "baseline", "dropout", "v3", "v3-robust", "v3-recipe"),
}
# small enough for the suite, large enough that every layer, the optimizer, augmentation,
# dropout and the one-cycle schedule all act
ARGS = ("--subset", "100", "--epochs", "2", "--seed", "3", "--no-progress")


def main(stack: str, data: str, cache: str, out: str) -> int:
    train = importlib.import_module(f"{stack}.train")
    for preset in STACK_PRESETS[stack]:
        rc = train.main(["--preset", preset, "--data", data, "--cache-dir", cache,
                         "--out", f"{out}/{stack}-{preset}", *ARGS])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
