"""The building blocks of the NumPy MLP: CS231n-style forward/backward pairs.

Conventions (the specification the JAX port follows):

- samples are *columns*: an activation ``A`` has shape ``(n_units, m)`` for a
  batch of ``m`` samples;
- a layer's ``W`` has shape ``(n_out, n_in)`` and its ``b`` shape ``(n_out, 1)``;
- every ``*_forward`` returns ``(output, cache)`` and the matching
  ``*_backward`` takes the upstream gradient and that cache and returns the
  gradients of the *same scalar* with respect to its inputs (plain chain rule,
  no hidden 1/m): the 1/m that makes the cost a *mean* over the batch enters
  exactly once, in ``bce_grad``;
- functions keep the dtype of their inputs (float64 for gradient checks,
  float32 for speed); nothing is silently promoted.
"""
from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------ linear
def linear_forward(A_prev: np.ndarray, W: np.ndarray, b: np.ndarray):
    """Z = W @ A_prev + b.

    A_prev: (n_in, m), W: (n_out, n_in), b: (n_out, 1) -> Z: (n_out, m);
    cache = (A_prev, W) for the backward pass.
    """
    Z = W @ A_prev
    Z += b  # in place: avoids a second (n_out, m) temporary
    return Z, (A_prev, W)


def linear_backward(dZ: np.ndarray, cache, need_dA_prev: bool = True):
    """Gradients of a scalar through Z = W @ A_prev + b.

    dZ: (n_out, m) -> dA_prev: (n_in, m) (None if ``need_dA_prev`` is False:
    the first layer's input is the data, whose gradient nobody needs and which
    costs as much as dW), dW: (n_out, n_in), db: (n_out, 1).
    """
    A_prev, W = cache
    dW = dZ @ A_prev.T
    db = dZ.sum(axis=1, keepdims=True)
    dA_prev = W.T @ dZ if need_dA_prev else None
    return dA_prev, dW, db


# ------------------------------------------------------------------ ReLU
def relu_forward(Z: np.ndarray):
    """A = max(Z, 0). Z: (n, m) -> A: (n, m); cache = Z."""
    return np.maximum(Z, 0), Z


def relu_backward(dA: np.ndarray, cache) -> np.ndarray:
    """dZ = dA where Z > 0, else 0 (the subgradient at Z == 0 is taken as 0). (n, m) -> (n, m)."""
    Z = cache
    return np.where(Z > 0, dA, np.zeros((), dA.dtype))


# ------------------------------------------------------------------ sigmoid + BCE
def sigmoid(Z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-Z)) without overflow for large |Z|. Any shape, dtype kept.

    exp is only ever applied to -|Z| <= 0, so it cannot overflow:
    for Z >= 0, 1 / (1 + e^-Z); for Z < 0, e^Z / (1 + e^Z).
    """
    Z = np.asarray(Z)
    e = np.exp(-np.abs(Z))
    one = np.ones((), Z.dtype)
    return np.where(Z >= 0, one / (one + e), e / (one + e))


def bce_cost(logits: np.ndarray, Y: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against labels Y, from the logits.

    logits: (1, m), Y: (1, m) of 0/1 -> a Python float.
    Per sample: -[y log s(z) + (1 - y) log(1 - s(z))] = max(z, 0) - z y + log(1 + e^-|z|),
    which never takes log(0) and never overflows, however large |z| is.
    """
    Z = np.asarray(logits)
    Y = np.asarray(Y, Z.dtype)
    per_sample = np.maximum(Z, 0) - Z * Y + np.log1p(np.exp(-np.abs(Z)))
    return float(per_sample.mean())


def bce_grad(logits: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """d(mean BCE)/d(logits) = (sigmoid(Z) - Y) / m. (1, m) -> (1, m).

    This is where the sigmoid is folded into the cost: the network's last
    layer outputs the logit Z_L, and the gradient goes straight from the cost
    to Z_L (dZ_L = (A_L - Y) / m with A_L = sigmoid(Z_L)). The 1/m is the
    derivative of the *mean* over the batch; no other function divides by m.
    """
    Z = np.asarray(logits)
    Y = np.asarray(Y, Z.dtype)
    m = Z.shape[-1]
    return (sigmoid(Z) - Y) / np.asarray(m, Z.dtype)
