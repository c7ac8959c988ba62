"""The models of the spec stacks as pure JAX functions (+ thin Flax linen wrappers): the
two MLPs, the original project's three CNNs and net4 (core/architecture.py).

Why plain functions rather than stock ``flax.linen`` layers: parity with the specs
needs exact control that the stock layers do not give --
- BatchNorm must be torch's BatchNorm2d (momentum 0.1 in torch terms, *unbiased*
  batch variance in running_var, ``num_batches_tracked``), not ``nn.BatchNorm``;
- dropout must accept an explicit mask so tests can feed torch and JAX the same one;
- the convolution formulation is chosen per backend: on XLA:CPU, ``lax.conv`` inside
  ``lax.scan`` collapses (~50 images/s) while im2col + one matmul runs fast; on a GPU
  cuDNN convolutions win.
The variables still use Flax's layout and names (``{"params": {"conv1": {"kernel", "bias"}},
"batch_stats": {...}}``, kernels HWIO / (in, out)), and ``FlaxModel`` below is an ordinary
linen Module over the same functions, so ``Module.init``/``apply`` work on these pytrees.

Layouts: images NHWC; the MLP flattens each image in (H, W, C) order (the numpy_mlp
convention), the CNN flattens its 8x8x64 feature map in (H, W, C) order (torch uses
(C, H, W): ``convert.py`` permutes fc1's rows). net4's variables nest by module, as its
torch names do: ``{"params": {"stem": {"conv": {"kernel"}, "bn": {"scale", "bias"}},
"block1": {"conv1", "bn1", "conv2", "bn2"}, ..., "fc": {"kernel", "bias"}},
"batch_stats": {"stem": {"bn": ...}, "block1": {"bn1": ..., "bn2": ...}, ...}}``.

Max pooling with torch's gradient: torch's max_pool2d sends a window's gradient to its
FIRST maximum in row-major order, where ``reduce_max``'s autodiff splits it among tied
maxima. The original CNNs pool after a ReLU, where a tie at 0 gets no gradient either way;
net4 pools a convolution's raw output (no bias: an all-zero neighbourhood gives exactly 0,
so ties happen) and its global pool follows the same rule (torch: ``F.max_pool2d`` over
the whole map), so ``maxpool2_first`` and ``global_maxpool_first`` carry torch's rule in
hand-written backwards.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from data.errors import UserError
from core.architecture import (BN_EPS, BN_MOMENTUM, DROPOUT_P, FC_HIDDEN, NET4_WIDTHS,
                               cnn_layout, has_batchnorm, has_dropout, mlp_layer_dims)
from core.catalog import CNN_MODELS, DROPOUT_MODELS, MLP_HIDDEN
from core.init import cnn_init, mlp_init

from . import CONV_IMPLS, convert

# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                      # "mlp" | "cnn"
    layer_dims: tuple[int, ...] = ()  # MLP only: (3072, h1, ..., 1)
    batchnorm: bool = False          # CNN only: BatchNorm2d after each conv
    dropout: bool = False            # CNN only: Dropout after fc1's ReLU
    dropout_p: float = DROPOUT_P     # its probability of zeroing a unit (training only)
    layout: str = "original"         # CNN only: "original" (conv1, conv2, fc1, fc2) | "net4"


# CNN variants (torch_cnn.model.build_model): baseline = plain; dropout = + Dropout(0.5);
# v3 = + BatchNorm after both convs (and data augmentation, a training-loop option);
# net4 = its own layout (stem, 3 blocks, global max pool), BatchNorm throughout.
CNN_VARIANTS = {m: dict(batchnorm=has_batchnorm(m), dropout=has_dropout(m),
                        layout=cnn_layout(m)) for m in CNN_MODELS}
MODELS = tuple(MLP_HIDDEN) + tuple(CNN_VARIANTS)


def layer_dims_for(model: str, hidden=None) -> tuple[int, ...]:
    return tuple(mlp_layer_dims(model, hidden))


def get_spec(model: str, hidden=None, dropout_p: float | None = None) -> ModelSpec:
    """``dropout_p``: the dropout layer's probability (None: DROPOUT_P, the original's)."""
    if dropout_p is not None and model not in DROPOUT_MODELS:
        raise UserError(f"--dropout-p applies to the models with a dropout layer only, "
                        f"not {model}")
    if model in MLP_HIDDEN:
        return ModelSpec(model, "mlp", layer_dims=layer_dims_for(model, hidden))
    if model in CNN_VARIANTS:
        if hidden:
            raise UserError("--hidden applies to the MLP models only")
        return ModelSpec(model, "cnn", **CNN_VARIANTS[model],
                         dropout_p=DROPOUT_P if dropout_p is None else float(dropout_p))
    raise UserError(f"unknown model {model!r} (choose from {', '.join(MODELS)})")


# ---------------------------------------------------------------- init
def init_variables(spec: ModelSpec, seed: int, dtype=jnp.float32) -> dict:
    """Fresh variables, the family's seeded initial weights (``core.init``), so a seed
    starts from the same weights as in the spec stacks. MLP: He normal weights, zero
    biases. CNN: PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every
    conv/linear weight and bias, BN scale 1 / bias 0 / running mean 0 / running var 1."""
    if spec.family == "mlp":
        tensors = mlp_init(spec.layer_dims, seed, np.dtype(dtype))
        variables = convert.mlp_from_canonical(tensors)
    else:
        variables = convert.cnn_from_canonical(cnn_init(spec.name, seed))
        variables["params"] = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables["params"])
    return jax.tree_util.tree_map(jnp.asarray, variables)



# ---------------------------------------------------------------- layers
# Below this many input channels the hybrid forward uses im2col: with C_in = 3 the patch
# matrix is small (27 columns) and one matmul beats XLA:CPU's convolution; above it
# lax.conv wins (measured inside lax.scan, where training runs).
HYBRID_IM2COL_MAX_CIN = 8


def conv3x3(x, kernel, bias, impl: str):
    """3x3 convolution, stride 1, zero padding 1 (torch Conv2d(k=3, padding=1)), NHWC/HWIO.

    ``impl="im2col"``: the 9 shifted copies concatenated on the channel axis and one matmul
    with the kernel reshaped (9*C_in, C_out) (row order kh, kw, c_in = HWIO's memory order);
    gradients by autodiff.
    ``impl="xla"``: ``lax.conv_general_dilated`` with autodiff (cuDNN on a GPU).
    ``impl="hybrid"`` (CPU): the same function with a hand-written backward, see
    ``_conv3x3_hybrid``.
    ``bias`` None: no bias (net4's convolutions).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution formulation {impl!r} (one of {CONV_IMPLS})")
    if impl == "xla":
        y = _conv_xla(x, kernel)
    elif impl == "hybrid":
        y = _conv3x3_hybrid(x, kernel)
    else:
        b, h, w, c = x.shape
        y = (_im2col(x) @ kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)
    return y if bias is None else y + bias


def _im2col(x):
    """(B, H, W, C) -> (B*H*W, 9*C): the zero-padded 3x3 neighbourhoods, column order
    (kh, kw, c) = an HWIO kernel's row order."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)],
                           axis=-1)
    return cols.reshape(b * h * w, 9 * c)


def _conv_xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _conv3x3_hybrid(x, kernel):
    """The 3x3 convolution (no bias) with a backward made only of fast XLA:CPU kernels.

    Inside ``lax.scan`` XLA:CPU runs a convolution in its canonical form (images NHWC,
    kernel HWIO) with its multi-threaded Eigen kernel, but the convolutions that autodiff
    of ``lax.conv`` emits for the gradients (a kernel gradient contracting over the batch,
    an input gradient with a dilated/reversed kernel) fall back to a slow path (measured
    ~40x slower for net4's training step inside the scan, though not as a standalone jit).
    Autodiff of im2col instead pays a matmul with a (B*H*W, 9*C_in) output plus its
    col2im. Here every gradient is a canonical convolution:
    - forward: im2col + matmul for few input channels, else a plain ``lax.conv``;
    - input gradient: a plain forward convolution of the output gradient with the
      kernel flipped in space and transposed in channels (the textbook identity for a
      stride-1, "same"-padded convolution), with no dilation;
    - kernel gradient: ``_kernel_grad``, a plain convolution with the roles swapped.
    """
    return _hybrid_fwd(x, kernel)[0]


def _hybrid_fwd(x, kernel):
    b, h, w, c = x.shape
    if c <= HYBRID_IM2COL_MAX_CIN:
        y = (_im2col(x) @ kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)
    else:
        y = _conv_xla(x, kernel)
    return y, (x, kernel)


def _kernel_grad(x, g):
    """The 3x3 "same" convolution's kernel gradient, (3, 3, C_in, C_out) HWIO, as one
    canonical convolution: x's channels are the images (C_in, H, W, B), the batch is the
    contracted channel axis, and the output gradient is an H x W kernel (H, W, B, C_out);
    padding 1 leaves a 3 x 3 output, dk[i, j, c, o] = sum_{b,p} xpad[b, p + (i, j), c] g[b, p, o].
    Building the (9*C_in, B*H*W) patch matrix explicitly and multiplying instead costs
    ~1.6-5x more per layer here (nine slice copies and a concatenate: memory traffic, not FLOPs)."""
    xt = jnp.transpose(x, (3, 1, 2, 0))                       # (C_in, H, W, B)
    gt = jnp.transpose(g, (1, 2, 0, 3))                       # (H, W, B, C_out)
    dk = _conv_xla(xt, gt)                                    # (C_in, 3, 3, C_out)
    return jnp.transpose(dk, (1, 2, 0, 3))                    # (C_in, 3, 3, C_out) -> HWIO


def _hybrid_bwd(res, g):
    x, kernel = res
    dk = _kernel_grad(x, g)
    # dx[p] = sum_{i,j} g[p + (1 - i, 1 - j)] @ kernel[i, j]^T  =  conv(g, flip(kernel)^T)
    dx = _conv_xla(g, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
    return dx, dk


_conv3x3_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def maxpool2(x):
    """2x2 max pooling, stride 2 (torch MaxPool2d(2)), as a reshape + max."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@jax.custom_vjp
def relu_maxpool2(x):
    """``maxpool2(relu(x))``, computed as ``relu(maxpool2(x))`` (max and ReLU commute) with
    torch's gradient: each window's gradient goes to its FIRST maximum in row-major
    order (torch's max_pool2d backward), and nowhere where the pooled value is <= 0
    (ReLU's derivative at 0 is 0 in both engines, so where every input of a window is
    <= 0 nothing flows back, as through relu-then-pool).

    Why a hand-written backward: autodiff of ``reduce_max`` builds a one-hot of *all*
    tied maxima, counts them and divides (several passes over the 4x larger input plus a
    reduction), the single most expensive part of the v3 training step on XLA:CPU; here
    it is one elementwise pass."""
    return _relu_pool_fwd(x)[0]


def _relu_pool_fwd(x):
    m = maxpool2(x)
    return jax.nn.relu(m), (x, m)


def _first_max_grad(x, m, g):
    """The gradient of 2x2 max pooling ``m = maxpool2(x)`` under cotangent ``g``, torch's
    way: each window's ``g`` to its FIRST maximum in row-major order."""
    b, h, w, c = x.shape
    xr = x.reshape(b, h // 2, 2, w // 2, 2, c)
    hit = xr == m[:, :, None, :, None, :]
    # first maximum of each window in row-major order: (0,0), (0,1), (1,0), (1,1)
    a, bb, cc = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0]
    row0 = jnp.stack([a, bb & ~a], axis=-2)                   # (B, H/2, W/2, 2, C)
    seen = a | bb
    row1 = jnp.stack([cc & ~seen, ~(seen | cc)], axis=-2)
    first = jnp.stack([row0, row1], axis=2)                   # (B, H/2, 2, W/2, 2, C)
    dx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return dx.reshape(x.shape)


def _relu_pool_bwd(res, g):
    x, m = res
    g = jnp.where(m > 0, g, jnp.zeros((), g.dtype))
    return (_first_max_grad(x, m, g),)


relu_maxpool2.defvjp(_relu_pool_fwd, _relu_pool_bwd)


@jax.custom_vjp
def maxpool2_first(x):
    """``maxpool2(x)`` (torch MaxPool2d(2)) with torch's gradient: each window's to its
    first maximum in row-major order, also on ties (net4 pools raw convolution outputs,
    where exact ties at 0 are common)."""
    return maxpool2(x)


def _pool_first_fwd(x):
    m = maxpool2(x)
    return m, (x, m)


def _pool_first_bwd(res, g):
    x, m = res
    return (_first_max_grad(x, m, g),)


maxpool2_first.defvjp(_pool_first_fwd, _pool_first_bwd)


@jax.custom_vjp
def global_maxpool_first(x):
    """Max over H and W: (B, H, W, C) -> (B, C), with the gradient of torch's
    ``F.max_pool2d(x, kernel_size=(H, W))``: all of it to the FIRST maximum in row-major
    order (``jnp.argmax`` returns the first), not split among ties as autodiff of
    ``max`` (and torch's ``amax``) would."""
    return x.max(axis=(1, 2))


def _gmax_fwd(x):
    return x.max(axis=(1, 2)), x


def _gmax_bwd(x, g):
    b, h, w, c = x.shape
    first = jnp.argmax(x.reshape(b, h * w, c), axis=1)                     # (B, C)
    hit = jnp.arange(h * w, dtype=first.dtype)[None, :, None] == first[:, None, :]
    dx = jnp.where(hit, g[:, None, :], jnp.zeros((), g.dtype))
    return (dx.reshape(x.shape),)


global_maxpool_first.defvjp(_gmax_fwd, _gmax_bwd)


def batchnorm(x, p, s, train: bool):
    """torch BatchNorm2d over NHWC. Returns (y, new_stats)."""
    if not train:
        inv = lax.rsqrt(s["var"] + BN_EPS)
        return (x - s["mean"]) * inv * p["scale"] + p["bias"], s
    n = x.shape[0] * x.shape[1] * x.shape[2]
    y, mean, var = _bn_train(x, p["scale"], p["bias"])
    unbiased = var * (n / (n - 1))                            # torch stores the unbiased one
    # the batch statistics feed only the running averages: no gradient flows through them
    # (_bn_train's backward ignores their cotangents, which this makes exactly zero)
    mean, unbiased = lax.stop_gradient(mean), lax.stop_gradient(unbiased)
    new = {"mean": (1 - BN_MOMENTUM) * s["mean"] + BN_MOMENTUM * mean,
           "var": (1 - BN_MOMENTUM) * s["var"] + BN_MOMENTUM * unbiased,
           "num_batches_tracked": s["num_batches_tracked"] + 1}
    return y, new


def _bn_train_fwd(x, scale, bias):
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.square(x - mean).mean(axis=(0, 1, 2))          # biased: used to normalise
    inv = lax.rsqrt(var + BN_EPS)
    y = (x - mean) * inv * scale + bias
    return (y, mean, var), (x, mean, inv, scale)


def _bn_train_bwd(res, cotangents):
    # The textbook closed form of batch-norm's backward: two per-channel sums over g and
    # one elementwise pass. Autodiff of the forward gives the same values but as several
    # more full passes over the (B, H, W, C) activations, which on XLA:CPU cost ~15% of
    # the v3 train step (memory-bound: bn1's input is 8 MB per batch of 64).
    g = cotangents[0]                  # cotangents of (mean, var): unused, see batchnorm
    x, mean, inv, scale = res
    n = x.shape[0] * x.shape[1] * x.shape[2]
    xhat = (x - mean) * inv
    dbias = g.sum(axis=(0, 1, 2))
    dscale = (g * xhat).sum(axis=(0, 1, 2))
    dx = (scale * inv) * (g - dbias / n - xhat * (dscale / n))
    return dx, dscale, dbias


@jax.custom_vjp
def _bn_train(x, scale, bias):
    """Training-mode batch norm: ``(y, batch mean, biased batch var)``. Gradients flow to
    x, scale and bias through ``y`` only (the caller stops the statistics' gradients)."""
    return _bn_train_fwd(x, scale, bias)[0]


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def dropout_mask(key, batch: int, p: float = DROPOUT_P) -> jax.Array:
    """Keep-mask (True = kept) for fc1's output, keep probability 1 - ``p``."""
    return jax.random.bernoulli(key, 1.0 - p, (batch, FC_HIDDEN))


def apply(spec: ModelSpec, variables: dict, x, train: bool = False, mask=None,
          conv_impl: str = "im2col"):
    """Forward pass. ``x``: float images (B, 32, 32, 3) in [0, 1] (pixels / 255).

    Returns ``(logits (B,), new_batch_stats)``; logits = log-odds that the image is REAL.
    ``mask``: dropout keep-mask (B, 512) bool, required when ``train`` and the model
    has dropout (the caller draws it, so tests can share it with torch).
    """
    if spec.layout == "net4":
        return _apply_net4(spec, variables, x, train, conv_impl)
    p = variables["params"]
    stats = variables.get("batch_stats", {})
    b = x.shape[0]
    if spec.family == "mlp":
        a = x.reshape(b, -1)
        n_layers = len(spec.layer_dims) - 1
        for l in range(1, n_layers + 1):
            a = a @ p[f"dense{l}"]["kernel"] + p[f"dense{l}"]["bias"]
            if l < n_layers:
                a = jax.nn.relu(a)
        return a[:, 0], stats

    new_stats = {}
    h = x
    for i in (1, 2):
        h = conv3x3(h, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"], conv_impl)
        if spec.batchnorm:
            h, new_stats[f"bn{i}"] = batchnorm(h, p[f"bn{i}"], stats[f"bn{i}"], train)
        # the CPU formulation pools with its hand-written backward; the others keep
        # autodiff's (the GPU path, measured as it is)
        h = relu_maxpool2(h) if conv_impl == "hybrid" else maxpool2(jax.nn.relu(h))
    h = h.reshape(b, -1)                                     # (H, W, C) flatten order
    h = jax.nn.relu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    if spec.dropout and train:
        if mask is None:
            raise ValueError("training a dropout model needs a dropout mask")
        h = jnp.where(mask, h / (1.0 - spec.dropout_p), 0.0)  # inverted dropout, as torch
    logits = (h @ p["fc2"]["kernel"] + p["fc2"]["bias"])[:, 0]
    return logits, new_stats


def _apply_net4(spec: ModelSpec, variables: dict, x, train: bool, conv_impl: str):
    """net4's forward (core/architecture.py): ``(logits (B,), new batch_stats)``.

    Also runs the folded form ``fold_batchnorm`` makes (``spec.batchnorm`` False, eval
    only): a BatchNorm missing from the params was folded into the convolution before it,
    which then has a bias."""
    if train and not spec.batchnorm:
        raise ValueError("a net4 with its BatchNorm folded (fold_batchnorm) evaluates only")
    p, stats = variables["params"], variables.get("batch_stats", {})
    new_stats: dict = {}

    def conv(h, q):
        return conv3x3(h, q["kernel"], q.get("bias"), conv_impl)

    def bn_relu(h, module, bn):
        if bn in p[module]:
            h, st = batchnorm(h, p[module][bn], stats[module][bn], train)
            new_stats.setdefault(module, {})[bn] = st
        return jax.nn.relu(h)

    h = bn_relu(conv(x, p["stem"]["conv"]), "stem", "bn")
    for b in range(1, len(NET4_WIDTHS) + 1):
        m = f"block{b}"
        h = bn_relu(maxpool2_first(conv(h, p[m]["conv1"])), m, "bn1")
        h = bn_relu(conv(h, p[m]["conv2"]), m, "bn2")
    h = global_maxpool_first(h)                               # (B, 128)
    logits = (h @ p["fc"]["kernel"] + p["fc"]["bias"])[:, 0]
    return logits, new_stats


def mlp_apply_features_major(spec: ModelSpec, params: dict, xt):
    """The MLP's ``apply`` on feature-major input: ``xt`` (n_in, B) float (pixels / 255,
    one image per column, numpy_mlp's layout) -> logits (B,). The same function as
    ``apply``; only the matmuls are oriented ``kernel.T @ a`` as in the spec. Full-batch
    training uses it: on XLA:CPU the products with a 100k-image batch and their gradients
    run several times faster in this orientation than as ``(B, n_in) @ kernel``."""
    if spec.family != "mlp":
        raise ValueError(f"{spec.name} is not an MLP")
    a = xt
    n_layers = len(spec.layer_dims) - 1
    for l in range(1, n_layers + 1):
        a = params[f"dense{l}"]["kernel"].T @ a + params[f"dense{l}"]["bias"][:, None]
        if l < n_layers:
            a = jax.nn.relu(a)
    return a[0]


def fold_batchnorm(spec: ModelSpec, variables: dict) -> tuple[ModelSpec, dict]:
    """Eval-mode BatchNorm folded into the convolution before it: ``(spec', variables')``
    with ``apply(spec', variables', x) == apply(spec, variables, x, train=False)`` up to
    float rounding (BN in eval mode is a per-channel affine map, so conv -> BN is one conv
    with kernel * s and bias (bias - mean) * s + beta, s = scale / sqrt(var + eps)).
    Evaluation then skips a full elementwise pass over each conv's output. Models without
    BatchNorm come back unchanged.

    net4: the BatchNorms right after a convolution (the stem's, each block's bn2) are
    folded; each block's bn1 follows a max pool and stays, applied with its running
    statistics (folding it through the pool needs a positive scale: max(s x) = s max(x)
    for s > 0 only). ``apply`` runs that form in eval mode only."""
    if not spec.batchnorm:
        return spec, variables
    p, st = variables["params"], variables["batch_stats"]
    if spec.layout == "net4":
        def fold(q, bn, s):
            sc = lax.rsqrt(s["var"] + BN_EPS) * bn["scale"]
            return {"kernel": q["kernel"] * sc, "bias": bn["bias"] - s["mean"] * sc}
        params = {"stem": {"conv": fold(p["stem"]["conv"], p["stem"]["bn"], st["stem"]["bn"])},
                  "fc": p["fc"]}
        stats = {}
        for b in range(1, len(NET4_WIDTHS) + 1):
            m = f"block{b}"
            params[m] = {"conv1": p[m]["conv1"], "bn1": p[m]["bn1"],
                         "conv2": fold(p[m]["conv2"], p[m]["bn2"], st[m]["bn2"])}
            stats[m] = {"bn1": st[m]["bn1"]}
        return dataclasses.replace(spec, batchnorm=False), {"params": params,
                                                             "batch_stats": stats}
    params = {k: v for k, v in p.items() if not k.startswith("bn")}
    for i in (1, 2):
        s = lax.rsqrt(st[f"bn{i}"]["var"] + BN_EPS) * p[f"bn{i}"]["scale"]
        params[f"conv{i}"] = {
            "kernel": p[f"conv{i}"]["kernel"] * s,
            "bias": (p[f"conv{i}"]["bias"] - st[f"bn{i}"]["mean"]) * s + p[f"bn{i}"]["bias"]}
    return dataclasses.replace(spec, batchnorm=False), {"params": params}


def bce_with_logits(logits, labels):
    """Mean binary cross-entropy from logits, stable (torch BCEWithLogitsLoss):
    softplus(z) - z * y = max(z, 0) - z y + log(1 + e^-|z|).

    Written with ``jax.nn.softplus`` (logaddexp) rather than max/abs: autodiff of
    ``maximum``/``abs`` splits the derivative at the tie z == 0 (which happens: an MLP
    whose last hidden layer is all dead outputs exactly its zero-initialised bias) and
    gives a wrong gradient there; softplus's derivative is sigmoid(z) everywhere."""
    y = labels.astype(logits.dtype)
    return jnp.mean(jax.nn.softplus(logits) - logits * y)


def default_conv_impl(platform: str | None = None) -> str:
    """hybrid on CPU (XLA:CPU's convolution gradients collapse inside lax.scan), cuDNN
    elsewhere. ``platform``: the device's ('cpu', 'gpu', ...), default JAX's backend."""
    return "hybrid" if (platform or jax.default_backend()) == "cpu" else "xla"


# ---------------------------------------------------------------- Flax linen wrapper
@functools.lru_cache(maxsize=None)
def _flax_module():
    import flax.linen as nn

    class FlaxModel(nn.Module):
        """A linen Module over ``apply``: ``FlaxModel(spec).init(key, x)`` gives variables
        in exactly the layout above (``{"params": {"conv1": {"kernel", "bias"}, ...},
        "batch_stats": {...}}``) and ``.apply(variables, x, train=True, mask=m,
        mutable=["batch_stats"])`` runs the same function the port trains with."""
        spec: ModelSpec
        conv_impl: str = "im2col"
        seed: int = 0  # the family's initial weights for this seed (core.init), as in training

        @nn.compact
        def __call__(self, x, train: bool = False, mask=None):
            fresh = {}

            def param_init(name):
                def init(rng, *_):  # the key is not used: the weights are the shared init's
                    if "v" not in fresh:  # one draw of the whole model per init
                        fresh["v"] = init_variables(self.spec, self.seed, x.dtype)
                    return fresh["v"]["params"][name]
                return init
            params = {k: self.param(k, param_init(k)) for k in _param_names(self.spec)}
            stats = {k: self.variable("batch_stats", k, _fresh_stats, self.spec, params[k])
                     for k in _stat_names(self.spec)}
            logits, new = apply(self.spec, {"params": params,
                                            "batch_stats": {k: v.value for k, v in stats.items()}},
                                x, train=train, mask=mask, conv_impl=self.conv_impl)
            if train and not self.is_initializing():
                for k, v in stats.items():
                    v.value = new[k]
            return logits

    return FlaxModel


def _net4_modules() -> list[str]:
    return ["stem"] + [f"block{b}" for b in range(1, len(NET4_WIDTHS) + 1)]


def _param_names(spec: ModelSpec) -> list[str]:
    if spec.family == "mlp":
        return [f"dense{l}" for l in range(1, len(spec.layer_dims))]
    if spec.layout == "net4":
        return _net4_modules() + ["fc"]
    return ["conv1"] + (["bn1"] if spec.batchnorm else []) + ["conv2"] + \
        (["bn2"] if spec.batchnorm else []) + ["fc1", "fc2"]


def _fresh_bn_stats(like):
    return {"mean": jnp.zeros_like(like), "var": jnp.ones_like(like),
            "num_batches_tracked": jnp.zeros((), jnp.int32)}


def _fresh_stats(spec: ModelSpec, params: dict):
    """The fresh running statistics of the module whose params are ``params``."""
    if spec.layout == "net4":  # a module holding BatchNorms
        return {k: _fresh_bn_stats(q["scale"]) for k, q in params.items() if k.startswith("bn")}
    return _fresh_bn_stats(params["scale"])


def _stat_names(spec: ModelSpec) -> list[str]:
    if spec.layout == "net4":
        return _net4_modules() if spec.batchnorm else []
    return ["bn1", "bn2"] if spec.batchnorm else []


def __getattr__(name):  # ``model.FlaxModel``, built lazily so importing flax is optional
    if name == "FlaxModel":
        return _flax_module()
    raise AttributeError(name)
