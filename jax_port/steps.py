"""Compiled training and evaluation: module-level jitted steps over an explicit state, and
the small epoch runner the CLI and bench/ share.

- ``TrainState``: what training carries from step to step (variables, optimizer state,
  the moving average when there is one); ``init_state(cfg, variables)``.
- ``StepConfig``: what the compiled programs depend on (model, convolution formulation,
  dtype, augmentation, EMA, label smoothing, TTA, the device mesh). It is the static
  argument of every jitted function below, so jit's own cache compiles each distinct
  configuration and shape once; nothing else (seed, learning rates, batch order) is
  compiled in.
- ``train_step(cfg, state, x_u8, y, dy, dx, flip, mask, lr, ema_decay)``: one pure step
  (augment on the device, pixels / 255, forward, BCE, gradients, update, moving average).
  ``train_chunk``: a ``lax.scan`` of such steps over a chunk of batches; ``full_batch_step``:
  an MLP's gradient-descent step on the whole split; ``eval_logits``: eval-mode logits.
- ``EpochRunner``: an epoch as a few compiled chunks (the dataset stays on the device as
  uint8; only the epoch's indices and augmentation draws travel), plus one plain step for
  a last partial batch; ``compile_epoch`` compiles all of it ahead; ``logits`` scores a
  split in fixed-size padded blocks (one compile).

Several devices (``StepConfig.of(..., mesh=make_mesh(devices))``): the same functions with
``jax.sharding`` constraints (data parallelism by the compiler, not ``pmap``). The state
and the uint8 dataset are replicated on every device of a one-axis Mesh; each global batch
(the preset's size, the same images, draws and dropout masks as on one device) is split
along that axis, so every reduction over the batch -- the loss, the weight gradients,
BatchNorm's statistics -- is over the global batch and the compiler adds the all-reduces.
Only the order of the float32 sums differs from one device. Results are replicated.

The optimisers are the specs': plain gradient descent for the MLPs (no state; the
learning rate lr0 / (1 + decay * epoch) is an argument) and Adam for the CNNs:
``optax.scale_by_adam`` (torch's formula: eps outside the square root, bias correction;
tests/parity/test_parity_cnn.py checks it numerically) followed by ``-lr * update`` with the
step's lr an argument, so a constant rate and a one-cycle schedule (per step inside the
scan, computed on the host by ``core.recipe.StepSchedule``) run the same program.

The recipe, as torch_cnn computes it: label smoothing (the BCE target is
``core.recipe.smooth_targets(y, eps)``); EMA (``state.ema`` holds variables whose params
are the moving average, ``ema <- d ema + (1 - d) live`` after each step with ``d`` from the
schedule, and whose batch_stats are the live ones: BatchNorm's running statistics are
copied, see torch_cnn.train.ema_update; ``final_variables`` is what is evaluated and
saved); flip TTA (the eval logits are ``(f(x) + f(mirror(x))) * 0.5``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from core.driver import NonFiniteLoss
from core.recipe import TTA_MODES, StepSchedule, smooth_targets
from data.batching import (PAD, AugDraws, augment_draws, batch_slices, dropout_rng, epoch_order,
                           identity_draws)

from . import model as M

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
EVAL_CHUNK = 125       # images per forward pass inside a compiled eval call (lax.map)
EVAL_BLOCK = 40        # chunks per compiled eval call: 5,000 images per dispatch
CHUNK_BATCHES = 50     # batches per compiled scan call: progress/Ctrl-C granularity
BATCH_AXIS = "batch"   # the Mesh axis a global batch is split along


# ------------------------------------------------------------------ devices
def make_mesh(devices) -> Mesh | None:
    """A one-axis Mesh over ``devices`` for data parallelism; None for a single device
    (the unsharded path, numerically the single-device computation)."""
    devices = list(devices)
    if len(devices) < 2:
        return None
    # Auto axes: the compiler propagates the batch sharding from the constraints below
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.size)


def augment_device(x_u8, dy, dx, flip, pad: int = PAD):
    """On-device twin of ``data.batching.augment``: zero-pad ``pad``, crop 32x32 at
    (dy, dx) in padded coordinates, then horizontal flip. Pure data movement, so
    bit-identical to the NumPy reference (tested)."""
    b, h, w, c = x_u8.shape
    xp = jnp.pad(x_u8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = jax.vmap(lambda im, y0, x0: lax.dynamic_slice(
        im, (y0, x0, jnp.zeros((), y0.dtype)), (h, w, c)))(xp, dy, dx)
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1, :], crop)


# ------------------------------------------------------------------ configuration and state
@dataclass(frozen=True)
class StepConfig:
    """What the compiled programs depend on: the static argument of every jitted step."""
    spec: M.ModelSpec
    conv_impl: str                 # "hybrid" | "im2col" | "xla" (model.conv3x3)
    dtype: str = "float32"         # of the weights and activations
    augment: bool = False          # random crop + flip on the device (v3)
    ema: bool = False              # keep a moving average of the weights
    label_smoothing: float = 0.0   # eps (unitless): the BCE target is y (1 - eps) + eps / 2
    tta: str = "none"              # "flip": eval logits averaged with the mirror image's
    mesh: Mesh | None = None       # data parallelism over its devices; None: one device

    @classmethod
    def of(cls, spec: M.ModelSpec, *, conv_impl: str | None = None, dtype=jnp.float32,
           augment: bool = False, ema: bool = False, label_smoothing: float = 0.0,
           tta: str = "none", mesh: Mesh | None = None) -> "StepConfig":
        """The configuration with defaults filled in (the backend's convolution, one device
        for a mesh of one) and checked."""
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        if spec.family == "mlp" and (ema or label_smoothing or tta != "none"):
            raise ValueError("the recipe (EMA, label smoothing, TTA) is for CNNs")
        return cls(spec, conv_impl or M.default_conv_impl(), jnp.dtype(dtype).name,
                   bool(augment), bool(ema), float(label_smoothing), tta,
                   mesh if mesh_size(mesh) > 1 else None)

    @property
    def n_devices(self) -> int:
        return mesh_size(self.mesh)

    @property
    def adam(self) -> optax.GradientTransformation | None:
        """The CNNs' Adam direction (the step's lr scales it); None: an MLP's plain GD."""
        if self.spec.family == "mlp":
            return None
        return optax.scale_by_adam(ADAM_B1, ADAM_B2, ADAM_EPS)


