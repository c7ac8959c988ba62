"""The NumPy MLP: parameters, forward, cost, backward, gradient-descent update.

Architecture (``L`` = number of weight layers)::

    mlp2: X -> LINEAR -> ReLU -> LINEAR -> logit            layer_dims [3072, 7, 1]
    mlp4: X -> [LINEAR -> ReLU] x 3 -> LINEAR -> logit      layer_dims [3072, 20, 7, 5, 1]

The network outputs one logit per image, the log-odds that the image is REAL
(label 1). The hidden sizes are the
original project's (7 and 20-7-5) and can be changed (``--hidden 20,7,5``).

Input: each (32, 32, 3) uint8 RGB image flattened in (H, W, C) order and scaled
to [0, 1] (pixels / 255), one image per *column*: X is (3072, m).

Parameters: ``{"W1", "b1", ..., "WL", "bL"}`` with ``Wl`` (n_l, n_{l-1}) and
``bl`` (n_l, 1), the canonical checkpoint names of the MLP family.
"""
from __future__ import annotations

import numpy as np

from data.batching import to_float
from core.architecture import mlp_layer_dims
from core.catalog import MLP_MODELS
from core.init import mlp_init

from .layers import (bce_cost, bce_grad, linear_backward, linear_forward, relu_backward,
                     relu_forward)

MODELS = MLP_MODELS
layer_dims_for = mlp_layer_dims  # the contract's (core.architecture)


def num_layers(params: dict) -> int:
    return len(params) // 2


def init_params(layer_dims: list[int], seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """He initialisation: Wl = randn(n_l, n_{l-1}) * sqrt(2 / n_{l-1}), bl = 0.

    Drawn in float64 from the seed's init stream by ``core.init.mlp_init`` (the draws
    the JAX port starts from too), layer by layer in order, then cast to ``dtype`` --
    so float32 and float64 runs of one seed start from the same weights (up to rounding).
    """
    return mlp_init(layer_dims, seed, dtype)


def images_to_X(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(m, 32, 32, 3) uint8 NHWC -> X (3072, m) in [0, 1]: flattened in (H, W, C) order, / 255.

    The result is the transpose of a C-ordered (m, 3072) array (a view, no copy
    beyond the float conversion); NumPy's BLAS handles either layout.
    """
    images = np.asarray(images)
    return to_float(images.reshape(images.shape[0], -1), dtype).T


def forward(X: np.ndarray, params: dict):
    """X (n_in, m) float -> (logits (1, m), caches).

    Hidden layers are LINEAR -> ReLU; the last layer is LINEAR only: the sigmoid
    is folded into the cost (see ``layers.bce_grad``) and applied by
    ``predict.p_fake``. caches[l-1] = (linear cache, relu cache or None).
    """
    L = num_layers(params)
    A = X
    caches = []
    for l in range(1, L + 1):
        Z, lin_cache = linear_forward(A, params[f"W{l}"], params[f"b{l}"])
        if l < L:
            A, relu_cache = relu_forward(Z)
        else:
            A, relu_cache = Z, None
        caches.append((lin_cache, relu_cache))
    return A, caches


def cost(logits: np.ndarray, Y: np.ndarray) -> float:
    """Mean binary cross-entropy over the batch, from the logits (stable). Y (1, m) of 0/1."""
    return bce_cost(logits, Y)


def backward(logits: np.ndarray, Y: np.ndarray, caches) -> dict[str, np.ndarray]:
    """Gradients of the *mean* cost over the batch: {"dW1", "db1", ..., "dWL", "dbL"}.

    dZ_L = (sigmoid(Z_L) - Y) / m, then back through each LINEAR (and ReLU).
    The input's gradient (dX) is never computed.
    """
    grads = {}
    L = len(caches)
    dZ = bce_grad(logits, Y)
    for l in range(L, 0, -1):
        lin_cache, _ = caches[l - 1]
        dA_prev, grads[f"dW{l}"], grads[f"db{l}"] = linear_backward(dZ, lin_cache,
                                                                    need_dA_prev=l > 1)
        if l > 1:
            dZ = relu_backward(dA_prev, caches[l - 2][1])
    return grads


def update(params: dict, grads: dict, lr: float) -> dict[str, np.ndarray]:
    """One step of plain gradient descent: p <- p - lr * dp. Returns new arrays, dtype kept."""
    return {k: p - np.asarray(lr, p.dtype) * grads[f"d{k}"] for k, p in params.items()}


def lr_at(lr0: float, decay: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based: the first epoch uses lr0): lr0 / (1 + decay * epoch)."""
    return float(lr0) / (1.0 + float(decay) * int(epoch))


def as_float_batch(Xb: np.ndarray, dtype) -> np.ndarray:
    """A batch of columns as floats in [0, 1]: uint8 pixels are scaled (/ 255) on the fly,
    float input is used as is. Keeping the data uint8 and converting per batch avoids a
    1.2 GB (float32) or 2.5 GB (float64) copy of the full training set."""
    return to_float(Xb, dtype) if Xb.dtype == np.uint8 else Xb


def predict_logits(X: np.ndarray, params: dict, chunk: int = 8192) -> np.ndarray:
    """Logits (m,) for X (n_in, m) (float, or uint8 pixels), ``chunk`` columns at a time."""
    m = X.shape[1]
    dtype = params["W1"].dtype
    out = np.empty(m, np.float64)
    for i in range(0, m, chunk):
        out[i:i + chunk] = forward(as_float_batch(X[:, i:i + chunk], dtype), params)[0][0]
    return out

