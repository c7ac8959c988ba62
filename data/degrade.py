"""Resize-and-compress augmentation: the training-side answer to "the verdict depends on
how the photo was shrunk".

CIFAKE's two classes were made differently (REAL: CIFAR-10's own downsampling; FAKE:
Stable Diffusion's 512x512 outputs shrunk to 32x32), then both stored as JPEG. A network
trained on them can learn the shrinking and compression fingerprint instead of the
content, and then a real photo's verdict follows the resize filter a user happened to
pick (docs/realworld.md). This augmentation puts a random, class-independent fingerprint
over a fraction of the training images each epoch, so the fingerprint stops telling the
classes apart:

1. enlarge the 32x32 image by an integer factor (``SCALES``) with a random filter: a
   stand-in for the larger source every real-world input starts from;
2. shrink it back to 32x32 with a random filter (``DOWN_FILTERS``, every filter a user's
   tool may use);
3. with probability ``JPEG_P``, a JPEG round trip at a random quality (``JPEG_QUALITY``)
   and chroma subsampling (4:2:0 or 4:4:4).

Which images are degraded, and how, is drawn from the run's seed and the epoch alone
(``degrade_rng``), before any image is touched, so every stack trains on exactly the same
images and a resumed run continues identically. The work is spread over worker processes;
the result does not depend on their number.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image

from .batching import rng
from .errors import UserError
from .images import SIZE

_STREAM_DEGRADE = 4  # a stream of data.batching.rng of its own (0-3 are taken there)

R = Image.Resampling
UP_FILTERS = (R.NEAREST, R.BILINEAR, R.BICUBIC, R.LANCZOS)
DOWN_FILTERS = (R.NEAREST, R.BOX, R.BILINEAR, R.HAMMING, R.BICUBIC, R.LANCZOS)
SCALES = (2, 3, 4, 6, 8)           # enlargement factors: sources of 64 to 256 pixels
JPEG_P = 0.75                      # share of degraded images that are also JPEG-coded
JPEG_QUALITY = (40, 95)            # inclusive range of the IJG quality
SUBSAMPLINGS = (0, 2)              # Pillow's codes: 4:4:4 and 4:2:0
_CHUNK = 512                       # images per worker task


@dataclass(frozen=True)
class Draws:
    """Per-image choices of one epoch; ``which`` indexes the degraded images."""
    which: np.ndarray    # (k,) int64, ascending
    scale: np.ndarray    # (k,) enlargement factor
    up: np.ndarray       # (k,) index into UP_FILTERS
    down: np.ndarray     # (k,) index into DOWN_FILTERS
    quality: np.ndarray  # (k,) JPEG quality, 0 = no JPEG
    subsampling: np.ndarray  # (k,) Pillow subsampling code


def check_probability(p) -> float:
    try:
        v = float(p)
    except (TypeError, ValueError):
        raise UserError(f"--degrade: {p!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise UserError(f"--degrade: {p!r} is not a probability in [0, 1]")
    return v


def degrade_rng(seed: int, epoch: int) -> np.random.Generator:
    return rng(seed, _STREAM_DEGRADE, epoch)


def draws(seed: int, epoch: int, n: int, p: float) -> Draws:
    """Which of ``n`` images are degraded this epoch (each with probability ``p``), and how."""
    g = degrade_rng(seed, epoch)
    which = np.flatnonzero(g.random(n) < p)
    k = len(which)
    jpeg = g.random(k) < JPEG_P
    quality = np.where(jpeg, g.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, k), 0)
    return Draws(which=which, scale=np.asarray(SCALES)[g.integers(0, len(SCALES), k)],
                 up=g.integers(0, len(UP_FILTERS), k), down=g.integers(0, len(DOWN_FILTERS), k),
                 quality=quality, subsampling=np.asarray(SUBSAMPLINGS)[g.integers(0, 2, k)])


def degrade_image(img: np.ndarray, scale: int, up: int, down: int, quality: int,
                  subsampling: int) -> np.ndarray:
    """One (32, 32, 3) uint8 image through enlarge -> shrink -> [JPEG]; same shape back."""
    im = Image.fromarray(img)
    big = SIZE * int(scale)
    im = im.resize((big, big), UP_FILTERS[up]).resize((SIZE, SIZE), DOWN_FILTERS[down])
    if quality:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality), subsampling=int(subsampling))
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _work(task) -> np.ndarray:
    """Degrade one chunk: (images (k, 32, 32, 3), then the k draws of each kind)."""
    imgs, *params = task
    return np.stack([degrade_image(im, *args) for im, *args in zip(imgs, *params)])


_POOL: dict = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    # Processes, not threads: Pillow's per-image Python overhead holds the GIL. "spawn",
    # not fork: the parent may be running JAX's or torch's threads, which fork would copy
    # in an undefined state. One pool per process, reused by every epoch.
    if workers not in _POOL:
        _POOL[workers] = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    return _POOL[workers]


def _tasks(images: np.ndarray, d: Draws) -> list[tuple]:
    return [(images[d.which[lo:lo + _CHUNK]], d.scale[lo:lo + _CHUNK], d.up[lo:lo + _CHUNK],
             d.down[lo:lo + _CHUNK], d.quality[lo:lo + _CHUNK], d.subsampling[lo:lo + _CHUNK])
            for lo in range(0, len(d.which), _CHUNK)]


def _assemble(images: np.ndarray, d: Draws, results) -> np.ndarray:
    out = images.copy()
    for lo, res in zip(range(0, len(d.which), _CHUNK), results):
        out[d.which[lo:lo + _CHUNK]] = res
    return out


def degrade_split(images: np.ndarray, seed: int, epoch: int, p: float,
                  workers: int | None = None) -> np.ndarray:
    """A copy of ``images`` (N, 32, 32, 3) uint8 with this epoch's draws applied; the
    input is not modified; ``p`` = 0 returns the input itself. ``workers``: processes
    (default: one per CPU; 1 = in this process); the result does not depend on it."""
    if p <= 0:
        return images
    d = draws(seed, epoch, len(images), p)
    tasks = _tasks(images, d)
    workers = workers or os.cpu_count() or 1
    results = map(_work, tasks) if workers == 1 or len(tasks) < 2 else \
        _pool(workers).map(_work, tasks)
    return _assemble(images, d, results)


class DegradeFeed:
    """The degraded copies of a training split for successive epochs (1-based, as
    ``degrade_split``'s), each the same array ``degrade_split`` gives. With worker
    processes, asking for epoch e hands epoch e + 1's tasks to the pool before it returns,
    so the next copy is made while epoch e trains (on a GPU the copy is otherwise most of a
    robust epoch's time). Asking for another epoch than the one prepared (a resumed run)
    drops the prepared one."""

    def __init__(self, images: np.ndarray, seed: int, p: float, last_epoch: int,
                 workers: int | None = None):
        self.images, self.seed, self.p, self.last_epoch = images, seed, p, last_epoch
        self.workers = workers or os.cpu_count() or 1
        self._next = None  # (epoch, draws, futures) handed to the pool

    def _submit(self, epoch: int):
        d = draws(self.seed, epoch, len(self.images), self.p)
        pool = _pool(self.workers)
        return epoch, d, [pool.submit(_work, t) for t in _tasks(self.images, d)]

    def get(self, epoch: int) -> np.ndarray:
        if self.p <= 0:
            return self.images
        if self.workers == 1:
            return degrade_split(self.images, self.seed, epoch, self.p, workers=1)
        if self._next is None or self._next[0] != epoch:
            self.close()
            self._next = self._submit(epoch)
        _, d, futures = self._next
        out = _assemble(self.images, d, (f.result() for f in futures))
        self._next = self._submit(epoch + 1) if epoch < self.last_epoch else None
        return out

    def close(self) -> None:
        """Drop the prepared epoch (tasks not yet started are cancelled)."""
        if self._next is not None:
            for f in self._next[2]:
                f.cancel()
            self._next = None