class TrainState(NamedTuple):
    variables: dict          # {"params": ..., ["batch_stats": ...]}, flax's layout
    opt: Any = ()            # Adam's state (optax.ScaleByAdamState); () for plain GD
    ema: dict | None = None  # the moving average's variables, when the run keeps one


def init_state(cfg: StepConfig, variables: dict) -> TrainState:
    # copies of the arrays (jnp.asarray), never views of a caller's NumPy buffers; Adam's
    # zeros and the EMA's copies in one jitted program: run eagerly, they compile a small
    # program per tensor shape (~0.5 s per process)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    opt, ema = _fresh_state(cfg, variables)
    return place(cfg, TrainState(variables, opt, ema))


@functools.partial(jax.jit, static_argnums=0)
def _fresh_state(cfg: StepConfig, variables: dict):
    opt = () if cfg.adam is None else cfg.adam.init(variables["params"])
    # the first step's EMA decay is 0: this start value is never averaged in
    ema = jax.tree_util.tree_map(jnp.copy, variables) if cfg.ema else None
    return opt, ema


def final_variables(state: TrainState) -> dict:
    """What is evaluated and saved: the moving average when there is one."""
    return state.variables if state.ema is None else state.ema


def adam_count(state: TrainState) -> int:
    """Steps taken (Adam's count; 0 for plain GD, which keeps no count)."""
    return int(state.opt.count) if isinstance(state.opt, optax.ScaleByAdamState) else 0


