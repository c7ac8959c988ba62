"""Scoring user images: what every stack's ``Detector`` and ``predict`` command share.

A stack contributes one thing, ``p_fake_batch(uint8 (B, 32, 32, 3)) -> (B,) P(FAKE)``,
by subclassing ``DetectorBase`` (plus its own ``load``). What a user touches -- which
inputs count as images (paths, folders, PIL images, uint8 arrays, encoded bytes), the
batching that bounds memory, the threshold, the result records, output files and the
command line -- is written here once, so the three stacks cannot drift apart.

Result records (one per input, in input order, failed inputs included)::

    {"index": 0, "path": "a.jpg" or None, "p_fake": 0.97 or None, "label": "FAKE"|"REAL"|None,
     "resized": bool or None, "original_size": [width, height] or None,
     "out_of_distribution": bool or None, "ood_reason": "..." or None, "error": None or "..."}

``out_of_distribution`` is True for every input that is not a 32x32 colour image (the
detector's verdict on a resized photo depends on how it was resized: docs/realworld.md),
with one line of why in ``ood_reason``; text output prints it beside the verdict.

``label`` is FAKE when ``p_fake >= threshold`` (0.5 by default).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data.errors import DataError, UserError, emit, one_line
from data.images import PREDICT_BATCH, SIZE, decodable_extensions, image_to_model_input, \
    load_image_bytes, load_image_for_model, resize_to_model
from .atomic import atomic_text_writer
from data.photo import is_out_of_distribution
from . import flags
from .flags import ArgumentParser, positive_int
# What a folder scan picks up is data.images.decodable_extensions() (compared
# case-insensitively): every format the installed Pillow decodes. A file named explicitly
# is always tried, whatever its extension.
DEFAULT_THRESHOLD = 0.5
OUTPUT_FORMATS = (".csv", ".jsonl")
CSV_FIELDS = ("index", "path", "p_fake", "label", "resized", "original_width",
              "original_height", "out_of_distribution", "ood_reason", "error")


# ------------------------------------------------------------------ inputs
class Unreadable:
    """An input known to be unusable before decoding (e.g. a folder with no images):
    it still gets its own result record, with this message as the error."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message

    def __fspath__(self) -> str:  # lets it pass where a path is expected, without opening it
        return self.path


def iter_image_paths(inputs: Iterable[str | os.PathLike]) -> Iterator[str | Unreadable]:
    """File paths and folders -> image paths, lazily (a folder of a million files is not
    listed into memory at once). A folder is scanned recursively, in sorted order, for
    files of every format the decoder reads (``decodable_extensions``); hidden files and
    folders (a leading '.', e.g. macOS '._photo.jpg' resource files) are skipped, and
    symlinked folders are not followed (a link cycle would never end). Anything else --
    a file of any extension, a missing path -- is passed through so that the loader
    reports it as that input's error. A folder holding no image, or one that cannot be
    listed, becomes an ``Unreadable`` entry, so every input appears in the output."""
    extensions = decodable_extensions()
    for item in inputs:
        p = os.fspath(item)
        if not os.path.isdir(p):
            yield p
            continue
        found = reported = 0
        problems: list[OSError] = []

        def unlistable():
            # os.walk reports a folder it cannot list through onerror, before or after the
            # folders it can: drained after each step and once more at the end, so the
            # last folder's error is not lost
            nonlocal reported
            while problems:
                e = problems.pop(0)
                reported += 1
                yield Unreadable(e.filename or p, f"{e.filename or p}: cannot list folder "
                                                  f"({e.strerror or e})")
        for root, dirs, files in os.walk(p, onerror=problems.append):
            yield from unlistable()
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and name.lower().endswith(extensions):
                    found += 1
                    yield os.path.join(root, name)
        yield from unlistable()
        if not found and not reported:
            yield Unreadable(p, f"{p}: folder holds no image file "
                                f"(none in a format Pillow decodes, e.g. .jpg .png "
                                f".webp; searched recursively)")


