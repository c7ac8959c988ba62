"""Train the NumPy MLP: ``python -m numpy_mlp.train [--preset NAME] [flags]``.

Gradient descent on the mean binary cross-entropy, by hand (see ``model``):
each epoch visits the training set in ``data.batching.epoch_order(seed, epoch)``
(reshuffled every epoch) in batches of ``--batch-size`` images, with learning
rate ``lr0 / (1 + decay * epoch)`` (epoch 0-based). ``--batch-size full`` is
full-batch gradient descent: one step per epoch over the whole training set,
in the natural order (the full-batch gradient is a sum over all images, so a
shuffle would change only rounding, at the cost of copying the set every epoch).

Configuration, resume, the run directory and the report are ``core.driver``'s; this
module supplies the MLP's own part. The resume point (state.safetensors) is the weights
of the last completed epoch under canonical names: all randomness derives from
(seed, epoch) and plain gradient descent has no optimizer state, so a resumed run ends
bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math
import platform

import numpy as np

from core import flags
from data import run_cli
from data.batching import batch_slices, epoch_order
from core.driver import NonFiniteLoss, Stack, train
from data.errors import UserError
from core.flags import check_fits_memory

from . import checkpoint
from .model import (MODELS, as_float_batch, backward, cost, forward, images_to_X, init_params,
                    layer_dims_for, lr_at, predict_logits, update)


# ------------------------------------------------------------------ the epoch
def take_columns(X: np.ndarray, idx) -> np.ndarray:
    """X[:, idx], gathering whole rows of the underlying C-ordered (m, n_in) array
    when X is its transpose (the layout ``images_to_X`` and the trainer use)."""
    if isinstance(idx, slice) or not X.flags.f_contiguous:
        return X[:, idx]
    return X.T[idx].T


def train_epoch(params: dict, X: np.ndarray, Y: np.ndarray, order: np.ndarray | None,
                batch_size: int | None, lr: float, on_step=None):
    """One epoch of gradient descent -> (params, mean_loss, acc).

    X: (n_in, n) float in [0, 1], or uint8 pixels (scaled per batch in the params'
    dtype); Y: (1, n) or (n,) of 0/1; order: permutation of range(n) to visit
    (None = natural order, no gather); batch_size: images per step (None = full
    batch); lr: this epoch's learning rate. mean_loss is the mean of the steps'
    mean BCE; acc (%) counts each image as classified by the weights *before*
    its step (accuracy "as trained"). ``on_step(images, loss)`` is called after
    every step. Raises NonFiniteLoss (1-based step) before applying a bad step.
    """
    dtype = params["W1"].dtype
    Y = np.asarray(Y).reshape(1, -1)
    n = Y.shape[1]
    total_loss, correct, steps = 0.0, 0, 0
    for step, s in enumerate(batch_slices(n, batch_size), 1):
        idx = s if order is None else order[s]
        Xb = as_float_batch(take_columns(X, idx), dtype)
        Yb = Y[:, idx].astype(dtype)
        # overflow/NaN is detected just below and reported as one error line,
        # so NumPy's RuntimeWarnings would only add noise
        with np.errstate(over="ignore", invalid="ignore"):
            logits, caches = forward(Xb, params)
            loss = cost(logits, Yb)
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        params = update(params, backward(logits, Yb, caches), lr)
        total_loss += loss
        correct += int(((logits > 0) == (Yb > 0.5)).sum())
        steps += 1
        if on_step is not None:
            on_step(Yb.shape[1], loss)
    return params, total_loss / max(steps, 1), 100.0 * correct / max(n, 1)


# ------------------------------------------------------------------ the stack
class NumpyMLP(Stack):
    name = "numpy_mlp"
    description = "Train the NumPy MLP detector on CIFAKE."
    models = MODELS
    default_model = "mlp2"

    def configure(self, cfg):
        if flags.device(cfg.get("device", "cpu")) == "gpu":
            raise UserError("--device gpu: numpy_mlp runs on the CPU only (its arrays are "
                            "NumPy's); use jax_port for a GPU")
        cfg["layer_dims"] = layer_dims_for(cfg["model"], cfg["hidden"])
        cfg["hidden"] = cfg["layer_dims"][1:-1]
        check_fits_memory(sum(a * b for a, b in zip(cfg["layer_dims"], cfg["layer_dims"][1:])),
                          np.dtype(cfg["dtype"]).itemsize, "--hidden")

    def build(self, cfg, ds):
        self.cfg, self.dtype = cfg, np.dtype(cfg["dtype"])
        self.params = init_params(cfg["layer_dims"], cfg["seed"], self.dtype)
        # uint8 columns converted per batch; full-batch mode converts once (float32: 1.2 GB
        # for the full 100k set) since every epoch uses all of it
        self.X = (images_to_X(ds.train.images, self.dtype) if cfg["batch_size"] is None
                  else ds.train.images.reshape(len(ds.train), -1).T)
        self.Y = ds.train.labels.reshape(1, -1)
        # where it ran, as the other stacks record it (NumPy computes on the CPU only)
        return {"device": "cpu", "device_kind": "cpu",
                "versions": {"python": platform.python_version(), "numpy": np.__version__}}

    def load(self, path):
        params, meta = checkpoint.load(path)
        epoch = int(meta.get("epoch_completed", "-1"))
        if epoch < 0 or meta["layer_dims"] != self.cfg["layer_dims"] \
                or params["W1"].dtype != self.dtype:
            raise UserError(f"{path}: does not match the run's config.json")
        self.params = params
        return epoch

    def train_epoch(self, epoch, progress):
        bs, n = self.cfg["batch_size"], self.Y.shape[1]
        lr = lr_at(self.cfg["lr"], self.cfg["decay"], epoch)
        order = None if bs is None else epoch_order(self.cfg["seed"], epoch, n)
        done = [0]

        def on_step(images, loss):
            done[0] += images
            progress(done[0], loss)
        self.params, loss, acc = train_epoch(self.params, self.X, self.Y, order, bs, lr, on_step)
        return {"lr": lr, "train_loss": loss, "train_acc": acc}

    def logits(self, split):
        return predict_logits(split.images.reshape(len(split), -1).T, self.params)

    def save_state(self, path, epoch):
        checkpoint.save(path, self.params, self.cfg["model"], self.cfg["layer_dims"],
                        {"epoch_completed": str(epoch)})

    def save_model(self, path):
        checkpoint.save(path, self.params, self.cfg["model"], self.cfg["layer_dims"])


def main(argv: list[str] | None = None) -> int:
    return train(NumpyMLP(), argv)


if __name__ == "__main__":
    run_cli(main, prog="numpy_mlp.train")