# ------------------------------------------------------------------ placement
def put(cfg: StepConfig, a, spec: P = P()):
    """``a`` (host data, the same on every process) as an array on the configuration's
    devices: on the default device without a mesh; with one, laid out by ``spec``
    (default replicated). ``make_array_from_callback`` lets each host supply its own
    devices' parts, so this also works when the mesh spans several hosts."""
    if cfg.mesh is None:
        return jnp.asarray(a)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(cfg.mesh, spec),
                                        lambda idx: a[idx])


def place(cfg: StepConfig, tree):
    """A pytree (a state, variables) replicated on the mesh; unchanged without one."""
    if cfg.mesh is None:
        return tree
    return jax.tree_util.tree_map(lambda a: put(cfg, np.asarray(a)), tree)


def scalar(cfg: StepConfig, v):
    return put(cfg, np.asarray(v, cfg.dtype))


def _split(cfg: StepConfig, a, axis: int = 0):
    """Inside jit: lay ``a`` out with ``axis`` split over the devices when it divides
    evenly, else replicated (a last partial batch of an odd size: every device computes
    it whole; the same function either way). No-op without a mesh."""
    if cfg.mesh is None or a is None:
        return a
    spec = P(*([None] * axis), BATCH_AXIS) if a.shape[axis] % cfg.n_devices == 0 else P()
    return lax.with_sharding_constraint(a, NamedSharding(cfg.mesh, spec))


def _replicated(cfg: StepConfig, tree):
    """Inside jit: results replicated, so every device and every host holds all of them."""
    if cfg.mesh is None:
        return tree
    rep = NamedSharding(cfg.mesh, P())
    return jax.tree_util.tree_map(lambda a: lax.with_sharding_constraint(a, rep), tree)


# ------------------------------------------------------------------ one step
def inputs(cfg: StepConfig, x_u8, dy=None, dx=None, flip=None):
    """uint8 NHWC images -> the model's float input (augmented first when ``cfg.augment``)."""
    if cfg.augment:
        x_u8 = augment_device(x_u8, dy, dx, flip)
    return x_u8.astype(cfg.dtype) / jnp.asarray(255, cfg.dtype)


def loss_fn(cfg: StepConfig, params, stats, x, y, mask):
    """(mean BCE against the (smoothed) targets, (logits, new batch stats)) of float
    images ``x`` in training mode; ``mask`` the dropout keep-mask."""
    logits, new_stats = M.apply(cfg.spec, {"params": params, "batch_stats": stats}, x,
                                train=True, mask=mask, conv_impl=cfg.conv_impl)
    target = smooth_targets(y.astype(logits.dtype), cfg.label_smoothing) \
        if cfg.label_smoothing else y
    return M.bce_with_logits(logits, target), (logits, new_stats)


def _step(cfg: StepConfig, state: TrainState, x_u8, y, dy, dx, flip, mask, lr, ema_decay):
    x_u8, y, dy, dx, flip, mask = (_split(cfg, a) for a in (x_u8, y, dy, dx, flip, mask))
    x = inputs(cfg, x_u8, dy, dx, flip)
    v = state.variables
    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        functools.partial(loss_fn, cfg), has_aux=True)(v["params"], v.get("batch_stats", {}),
                                                       x, y, mask)
    opt = state.opt
    if cfg.adam is None:
        updates = grads
    else:
        updates, opt = cfg.adam.update(grads, opt, v["params"])
    params = jax.tree_util.tree_map(lambda p, u: p - lr.astype(p.dtype) * u, v["params"],
                                    updates)
    new_v = {"params": params, **({"batch_stats": new_stats} if "batch_stats" in v else {})}
    ema = state.ema
    if ema is not None:
        d = ema_decay
        ema = {**new_v, "params": jax.tree_util.tree_map(
            lambda a, w: d.astype(a.dtype) * a + (1 - d).astype(a.dtype) * w,
            ema["params"], params)}
    return TrainState(new_v, opt, ema), (loss, jnp.sum((logits > 0) == (y == 1)))