def to_model_input(item, index: int) -> tuple[np.ndarray, bool, tuple[int, int], str | None]:
    """One input -> ``(uint8 (32, 32, 3), resized?, original (width, height), path or None)``.

    Accepted: a file path (str or path-like), a PIL image, a uint8 array (H, W, 3),
    (H, W, 4) (alpha dropped, as for files), (H, W) or (H, W, 1) (grayscale) of any
    size, or the bytes of an image file. Raises ``DataError`` naming the input."""
    from PIL import Image
    if isinstance(item, Unreadable):
        raise DataError(item.message)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        arr, resized, size = load_image_for_model(path)
        return arr, resized, size, path
    where = f"input {index}"
    if isinstance(item, Image.Image):
        arr, resized, size = image_to_model_input(item, where)
        return arr, resized, size, None
    if isinstance(item, (bytes, bytearray, memoryview)):
        arr, resized, size = load_image_bytes(bytes(item), where)
        return arr, resized, size, None
    if isinstance(item, np.ndarray):
        return (*array_to_model_input(item, where), None)
    raise DataError(f"{where}: unsupported type {type(item).__name__}; pass a file path, a "
                    f"PIL image, a uint8 array (H, W, 3) or the bytes of an image file")


def array_to_model_input(a: np.ndarray, where: str) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """A uint8 image array -> model input. Other dtypes are refused rather than guessed:
    a float array may mean 0..1 or 0..255, and the wrong guess scores a different image."""
    if a.dtype != np.uint8:
        raise DataError(f"{where}: array of dtype {a.dtype}; pass uint8 pixels 0..255 "
                        f"(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(f"{where}: array of shape {a.shape}; expected an image (H, W, 3), "
                        f"(H, W, 4) or (H, W)")
    size = (int(a.shape[1]), int(a.shape[0]))
    return resize_to_model(np.ascontiguousarray(a)), size != (SIZE, SIZE), size


def _as_items(images) -> Iterable:
    """``predict``'s argument -> an iterable of single inputs. One image (a path, a PIL
    image, the bytes of a file as bytes, bytearray or memoryview, an array that is not
    4-D) is accepted as a list of one; a 4-D array is a batch (N, H, W, C)."""
    from PIL import Image
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return images if images.ndim == 4 else [images]
    return images


