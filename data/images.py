"""Image decoding: the one place bytes become uint8 RGB arrays.

Two entry points:
- ``decode_dataset_image`` for dataset files: must be exactly 32x32; the
  declared size is checked from the header *before* any pixel is decoded, so a
  decompression bomb costs nothing.
- ``load_image_for_model`` for user images (predict): any size and mode, turned
  into the model's 32x32 RGB input.

Mode policy (both): grayscale (L, I;16, I, F), palette (P), RGBA/LA, CMYK and
YCbCr are converted to RGB with Pillow's ``convert("RGB")``; transparency is
dropped (alpha is discarded, not composited), as torchvision's ImageFolder
loader does.
"""
from __future__ import annotations

import io
import json
import os
import stat
import sys
import warnings

import numpy as np
from PIL import Image

from .errors import DataError

SIZE = 32  # pixels: CIFAKE images are 32x32
# Upper bound on the declared pixel count of any image we agree to decode
# (user images in predict). 40 Mpx: a large photo is fine, a bomb is refused.
MAX_PIXELS = 40_000_000
# Upper bound on the bytes of one image file, on disk or inflated from a zip (64 MiB):
# a CIFAKE JPEG is ~2 KB; anything this large is not an image we should read.
MAX_FILE_BYTES = 64 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Filter used to bring a user's image to 32x32. BOX (area averaging) is the
# anti-aliased choice for large downscales; documented in README.
RESIZE_FILTER = Image.Resampling.BOX


def read_file_bounded(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes``. A FIFO, a device or a huge file
    is refused up front instead of hanging or exhausting memory."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, expected an image file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a pipe, device or socket)")
    if st.st_size > max_bytes:
        raise DataError(f"{path}: {st.st_size:,} bytes, more than a file of this kind should "
                        f"({max_bytes:,})")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:  # grew while we read it
        raise DataError(f"{path}: more than {max_bytes:,} bytes")
    return data


def _open(data: bytes, where: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{where}: image declares too many pixels (decompression bomb refused)") \
            from None
    except Image.UnidentifiedImageError:  # its message shows a BytesIO repr: say it plainly
        raise DataError(f"{where}: not a readable image (no image format recognised)") from None
    except Exception as e:  # OSError, SyntaxError from plugins
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    return im


def _to_rgb_array(im: Image.Image, where: str) -> np.ndarray:
    try:
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # truncated or corrupt pixel data
        raise DataError(f"{where}: corrupt or truncated image data ({type(e).__name__}: {e})") \
            from None


def decode_dataset_image(data: bytes, where: str) -> np.ndarray:
    """Bytes of one dataset file -> (32, 32, 3) uint8 RGB. Raises DataError naming ``where``."""
    im = _open(data, where)
    if im.size != (SIZE, SIZE):
        raise DataError(f"{where}: image is {im.size[0]}x{im.size[1]}, CIFAKE images must be "
                        f"{SIZE}x{SIZE}")
    arr = _to_rgb_array(im, where)
    if arr.shape != (SIZE, SIZE, 3):
        raise DataError(f"{where}: decoded to shape {arr.shape}, expected (32, 32, 3)")
    return arr


def load_image_for_model(path: str) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """A user's image file (JPEG/PNG/WebP/..., any size or mode) -> model input.

    Returns ``(image (32, 32, 3) uint8 RGB, resized?, original (width, height))``.
    Images that are not 32x32 are resized with ``RESIZE_FILTER`` (the detector
    was trained on 32x32 originals, so a resized image is out of distribution;
    callers say so in their output).
    """
    data = read_file_bounded(path)
    im = _open(data, path)
    size = im.size
    if size[0] < 1 or size[1] < 1:
        raise DataError(f"{path}: image has no pixels ({size[0]}x{size[1]})")
    arr = _to_rgb_array(im, path)
    resized = size != (SIZE, SIZE)
    if resized:
        arr = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), RESIZE_FILTER), dtype=np.uint8)
    return arr, resized, size


def score_images(paths: list[str], p_fake_batch, as_json: bool) -> int:
    """The one predict loop of every stack: decode each image with
    ``load_image_for_model``, score all good ones with ``p_fake_batch(uint8 (B, 32, 32, 3))
    -> (B,) P(FAKE)``, print one line per image (or a JSON list), and an ``error:`` line
    on stderr per bad file. Returns the exit status: 1 if any file failed, else 0.
    """
    good, arrays, failed = [], [], 0
    for path in paths:
        try:
            arr, resized, size = load_image_for_model(path)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        good.append((path, resized, size))
        arrays.append(arr)
    probs = np.asarray(p_fake_batch(np.stack(arrays)), np.float64).reshape(-1) if arrays \
        else np.zeros(0)
    results = [{"path": path, "p_fake": float(p), "verdict": "FAKE" if p >= 0.5 else "REAL",
                "resized": bool(resized), "original_size": [int(size[0]), int(size[1])]}
               for (path, resized, size), p in zip(good, probs)]
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            note = (f"  (resized from {r['original_size'][0]}x{r['original_size'][1]})"
                    if r["resized"] else "")
            print(f"{r['path']}  P(FAKE)={r['p_fake']:.4f}  {r['verdict']}{note}", flush=True)
    return 1 if failed else 0
