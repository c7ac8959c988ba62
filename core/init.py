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

from .architecture import cnn_tensors

INIT_SCHEME = "numpy/1"  # recorded in each run's config; a resume refuses another scheme



def mlp_init(layer_dims, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """He initialisation of an MLP with ``layer_dims`` = [3072, h1, ..., 1]."""
    g = init_rng(seed)
    params = {}
    for l in range(1, len(layer_dims)):
        n_in, n_out = int(layer_dims[l - 1]), int(layer_dims[l])
        params[f"W{l}"] = (g.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        params[f"b{l}"] = np.zeros((n_out, 1), dtype)
    return params


def _is_batchnorm(layer: str) -> bool:
    """``layer`` ("bn1", "stem.bn", "block2.bn1", "conv1", ...) names a BatchNorm2d."""
    return layer.rsplit(".", 1)[-1].startswith("bn")


def cnn_init(model: str, seed: int) -> dict[str, np.ndarray]:
    """A fresh CNN ``model`` (``core.catalog.CNN_MODELS``) as a torch ``state_dict`` of
    NumPy arrays, drawn tensor by tensor in the canonical table's order (``cnn_tensors``);
    a layer's bias, when it has one, is drawn with its weight's fan_in."""
    table = cnn_tensors(model)
    g = init_rng(seed)
    weights = {k[:-len(".weight")]: shape for k, (shape, _) in table.items()
               if k.endswith(".weight") and not _is_batchnorm(k[:-len(".weight")])}
    constant = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
    sd: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in table.items():
        layer, kind = name.rsplit(".", 1)
        if _is_batchnorm(layer):
            sd[name] = (np.zeros(shape, np.int64) if kind == "num_batches_tracked"
                        else np.full(shape, constant[kind], np.float32))
            continue
        fan_in = int(np.prod(weights[layer][1:]))  # C_in * k * k, or the linear's inputs
        bound = 1.0 / np.sqrt(fan_in)
        sd[name] = g.uniform(-bound, bound, size=shape).astype(np.float32)
    return sd
