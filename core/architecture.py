"""The model contract every stack implements: architecture constants, the layer sizes of
an MLP, and the canonical tensor table of each model (names, shapes, dtypes, in order).

Checkpoints of either family hold exactly these tensors under these names, whatever the
stack that wrote them; each stack converts to and from its own layout in one place
(torch: none; JAX: ``jax_port/convert.py``).

MLP (numpy_mlp's layout): ``W{l}`` (n_l, n_{l-1}) and ``b{l}`` (n_l, 1) for l = 1..L, with
``layer_dims = [3072, n_1, ..., 1]``; float32 or float64 (the run's dtype).
CNN (torch ``state_dict`` names and layouts): ``conv{i}.weight`` (C_out, C_in, 3, 3) and
``.bias``; for v3 ``bn{i}.weight|bias|running_mean|running_var`` (C_out,) and
``bn{i}.num_batches_tracked`` int64 shape (); ``fc1.weight`` (512, 4096) whose columns
follow torch's (C, H, W) flatten order, ``fc1.bias``, ``fc2.weight`` (1, 512), ``fc2.bias``.
"""
from __future__ import annotations

import json

from data.errors import UserError

from .catalog import CNN_MODELS, DROPOUT_MODELS, MLP_HIDDEN

IMAGE_SHAPE = (32, 32, 3)   # H, W, C of a CIFAKE image (NHWC everywhere outside torch)
N_IN = 32 * 32 * 3          # MLP input units: one per pixel channel (3072)

KERNEL = 3                  # conv kernel side, stride 1, zero padding 1 ("same")
CONV_CHANNELS = (32, 64)    # output channels of conv1, conv2
FC_HIDDEN = 512             # fc1 width
FEATURES = 64 * 8 * 8       # fc1 inputs: conv2's 64 channels after two 2x2 poolings of 32x32
DROPOUT_P = 0.5             # probability of zeroing an fc1 activation (the original's)
BN_EPS = 1e-5               # torch BatchNorm2d eps
BN_MOMENTUM = 0.1           # torch convention: running = 0.9 * running + 0.1 * batch statistic

TensorTable = dict[str, tuple[tuple[int, ...], str | None]]


def has_batchnorm(model: str) -> bool:
    """BatchNorm2d after each conv, before its ReLU: v3 only."""
    return model == "v3"


def has_dropout(model: str) -> bool:
    """Dropout after fc1's ReLU (its probability: ``--dropout-p``, default DROPOUT_P)."""
    return model in DROPOUT_MODELS


def mlp_layer_dims(model: str, hidden=None) -> list[int]:
    """Units per layer, input first and the single logit last: mlp2 -> [3072, 7, 1].
    ``hidden`` overrides the hidden sizes; mlp2 takes exactly one, mlp4 exactly three."""
    if model not in MLP_HIDDEN:
        raise UserError(f"unknown MLP model {model!r} (choose from {', '.join(MLP_HIDDEN)})")
    hidden = [int(h) for h in (MLP_HIDDEN[model] if hidden is None else hidden)]
    want = len(MLP_HIDDEN[model])
    if len(hidden) != want:
        raise UserError(f"--hidden: {model} has {want} hidden layer{'s' * (want > 1)}, "
                        f"got {len(hidden)} size{'s' * (len(hidden) != 1)} {hidden}")
    if any(h <= 0 for h in hidden):
        raise UserError(f"--hidden: layer sizes must be positive integers, got {hidden}")
    return [N_IN, *hidden, 1]


def check_layer_dims(dims, where: str) -> list[int]:
    """``dims`` read from a file (checkpoint metadata, config.json) as an MLP's layer_dims:
    a list of positive ints, 3072 inputs, at least one hidden layer, one output."""
    if not (isinstance(dims, list) and len(dims) >= 3 and dims[0] == N_IN and dims[-1] == 1
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise UserError(f"{where}: 'layer_dims' must be a list [{N_IN}, hidden..., 1] of "
                        f"positive integers, got {dims!r}")
    return dims


def layer_dims_from_metadata(path, meta: dict) -> list[int]:
    """An MLP checkpoint's ``layer_dims`` metadata (a JSON list), checked."""
    try:
        dims = json.loads(meta["layer_dims"])
    except (KeyError, TypeError, ValueError, RecursionError):  # deep nesting: RecursionError
        raise UserError(f"{path}: metadata 'layer_dims' missing or not JSON") from None
    return check_layer_dims(dims, f"{path}: metadata")


def mlp_tensors(layer_dims) -> TensorTable:
    """Canonical name -> (shape, None: float32 or float64) of an MLP with ``layer_dims``."""
    out: TensorTable = {}
    for l in range(1, len(layer_dims)):
        out[f"W{l}"] = ((layer_dims[l], layer_dims[l - 1]), None)
        out[f"b{l}"] = ((layer_dims[l], 1), None)
    return out


def cnn_tensors(model: str) -> TensorTable:
    """Canonical name -> (shape, dtype) of CNN ``model``, in torch ``state_dict`` order."""
    if model not in CNN_MODELS:
        raise UserError(f"unknown CNN model {model!r}; choose one of {', '.join(CNN_MODELS)}")
    f = "float32"
    out: TensorTable = {}
    c_in = IMAGE_SHAPE[2]
    for i, c_out in enumerate(CONV_CHANNELS, start=1):
        out[f"conv{i}.weight"] = ((c_out, c_in, KERNEL, KERNEL), f)
        out[f"conv{i}.bias"] = ((c_out,), f)
        if has_batchnorm(model):
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[f"bn{i}.{k}"] = ((c_out,), f)
            out[f"bn{i}.num_batches_tracked"] = ((), "int64")
        c_in = c_out
    out.update({"fc1.weight": ((FC_HIDDEN, FEATURES), f), "fc1.bias": ((FC_HIDDEN,), f),
                "fc2.weight": ((1, FC_HIDDEN), f), "fc2.bias": ((1,), f)})
    return out
