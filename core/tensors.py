"""Checked .safetensors files: the one format weights and resume state are stored in.
Nothing is ever unpickled; names, shapes and dtypes are validated on load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from data.errors import UserError
from data.images import stat_regular_file

FORMAT = "cifake-detector/1"


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """NumPy arrays -> .safetensors, atomically."""
    from safetensors.numpy import save
    # np.ascontiguousarray turns a 0-d array into shape (1,); scalars such as BatchNorm's
    # num_batches_tracked must keep shape (), so only copy what is not C-contiguous.
    def contiguous(v):
        a = np.asarray(v)
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    data = save({k: contiguous(v) for k, v in tensors.items()},
                metadata={"format": FORMAT, **(metadata or {})})
    atomic_write_bytes(path, _sorted_metadata(data))


def _sorted_metadata(data: bytes) -> bytes:
    """The same file with its metadata in key order: the library writes it in hash order,
    which differs from run to run, so equal tensors and metadata would give different
    bytes. Reordering keys keeps the header's length, so the tensor offsets stay valid."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(new) > n:  # cannot happen for the library's compact JSON; keep its bytes then
        return data
    return data[:8] + new + b" " * (n - len(new)) + data[8 + n:]


def _open_safetensors(path: Path):
    from safetensors import safe_open
    if not os.path.lexists(path):
        raise UserError(f"{path}: checkpoint not found")
    stat_regular_file(str(path))  # a FIFO or a device is named as such, never opened
    try:
        with open(path, "rb"):  # says "permission denied" instead of a parser's message
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise UserError(f"{path}: not a valid .safetensors file ({type(e).__name__}: {e})") \
            from None


def read_safetensors_header(path: str | os.PathLike
                            ) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """(name -> (shape, dtype name), metadata) of a .safetensors file, from its header
    alone: no tensor data is read, so a checkpoint padded with a huge tensor costs nothing."""
    path = Path(path)
    with _open_safetensors(path) as f:
        try:
            meta = dict(f.metadata() or {})
            header = {}
            for k in f.keys():
                sl = f.get_slice(k)
                header[k] = (tuple(int(d) for d in sl.get_shape()), _dtype_name(sl.get_dtype()))
        except Exception as e:
            raise UserError(f"{path}: not a valid .safetensors file "
                            f"({type(e).__name__}: {e})") from None
    return header, meta


# safetensors' dtype codes -> NumPy names (the loader returns NumPy arrays of these)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
              "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


def _dtype_name(code: str) -> str:
    return _ST_DTYPES.get(str(code).upper(), str(code).lower())


def load_safetensors(path: str | os.PathLike,
                     expected: dict[str, tuple[tuple[int, ...], str]] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a .safetensors file as NumPy arrays, validating names, shapes, dtypes and values.

    ``expected``: name -> (shape, dtype name or None). Missing, extra or mis-shaped
    tensors raise UserError naming the file and the tensor, checked from the header
    *before* any tensor is read. A floating tensor holding NaN or inf is refused too:
    no stack ever saves one (training stops at the first non-finite loss), so it can
    only be a corrupt or diverged file, and it would score every image as NaN.
    """
    path = Path(path)
    header, meta = read_safetensors_header(path)
    if expected is not None:
        missing = sorted(set(expected) - set(header))
        extra = sorted(set(header) - set(expected))
        if missing or extra:
            raise UserError(f"{path}: checkpoint does not fit this model "
                            f"(missing {missing[:4]}, unexpected {extra[:4]})")
        for k, (shape, dtype) in expected.items():
            got_shape, got_dtype = header[k]
            if got_shape != tuple(shape):
                raise UserError(f"{path}: tensor '{k}' has shape {got_shape}, "
                                f"this model needs {tuple(shape)}")
            if dtype is not None and got_dtype != dtype:
                raise UserError(f"{path}: tensor '{k}' has dtype {got_dtype}, expected {dtype}")
    try:
        with _open_safetensors(path) as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid .safetensors file ({type(e).__name__}: {e})") \
            from None
    for k, t in tensors.items():
        if t.dtype.kind == "f" and not np.isfinite(t).all():
            bad = int((~np.isfinite(t)).sum())
            raise UserError(f"{path}: tensor '{k}' holds {bad:,} non-finite values (NaN/inf): "
                            f"the file is corrupt or the run diverged")
    return tensors, meta


def check_uniform_float(path, tensors: dict[str, np.ndarray]) -> str:
    """All tensors float32, or all float64 (MLP checkpoints keep their training dtype).

    Returns the dtype name; otherwise a UserError naming the first offending tensor.
    """
    first = next(iter(tensors))
    want = str(tensors[first].dtype)
    for k, t in tensors.items():
        d = str(t.dtype)
        if d not in ("float32", "float64") or d != want:
            raise UserError(f"{path}: tensor '{k}' has dtype {d}; tensors must all be float32 "
                            f"or all float64 (tensor '{first}' is {want})")
    return want
