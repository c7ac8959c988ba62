"""Canonical MLP checkpoints: ``W1, b1, ..., WL, bL`` in one .safetensors file.

``Wl`` has shape (n_l, n_{l-1}) and ``bl`` shape (n_l, 1), where
``layer_dims = [3072, n_1, ..., 1]``; the input vector is the NHWC uint8 image
flattened in (H, W, C) order, / 255. Metadata: {"family": "mlp", "model":
"mlp2"|"mlp4", "layer_dims": "[3072, 7, 1]", "dtype": "float32"|"float64"}.
Tensors are stored in the dtype they were trained in (float64 runs keep every
bit, which --resume needs); ``load`` accepts float32 and float64.
"""
from __future__ import annotations

import json

import numpy as np

from data.errors import UserError
from core.architecture import layer_dims_from_metadata, mlp_tensors
from core.tensors import check_uniform_float, load_safetensors, read_safetensors_header, save_safetensors

FAMILY = "mlp"


def save(path, params: dict[str, np.ndarray], model: str, layer_dims: list[int],
         extra_meta: dict[str, str] | None = None) -> None:
    """Write ``params`` atomically under canonical names (shapes checked first)."""
    shapes = mlp_tensors(layer_dims)
    if set(params) != set(shapes) or any(params[k].shape != s for k, (s, _) in shapes.items()):
        raise ValueError(f"params do not match layer_dims {layer_dims}")
    dtype = str(params["W1"].dtype)
    meta = {"family": FAMILY, "model": model, "layer_dims": json.dumps(list(layer_dims)),
            "dtype": dtype, **(extra_meta or {})}
    save_safetensors(path, params, meta)


def load(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a canonical MLP checkpoint -> (params, metadata), validating names, shapes, dtype.

    Metadata gains ``layer_dims`` parsed as a list of ints.
    """
    _, meta = read_safetensors_header(path)  # the metadata says which shapes to expect
    if meta.get("family") != FAMILY:
        raise UserError(f"{path}: not an MLP checkpoint (family {meta.get('family')!r})")
    dims = layer_dims_from_metadata(path, meta)
    params, _ = load_safetensors(path, mlp_tensors(dims))
    check_uniform_float(path, params)
    meta = dict(meta, layer_dims=dims)
    return params, meta