def check_threshold(t) -> float:
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise UserError(f"threshold must be a number in [0, 1], got {t!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise UserError(f"threshold must be a number in [0, 1], got {t!r}")
    return v


# ------------------------------------------------------------------ detector
class DetectorBase:
    """A trained run, ready to score images. Subclasses set ``stack`` and implement
    ``load`` and ``p_fake_batch``; everything else is shared.

    >>> det = Detector.load("runs/detector")               # doctest: +SKIP
    >>> det.predict(["a.jpg", pil_image, uint8_array])      # doctest: +SKIP
    [{"index": 0, "path": "a.jpg", "p_fake": 0.97, "label": "FAKE", ...}, ...]
    """

    stack = ""

    def __init__(self, run_dir: str | os.PathLike, config: dict, device: str):
        self.run_dir = Path(run_dir)
        self.config = config
        self.device = device  # what it actually runs on, e.g. "cpu" or "cuda:0"

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str = "auto") -> "DetectorBase":
        raise NotImplementedError

    def p_fake_batch(self, images: np.ndarray) -> np.ndarray:
        """P(FAKE) = 1 - sigmoid(logit) for uint8 (B, 32, 32, 3) images -> float64 (B,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__module__}.{type(self).__name__}(run_dir={str(self.run_dir)!r}, "
                f"model={self.config.get('model')!r}, device={self.device!r})")

    def predict(self, images, threshold: float = DEFAULT_THRESHOLD,
                batch_size: int = PREDICT_BATCH) -> list[dict]:
        """Score ``images`` (see ``to_model_input`` for what an image may be; one image
        or a 4-D uint8 array also work) -> one record per input, in order. An input
        that cannot be read gets ``error`` set and ``p_fake``/``label`` None; it does not
        stop the others."""
        return list(self.predict_iter(images, threshold, batch_size))

    def predict_iter(self, images, threshold: float = DEFAULT_THRESHOLD,
                     batch_size: int = PREDICT_BATCH) -> Iterator[dict]:
        """``predict`` as a generator: at most ``batch_size`` decoded images are held at
        once, so memory does not grow with the number of inputs."""
        threshold = check_threshold(threshold)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        pending: list[dict] = []
        arrays: list[np.ndarray] = []
        for i, item in enumerate(_as_items(images)):
            rec = {"index": i, "path": None, "p_fake": None, "label": None, "resized": None,
                   "original_size": None, "out_of_distribution": None, "ood_reason": None,
                   "error": None}
            if isinstance(item, (str, os.PathLike)):
                rec["path"] = os.fspath(item)
            try:
                arr, resized, size, _ = to_model_input(item, i)
            except DataError as e:
                rec["error"] = one_line(str(e))
            else:
                rec["resized"], rec["original_size"] = bool(resized), [int(size[0]), int(size[1])]
                # a colour image whose three channels are equal is grayscale content
                gray = "L" if np.array_equal(arr[..., 0], arr[..., 1]) and \
                    np.array_equal(arr[..., 1], arr[..., 2]) else None
                ood, why = is_out_of_distribution(size, gray)
                rec["out_of_distribution"], rec["ood_reason"] = ood, (why or None)
                arrays.append(arr)
            pending.append(rec)
            if len(arrays) == batch_size:
                yield from self._score(pending, arrays, threshold)
                pending, arrays = [], []
        yield from self._score(pending, arrays, threshold)

    def _score(self, pending: list[dict], arrays: list[np.ndarray], threshold: float):
        if arrays:
            probs = np.asarray(self.p_fake_batch(np.stack(arrays)), np.float64).reshape(-1)
            if probs.shape != (len(arrays),):  # a bug in a stack, not the user's input
                raise AssertionError(f"p_fake_batch returned {probs.shape} for "
                                     f"{len(arrays)} images")
            it = iter(probs.tolist())
            for rec in pending:
                if rec["error"] is not None:
                    continue
                p = next(it)
                if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                    rec["error"] = (f"{one_line(rec['path'] or 'input ' + str(rec['index']))}: "
                                    f"the model's output is not a probability ({p}); its "
                                    f"weights are probably corrupt or diverged")
                    continue
                rec["p_fake"] = p
                rec["label"] = "FAKE" if p >= threshold else "REAL"
        yield from pending


# ------------------------------------------------------------------ output
def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise UserError(f"--output {path}: unknown format {ext or '(no extension)'!r}; "
                        f"name it FILE.csv or FILE.jsonl")
    return ext


# A cell beginning with one of these is read as a formula by spreadsheet programs: a file
# named "=HYPERLINK(...).jpg" would run when the CSV is opened (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell that begins like a formula gets a leading ``'`` (OWASP's rule: the
    spreadsheet then shows it as text); every other value is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_row(rec: dict) -> dict:
    size = rec["original_size"] or (None, None)
    row = {k: rec[k] for k in ("index", "path", "p_fake", "label", "resized",
                               "out_of_distribution", "ood_reason", "error")}
    row.update(original_width=size[0], original_height=size[1])
    return {k: ("" if row[k] is None else spreadsheet_safe(row[k])) for k in CSV_FIELDS}


def text_line(rec: dict) -> str:
    name = one_line(rec["path"] if rec["path"] is not None else f"input {rec['index']}")
    note = f"  [out of distribution: {rec['ood_reason']}]" if rec["out_of_distribution"] else ""
    return f"{name}  P(FAKE)={rec['p_fake']:.4f}  {rec['label']}{note}"


def add_device_flag(ap: argparse.ArgumentParser, help_extra: str = "") -> None:
    def parse(s: str) -> str:
        try:
            return flags.device(s)  # the train commands' vocabulary
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    ap.add_argument("--device", type=parse, default="auto", metavar="{auto,cpu,gpu}",
                    help="where the model runs: auto = a GPU when one is visible, else the "
                         "CPU; 'cuda' is accepted for gpu" + help_extra)


def _threshold_arg(s: str) -> float:
    try:
        return check_threshold(s)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_predict_parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=prog, description=description,
        epilog=f"example:\n  {prog} --run runs/detector photos/ extra.jpg --output scores.csv")
    ap.add_argument("--run", required=True, help="run directory (config.json + model.safetensors)")
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                    help="image files (any size/mode) and folders (scanned recursively for "
                         "every image format the installed Pillow decodes: .jpg .png .webp "
                         ".gif .tif .bmp ...)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--output", metavar="FILE.csv|FILE.jsonl",
                     help="write one row per input (failed ones with their error) to this file, "
                          "which appears only once complete; stdout then gets a summary")
    out.add_argument("--json", action="store_true",
                     help="print a JSON list of the result records instead of lines")
    ap.add_argument("--threshold", type=_threshold_arg, default=DEFAULT_THRESHOLD,
                    help="label FAKE when P(FAKE) >= this")
    add_device_flag(ap)
    ap.add_argument("--batch-size", type=positive_int("--batch-size"), default=PREDICT_BATCH,
                    help="images decoded and scored at once (bounds memory)")
    return ap


def predict_cli(argv: list[str] | None, prog: str, description: str,
                load: Callable[[str, str], DetectorBase]) -> int:
    """The ``predict`` command of every stack. Exit status 1 if any input failed."""
    args = build_predict_parser(prog, description).parse_args(argv)
    fmt = output_format(args.output) if args.output else None
    if fmt:
        # the temp file is created before the model loads: a bad --output costs nothing
        with atomic_text_writer(args.output, newline="" if fmt == ".csv" else None) as f:
            det = load(args.run, args.device)
            n, failed = _write(det.predict_iter(iter_image_paths(args.inputs), args.threshold,
                                                args.batch_size), f, fmt)
        emit(f"wrote {n:,} row(s) to {one_line(args.output)}: {n - failed:,} scored, "
             f"{failed:,} failed", what=f"the summary (the rows are in {one_line(args.output)})")
        return 1 if failed else 0
    det = load(args.run, args.device)
    records = det.predict_iter(iter_image_paths(args.inputs), args.threshold, args.batch_size)
    return _print(records, args.json)


def _write(records: Iterable[dict], f, fmt: str) -> tuple[int, int]:
    n = failed = 0
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS) if fmt == ".csv" else None
    if writer:
        writer.writeheader()
    for rec in records:
        n += 1
        if rec["error"] is not None:
            failed += 1
            emit(f"error: {rec['error']}", err=True)
        if writer:
            writer.writerow(csv_row(rec))
        else:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    return n, failed


def _print(records: Iterable[dict], as_json: bool) -> int:
    failed = 0
    first = True
    if as_json:
        emit("[")
    ok = False
    try:
        for rec in records:
            if rec["error"] is not None:
                failed += 1
                emit(f"error: {rec['error']}", err=True)
            if as_json:
                emit(("" if first else ",\n") + json.dumps(rec, allow_nan=False), end="")
                first = False
            elif rec["error"] is None:
                emit(text_line(rec))
        ok = True
    finally:
        if as_json:  # even when interrupted or refused, what was printed stays valid JSON
            try:
                emit("\n]")
            except (OSError, UserError):
                if ok:  # (otherwise the first failure is the one to report)
                    raise
    return 1 if failed else 0
