"""What the JAX tests share: an epoch runner and its step configuration in one call."""
from __future__ import annotations

from jax_port.steps import CHUNK_BATCHES, EpochRunner, StepConfig


def runner(spec, *, lr: float, batch_size, seed: int = 0, decay: float = 0.0, schedule=None,
           rng_epoch_offset: int = 0, chunk_batches: int = CHUNK_BATCHES,
           **static) -> tuple[StepConfig, EpochRunner]:
    """(StepConfig.of(spec, **static), an EpochRunner over it); an EMA when the schedule
    keeps one."""
    cfg = StepConfig.of(spec, ema=bool(schedule is not None and schedule.ema), **static)
    return cfg, EpochRunner(cfg, batch_size=batch_size, seed=seed, lr=lr, schedule=schedule,
                            decay=decay, rng_epoch_offset=rng_epoch_offset,
                            chunk_batches=chunk_batches)
