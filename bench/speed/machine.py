"""What this machine can do, measured in the bench's own run, so each row can be read
against the machine it ran on.

- ``sgemm``: float32 matrix product rate of NumPy's BLAS on every core (GFLOP/s, best of
  several 2048^3 products): the compute roof. A CNN's training step is mostly products of
  this kind, so images/s x FLOPs per image / this rate is the fraction of the roof a row
  reaches.
- ``copy``: memory bandwidth of ``np.copyto`` (GB/s, bytes read + bytes written, best of
  several), once over 256 MiB (main memory) and once over 4 MiB (the caches). A step whose
  activations spill out of the caches is bound by the first.

``train_flops(model)`` (``core.architecture``'s, re-exported): floating-point operations of
one training image, counted as the products alone (2 per multiply-add): the forward pass F,
the weight gradients (F again) and the input gradients of every layer but the first (which
has no input to differentiate into). Bias adds, activations, pooling, BatchNorm and the
optimiser are left out: they are memory traffic, not FLOPs that a matrix unit could run.
"""
from __future__ import annotations

import time

import numpy as np

from core.architecture import train_flops  # noqa: F401  (the count lives in core; re-exported)

SGEMM_N = 2048          # side of the square float32 matrices timed for the compute roof
SGEMM_REPEATS = 5       # products timed; the best one counts
COPY_BIG = 256 << 20    # bytes: well past any cache of the project's machines
COPY_SMALL = 4 << 20    # bytes: fits in L3 (and mostly L2 on two cores)
COPY_REPEATS = 5


def sgemm_gflops(n: int = SGEMM_N, repeats: int = SGEMM_REPEATS) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)  # warm-up: threads started, pages touched
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def copy_gbps(nbytes: int, repeats: int = COPY_REPEATS) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    inner = max(1, (64 << 20) // nbytes)  # small buffers: several copies per timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            np.copyto(dst, src)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * nbytes / best / 1e9


def measure() -> dict:
    """The machine's compute roof and memory bandwidth, now (a few seconds)."""
    return {"sgemm_gflops": sgemm_gflops(), "copy_gbps": copy_gbps(COPY_BIG),
            "copy_cache_gbps": copy_gbps(COPY_SMALL),
            "how": f"sgemm: best of {SGEMM_REPEATS} NumPy float32 {SGEMM_N}^3 products on "
                   f"every core; copy: best of {COPY_REPEATS} np.copyto over "
                   f"{COPY_BIG >> 20} MiB and {COPY_SMALL >> 20} MiB (read + write bytes)"}


def roofline_fraction(model: str, images_per_s: float | None, sgemm: float | None) -> float | None:
    """Training images/s x FLOPs per image / the measured compute roof (0-1)."""
    if not images_per_s or not sgemm:
        return None
    return images_per_s * train_flops(model) / (sgemm * 1e9)
