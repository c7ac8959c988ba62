"""The original project's seven rows: the numbers this product sets out to reproduce.

These are the *reference* figures quoted from the original write-up (test and
train accuracy in %, on the 20k CIFAKE test split), used only to print
differences next to what we measure; nothing here is a result of this project.
"""
from __future__ import annotations

# row name -> (family, description, epochs, original test %, original train %)
ORIGINAL = {
    "mlp2-full": ("mlp", "MLP 2-layer, full-batch", 7000, 75.44, 75.75),
    "mlp4-full": ("mlp", "MLP 4-layer, full-batch", 7000, 76.44, 76.64),
    "mlp2-mini": ("mlp", "MLP 2-layer, mini-batch", 100, 78.40, 80.56),
    "mlp4-mini": ("mlp", "MLP 4-layer, mini-batch", 100, 81.94, 86.82),
    "baseline": ("cnn", "CNN baseline", 10, 95.08, 99.39),
    "dropout": ("cnn", "CNN + Dropout", 25, 95.91, 99.89),
    "v3": ("cnn", "CNN v3: aug + BN + Dropout", 50, 96.47, 97.22),
}
ROWS = tuple(ORIGINAL)
