"""Canonical CNN checkpoints: ``model.safetensors`` holding the plain PyTorch
``state_dict`` of ``model.CifakeCNN`` (names shared by the whole CNN family,
e.g. the JAX port), float32 (``bn*.num_batches_tracked``: int64, shape ()).
metadata: {"format", "family": "cnn", "model": name}. Nothing is pickled.
"""
from __future__ import annotations

import numpy as np
import torch

from data.errors import UserError
from core.tensors import load_safetensors, save_safetensors

from .model import MODELS


def expected_shapes(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical tensor name -> (shape, dtype) for model ``name``, in state_dict order."""
    if name not in MODELS:
        raise UserError(f"unknown CNN model {name!r}; choose one of {', '.join(MODELS)}")
    f = "float32"
    out = {"conv1.weight": ((32, 3, 3, 3), f), "conv1.bias": ((32,), f)}
    if name == "v3":
        out.update({f"bn1.{k}": ((32,), f) for k in ("weight", "bias", "running_mean",
                                                      "running_var")})
        out["bn1.num_batches_tracked"] = ((), "int64")
    out.update({"conv2.weight": ((64, 32, 3, 3), f), "conv2.bias": ((64,), f)})
    if name == "v3":
        out.update({f"bn2.{k}": ((64,), f) for k in ("weight", "bias", "running_mean",
                                                      "running_var")})
        out["bn2.num_batches_tracked"] = ((), "int64")
    out.update({"fc1.weight": ((512, 4096), f), "fc1.bias": ((512,), f),
                "fc2.weight": ((1, 512), f), "fc2.bias": ((1,), f)})
    return out


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu").contiguous().numpy() for k, v in model.state_dict().items()}


def save(path, model: torch.nn.Module, name: str) -> None:
    """Write the model's state_dict under canonical names, atomically."""
    tensors = state_to_numpy(model)
    exp = expected_shapes(name)
    if list(tensors) != list(exp):  # a bug, not a user error
        raise AssertionError(f"state_dict names {list(tensors)} != canonical {list(exp)}")
    save_safetensors(path, tensors, {"family": "cnn", "model": name})


def read(path, name: str) -> dict[str, np.ndarray]:
    """Load and validate a canonical checkpoint for model ``name`` (NumPy arrays)."""
    tensors, meta = load_safetensors(path, expected_shapes(name))
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
