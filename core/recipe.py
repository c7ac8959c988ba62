"""The training recipe's ingredients as pure functions, written once for every stack.

The torch spec and the JAX port both take their per-step numbers from here (computed
in float64 on the host, then handed to the step), so the two cannot disagree on a
schedule; the tensor arithmetic that uses them is each stack's own.

- ``StepSchedule.lr(step)``: the learning rate of global step ``step`` (0-based, counted
  over the whole run). ``constant``: ``lr`` throughout. ``onecycle``: the formula of
  ``optax.cosine_onecycle_schedule(total, lr, warmup_frac, div_factor,
  final_div_factor)``: from ``lr / div_factor`` up to ``lr`` over the first
  ``int(warmup_frac * total)`` steps (cosine-shaped, or straight with
  ``warmup_shape="linear"``), then a cosine down to ``lr / (div_factor *
  final_div_factor)`` at step ``total``; tests/parity/test_recipe.py checks it against optax.
- ``StepSchedule.ema_decay(step)``: the weight of the old average when the weights
  after step ``step`` are folded into the exponential moving average:
  ``d_t = (d - d^t) / (1 - d^t)`` with ``t = step + 1`` steps taken. That is the
  bias-corrected (Adam-style, zero-started) average ``m_t / (1 - d^t)``,
  ``m_t = d m_{t-1} + (1 - d) w_t``, written as an update of the corrected average
  itself: no division at evaluation, and ``d_1 = 0`` makes the first average the first
  step's weights, so an early evaluation is not dragged towards the random start.
- ``smooth_targets(y, eps)``: the label-smoothed BCE target ``y (1 - eps) + eps / 2``
  (0 -> eps/2, 1 -> 1 - eps/2); works on NumPy, torch and JAX arrays alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEDULES = ("constant", "onecycle")
WARMUP_SHAPES = ("cosine", "linear")
TTA_MODES = ("none", "flip")


def onecycle_lr(step, total: int, lr: float, warmup_frac: float, div_factor: float,
                final_div_factor: float, warmup_shape: str = "cosine"):
    """The one-cycle learning rate at ``step`` (int or integer array), in float64.

    optax's piecewise form: boundaries (0, int(warmup_frac * total), total), values
    (lr / div_factor, that * div_factor, that / (div_factor * final_div_factor)); each
    interval interpolates start -> end by ``end + (start - end) / 2 (cos(pi p) + 1)``
    (``start + (end - start) p`` for a linear warm-up), p the fraction of the
    interval done; the final value holds from ``total`` on."""
    if warmup_shape not in WARMUP_SHAPES:
        raise ValueError(f"warmup_shape must be one of {WARMUP_SHAPES}, got {warmup_shape!r}")
    s = np.asarray(step, np.float64)
    bounds = np.array([0, int(warmup_frac * total), int(total)], np.float64)
    values = np.cumprod([lr / div_factor, div_factor, 1.0 / (div_factor * final_div_factor)])
    out = np.where(s >= bounds[2], values[2], 0.0)
    for i in (0, 1):
        size = max(bounds[i + 1] - bounds[i], 1.0)
        p = (s - bounds[i]) / size
        start, end = values[i], values[i + 1]
        if i == 0 and warmup_shape == "linear":
            v = start + (end - start) * p
        else:
            v = end + (start - end) / 2.0 * (np.cos(np.pi * p) + 1.0)
        out = np.where((bounds[i] <= s) & (s < bounds[i + 1]), v, out)
    return float(out) if out.ndim == 0 else out


def ema_decay_at(decay: float, t):
    """``(d - d^t) / (1 - d^t)``: the bias-corrected EMA's weight on the old average when
    the ``t``-th step's weights (t >= 1) are folded in; float64, array or scalar."""
    t = np.asarray(t, np.float64)
    dt = decay ** t
    out = (decay - dt) / (1.0 - dt)
    return float(out) if out.ndim == 0 else out


def tta_of(cfg: dict, where) -> str:
    """A run's test-time augmentation from its config.json (``where``); a run without the
    key predates it and had none."""
    from data.errors import UserError
    tta = cfg.get("tta", "none")
    if tta not in TTA_MODES:
        raise UserError(f"{where}: unknown test-time augmentation 'tta' {tta!r} (this version "
                        f"knows {', '.join(TTA_MODES)})")
    return tta


def smooth_targets(y, eps: float):
    """Label-smoothed binary targets ``y (1 - eps) + eps / 2``; ``eps = 0`` returns ``y``
    untouched (not even converted), so runs without smoothing compute exactly what they
    always did."""
    if not eps:
        return y
    return y * (1.0 - eps) + eps / 2.0


@dataclass(frozen=True)
class StepSchedule:
    """Everything a training step needs per step that is not data: the learning rate and
    the EMA decay, from a run's configuration and its number of steps per epoch."""
    lr0: float
    schedule: str = "constant"
    total_steps: int = 0
    warmup_frac: float = 0.0
    warmup_shape: str = "cosine"
    div_factor: float = 1.0
    final_div_factor: float = 1.0
    ema: float = 0.0  # 0: no moving average

    @classmethod
    def from_config(cls, cfg: dict, steps_per_epoch: int) -> "StepSchedule":
        onecycle = cfg.get("schedule", "constant") == "onecycle"
        kw = {}
        if onecycle:
            kw = {k: cfg[k] for k in ("warmup_frac", "warmup_shape", "div_factor",
                                       "final_div_factor")}
        return cls(lr0=float(cfg["lr"]), schedule="onecycle" if onecycle else "constant",
                   total_steps=int(cfg["epochs"]) * int(steps_per_epoch),
                   ema=float(cfg.get("ema_decay") or 0.0), **kw)

    @property
    def varies(self) -> bool:
        """True when the learning rate changes from step to step."""
        return self.schedule != "constant"

    def lr(self, step):
        """Learning rate of global step ``step`` (0-based; int or array), float64."""
        if not self.varies:
            return self.lr0 if np.ndim(step) == 0 else np.full(np.shape(step), self.lr0)
        return onecycle_lr(step, self.total_steps, self.lr0, self.warmup_frac,
                           self.div_factor, self.final_div_factor, self.warmup_shape)

    def ema_decay(self, step):
        """EMA decay applied after global step ``step`` (0-based): ``ema_decay_at(d, step + 1)``."""
        if not self.ema:
            return 0.0 if np.ndim(step) == 0 else np.zeros(np.shape(step))
        return ema_decay_at(self.ema, np.asarray(step) + 1)

