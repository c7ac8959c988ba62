"""Canonical CNN checkpoints: ``model.safetensors`` holding the plain PyTorch
``state_dict`` of ``model.CifakeCNN`` (names shared by the whole CNN family,
e.g. the JAX port), float32 (``bn*.num_batches_tracked``: int64, shape ()).
metadata: {"format", "family": "cnn", "model": name}. Nothing is pickled.
"""
from __future__ import annotations

import numpy as np
import torch

from data.errors import UserError
from core.architecture import cnn_tensors
from core.tensors import load_safetensors, save_safetensors


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu").contiguous().numpy() for k, v in model.state_dict().items()}


def save(path, model: torch.nn.Module, name: str) -> None:
    """Write the model's state_dict under canonical names, atomically."""
    tensors = state_to_numpy(model)
    exp = cnn_tensors(name)
    if list(tensors) != list(exp):  # a bug, not a user error
        raise AssertionError(f"state_dict names {list(tensors)} != canonical {list(exp)}")
    save_safetensors(path, tensors, {"family": "cnn", "model": name})


def read(path, name: str) -> dict[str, np.ndarray]:
    """Load and validate a canonical checkpoint for model ``name`` (NumPy arrays)."""
    tensors, meta = load_safetensors(path, cnn_tensors(name))
    if meta.get("family", "cnn") != "cnn":
        raise UserError(f"{path}: a {meta.get('family')!r} checkpoint, not a CNN one")
    if meta.get("model", name) != name:
        raise UserError(f"{path}: checkpoint is for model {meta.get('model')!r}, not {name!r}")
    return tensors


def load_into(path, model: torch.nn.Module) -> torch.nn.Module:
    """Load a canonical checkpoint into ``model`` (validated names/shapes/dtypes)."""
    tensors = read(path, model.name)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                          strict=True)
    return model
