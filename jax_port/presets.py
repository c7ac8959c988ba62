"""The original project's seven rows, with the SAME names and values as the spec stacks'
presets (numpy_mlp.presets for the MLPs, torch_cnn.presets for the CNNs). Copied, not
imported (jax_port never imports another stack); tests/test_jax_port.py asserts equality.

Units: ``lr`` is the step size (MLP: lr0 of lr = lr0 / (1 + decay * epoch), epoch 0-based,
per epoch; CNN: Adam's constant step size); ``batch_size`` in images (None = full batch);
``epochs`` passes over the training set; ``eval_every`` in epochs (MLP rows only: the test
set is evaluated every K epochs and always at the last).
"""
# (numpy_mlp/presets.py explains how the spec's engineer chose lr/decay for these rows.)
MLP_PRESETS = {
    # 2-layer 3072-12-1, full-batch gradient descent, 7000 epochs (original: 75.44% test)
    "mlp2-full": {"model": "mlp2", "hidden": [12], "batch_size": None, "epochs": 7000, "lr": 0.04,
                  "decay": 0.0002, "eval_every": 100},
    # 4-layer 3072-20-7-5-1, full batch, 7000 epochs (original: 76.44% test)
    "mlp4-full": {"model": "mlp4", "batch_size": None, "epochs": 7000, "lr": 0.05,
                  "decay": 0.0002, "eval_every": 100},
    # 2-layer 3072-12-1, mini-batch, 100 epochs (original: 78.40% test)
    "mlp2-mini": {"model": "mlp2", "hidden": [12], "batch_size": 32, "epochs": 100, "lr": 0.0075,
                  "decay": 0.0, "eval_every": 1},
    # 4-layer, mini-batch, 100 epochs (original: 81.94% test)
    "mlp4-mini": {"model": "mlp4", "batch_size": 32, "epochs": 100, "lr": 0.0075,
                  "decay": 0.0, "eval_every": 1},
}

CNN_PRESETS = {
    # Adam (torch defaults), constant lr, batch 64 (original: 95.08% / 95.91% / 96.47% test)
    "baseline": {"model": "baseline", "epochs": 10, "batch_size": 64, "lr": 1e-3},
    "dropout": {"model": "dropout", "epochs": 25, "batch_size": 64, "lr": 1e-3},
    "v3": {"model": "v3", "epochs": 50, "batch_size": 64, "lr": 1e-3},
}

PRESETS = {**MLP_PRESETS, **CNN_PRESETS}

# Used when neither a preset nor a flag sets a value (the specs' defaults, per family).
MLP_DEFAULTS = {"epochs": 100, "batch_size": 128, "lr": 0.01, "decay": 0.0, "eval_every": 1,
                "dtype": "float32"}
CNN_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "decay": 0.0, "eval_every": 1,
                "dtype": "float32"}

# Augmentation (random crop 32 / padding 4 + horizontal flip) belongs to v3 only.
AUGMENTED_MODELS = ("v3",)
