"""Test-time perturbations of the robustness battery (``cifake.battery``): pure functions
on uint8 RGB images, each with one fixed definition.

Every function takes one image (H, W, 3) or a batch (N, H, W, 3) of uint8 and returns a
new uint8 array of the same shape; the input is never modified.

- ``jpeg(images, quality)``: a JPEG round trip per image through Pillow's encoder, the
  IJG tables scaled to ``quality`` with 4:2:0 chroma subsampling (``data.photo.
  jpeg_roundtrip``: the settings CIFAKE's own files were written with), decoded back.
- ``resize(images, scale, filter)``: down to round(scale x H) by round(scale x W) pixels
  (at least 1) with Pillow's ``filter`` (a key of ``data.photo.FILTERS``), then back up to
  H x W with the same filter. Pillow's bilinear widens its kernel when shrinking (it
  anti-aliases); nearest takes the source pixel under each output pixel's centre.
- ``blur(images, sigma)``: a Gaussian blur computed in NumPy, not Pillow's
  ``GaussianBlur`` (which approximates the Gaussian with three box blurs): separable
  weights exp(-x^2 / 2 sigma^2) for |x| <= ceil(4 sigma), normalised to sum 1, along the
  rows and then the columns of each channel in float64; edges mirrored half a pixel out
  (d c b a | a b c d | d c b a, scipy.ndimage's 'reflect'); rounded half to even and
  clipped to 0..255. sigma 0 returns the image unchanged.
- ``noise(images, sigma, indices, seed)``: pixel + sigma x z in float64, rounded half to
  even and clipped to 0..255, with z ~ N(0, 1) per pixel and channel drawn by NumPy's
  ``default_rng(SeedSequence([seed, index]))`` for the image at position ``index`` of
  its split. An image's noise depends only on (seed, index): not on the batch it is
  scored in, nor on which other images are scored, and every sigma scales the same z.

``BATTERY`` is the battery's list of conditions and ``apply`` runs one of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .photo import FILTERS, jpeg_roundtrip

NOISE_SEED = 0  # the battery's seed for ``noise``
_TRUNCATE = 4.0  # the blur kernel reaches ceil(_TRUNCATE * sigma) pixels each way


def _as_batch(images) -> tuple[np.ndarray, bool]:
    """(N, H, W, 3) uint8 view of ``images``, and whether it was a single image."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 3:
        return a[None], True
    if a.ndim == 4 and a.shape[-1] == 3:
        return a, False
    raise ValueError(f"images must be (H, W, 3) or (N, H, W, 3), got shape {a.shape}")


def _per_image(images, one) -> np.ndarray:
    batch, single = _as_batch(images)
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        out[i] = one(img)
    return out[0] if single else out


