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

net4 (beyond the original; ``cnn_layout(m) == "net4"``), pixels / 255 in, one logit out:
    stem     conv3x3(3->16, no bias) -> BN -> ReLU                             (16, 32, 32)
    block b  conv3x3(c_in->c_out, no bias) -> MaxPool 2 -> BN -> ReLU
             -> conv3x3(c_out->c_out, no bias) -> BN -> ReLU,  c_out = 32, 64, 128
             (32, 16, 16), (64, 8, 8), (128, 4, 4)
    head     global max pool over H, W (128,) -> Linear(128->1, with bias)
BatchNorm is torch's BatchNorm2d (affine, eps 1e-5, momentum 0.1); no dropout; trained
with v3's augmentation. Tensors: ``stem.conv.weight`` (16, 3, 3, 3), ``stem.bn.{weight,
bias,running_mean,running_var,num_batches_tracked}``, then for b = 1..3
``block{b}.conv1.weight``, ``block{b}.bn1.*``, ``block{b}.conv2.weight``,
``block{b}.bn2.*``, then ``fc.weight`` (1, 128), ``fc.bias`` (1,).
Parameters: 291,793 (convs 290,736 + BN scale/shift 928 + fc 129), v3 2,117,761.
Training FLOPs per image (``train_flops``: products only, forward + weight gradients +
input gradients of every layer but the first): net4 129,172,224, v3 44,436,480, 2.91x;
counted as 3 x the forward pass's (2 x multiply-adds) instead: 130,056,960 vs 46,205,952,
2.81x.
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
NET4_STEM = 16              # net4: output channels of the stem's conv
NET4_WIDTHS = (32, 64, 128)  # net4: output channels of blocks 1, 2, 3 (each halves H and W)
NET4_FEATURES = NET4_WIDTHS[-1]  # net4: fc inputs, block 3's channels after the global max pool

TensorTable = dict[str, tuple[tuple[int, ...], str | None]]


def cnn_layout(model: str) -> str:
    """"original" (baseline, dropout, v3: conv1, conv2, fc1, fc2) or "net4"."""
    return "net4" if model == "net4" else "original"


def has_batchnorm(model: str) -> bool:
    """BatchNorm2d after each conv: v3 (before the conv's ReLU) and net4 (see above)."""
    return model in ("v3", "net4")


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
    if cnn_layout(model) == "net4":
        return _net4_tensors()
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


def _bn_tensors(prefix: str, c: int) -> TensorTable:
    """A BatchNorm2d's state_dict entries, in torch's order."""
    out: TensorTable = {f"{prefix}.{k}": ((c,), "float32")
                        for k in ("weight", "bias", "running_mean", "running_var")}
    out[f"{prefix}.num_batches_tracked"] = ((), "int64")
    return out


def _net4_tensors() -> TensorTable:
    f = "float32"
    k = KERNEL
    out: TensorTable = {"stem.conv.weight": ((NET4_STEM, IMAGE_SHAPE[2], k, k), f),
                        **_bn_tensors("stem.bn", NET4_STEM)}
    c_in = NET4_STEM
    for b, c_out in enumerate(NET4_WIDTHS, start=1):
        out[f"block{b}.conv1.weight"] = ((c_out, c_in, k, k), f)
        out.update(_bn_tensors(f"block{b}.bn1", c_out))
        out[f"block{b}.conv2.weight"] = ((c_out, c_out, k, k), f)
        out.update(_bn_tensors(f"block{b}.bn2", c_out))
        c_in = c_out
    out.update({"fc.weight": ((1, NET4_FEATURES), f), "fc.bias": ((1,), f)})
    return out


# ---------------------------------------------------------------- compute per image
def layer_macs(model: str) -> list[int]:
    """Multiply-adds per image of each weight layer (convolutions and linear layers), in
    the order the forward pass runs them; any model of either family (an MLP at its
    catalog widths)."""
    if model not in CNN_MODELS:
        dims = mlp_layer_dims(model)
        return [a * b for a, b in zip(dims[:-1], dims[1:])]
    h, w, c = IMAGE_SHAPE
    taps = KERNEL * KERNEL
    if cnn_layout(model) == "net4":
        macs = [h * w * taps * c * NET4_STEM]
        c = NET4_STEM
        for c_out in NET4_WIDTHS:
            macs.append(h * w * taps * c * c_out)          # conv1 at the block's input size
            h, w = h // 2, w // 2                            # its 2x2 max pool
            macs.append(h * w * taps * c_out * c_out)      # conv2 after the pool
            c = c_out
        return macs + [NET4_FEATURES * 1]
    macs = []
    for c_out in CONV_CHANNELS:  # each conv keeps the size; a 2x2 pool halves it after
        macs.append(h * w * taps * c * c_out)
        h, w, c = h // 2, w // 2, c_out
    return macs + [FEATURES * FC_HIDDEN, FC_HIDDEN * 1]


def train_flops(model: str) -> int:
    """Floating-point operations of one training image, counted as the products alone
    (2 per multiply-add): the forward pass F, the weight gradients (F again) and the input
    gradients of every layer but the first (which has no input to differentiate into).
    Bias adds, activations, pooling, BatchNorm and the optimiser are left out: they are
    memory traffic, not FLOPs that a matrix unit could run. (The rougher "3 x forward"
    count is ``3 * 2 * sum(layer_macs(model))``.)"""
    macs = layer_macs(model)
    return 2 * (2 * sum(macs) + sum(macs[1:]))
