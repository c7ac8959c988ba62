"""Initial weights for both families, drawn once with NumPy, under the canonical names.

Every stack of a family starts from these arrays (torch loads them into its modules,
the JAX port converts them with ``jax_port/convert.py``), so a run of one seed starts
from bit-identical weights whatever the stack, and the two stacks' curves can be
compared epoch by epoch.

MLP (numpy_mlp names): He normal, ``Wl = randn(n_l, n_{l-1}) * sqrt(2 / n_{l-1})``,
``bl = 0`` (n_l, 1), drawn in float64 layer by layer, then cast to the run's dtype.

CNN (torch ``state_dict`` names and layouts): PyTorch's default distributions,
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for every conv/linear weight and bias (what
``kaiming_uniform_(a=sqrt(5))`` and torch's bias init amount to), BatchNorm scale 1,
bias 0, running mean 0, running var 1, ``num_batches_tracked`` 0. Drawn in float64 in
``state_dict`` order, then cast to float32.

All draws come from the seed's init stream ``data.batching.init_rng(seed)``.
"""
from __future__ import annotations

import numpy as np

from data.batching import init_rng
from .catalog import CNN_MODELS

INIT_SCHEME = "numpy/1"  # recorded in each run's config; a resume refuses another scheme

CONV_CHANNELS = (32, 64)  # output channels of conv1, conv2 (3x3, padding 1)
FC_HIDDEN = 512           # fc1 width
FEATURES = 64 * 8 * 8     # fc1 inputs: conv2's 64 channels after two 2x2 poolings of 32x32


def mlp_init(layer_dims, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """He initialisation of an MLP with ``layer_dims`` = [3072, h1, ..., 1]."""
    g = init_rng(seed)
    params = {}
    for l in range(1, len(layer_dims)):
        n_in, n_out = int(layer_dims[l - 1]), int(layer_dims[l])
        params[f"W{l}"] = (g.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        params[f"b{l}"] = np.zeros((n_out, 1), dtype)
    return params


def cnn_init(model: str, seed: int) -> dict[str, np.ndarray]:
    """A fresh ``model`` ("baseline" | "dropout" | "v3") as a torch ``state_dict`` of NumPy arrays."""
    if model not in CNN_MODELS:
        raise ValueError(f"unknown CNN model {model!r}; choose one of {', '.join(CNN_MODELS)}")
    g = init_rng(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return g.uniform(-bound, bound, size=shape).astype(np.float32)

    sd: dict[str, np.ndarray] = {}
    c_in = 3
    for i, c_out in enumerate(CONV_CHANNELS, start=1):
        fan_in = c_in * 3 * 3
        sd[f"conv{i}.weight"] = uniform((c_out, c_in, 3, 3), fan_in)
        sd[f"conv{i}.bias"] = uniform((c_out,), fan_in)
        if model == "v3":
            sd[f"bn{i}.weight"] = np.ones(c_out, np.float32)
            sd[f"bn{i}.bias"] = np.zeros(c_out, np.float32)
            sd[f"bn{i}.running_mean"] = np.zeros(c_out, np.float32)
            sd[f"bn{i}.running_var"] = np.ones(c_out, np.float32)
            sd[f"bn{i}.num_batches_tracked"] = np.zeros((), np.int64)
        c_in = c_out
    for name, n_in, n_out in (("fc1", FEATURES, FC_HIDDEN), ("fc2", FC_HIDDEN, 1)):
        sd[f"{name}.weight"] = uniform((n_out, n_in), n_in)
        sd[f"{name}.bias"] = uniform((n_out,), n_in)
    return sd