@functools.partial(jax.jit, static_argnums=0)
def train_step(cfg: StepConfig, state: TrainState, x_u8, y, dy, dx, flip, mask, lr, ema_decay):
    """One training step on one batch -> (new state, (loss, number correct)). ``dy, dx,
    flip``: the augmentation draws (ignored unless ``cfg.augment``); ``mask``: the dropout
    keep-mask (B, 512) bool (None for models without dropout); ``lr``, ``ema_decay``: this
    step's, as scalars of ``cfg.dtype``."""
    return _replicated(cfg, _step(cfg, state, x_u8, y, dy, dx, flip, mask, lr, ema_decay))


@functools.partial(jax.jit, static_argnums=0)
def train_chunk(cfg: StepConfig, state: TrainState, images, labels, idx, dy, dx, flip, steps,
                lrs, ema_decays, key):
    """``lax.scan`` of ``train_step`` over k full batches of the device-resident split:
    ``idx``/``dy``/``dx``/``flip`` (k, B); ``steps`` (k,) their step numbers in the epoch
    (dropout masks = fold_in(key, step)); ``lrs``, ``ema_decays`` (k,) each step's.
    Returns (state, losses (k,), numbers correct (k,))."""
    def body(st, xs):
        i, a, b, f, s, lr, d = xs
        mask = M.dropout_mask(jax.random.fold_in(key, s), i.shape[0], cfg.spec.dropout_p) \
            if cfg.spec.dropout else None
        return _step(cfg, st, images[i], labels[i], a, b, f, mask, lr, d)
    state, (losses, ncs) = lax.scan(body, state, (idx, dy, dx, flip, steps, lrs, ema_decays))
    return _replicated(cfg, (state, losses, ncs))


