"""The original project's four MLP configurations (see README for how they were tuned).

Units: ``lr`` is lr0 of ``lr = lr0 / (1 + decay * epoch)`` (epoch 0-based, per epoch,
not per step); ``batch_size`` in images (None = full batch: one step per epoch);
``eval_every`` in epochs (test-set evaluation is skipped in between; the last
epoch is always evaluated).
"""
PRESETS = {
    # 2-layer 3072-7-1, full-batch gradient descent, 7000 epochs (original: 75.44% test)
    "mlp2-full": {"model": "mlp2", "batch_size": None, "epochs": 7000, "lr": 0.1,
                  "decay": 0.0, "eval_every": 100},
    # 4-layer 3072-20-7-5-1, full batch, 7000 epochs (original: 76.44% test)
    "mlp4-full": {"model": "mlp4", "batch_size": None, "epochs": 7000, "lr": 0.1,
                  "decay": 0.0, "eval_every": 100},
    # 2-layer, mini-batch, 100 epochs (original: 78.40% test)
    "mlp2-mini": {"model": "mlp2", "batch_size": 128, "epochs": 100, "lr": 0.01,
                  "decay": 0.01, "eval_every": 1},
    # 4-layer, mini-batch, 100 epochs (original: 81.94% test)
    "mlp4-mini": {"model": "mlp4", "batch_size": 128, "epochs": 100, "lr": 0.01,
                  "decay": 0.01, "eval_every": 1},
}
