"""Image decoding: the one place bytes become uint8 RGB arrays.

Two entry points:
- ``decode_dataset_image`` for dataset files: must be exactly 32x32; the
  declared size is checked from the header *before* any pixel is decoded, so a
  decompression bomb costs nothing.
- ``load_image_for_model`` for user images (predict): any size and mode, turned
  into the model's 32x32 RGB input (``image_to_model_input`` for an image already
  opened or in memory, ``load_image_bytes`` for an upload).

Mode policy (both): palette (P), grayscale (L), RGBA/LA, CMYK and YCbCr are
converted to RGB with Pillow's ``convert("RGB")``; transparency is dropped (alpha
is discarded, not composited), as torchvision's ImageFolder loader does.
Pillow's ``convert`` clips instead of scaling the high-bit-depth grayscale modes,
so they are scaled here: 16-bit (``I;16*``, and ``I`` from a PNG) by 255/65535, 32-bit
float (``F``) by 255 when every value is in [0, 1]. A 32-bit integer image, or a float
one outside [0, 1], has no defined white level: refused, naming the file.
User images (predict) get their EXIF orientation applied first, as photo viewers do.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError
from .photo import SIZE, to_cifake_32  # photo holds the one resize pipeline

# Upper bound on the declared pixel count of any image we agree to decode
# (user images in predict). 40 Mpx: a large photo is fine, a bomb is refused.
MAX_PIXELS = 40_000_000
# Upper bound on the bytes of one image file, on disk or inflated from a zip (64 MiB):
# a CIFAKE JPEG is ~2 KB; anything this large is not an image we should read.
MAX_FILE_BYTES = 64 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images scored per forward pass in predict: bounds its memory whatever the number of
# files (a CNN's activations for 256 images are ~40 MB).
PREDICT_BATCH = 256


# Formats Pillow registers an opener for but cannot turn into pixels here: it reads only
# the header of an MPEG video; EPS needs the Ghostscript program (checked when asked).
_HEADER_ONLY = {"MPEG"}
# Registered without an opener of their own: opened by another format's plugin.
_OPENED_BY = {"MPO": "JPEG"}
# Formats decoded by a library Pillow may be built without (PIL.features names).
_CODEC = {"AVIF": "avif", "JPEG2000": "jpg_2000", "WEBP": "webp"}


@functools.cache
def decodable_extensions() -> tuple[str, ...]:
    """The file extensions (lower case, with the dot) of every format the installed Pillow
    decodes: what a folder scan picks up, so that scanning and decoding agree (a file of
    any other extension is still tried when named). Stub plugins, which identify a format
    but need a handler to decode it, are left out, as are ``_HEADER_ONLY`` and EPS when
    Ghostscript is missing, and the ``_CODEC`` formats this Pillow was built without (AVIF
    is scanned only where Pillow decodes it)."""
    from PIL import EpsImagePlugin, ImageFile, features
    Image.init()
    skip = set(_HEADER_ONLY) | (set() if EpsImagePlugin.has_ghostscript() else {"EPS"})
    skip |= {fmt for fmt, codec in _CODEC.items() if not features.check(codec)}
    out = set()
    for ext, fmt in Image.registered_extensions().items():
        opener = Image.OPEN.get(_OPENED_BY.get(fmt, fmt))
        if opener is None or fmt in skip:
            continue
        if isinstance(opener[0], type) and issubclass(opener[0], ImageFile.StubImageFile):
            continue
        out.add(ext.lower())
    return tuple(sorted(out))


def stat_regular_file(path: str) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), which must be a regular file: a FIFO would
    block the ``open`` that reads it and a device never end, so both are refused here,
    before anything opens them, naming the file and what it is."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: cannot read (Is a directory)")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file (a pipe, device or socket)")
    return st


def read_file_bounded(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes``. A FIFO, a device or a huge file
    is refused up front instead of hanging or exhausting memory."""
    st = stat_regular_file(path)
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


def check_pixels(size: tuple[int, int], where: str) -> None:
    """The pixel cap, applied to every size an image reports: its header's, and again once
    decoded, since a container (an ICNS, an ICO) may hold a larger picture than it
    declares."""
    if size[0] * size[1] > MAX_PIXELS:
        raise DataError(f"{where}: image declares too many pixels ({size[0]}x{size[1]}, more "
                        f"than {MAX_PIXELS:,}; decompression bomb refused)")


