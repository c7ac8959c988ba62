"""Checked .safetensors files: the one format weights and resume state are stored in.
Nothing is ever unpickled; names, shapes and dtypes are validated on load."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .errors import UserError

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
    atomic_write_bytes(path, data)


def load_safetensors(path: str | os.PathLike,
                     expected: dict[str, tuple[tuple[int, ...], str]] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a .safetensors file as NumPy arrays, validating names, shapes and dtypes.

    ``expected``: name -> (shape, dtype name). Missing, extra or mis-shaped
    tensors raise UserError naming the file and the tensor.
    """
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise UserError(f"{path}: not a valid .safetensors file ({type(e).__name__}: {e})") \
            from None
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise UserError(f"{path}: checkpoint does not fit this model "
                            f"(missing {missing[:4]}, unexpected {extra[:4]})")
        for k, (shape, dtype) in expected.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(shape):
                raise UserError(f"{path}: tensor '{k}' has shape {tuple(t.shape)}, "
                                f"this model needs {tuple(shape)}")
            if dtype is not None and str(t.dtype) != dtype:
                raise UserError(f"{path}: tensor '{k}' has dtype {t.dtype}, expected {dtype}")
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
