"""Batch order and augmentation draws shared by every stack.

Everything random in the input pipeline is drawn here, from ``(seed, epoch)``,
with NumPy, so the NumPy, PyTorch and JAX stacks see the same batches and the
same augmented images and can follow identical training trajectories.

Conventions:
- the epoch's order is a permutation of ``range(n)`` (sampling without
  replacement), reshuffled every epoch: ``epoch_order(seed, epoch, n)``;
- batches are consecutive slices of that order; the last partial batch is
  kept (``drop_last=False``) unless asked otherwise; ``batch_size=None`` is
  full-batch mode: one batch holding the whole split (in the permuted order);
- data parallelism splits each of those (global) batches into contiguous parts, one
  per process (``rank_rows``): the batches, and so the function trained, stay the same;
- augmentation draws are per *position in the epoch order*: the k-th image of
  the epoch gets crop offsets ``dy[k], dx[k]`` in ``[0, 2 * pad]`` and flip flag
  ``flip[k]``; slice them exactly as you slice the order;
- the reference ``augment`` applies, to NHWC uint8 images: zero padding of
  ``pad`` pixels on each side, a 32x32 crop at ``(dy, dx)`` of the padded image,
  then a horizontal flip where ``flip`` is set (torchvision's
  ``RandomCrop(32, padding=4)`` followed by ``RandomHorizontalFlip()``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

PAD = 4  # pixels of zero padding for the random crop, as in the original v3

# Independent random streams derived from one seed (SeedSequence spawn keys).
_STREAM_ORDER, _STREAM_AUG, _STREAM_INIT, _STREAM_DROPOUT, _STREAM_VAL = 0, 1, 2, 3, 4


def rng(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator for stream ``keys`` (e.g. (stream, epoch)) of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation of ``range(n)`` for this epoch (int64)."""
    return rng(seed, _STREAM_ORDER, epoch).permutation(n)


def num_batches(n: int, batch_size: int | None, drop_last: bool = False) -> int:
    if batch_size is None:
        return 1 if n > 0 else 0
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_slices(n: int, batch_size: int | None, drop_last: bool = False) -> list[slice]:
    """Slices of the epoch order that form the batches."""
    if batch_size is None:
        return [slice(0, n)]
    if batch_size <= 0:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    return [slice(i * batch_size, min((i + 1) * batch_size, n))
            for i in range(num_batches(n, batch_size, drop_last))]


def rank_rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``total`` images that process ``rank`` of
    ``world`` trains on (data parallelism): contiguous parts in rank order whose sizes
    differ by at most one (the first ``total % world`` ranks take one more), so the parts
    tile the batch, nothing is padded or repeated, and the same positions index its
    augmentation draws."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}")
    q, r = divmod(total, world)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


@dataclass(frozen=True)
class AugDraws:
    """Per-image augmentation parameters, aligned with the epoch order."""
    dy: np.ndarray    # (n,) int32 in [0, 2*pad]: crop top in padded coordinates
    dx: np.ndarray    # (n,) int32 in [0, 2*pad]: crop left in padded coordinates
    flip: np.ndarray  # (n,) bool: flip horizontally after the crop

    def __getitem__(self, s) -> "AugDraws":
        return AugDraws(self.dy[s], self.dx[s], self.flip[s])

    def __len__(self) -> int:
        return int(self.dy.shape[0])


def augment_draws(seed: int, epoch: int, n: int, pad: int = PAD) -> AugDraws:
    g = rng(seed, _STREAM_AUG, epoch)
    dy = g.integers(0, 2 * pad + 1, size=n, dtype=np.int32)
    dx = g.integers(0, 2 * pad + 1, size=n, dtype=np.int32)
    flip = g.random(n) < 0.5
    return AugDraws(dy, dx, flip)


def identity_draws(n: int, pad: int = PAD) -> AugDraws:
    """Draws that leave images unchanged (centre crop, no flip)."""
    return AugDraws(np.full(n, pad, np.int32), np.full(n, pad, np.int32), np.zeros(n, bool))


def augment(images: np.ndarray, draws: AugDraws, pad: int = PAD) -> np.ndarray:
    """NumPy reference: pad with zeros, crop at (dy, dx), then flip. (B, H, W, C) -> same shape."""
    b, h, w, c = images.shape
    if len(draws) != b:
        raise ValueError(f"{len(draws)} draws for {b} images")
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), images.dtype)
    padded[:, pad:pad + h, pad:pad + w] = images
    rows = draws.dy[:, None] + np.arange(h)[None, :]            # (B, H)
    cols = draws.dx[:, None] + np.arange(w)[None, :]            # (B, W)
    cols = np.where(draws.flip[:, None], cols[:, ::-1], cols)  # flip after crop
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def dropout_rng(seed: int, epoch: int) -> np.random.Generator:
    """Stream for dropout masks drawn in NumPy (tests that share masks across stacks)."""
    return rng(seed, _STREAM_DROPOUT, epoch)


def val_rng(val_seed: int) -> np.random.Generator:
    """Stream for drawing the validation split. Seeded by ``--val-seed``, not the training
    seed: runs of every training seed hold out the same images."""
    return rng(val_seed, _STREAM_VAL)


def init_rng(seed: int) -> np.random.Generator:
    """Stream for weight initialisation drawn in NumPy."""
    return rng(seed, _STREAM_INIT)


def to_float(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 pixels -> [0, 1] floats (pixels / 255), the scaling every stack uses."""
    return images.astype(dtype) / np.asarray(255, dtype)
