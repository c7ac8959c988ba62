"""Bringing a photograph of any size to a 32x32 input that looks like CIFAKE's own images.

CIFAKE's images (both classes) are 32x32 RGB JPEGs at the IJG quality-75 tables with 4:2:0
chroma subsampling (measured on every sampled file: ``python -m bench.photo.study``). A
detector trained on them has learned, among other things, how they were shrunk and
compressed, so the way a large photo is brought to 32x32 moves its verdict. ``shrink``
is every candidate way (the study scores each of them); ``to_cifake_32`` is the one
chosen because its output's luma spectrum is the closest to CIFAKE's, both classes
pooled (docs/realworld.md gives the measurements and the reasoning). A verdict on any
input that was not already 32x32 remains out of distribution: ``is_out_of_distribution``
says so and why.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import DataError

# Pillow's resampling filters by the names the study and its tables use. Pillow's
# bilinear/bicubic/lanczos widen their support by the scale factor when shrinking
# (they anti-alias), unlike the fixed-support kernels of OpenCV or torch's interpolate.
FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# How CIFAKE's files are encoded (both classes): IJG tables scaled to quality 75, 4:2:0.
SIZE = 32  # pixels: CIFAKE images, and so the detector's input, are SIZE x SIZE
CIFAKE_JPEG_QUALITY = 75
CIFAKE_JPEG_SUBSAMPLING = 2  # Pillow's code for 4:2:0

# The chosen pipeline (see docs/realworld.md for why).
PIPELINE_FILTER = "bilinear"
PIPELINE_JPEG_QUALITY: int | None = CIFAKE_JPEG_QUALITY
PIPELINE = "centre square crop, Pillow bilinear to 32x32, JPEG quality 75 4:2:0 re-encode"

# Modes whose pixels carry no colour: CIFAKE has no grayscale image, so such a photo
# is out of distribution even at 32x32.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def centre_square(im: Image.Image) -> Image.Image:
    """The largest centred square of ``im``: CIFAKE's images are square, and squashing a
    4:3 photo to a square would distort every shape in it."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s)) if (w, h) != (s, s) else im


def jpeg_roundtrip(rgb: np.ndarray, quality: int,
                   subsampling: int = CIFAKE_JPEG_SUBSAMPLING) -> np.ndarray:
    """Encode uint8 RGB as JPEG at ``quality`` (Pillow's IJG tables) and decode it again."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8), "RGB").save(
        buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def shrink(im: Image.Image, filter: str, jpeg_quality: int | None = None,
           crop: bool = True) -> np.ndarray:
    """One candidate preprocessing: [centre square crop], resize to 32x32 with ``filter``
    (a key of FILTERS), [JPEG re-encode at ``jpeg_quality``] -> uint8 (32, 32, 3) RGB.

    Any mode is converted to RGB first (alpha dropped, as the data layer does). A 32x32
    input is returned unchanged by the resize; the JPEG step still applies when asked.
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter {filter!r}; choose one of {', '.join(FILTERS)}")
    w, h = im.size
    if w < 1 or h < 1:
        raise DataError(f"image has no pixels ({w}x{h})")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if crop:
        im = centre_square(im)
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), FILTERS[filter])
    arr = np.asarray(im, dtype=np.uint8)
    if jpeg_quality is not None:
        arr = jpeg_roundtrip(arr, jpeg_quality)
    return arr


def to_cifake_32(im: Image.Image) -> np.ndarray:
    """The documented preprocessing for a user's image: ``PIPELINE`` -> uint8 (32, 32, 3) RGB.

    A 32x32 image is passed through untouched (no re-encode): it may be one of CIFAKE's
    own files, which are already JPEG quality 75, and a second compression would change it.
    """
    if im.size == (SIZE, SIZE):
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return shrink(im, PIPELINE_FILTER, PIPELINE_JPEG_QUALITY, crop=True)


def is_out_of_distribution(original_size: tuple[int, int],
                           mode: str | None = None) -> tuple[bool, str]:
    """Whether a verdict on an input of ``original_size`` (width, height) and Pillow
    ``mode`` falls outside what the detector was trained on, with one line of why
    ('' when it does not). Only 32x32 colour images are in distribution: the network has
    never seen a shrunk photo, and its verdict on one depends on how it was shrunk."""
    w, h = (int(v) for v in original_size)
    if w < 1 or h < 1:
        raise ValueError(f"original_size must be positive, got {w}x{h}")
    reasons = []
    if (w, h) != (SIZE, SIZE):
        if w < SIZE or h < SIZE:
            how = f"enlarged from {w}x{h} to {SIZE}x{SIZE}"
        else:
            how = f"shrunk from {w}x{h} to {SIZE}x{SIZE}"
        if w != h:
            how += " after cropping to its centre square"
        reasons.append(f"{how}; the detector was trained only on {SIZE}x{SIZE} CIFAKE images "
                       f"and its verdict on a resized photo depends on how it was resized")
    if mode is not None and mode in GRAYSCALE_MODES:
        reasons.append("a grayscale image; every CIFAKE image is in colour")
    return (bool(reasons), "; ".join(reasons))