def _round_clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def jpeg(images, quality: int) -> np.ndarray:
    """JPEG round trip at ``quality`` (1..100), 4:2:0, per image."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    return _per_image(images, lambda img: jpeg_roundtrip(img, int(quality)))


def resize(images, scale: float, filter: str) -> np.ndarray:
    """Down by ``scale`` (0 < scale <= 1) and back up, both with Pillow's ``filter``."""
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter {filter!r}; choose one of {', '.join(FILTERS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"resize scale must be in (0, 1], got {scale}")
    f = FILTERS[filter]

    def one(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        small = (max(1, round(scale * w)), max(1, round(scale * h)))
        if small == (w, h):
            return img
        return np.asarray(Image.fromarray(img).resize(small, f).resize((w, h), f), np.uint8)
    return _per_image(images, one)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The blur's 1-D weights: exp(-x^2 / 2 sigma^2), |x| <= ceil(4 sigma), sum 1."""
    r = int(np.ceil(_TRUNCATE * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _convolve_axis(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    # 'symmetric' repeats the edge pixel (d c b a | a b c d), as scipy's 'reflect'; a
    # kernel wider than the image needs the padding folded more than once
    xp = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out, term = np.zeros_like(x), np.empty_like(x)
    window = [slice(None)] * x.ndim
    for j, w in enumerate(k):
        window[axis] = slice(j, j + n)
        np.multiply(xp[tuple(window)], w, out=term)
        out += term
    return out


def blur(images, sigma: float) -> np.ndarray:
    """Gaussian blur of standard deviation ``sigma`` pixels (module docstring)."""
    if not sigma >= 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    batch, single = _as_batch(images)
    if sigma == 0:
        out = batch.copy()
    else:
        k = gaussian_kernel(sigma)
        x = _convolve_axis(batch.astype(np.float64), k, axis=1)
        out = _round_clip(_convolve_axis(x, k, axis=2))
    return out[0] if single else out


def noise_field(indices, shape: tuple[int, ...], seed: int = NOISE_SEED) -> np.ndarray:
    """z ~ N(0, 1) of ``shape`` (one image's) for each index: float64 (len(indices), *shape)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((len(idx), *shape), np.float64)
    for i, k in enumerate(idx):
        g = np.random.default_rng(np.random.SeedSequence([int(seed), int(k)]))
        out[i] = g.standard_normal(shape)
    return out


def noise(images, sigma: float, indices, seed: int = NOISE_SEED) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` (pixel levels of 255); ``indices``: each image's
    position in its split (one int for a single image)."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    batch, single = _as_batch(images)
    idx = np.asarray(indices, np.int64).reshape(-1)
    if len(idx) != len(batch):
        raise ValueError(f"{len(batch)} image(s) but {len(idx)} index(es)")
    if sigma == 0:
        out = batch.copy()
    else:
        out = _round_clip(batch + sigma * noise_field(idx, batch.shape[1:], seed))
    return out[0] if single else out


# ------------------------------------------------------------------ the battery
@dataclass(frozen=True)
class Perturbation:
    key: str            # e.g. "jpeg75", "resize0.5-nearest", "blur1.0", "noise5"
    label: str          # for tables
    kind: str           # clean | jpeg | resize | blur | noise
    value: float = 0.0  # JPEG quality, resize scale, or sigma
    filter: str = ""    # resize only: a key of data.photo.FILTERS


def _battery() -> tuple[Perturbation, ...]:
    out = [Perturbation("clean", "clean (as stored)", "clean")]
    out += [Perturbation(f"jpeg{q}", f"JPEG quality {q}", "jpeg", q) for q in (90, 75, 50, 30)]
    out += [Perturbation(f"resize{s}-{f}", f"resize x{s} and back, {f}", "resize", s, f)
            for s in (0.5, 0.75) for f in ("bilinear", "nearest")]
    out += [Perturbation(f"blur{s}", f"Gaussian blur sigma {s}", "blur", s) for s in (0.5, 1.0)]
    out += [Perturbation(f"noise{s}", f"Gaussian noise sigma {s}/255", "noise", s) for s in (2, 5)]
    return tuple(out)


BATTERY = _battery()


def apply(p: Perturbation, images: np.ndarray, indices, seed: int = NOISE_SEED) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 under ``p``; ``indices`` (N,) their positions in the
    split (only noise uses them). The clean condition returns ``images`` itself."""
    if p.kind == "clean":
        return images
    if p.kind == "jpeg":
        return jpeg(images, int(p.value))
    if p.kind == "resize":
        return resize(images, p.value, p.filter)
    if p.kind == "blur":
        return blur(images, p.value)
    if p.kind == "noise":
        return noise(images, p.value, indices, seed)
    raise ValueError(f"unknown perturbation kind {p.kind!r}")


def timed_apply(task: tuple) -> tuple[np.ndarray, float]:
    """``apply(*task)`` and the seconds it took: what a worker process of the battery runs."""
    t0 = time.perf_counter()
    out = apply(*task)
    return out, time.perf_counter() - t0
