"""``model.safetensors`` under the spec stacks' canonical names, so any stack of a family
can evaluate any other's checkpoint.

MLP: numpy_mlp's ``W1, b1, ...`` (float32 or float64), metadata {"family": "mlp", "model",
"layer_dims": "[3072, 7, 1]", "dtype"}. CNN: torch_cnn's ``state_dict`` names (float32,
``bn*.num_batches_tracked`` int64 shape ()), metadata {"family": "cnn", "model"}.
The conversion is ``convert.py`` (lossless); names/shapes/dtypes are validated on load.
"""
from __future__ import annotations

import json

import numpy as np

from data.errors import UserError
from core.architecture import cnn_tensors, layer_dims_from_metadata, mlp_tensors
from core.tensors import check_uniform_float, load_safetensors, read_safetensors_header, save_safetensors

from . import convert
from .model import CNN_VARIANTS, ModelSpec, get_spec


def to_tensors(spec: ModelSpec, variables: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Canonical tensors + metadata for ``variables`` (what ``save`` writes)."""
    tensors = convert.to_canonical(jax_to_numpy(variables))
    if spec.family == "mlp":
        meta = {"family": "mlp", "model": spec.name, "layer_dims": json.dumps(list(spec.layer_dims)),
                "dtype": str(tensors["W1"].dtype)}
    else:
        meta = {"family": "cnn", "model": spec.name}
    return tensors, meta


def save(path, spec: ModelSpec, variables: dict, extra_meta: dict[str, str] | None = None) -> None:
    """Write ``variables`` atomically under canonical names, with ``extra_meta`` added to
    the file's metadata (the resume state records its epoch there)."""
    tensors, meta = to_tensors(spec, variables)
    save_safetensors(path, tensors, {**meta, **(extra_meta or {})})


def load(path, model: str | None = None) -> tuple[ModelSpec, dict, dict]:
    """Read a canonical checkpoint of either family -> (spec, JAX variables (NumPy leaves), meta).

    ``model``: the model the caller expects (e.g. from config.json); a mismatch is an error.
    """
    _, meta = read_safetensors_header(path)  # metadata first: it says which shapes to expect
    family, name = meta.get("family"), meta.get("model")
    if model is not None and name is not None and name != model:
        raise UserError(f"{path}: checkpoint is for model {name!r}, not {model!r}")
    name = name or model
    if family == "mlp":
        dims = layer_dims_from_metadata(path, meta)
        if name not in ("mlp2", "mlp4"):
            raise UserError(f"{path}: unknown MLP model {name!r}")
        tensors, _ = load_safetensors(path, mlp_tensors(dims))
        check_uniform_float(path, tensors)
        spec = get_spec(name, dims[1:-1])
    elif family == "cnn":
        if name not in CNN_VARIANTS:
            raise UserError(f"{path}: unknown CNN model {name!r}")
        tensors, _ = load_safetensors(path, cnn_tensors(name))
        spec = get_spec(name)
    else:
        raise UserError(f"{path}: unknown model family {family!r} (expected 'mlp' or 'cnn')")
    return spec, convert.from_canonical(tensors), meta


def jax_to_numpy(tree):
    import jax
    return jax.tree_util.tree_map(np.asarray, tree)