@functools.partial(jax.jit, static_argnums=0)
def features_major(cfg: StepConfig, x_u8):
    """uint8 images (n, 32, 32, 3) -> (n_in, n) float pixels / 255: the full-batch input,
    made once per training split (the same values ``inputs`` gives)."""
    x = inputs(dataclasses.replace(cfg, augment=False), x_u8)
    return _split(cfg, x.reshape(x.shape[0], -1).T, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def full_batch_step(cfg: StepConfig, state: TrainState, xt, y, lr):
    """One gradient-descent step of an MLP on the whole split, ``xt`` feature-major
    (``features_major``): the function of ``train_step`` on the same images, with the
    matmuls oriented as numpy_mlp's (``model.mlp_apply_features_major``)."""
    xt, y = _split(cfg, xt, axis=1), _split(cfg, y)

    def loss(p):
        z = M.mlp_apply_features_major(cfg.spec, p, xt)
        return M.bce_with_logits(z, y), z
    (l, z), grads = jax.value_and_grad(loss, has_aux=True)(state.variables["params"])
    params = jax.tree_util.tree_map(lambda p, g: p - lr.astype(p.dtype) * g,
                                    state.variables["params"], grads)
    return _replicated(cfg, (state._replace(variables={"params": params}),
                             (l, jnp.sum((z > 0) == (y == 1)))))


@functools.partial(jax.jit, static_argnums=0)
def eval_logits(cfg: StepConfig, variables, x_u8):
    """Logits of ``x_u8`` (k, c, 32, 32, 3): ``lax.map`` over the k chunks of c images.

    Forward-only choices that differ from training (same function, float rounding apart;
    tests/parity/test_parity_cnn.py checks them against torch): BatchNorm folded into the
    convolutions, and on the CPU a plain ``lax.conv`` for both layers (XLA:CPU runs a
    forward convolution fast even inside a loop; only its gradients are slow). Chunks of
    a few hundred images keep the activations cache-sized and reuse one set of buffers,
    which measured faster than one big batch."""
    spec, variables = M.fold_batchnorm(cfg.spec, variables)
    impl = "xla" if cfg.conv_impl == "hybrid" else cfg.conv_impl
    x_u8 = _split(cfg, x_u8, axis=1)  # several devices: each chunk's images split

    def chunk(x):
        x = x.astype(cfg.dtype) / jnp.asarray(255, cfg.dtype)
        z = M.apply(spec, variables, x, train=False, conv_impl=impl)[0]
        if cfg.tta == "flip":  # NHWC: axis 2 is the width
            z = (z + M.apply(spec, variables, x[:, :, ::-1, :], train=False,
                             conv_impl=impl)[0]) * 0.5
        return z
    return _replicated(cfg, lax.map(chunk, x_u8).reshape(-1))


# ------------------------------------------------------------------ evaluation of a split
@dataclass(frozen=True)
class EvalSet:
    """A split laid out for sharded evaluation (``eval_set``): ``chunks`` (k, c, 32, 32, 3)
    uint8 on the devices, each chunk's c images split over them; the first ``n`` images are
    the split's, the rest zero padding."""
    chunks: jax.Array
    n: int


def eval_set(cfg: StepConfig, images_u8, chunk: int = EVAL_CHUNK) -> EvalSet:
    """uint8 NHWC images laid out once for sharded evaluation: zero-padded to whole chunks
    of ``chunk`` images per device, each chunk split over the devices."""
    images = np.asarray(images_u8)
    n, nd = int(images.shape[0]), cfg.n_devices
    c = max(1, min(chunk, -(-n // nd))) * nd
    k = -(-n // c)
    padded = np.zeros((k * c,) + images.shape[1:], images.dtype)
    padded[:n] = images
    return EvalSet(put(cfg, padded.reshape((k, c) + images.shape[1:]), P(None, BATCH_AXIS)), n)


def logits(cfg: StepConfig, variables, images_u8, chunk: int = EVAL_CHUNK,
           block: int = EVAL_BLOCK) -> np.ndarray:
    """Eval-mode logits for uint8 NHWC images (host or device array, or an ``EvalSet``).

    Whole blocks of ``block * chunk`` images per compiled call, dispatched without waiting
    (one host copy at the end); the rest in one call padded to whole chunks. So a split
    costs at most two compilations (the block shape and its remainder's), and fewer than
    ``chunk`` images (prediction) run unpadded. With several devices the images go
    through ``eval_set`` (pass its result to lay a split out once)."""
    if isinstance(images_u8, EvalSet) or cfg.mesh is not None:
        es = images_u8 if isinstance(images_u8, EvalSet) else eval_set(cfg, images_u8, chunk)
        k = int(es.chunks.shape[0])
        out = [eval_logits(cfg, variables, es.chunks[s:s + block]) for s in range(0, k, block)]
        return np.concatenate([np.asarray(z) for z in out])[:es.n] if out else \
            np.zeros((0,), np.float32)
    n = int(images_u8.shape[0])
    if n == 0:
        return np.zeros((0,), np.float32)
    images = jnp.asarray(images_u8)
    chunk = min(chunk, n)
    out = []
    for s in range(0, n, block * chunk):
        part = images[s:s + block * chunk]
        k = part.shape[0]
        pad = -k % chunk
        if pad:
            part = jnp.concatenate([part, jnp.zeros((pad,) + part.shape[1:], part.dtype)])
        out.append(eval_logits(cfg, variables, part.reshape((-1, chunk) + part.shape[1:]))[:k])
    return np.asarray(jnp.concatenate(out))


# ------------------------------------------------------------------ epochs
def _check_finite(losses: list[float], steps_before: int) -> None:
    """The first non-finite loss as the driver's NonFiniteLoss (its step 1-based)."""
    for i, l in enumerate(losses):
        if not math.isfinite(l):
            raise NonFiniteLoss(steps_before + i + 1, l)


class EpochRunner:
    """Epochs of the compiled steps: the host side of training (the epoch's order,
    augmentation draws and dropout key, each step's lr and EMA decay, chunking, progress,
    the non-finite check). ``schedule`` gives the CNNs' lr and EMA decay per step (default:
    constant ``lr``); the MLPs' lr is ``lr / (1 + decay * epoch)`` per epoch. The specs key
    their per-epoch random streams differently (numpy_mlp by the 0-based epoch, torch_cnn
    by the 1-based one): rng key = epoch + ``rng_epoch_offset``, so the port visits exactly
    the batches (and augmentation draws) of its spec."""

    def __init__(self, cfg: StepConfig, *, batch_size: int | None, seed: int = 0,
                 lr: float | None = None, schedule: StepSchedule | None = None,
                 decay: float = 0.0, rng_epoch_offset: int = 0,
                 chunk_batches: int = CHUNK_BATCHES):
        if schedule is None:
            if lr is None:
                raise ValueError("give lr or a schedule")
            schedule = StepSchedule(lr0=float(lr))
        if schedule.ema and not cfg.ema:
            raise ValueError("the schedule keeps an EMA: StepConfig.of(..., ema=True)")
        if batch_size is not None and batch_size % cfg.n_devices:
            raise ValueError(f"a batch of {batch_size} images does not split evenly over "
                             f"{cfg.n_devices} devices")
        self.cfg, self.batch_size, self.seed, self.schedule = cfg, batch_size, int(seed), schedule
        self.decay, self.rng_epoch_offset = float(decay), int(rng_epoch_offset)
        self.chunk_batches = chunk_batches
        self._full_inputs = (None, None)  # (uint8 split, its feature-major float copy)

    def lr_at(self, epoch: int) -> float:
        """The epoch's learning rate: MLPs lr0 / (1 + decay * epoch), epoch 0-based
        (numpy_mlp.model.lr_at); CNNs: the schedule's at the epoch's first step."""
        if self.cfg.spec.family == "mlp":
            return self.schedule.lr0 / (1.0 + self.decay * epoch)
        return self.schedule.lr0

    def step_hypers(self, first: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, EMA decay) of global steps first .. first + n_steps - 1, in the dtype."""
        steps = np.arange(first, first + n_steps)
        return (np.asarray(self.schedule.lr(steps), self.cfg.dtype),
                np.asarray(self.schedule.ema_decay(steps), self.cfg.dtype))

    def step(self, state: TrainState, x_u8, y, draws: AugDraws | None = None, mask=None,
             lr=None, ema_decay=None):
        """One compiled step on host data. ``draws`` are used when augmenting (identity when
        None); ``mask``: the dropout keep-mask, required for dropout models (the caller owns
        that randomness; ``run_epoch`` draws its own); ``lr`` and ``ema_decay`` default to
        the schedule's for the step the state is at."""
        cfg = self.cfg
        draws = draws if draws is not None else identity_draws(len(y))
        if cfg.spec.dropout and mask is None:
            raise ValueError(f"{cfg.spec.name} has dropout: pass its keep-mask (B, 512)")
        lrs, emas = self.step_hypers(adam_count(state), 1)
        lr = (lrs[0] if cfg.spec.family == "cnn" else self.lr_at(0)) if lr is None else lr
        ema_decay = emas[0] if ema_decay is None else ema_decay
        return train_step(cfg, state, put(cfg, x_u8), put(cfg, y), put(cfg, draws.dy),
                          put(cfg, draws.dx), put(cfg, draws.flip),
                          None if mask is None else put(cfg, mask), scalar(cfg, lr),
                          scalar(cfg, ema_decay))

    # ------------------------------------------------------------ full batch (MLPs)
    def full_batch(self) -> bool:
        return self.batch_size is None and not self.cfg.augment and not self.cfg.spec.dropout

    def full_batch_inputs(self, images_dev):
        """The feature-major float copy of a device-resident uint8 split, made on its first
        use and kept while the split is the one trained on (1.2 GB in float32 for the full
        100k images)."""
        src, xt = self._full_inputs
        if src is not images_dev:
            self._full_inputs = None, None  # free the old copy before making the new one
            xt = features_major(self.cfg, images_dev)
            self._full_inputs = images_dev, xt
        return xt

    # ------------------------------------------------------------ minibatch epochs
    def _epoch_inputs(self, epoch: int, n: int) -> dict:
        """What a minibatch epoch (0-based ``epoch``) of ``n`` images dispatches, built the
        same way for ``compile_epoch`` and ``run_epoch``."""
        cfg, key_epoch = self.cfg, epoch + self.rng_epoch_offset
        order = epoch_order(self.seed, key_epoch, n).astype(np.int32)
        draws = augment_draws(self.seed, key_epoch, n) if cfg.augment else identity_draws(n)
        slices = batch_slices(n, self.batch_size)
        bs = slices[0].stop - slices[0].start
        n_full = n // bs
        lrs, ema_decays = self.step_hypers(epoch * len(slices), len(slices))
        if cfg.spec.family == "mlp":
            lrs[:] = self.lr_at(epoch)
        # The epoch's indices, draws and per-step numbers travel once; each chunk is a
        # device-side slice (several devices: each batch split over them).
        full = slice(0, n_full * bs)
        ep = [put(cfg, a[full].reshape(n_full, bs), P(None, BATCH_AXIS))
              for a in (order, draws.dy, draws.dx, draws.flip)]
        key = jax.random.PRNGKey(int(dropout_rng(self.seed, key_epoch).integers(0, 2**31 - 1)))
        return {"order": order, "draws": draws, "bs": bs, "n_full": n_full, "lrs": lrs,
                "ema_decays": ema_decays, "ep": ep, "key": put(cfg, key),
                "steps": put(cfg, np.arange(n_full, dtype=np.int32)),
                "hyper": [put(cfg, a[:n_full]) for a in (lrs, ema_decays)],
                "chunks": [(c0, min(c0 + self.chunk_batches, n_full))
                           for c0 in range(0, n_full, self.chunk_batches)]}

    def _chunk_args(self, state, images_dev, labels_dev, e: dict, c0: int, c1: int) -> tuple:
        return (self.cfg, state, images_dev, labels_dev, *(a[c0:c1] for a in e["ep"]),
                e["steps"][c0:c1], *(a[c0:c1] for a in e["hyper"]), e["key"])

    def _partial_args(self, state, images_dev, labels_dev, e: dict, n: int) -> tuple:
        """The last, partial batch's single step (a second compiled program)."""
        cfg, n_full, bs, draws = self.cfg, e["n_full"], e["bs"], e["draws"]
        sl = slice(n_full * bs, n)
        mask = M.dropout_mask(jax.random.fold_in(e["key"], n_full), n - n_full * bs,
                              cfg.spec.dropout_p) if cfg.spec.dropout else None
        idx = put(cfg, e["order"][sl])
        return (cfg, state, images_dev[idx], labels_dev[idx], put(cfg, draws.dy[sl]),
                put(cfg, draws.dx[sl]), put(cfg, draws.flip[sl]), mask,
                scalar(cfg, e["lrs"][n_full]), scalar(cfg, e["ema_decays"][n_full]))

    def compile_epoch(self, state, images_dev, labels_dev, epoch: int) -> None:
        """Compile every program ``run_epoch(state, images_dev, labels_dev, epoch)`` will
        dispatch (ahead of time: nothing is trained), so that the epoch's seconds are
        training alone and the compilation can be reported apart. Every epoch dispatches
        the same shapes, so one call before the first epoch covers the run. Full batch: the
        split's feature-major float copy is made here too (data preparation, once a run)."""
        n = int(labels_dev.shape[0])
        if self.full_batch():
            full_batch_step.lower(self.cfg, state, self.full_batch_inputs(images_dev),
                                  labels_dev, scalar(self.cfg, self.lr_at(epoch))).compile()
            return
        e = self._epoch_inputs(epoch, n)
        compiled = set()
        for c0, c1 in e["chunks"]:
            # every chunk's arguments are made (their device-side slices are small programs
            # of their own, compiled on first use); each chunk length's scan compiled once
            args = self._chunk_args(state, images_dev, labels_dev, e, c0, c1)
            if c1 - c0 not in compiled:
                train_chunk.lower(*args).compile()
                compiled.add(c1 - c0)
        if e["n_full"] * e["bs"] < n:
            train_step.lower(*self._partial_args(state, images_dev, labels_dev, e, n)).compile()

    def run_epoch(self, state: TrainState, images_dev, labels_dev, epoch: int,
                  on_chunk: Callable[[int, float, int], None] | None = None):
        """Train one epoch (0-based ``epoch``) over the device-resident split.

        Returns ``(state, {"lr", "train_loss" (mean over steps), "train_acc" (%),
        "seconds", "images_per_s"})``. ``on_chunk(images_done, last_loss, n_correct)``
        is called after every compiled chunk (progress bar). Compilation not done ahead
        (``compile_epoch``) happens here and counts in the seconds."""
        t0 = time.perf_counter()
        n = int(labels_dev.shape[0])
        if self.full_batch():
            state, losses, correct = self._full_batch_epoch(state, images_dev, labels_dev, epoch)
            lr = self.lr_at(epoch)
        else:
            state, losses, correct, lr = self._minibatch_epoch(state, images_dev, labels_dev,
                                                               epoch, n, on_chunk)
        if on_chunk and self.full_batch():
            on_chunk(n, losses[0], correct)
        jax.block_until_ready(state)
        secs = time.perf_counter() - t0
        return state, {"lr": lr, "train_loss": float(np.mean(losses)),
                       "train_acc": 100.0 * correct / n, "seconds": secs,
                       "images_per_s": n / secs}

    def _full_batch_epoch(self, state, images_dev, labels_dev, epoch):
        # one step over the split in its stored order (as numpy_mlp: the full-batch
        # gradient is a sum over all images; a shuffle changes only rounding)
        state, (l, nc) = full_batch_step(self.cfg, state, self.full_batch_inputs(images_dev),
                                         labels_dev, scalar(self.cfg, self.lr_at(epoch)))
        losses = [float(l)]
        _check_finite(losses, 0)
        return state, losses, int(nc)

    def _minibatch_epoch(self, state, images_dev, labels_dev, epoch, n, on_chunk):
        e = self._epoch_inputs(epoch, n)
        bs, n_full = e["bs"], e["n_full"]
        # A chunk's losses are read back only after the next chunk is dispatched, so the
        # device never waits for the host (progress and the NaN check lag one chunk).
        losses, correct, pending = [], 0, None

        def collect(p):
            nonlocal correct
            c1_, l_, nc_ = p
            l_ = np.asarray(l_)
            _check_finite(l_.tolist(), len(losses))
            losses.extend(l_.tolist())
            correct += int(np.asarray(nc_).sum())
            if on_chunk:
                on_chunk(c1_ * bs, float(l_[-1]), correct)

        for c0, c1 in e["chunks"]:
            state, l, nc = train_chunk(*self._chunk_args(state, images_dev, labels_dev, e,
                                                         c0, c1))
            if pending is not None:
                collect(pending)
            pending = (c1, l, nc)
        if pending is not None:
            collect(pending)
        if n_full * bs < n:  # last partial batch: a second compiled (non-scan) step
            state, (l, nc) = train_step(*self._partial_args(state, images_dev, labels_dev,
                                                           e, n))
            _check_finite([float(l)], len(losses))
            losses.append(float(l))
            correct += int(nc)
            if on_chunk:
                on_chunk(n, float(l), correct)
        return state, losses, correct, float(e["lrs"][0])