@contextlib.contextmanager
def _bounded(where: str):
    """Pillow's own pixel check (made an error at MAX_PIXELS, not a warning) for whatever
    it opens or decodes inside the block, nested pictures included."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{where}: image declares too many pixels (more than {MAX_PIXELS:,}; "
                        f"decompression bomb refused)") from None


def _open(data: bytes, where: str) -> Image.Image:
    try:
        with _bounded(where):
            im = Image.open(io.BytesIO(data))
    except DataError:
        raise
    except Image.UnidentifiedImageError:  # its message shows a BytesIO repr: say it plainly
        raise DataError(f"{where}: not a readable image (no image format recognised)") from None
    except Exception as e:  # OSError, SyntaxError from plugins
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    check_pixels(im.size, where)
    return im


def _high_depth_gray_to_u8(im: Image.Image, where: str) -> np.ndarray | None:
    """(H, W) uint8 for the grayscale modes Pillow's convert("RGB") would clip
    (16-bit would come out 99% white, float nearly black); None for every other mode."""
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and im.format in ("PNG", "PPM")):
        # 16-bit samples (a PNG's 16-bit gray may open as "I", a PGM with maxval > 255
        # always does, scaled by Pillow to 0..65535): 0..65535 -> 0..255, rounded
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise DataError(f"{where}: 16-bit image with samples outside 0..65535")
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "I":
        raise DataError(f"{where}: 32-bit integer image: it has no defined white level, "
                        f"so it cannot be scored faithfully; save it with 8 or 16 bits per channel")
    if mode == "F":
        a = np.asarray(im, np.float64)
        finite = np.isfinite(a).all()
        if not finite or a.min() < 0 or a.max() > 1:
            seen = "NaN/inf" if not finite else f"min {a.min():.4g}, max {a.max():.4g}"
            raise DataError(f"{where}: 32-bit float image with values outside [0, 1] ({seen}): "
                            f"no defined white level; save it with 8 or 16 bits per channel")
        return np.rint(a * 255).astype(np.uint8)
    return None


def _load(im: Image.Image, where: str) -> None:
    """Decode ``im``'s pixels (a no-op once done), with the pixel cap on what is decoded,
    nested pictures included, and on the size it decoded to."""
    try:
        with _bounded(where):
            im.load()
    except DataError:
        raise
    except Exception as e:  # truncated or corrupt pixel data
        raise DataError(f"{where}: corrupt or truncated image data ({type(e).__name__}: {e})") \
            from None
    check_pixels(im.size, where)


def _to_rgb_array(im: Image.Image, where: str) -> np.ndarray:
    _load(im, where)
    try:
        gray = _high_depth_gray_to_u8(im, where)
        if gray is not None:
            return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
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


def resize_to_model(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any size -> (32, 32, 3), the detector's input.

    The one place a user's image changes size: ``data.photo.to_cifake_32`` (centre square
    crop, bilinear shrink, JPEG round trip at CIFAKE's quality 75 / 4:2:0), the pipeline
    that puts a shrunk photo closest to CIFAKE's own images (docs/realworld.md)."""
    if arr.shape[:2] == (SIZE, SIZE):
        return arr
    return to_cifake_32(Image.fromarray(arr))


def image_to_model_input(im: Image.Image, where: str) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """An opened PIL image (file or in memory) -> ``(image (32, 32, 3) uint8 RGB, resized?,
    original (width, height))``, after the EXIF orientation and the mode policy above.

    Images that are not 32x32 go through ``resize_to_model`` (the detector was trained on
    32x32 originals, so a resized image is out of distribution; callers say so)."""
    check_pixels(im.size, where)  # an in-memory image never went through _open's check
    _load(im, where)  # before the EXIF step, which would decode it unbounded
    try:
        # a phone photo stores its pixels sideways plus an EXIF orientation tag; viewers
        # (and so the user) see it rotated, and that is the image to score
        fmt = im.format
        im = ImageOps.exif_transpose(im)
        im.format = fmt  # transposing returns a new image without it; the mode policy needs it
    except Exception as e:  # corrupt pixel data or EXIF block
        raise DataError(f"{where}: corrupt or truncated image data ({type(e).__name__}: {e})") \
            from None
    size = im.size
    if size[0] < 1 or size[1] < 1:
        raise DataError(f"{where}: image has no pixels ({size[0]}x{size[1]})")
    arr = _to_rgb_array(im, where)
    return resize_to_model(arr), size != (SIZE, SIZE), size


def load_image_bytes(data: bytes, where: str) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """The bytes of a user's image file (e.g. an upload) -> model input, as
    ``image_to_model_input``; ``where`` names it in errors."""
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{where}: {len(data):,} bytes, more than any image file should "
                        f"({MAX_FILE_BYTES:,})")
    return image_to_model_input(_open(data, where), where)


def load_image_for_model(path: str) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """A user's image file (JPEG/PNG/WebP/..., any size or mode) -> model input.

    Returns ``(image (32, 32, 3) uint8 RGB, resized?, original (width, height))``.
    """
    return image_to_model_input(_open(read_file_bounded(path), path), path)
