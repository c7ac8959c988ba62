"""Compiled training and evaluation: the jit-compiled core the CLI and bench/ share.

- ``train_step(state, x_u8, y, draws, mask, lr, ema_decay)``: one pure step (augment on
  the device, pixels / 255, forward, BCE, gradients, update, moving average). Parity tests
  call it directly with explicit augmentation draws and dropout masks.
- ``run_epoch``: the whole epoch as a few compiled ``lax.scan`` calls over chunks of
  batches (the dataset stays on the device as uint8; only the epoch's indices and
  augmentation draws travel), plus one plain step for a last partial batch. Compiled
  once per shape and reused for every epoch.
- ``logits``: eval-mode logits for a whole split, in fixed-size padded batches (one compile).

Several devices (``Trainer(..., mesh=make_mesh(devices))``): the same functions, jitted
with ``jax.sharding`` (data parallelism by the compiler, not ``pmap``). The state and the
uint8 dataset are replicated on every device of a one-axis Mesh; each global batch (the
preset's size, the same images, draws and dropout masks as on one device) is split along
that axis by a sharding constraint, so every reduction over the batch -- the loss, the
weight gradients, BatchNorm's statistics -- is over the global batch and the compiler adds
the all-reduces. Only the order of the float32 sums differs from one device. Evaluation is
split over the devices the same way. With one device (``mesh=None``) nothing here is
sharded: the computation is exactly the single-device one.

The optimisers are the specs': plain gradient descent for the MLPs (no state: the
learning rate lr0 / (1 + decay * epoch) is a traced argument, so changing it each epoch
does not recompile) and ``optax.adam`` for the CNNs. torch's Adam divides by
``sqrt(v_hat) + eps`` (eps outside the square root) with bias correction, which is
exactly ``optax.adam``'s formula (eps_root=0); tests/test_parity_cnn.py checks it
numerically.

The recipe (``schedule``: a ``core.recipe.StepSchedule``; ``label_smoothing``; ``tta``),
as torch_cnn computes it:
- a one-cycle schedule: ``optax.scale_by_adam`` followed by ``-lr * update`` with this
  step's lr, an argument of the step (per step inside the scan, computed on the host by
  the shared schedule), so the epoch's program is compiled once;
- label smoothing: the BCE target is ``core.recipe.smooth_targets(y, eps)``;
- EMA: ``state["ema"]`` holds variables whose params are the moving average,
  ``ema <- d ema + (1 - d) live`` after each step with ``d`` from the schedule, and whose
  batch_stats are the live ones (BatchNorm's running statistics, copied: see
  torch_cnn.train.ema_update); ``final_variables`` is what is evaluated and saved;
- flip TTA: the eval logits are ``(f(x) + f(mirror(x))) * 0.5``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from data.batching import (PAD, AugDraws, augment_draws, batch_slices, dropout_rng, epoch_order,
                           identity_draws)
from core.recipe import TTA_MODES, StepSchedule, smooth_targets

from . import model as M

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
EVAL_CHUNK = 125       # images per forward pass inside a compiled eval call (lax.map)
EVAL_BLOCK = 40        # chunks per compiled eval call: 5,000 images per dispatch
CHUNK_BATCHES = 50     # batches per compiled scan call: progress/Ctrl-C granularity
BATCH_AXIS = "batch"   # the Mesh axis a global batch is split along
_COMPILED: dict = {}   # Trainer._compile_key -> jitted (step, scan, eval)


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


class Trainer:
    """Everything compiled for one (model, hyperparameters) pair.

    ``state`` is a pytree ``{"variables": {"params", ["batch_stats"]}, "opt": optax state}``.
    """

    def __init__(self, spec: M.ModelSpec, *, lr: float, batch_size: int | None,
                 decay: float = 0.0, augment: bool = False, seed: int = 0,
                 conv_impl: str | None = None, dtype=jnp.float32,
                 chunk_batches: int = CHUNK_BATCHES, rng_epoch_offset: int = 0,
                 schedule: StepSchedule | None = None, label_smoothing: float = 0.0,
                 tta: str = "none", mesh: Mesh | None = None):
        self.spec, self.lr0, self.decay = spec, float(lr), float(decay)
        # the recipe (CNNs): None = constant lr and no moving average, as the original
        self.schedule = schedule if schedule is not None else StepSchedule(lr0=self.lr0)
        if self.schedule.lr0 != self.lr0:
            raise ValueError(f"schedule's lr {self.schedule.lr0} != lr {self.lr0}")
        self.per_step_lr = self.schedule.varies
        self.ema = bool(self.schedule.ema)
        self.label_smoothing = float(label_smoothing)
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        self.tta = tta
        if spec.family == "mlp" and (self.per_step_lr or self.ema or self.label_smoothing
                                     or tta != "none"):
            raise ValueError("the recipe (schedule, EMA, label smoothing, TTA) is for CNNs")
        self.batch_size, self.augment, self.seed = batch_size, bool(augment), int(seed)
        self.conv_impl = conv_impl or M.default_conv_impl()
        self.dtype = dtype
        self.chunk_batches = chunk_batches
        # The specs key their per-epoch random streams differently: numpy_mlp by the 0-based
        # epoch, torch_cnn by the 1-based one. rng key = epoch (0-based) + this offset, so the
        # port visits exactly the batches (and augmentation draws) of its spec.
        self.rng_epoch_offset = int(rng_epoch_offset)
        # MLP: plain GD (lr passed per call); CNN: Adam with torch's defaults, constant lr
        # (or Adam's direction times the step's lr for a per-step schedule).
        if spec.family == "mlp":
            self.tx = None
        elif self.per_step_lr:
            self.tx = optax.chain(optax.scale_by_adam(ADAM_B1, ADAM_B2, ADAM_EPS))
        else:
            self.tx = optax.adam(lr, ADAM_B1, ADAM_B2, ADAM_EPS)
        self.mesh = mesh if mesh_size(mesh) > 1 else None
        self.n_devices = mesh_size(self.mesh)
        if batch_size is not None and batch_size % self.n_devices:
            raise ValueError(f"a batch of {batch_size} images does not split evenly over "
                             f"{self.n_devices} devices")
        # Compile once, reuse: the jitted functions depend only on this key (not on the seed,
        # decay, batch size, chunking or the schedule's values, which are arguments or
        # shapes), so Trainers that share it (a resumed run, bench repeats, tests) share the
        # compiled code.
        key = (spec, None if self.tx is None or self.per_step_lr else self.lr0, self.augment,
               self.conv_impl, jnp.dtype(dtype).name, self.per_step_lr, self.ema,
               self.label_smoothing, self.tta, self.mesh)
        if key not in _COMPILED:
            if self.mesh is None:
                _COMPILED[key] = (jax.jit(self._step), jax.jit(self._scan),
                                  jax.jit(self._eval_logits), jax.jit(self._full_step),
                                  jax.jit(self._features_major))
            else:
                # results (the state, losses, logits) replicated: every device, and every
                # host, holds all of them
                rep = NamedSharding(self.mesh, P())
                _COMPILED[key] = (jax.jit(self._step, out_shardings=rep),
                                  jax.jit(self._scan, out_shardings=rep),
                                  jax.jit(self._eval_logits, out_shardings=rep),
                                  jax.jit(self._full_step, out_shardings=rep),
                                  jax.jit(self._features_major))
        (self._step_jit, self._scan_jit, self._eval_jit, self._full_step_jit,
         self._features_major_jit) = _COMPILED[key]
        self._full_inputs = (None, None)  # (uint8 split, its feature-major float copy)

    # ------------------------------------------------------------ placement
    def put(self, a, spec: P = P()):
        """``a`` (host data, the same on every process) as an array on this trainer's
        devices: on the default device without a mesh; with one, laid out by ``spec``
        (default replicated). ``make_array_from_callback`` lets each host supply its own
        devices' parts, so this also works when the mesh spans several hosts."""
        if self.mesh is None:
            return jnp.asarray(a)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec),
                                            lambda idx: a[idx])

    def place(self, tree):
        """A pytree (a state, variables) replicated on the mesh; unchanged without one."""
        if self.mesh is None:
            return tree
        return jax.tree_util.tree_map(lambda a: self.put(np.asarray(a)), tree)

    def _split(self, a, axis: int = 0):
        """Inside jit: lay ``a`` out with ``axis`` split over the devices when it divides
        evenly, else replicated (a last partial batch of an odd size: every device computes
        it whole; the same function either way). No-op without a mesh."""
        if self.mesh is None or a is None:
            return a
        spec = P(*([None] * axis), BATCH_AXIS) if a.shape[axis] % self.n_devices == 0 else P()
        return lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec))

    # ------------------------------------------------------------ state
    def init_state(self, variables: dict) -> dict:
        variables = jax.tree_util.tree_map(jnp.asarray, variables)
        opt = () if self.tx is None else self.tx.init(variables["params"])
        state = {"variables": variables, "opt": opt}
        if self.ema:  # the first step's decay is 0: this start value is never averaged in
            state["ema"] = jax.tree_util.tree_map(jnp.copy, variables)
        return self.place(state)

    @staticmethod
    def final_variables(state) -> dict:
        """What is evaluated and saved: the moving average when there is one."""
        return state.get("ema", state["variables"])

    def lr_at(self, epoch: int) -> float:
        """lr0 / (1 + decay * epoch), epoch 0-based (numpy_mlp.model.lr_at); CNNs: constant
        (a per-step schedule's values come from ``step_hypers``)."""
        return self.lr0 / (1.0 + self.decay * epoch) if self.tx is None else self.lr0

    def step_hypers(self, first: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(lr, EMA decay) of global steps first .. first + n_steps - 1, in the trainer's
        dtype. Without a per-step schedule every lr is the epoch's (set by the caller)."""
        steps = np.arange(first, first + n_steps)
        return (np.asarray(self.schedule.lr(steps), self.dtype),
                np.asarray(self.schedule.ema_decay(steps), self.dtype))

    # ------------------------------------------------------------ one step (pure)
    def _inputs(self, x_u8, dy, dx, flip):
        if self.augment:
            x_u8 = augment_device(x_u8, dy, dx, flip)
        return x_u8.astype(self.dtype) / jnp.asarray(255, self.dtype)

    def _loss(self, params, stats, x, y, mask):
        logits, new_stats = M.apply(self.spec, {"params": params, "batch_stats": stats}, x,
                                    train=True, mask=mask, conv_impl=self.conv_impl)
        target = smooth_targets(y.astype(logits.dtype), self.label_smoothing) \
            if self.label_smoothing else y
        return M.bce_with_logits(logits, target), (logits, new_stats)

    def _step(self, state, x_u8, y, dy, dx, flip, mask, lr, ema_decay):
        """One training step on one batch. Returns (new_state, (loss, n_correct))."""
        x_u8, y, dy, dx, flip, mask = (self._split(a) for a in (x_u8, y, dy, dx, flip, mask))
        x = self._inputs(x_u8, dy, dx, flip)
        v = state["variables"]
        (loss, (logits, new_stats)), grads = jax.value_and_grad(self._loss, has_aux=True)(
            v["params"], v.get("batch_stats", {}), x, y, mask)
        if self.tx is None:
            params = jax.tree_util.tree_map(lambda p, g: p - lr.astype(p.dtype) * g,
                                            v["params"], grads)
            opt = state["opt"]
        else:
            updates, opt = self.tx.update(grads, state["opt"], v["params"])
            if self.per_step_lr:
                updates = jax.tree_util.tree_map(lambda u: -lr.astype(u.dtype) * u, updates)
            params = optax.apply_updates(v["params"], updates)
        new_v = {"params": params}
        if "batch_stats" in v:
            new_v["batch_stats"] = new_stats
        new_state = {"variables": new_v, "opt": opt}
        if self.ema:
            new_state["ema"] = {**new_v, "params": jax.tree_util.tree_map(
                lambda a, w: ema_decay.astype(a.dtype) * a + (1 - ema_decay).astype(a.dtype) * w,
                state["ema"]["params"], params)}
        n_correct = jnp.sum((logits > 0) == (y == 1))
        return new_state, (loss, n_correct)

    def train_step(self, state, x_u8, y, draws: AugDraws | None = None, mask=None, lr=None,
                   ema_decay=None):
        """Public single step (compiled). ``draws`` are used when the trainer augments
        (identity when None); ``mask``: the dropout keep-mask (B, 512) bool, required for
        dropout models (the caller owns that randomness; ``run_epoch`` draws its own);
        ``lr`` and ``ema_decay`` default to the schedule's for the step the state is at
        (Adam's count), or this trainer's lr for epoch 0."""
        b = len(y)
        draws = draws if draws is not None else identity_draws(b)
        if self.spec.dropout and mask is None:
            raise ValueError(f"{self.spec.name} has dropout: pass its keep-mask (B, 512)")
        if lr is None or ema_decay is None:
            step = int(state["opt"][0].count) if self.tx is not None else 0
            lrs, emas = self.step_hypers(step, 1)
            lr = (lrs[0] if self.per_step_lr else self.lr0) if lr is None else lr
            ema_decay = emas[0] if ema_decay is None else ema_decay
        return self._step_jit(state, self.put(x_u8), self.put(y), self.put(draws.dy),
                              self.put(draws.dx), self.put(draws.flip),
                              None if mask is None else self.put(mask),
                              self._scalar(lr), self._scalar(ema_decay))

    # ------------------------------------------------------------ a full-batch MLP step
    def _features_major(self, x_u8):
        """uint8 images (n, 32, 32, 3) -> (n_in, n) float pixels / 255: the full-batch
        input, made once per training split (the same values ``_inputs`` gives)."""
        x = self._inputs(x_u8, None, None, None)
        return self._split(x.reshape(x.shape[0], -1).T, axis=1)

    def _full_step(self, state, xt, y, lr):
        """One gradient-descent step of an MLP on the whole split, ``xt`` feature-major
        (``_features_major``): the function of ``_step`` on the same images, with the
        matmuls oriented as numpy_mlp's (``model.mlp_apply_features_major``)."""
        xt, y = self._split(xt, axis=1), self._split(y)

        def loss(p):
            z = M.mlp_apply_features_major(self.spec, p, xt)
            return M.bce_with_logits(z, y), z
        (l, z), grads = jax.value_and_grad(loss, has_aux=True)(state["variables"]["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - lr.astype(p.dtype) * g,
                                        state["variables"]["params"], grads)
        return {"variables": {"params": params}, "opt": state["opt"]}, \
            (l, jnp.sum((z > 0) == (y == 1)))

    def full_batch_inputs(self, images_dev):
        """The feature-major float copy of a device-resident uint8 split, made on its first
        use and kept while the split is the one trained on (1.2 GB in float32 for the full
        100k images)."""
        src, xt = self._full_inputs
        if src is not images_dev:
            self._full_inputs = None, None  # free the old copy before making the new one
            xt = self._features_major_jit(images_dev)
            self._full_inputs = images_dev, xt
        return xt

    # ------------------------------------------------------------ a chunk of batches (scan)
    def _scan(self, state, images, labels, idx, dy, dx, flip, steps, lrs, ema_decays, key):
        """``idx``/``dy``/``dx``/``flip``: (k, B) for k full batches; ``steps`` (k,) their
        step numbers in the epoch (dropout masks = fold_in(key, step)); ``lrs`` and
        ``ema_decays`` (k,) each step's learning rate and EMA decay."""
        def body(st, xs):
            i, a, b_, f, s, lr, ed = xs
            mask = M.dropout_mask(jax.random.fold_in(key, s), i.shape[0], self.spec.dropout_p) \
                if self.spec.dropout else None
            st, (loss, nc) = self._step(st, images[i], labels[i], a, b_, f, mask, lr, ed)
            return st, (loss, nc)
        state, (losses, ncs) = lax.scan(body, state, (idx, dy, dx, flip, steps, lrs,
                                                      ema_decays))
        return state, losses, ncs

    def dropout_key(self, epoch: int):
        return jax.random.PRNGKey(int(dropout_rng(self.seed, epoch).integers(0, 2**31 - 1)))

    def _epoch_inputs(self, epoch: int, n: int) -> dict:
        """What a minibatch epoch (0-based ``epoch``) of ``n`` images dispatches, built the
        same way for ``compile_epoch`` and ``run_epoch``."""
        key_epoch = epoch + self.rng_epoch_offset
        order = epoch_order(self.seed, key_epoch, n).astype(np.int32)
        draws = augment_draws(self.seed, key_epoch, n) if self.augment else identity_draws(n)
        slices = batch_slices(n, self.batch_size)
        bs = slices[0].stop - slices[0].start
        n_full = n // bs
        lrs, ema_decays = self.step_hypers(epoch * len(slices), len(slices))
        if not self.per_step_lr:
            lrs[:] = self.lr_at(epoch)
        # The epoch's indices, draws and per-step numbers travel once; each chunk is a
        # device-side slice.
        full = slice(0, n_full * bs)
        # (several devices: each batch's images, draws and positions split over them)
        ep = [self.put(a[full].reshape(n_full, bs), P(None, BATCH_AXIS))
              for a in (order, draws.dy, draws.dx, draws.flip)]
        return {"order": order, "draws": draws, "bs": bs, "n_full": n_full, "lrs": lrs,
                "ema_decays": ema_decays, "ep": ep,
                "key": self.put(self.dropout_key(key_epoch)),
                "steps": self.put(np.arange(n_full, dtype=np.int32)),
                "hyper": [self.put(a[:n_full]) for a in (lrs, ema_decays)],
                "chunks": [(c0, min(c0 + self.chunk_batches, n_full))
                           for c0 in range(0, n_full, self.chunk_batches)]}

    def _scan_args(self, state, images_dev, labels_dev, e: dict, c0: int, c1: int) -> tuple:
        return (state, images_dev, labels_dev, *(a[c0:c1] for a in e["ep"]),
                e["steps"][c0:c1], *(a[c0:c1] for a in e["hyper"]), e["key"])

    def _partial_args(self, state, images_dev, labels_dev, e: dict, n: int) -> tuple:
        """The last, partial batch's single step (a second compiled program)."""
        n_full, bs, draws = e["n_full"], e["bs"], e["draws"]
        sl = slice(n_full * bs, n)
        mask = M.dropout_mask(jax.random.fold_in(e["key"], n_full), n - n_full * bs,
                              self.spec.dropout_p) if self.spec.dropout else None
        idx = self.put(e["order"][sl])
        return (state, images_dev[idx], labels_dev[idx],
                self.put(draws.dy[sl]), self.put(draws.dx[sl]), self.put(draws.flip[sl]), mask,
                self._scalar(e["lrs"][n_full]), self._scalar(e["ema_decays"][n_full]))

    def _full_batch(self) -> bool:
        return self.batch_size is None and not self.augment and not self.spec.dropout

    def compile_epoch(self, state, images_dev, labels_dev, epoch: int) -> None:
        """Compile every program ``run_epoch(state, images_dev, labels_dev, epoch)`` will
        dispatch (ahead of time: nothing is trained), so that the epoch's seconds are
        training alone and the compilation can be reported apart. Every epoch dispatches
        the same shapes, so one call before the first epoch covers the run. Full batch: the
        split's feature-major float copy is made here too (data preparation, once a run)."""
        n = int(labels_dev.shape[0])
        if self._full_batch():
            self._full_step_jit.lower(state, self.full_batch_inputs(images_dev), labels_dev,
                                      self._scalar(self.lr_at(epoch))).compile()
            return
        e = self._epoch_inputs(epoch, n)
        compiled = set()
        for c0, c1 in e["chunks"]:
            # every chunk's arguments are made (their device-side slices are small programs
            # of their own, compiled on first use); each chunk length's scan compiled once
            args = self._scan_args(state, images_dev, labels_dev, e, c0, c1)
            if c1 - c0 not in compiled:
                self._scan_jit.lower(*args).compile()
                compiled.add(c1 - c0)
        if e["n_full"] * e["bs"] < n:
            self._step_jit.lower(*self._partial_args(state, images_dev, labels_dev, e, n)
                                 ).compile()

    def run_epoch(self, state, images_dev, labels_dev, epoch: int,
                  on_chunk: Callable[[int, float, int], None] | None = None):
        """Train one epoch (0-based ``epoch``) over the device-resident split.

        Returns ``(state, {"lr", "train_loss" (mean over steps), "train_acc" (%),
        "seconds", "images_per_s"})``. ``on_chunk(images_done, last_loss, n_correct)``
        is called after every compiled chunk (progress bar). Compilation not done ahead
        (``compile_epoch``) happens here and counts in the seconds.
        """
        t0 = time.perf_counter()
        n = int(labels_dev.shape[0])
        if self._full_batch():
            # full batch: one step over the split in its stored order (as numpy_mlp: the
            # full-batch gradient is a sum over all images; a shuffle changes only rounding)
            lr = self._scalar(self.lr_at(epoch))
            state, (l, nc) = self._full_step_jit(state, self.full_batch_inputs(images_dev),
                                                 labels_dev, lr)
            losses, correct = [float(l)], int(nc)
            _check_finite(losses, epoch, 0)
            if on_chunk:
                on_chunk(n, losses[0], correct)
            secs = time.perf_counter() - t0
            return state, {"lr": self.lr_at(epoch), "train_loss": losses[0],
                           "train_acc": 100.0 * correct / n, "seconds": secs,
                           "images_per_s": n / secs}
        e = self._epoch_inputs(epoch, n)
        bs, n_full = e["bs"], e["n_full"]
        # A chunk's losses are read back only after the next chunk is dispatched, so the
        # device never waits for the host (progress and the NaN check lag one chunk).
        losses, correct = [], 0
        pending = None

        def collect(p):
            nonlocal correct
            c1_, l_, nc_ = p
            l_ = np.asarray(l_)
            _check_finite(l_.tolist(), epoch, len(losses))
            losses.extend(l_.tolist())
            correct += int(np.asarray(nc_).sum())
            if on_chunk:
                on_chunk(c1_ * bs, float(l_[-1]), correct)

        for c0, c1 in e["chunks"]:
            state, l, nc = self._scan_jit(*self._scan_args(state, images_dev, labels_dev, e,
                                                           c0, c1))
            if pending is not None:
                collect(pending)
            pending = (c1, l, nc)
        if pending is not None:
            collect(pending)
        if n_full * bs < n:  # last partial batch: a second compiled (non-scan) step
            state, (l, nc) = self._step_jit(*self._partial_args(state, images_dev, labels_dev,
                                                                e, n))
            _check_finite([float(l)], epoch, len(losses))
            losses.append(float(l))
            correct += int(nc)
            if on_chunk:
                on_chunk(n, float(l), correct)
        jax.block_until_ready(state)
        secs = time.perf_counter() - t0
        return state, {"lr": float(e["lrs"][0]), "train_loss": float(np.mean(losses)),
                       "train_acc": 100.0 * correct / n, "seconds": secs,
                       "images_per_s": n / secs}

    def _scalar(self, v):
        if self.mesh is None:
            return jnp.asarray(v, self.dtype)
        return self.put(np.asarray(v, jnp.dtype(self.dtype)))

    # ------------------------------------------------------------ evaluation
    def _eval_logits(self, variables, x_u8):
        """Logits of ``x_u8`` (k, c, 32, 32, 3): ``lax.map`` over the k chunks of c images.

        Forward-only choices that differ from training (same function, float rounding
        apart; tests/test_parity_cnn.py checks them against torch): BatchNorm folded into
        the convolutions, and on the CPU a plain ``lax.conv`` for both layers (XLA:CPU runs
        a forward convolution fast even inside a loop; only its gradients are slow).
        Chunks of a few hundred images keep the activations cache-sized and reuse one set
        of buffers, which measured faster than one big batch."""
        spec, variables = M.fold_batchnorm(self.spec, variables)
        impl = "xla" if self.conv_impl == "hybrid" else self.conv_impl
        x_u8 = self._split(x_u8, axis=1)  # several devices: each chunk's images split

        def chunk(x):
            x = x.astype(self.dtype) / jnp.asarray(255, self.dtype)
            z = M.apply(spec, variables, x, train=False, conv_impl=impl)[0]
            if self.tta == "flip":  # NHWC: axis 2 is the width
                z = (z + M.apply(spec, variables, x[:, :, ::-1, :], train=False,
                                 conv_impl=impl)[0]) * 0.5
            return z
        return lax.map(chunk, x_u8).reshape(-1)

    def eval_set(self, images_u8, chunk: int = EVAL_CHUNK) -> "EvalSet":
        """uint8 NHWC images laid out once for sharded evaluation: zero-padded to whole
        chunks of ``chunk`` images per device, each chunk split over the devices."""
        images = np.asarray(images_u8)
        n, nd = int(images.shape[0]), self.n_devices
        c = max(1, min(chunk, -(-n // nd))) * nd
        k = -(-n // c)
        padded = np.zeros((k * c,) + images.shape[1:], images.dtype)
        padded[:n] = images
        return EvalSet(self.put(padded.reshape((k, c) + images.shape[1:]), P(None, BATCH_AXIS)),
                       n)

    def logits(self, variables, images_u8, chunk: int = EVAL_CHUNK,
               block: int = EVAL_BLOCK) -> np.ndarray:
        """Eval-mode logits for uint8 NHWC images (host or device array).

        Whole blocks of ``block * chunk`` images per compiled call, dispatched without
        waiting (one host copy at the end); the rest in one call padded to whole chunks.
        So a split costs at most two compilations (the block shape and its remainder's),
        and fewer than ``chunk`` images (prediction) run unpadded. With several devices
        the images go through ``eval_set`` (pass its result to lay a split out once)."""
        if isinstance(images_u8, EvalSet) or self.mesh is not None:
            es = images_u8 if isinstance(images_u8, EvalSet) else self.eval_set(images_u8, chunk)
            k = int(es.chunks.shape[0])
            out = [self._eval_jit(variables, es.chunks[s:s + block]) for s in range(0, k, block)]
            return np.concatenate([np.asarray(z) for z in out])[:es.n] if out else \
                np.zeros((0,), np.float32)
        n = int(images_u8.shape[0])
        if n == 0:
            return np.zeros((0,), np.float32)
        images = jnp.asarray(images_u8)
        chunk = min(chunk, n)
        per_call = block * chunk
        out = []
        for s in range(0, n, per_call):
            part = images[s:s + per_call]
            k = part.shape[0]
            pad = -k % chunk
            if pad:
                part = jnp.concatenate([part, jnp.zeros((pad,) + part.shape[1:], part.dtype)])
            z = self._eval_jit(variables, part.reshape((-1, chunk) + part.shape[1:]))
            out.append(z[:k])
        return np.asarray(jnp.concatenate(out))


@dataclass(frozen=True)
class EvalSet:
    """A split laid out for sharded evaluation (``Trainer.eval_set``): ``chunks`` (k, c,
    32, 32, 3) uint8 on the devices, each chunk's c images split over them; the first
    ``n`` images are the split's, the rest zero padding."""
    chunks: jax.Array
    n: int


class NonFiniteLoss(Exception):
    """A training step produced a non-finite loss (``epoch`` 0-based, ``step`` 1-based)."""
    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at epoch {epoch + 1}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


def _check_finite(losses: list[float], epoch: int, steps_before: int) -> None:
    for i, l in enumerate(losses):
        if not math.isfinite(l):
            raise NonFiniteLoss(epoch, steps_before + i + 1, l)
