"""Lossless weight conversion between the spec stacks' canonical tensors and JAX pytrees.

Works on NumPy dicts keyed by the canonical names (it imports neither torch nor
numpy_mlp): every transform is a transpose/reshape/permutation or a dtype-preserving
copy, so a round trip is bit-exact (tests/parity/test_parity_*.py check ``array_equal``).

MLP family (numpy_mlp): ``W{l}`` (n_out, n_in), ``b{l}`` (n_out, 1)
    <-> ``{"params": {"dense{l}": {"kernel": (n_in, n_out) = W.T, "bias": (n_out,)}}}``
CNN family (torch ``state_dict``):
    conv{i}.weight (O, I, kh, kw) <-> params conv{i}.kernel (kh, kw, I, O)   [HWIO]
    conv{i}.bias                 <-> params conv{i}.bias
    bn{i}.weight / .bias         <-> params bn{i}.scale / .bias
    bn{i}.running_mean / _var    <-> batch_stats bn{i}.mean / .var
    bn{i}.num_batches_tracked    <-> batch_stats bn{i}.num_batches_tracked (int64 <-> int32)
    fc1.weight (512, 4096)       <-> params fc1.kernel (4096, 512): transposed AND its rows
                                     permuted from torch's (C, H, W) flatten order to the
                                     port's NHWC (H, W, C) order
    fc{1,2}.bias, fc2.weight (1, 512) <-> fc2.kernel (512, 1)
net4 (nested by module, as its torch names: ``model.py``'s docstring), for every module
path M ("stem.conv", "block2.bn1", "fc", ...):
    M.weight of a conv (O, I, kh, kw) <-> params M.kernel (kh, kw, I, O)   [HWIO]
    M.weight / .bias of a BN         <-> params M.scale / .bias
    M.running_mean / _var, M.num_batches_tracked <-> batch_stats M.mean / .var /
                                         .num_batches_tracked (int64 <-> int32)
    fc.weight (1, 128), fc.bias      <-> params fc.kernel (128, 1), fc.bias
"""
from __future__ import annotations

import numpy as np

from core.architecture import cnn_tensors

FEAT_C, FEAT_H, FEAT_W = 64, 8, 8  # the CNN's feature map entering fc1


def _np(a) -> np.ndarray:
    return np.asarray(a)


# ---------------------------------------------------------------- MLP
def mlp_from_canonical(tensors: dict) -> dict:
    """numpy_mlp params {"W1", "b1", ...} -> JAX variables (dtype kept)."""
    n = len([k for k in tensors if k.startswith("W")])
    return {"params": {f"dense{l}": {"kernel": np.ascontiguousarray(_np(tensors[f"W{l}"]).T),
                                     "bias": _np(tensors[f"b{l}"])[:, 0].copy()}
                       for l in range(1, n + 1)}}


def mlp_to_canonical(variables: dict) -> dict[str, np.ndarray]:
    """JAX MLP variables -> numpy_mlp params {"W1", "b1", ...} (dtype kept)."""
    p = variables["params"]
    out = {}
    for l in range(1, len(p) + 1):
        out[f"W{l}"] = np.ascontiguousarray(_np(p[f"dense{l}"]["kernel"]).T)
        out[f"b{l}"] = _np(p[f"dense{l}"]["bias"])[:, None].copy()
    return out


# ---------------------------------------------------------------- CNN
def _fc1_to_flax(w: np.ndarray) -> np.ndarray:
    """torch fc1.weight (512, C*H*W) -> kernel (H*W*C, 512)."""
    o = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(o, FEAT_C, FEAT_H, FEAT_W).transpose(2, 3, 1, 0).reshape(-1, o))


def _fc1_to_torch(k: np.ndarray) -> np.ndarray:
    """kernel (H*W*C, 512) -> torch fc1.weight (512, C*H*W)."""
    o = k.shape[1]
    return np.ascontiguousarray(
        k.reshape(FEAT_H, FEAT_W, FEAT_C, o).transpose(3, 2, 0, 1).reshape(o, -1))


def cnn_params_from_canonical(sd: dict) -> dict:
    """The trainable part only (also used for Adam moments, which have the params' shapes)."""
    if _is_net4(sd):
        return _net4_from_canonical(sd)["params"]
    p = {}
    for i in (1, 2):
        p[f"conv{i}"] = {"kernel": np.ascontiguousarray(_np(sd[f"conv{i}.weight"]).transpose(2, 3, 1, 0)),
                         "bias": _np(sd[f"conv{i}.bias"]).copy()}
        if f"bn{i}.weight" in sd:
            p[f"bn{i}"] = {"scale": _np(sd[f"bn{i}.weight"]).copy(),
                           "bias": _np(sd[f"bn{i}.bias"]).copy()}
    p["fc1"] = {"kernel": _fc1_to_flax(_np(sd["fc1.weight"])), "bias": _np(sd["fc1.bias"]).copy()}
    p["fc2"] = {"kernel": np.ascontiguousarray(_np(sd["fc2.weight"]).T),
                "bias": _np(sd["fc2.bias"]).copy()}
    return p


def cnn_params_to_canonical(p: dict) -> dict[str, np.ndarray]:
    """Inverse of ``cnn_params_from_canonical``, in torch ``state_dict`` order (BN stats excluded)."""
    if "stem" in p:
        return _net4_to_canonical({"params": p}, buffers=False)
    out = {}
    for i in (1, 2):
        out[f"conv{i}.weight"] = np.ascontiguousarray(_np(p[f"conv{i}"]["kernel"]).transpose(3, 2, 0, 1))
        out[f"conv{i}.bias"] = _np(p[f"conv{i}"]["bias"]).copy()
        if f"bn{i}" in p:
            out[f"bn{i}.weight"] = _np(p[f"bn{i}"]["scale"]).copy()
            out[f"bn{i}.bias"] = _np(p[f"bn{i}"]["bias"]).copy()
    out["fc1.weight"] = _fc1_to_torch(_np(p["fc1"]["kernel"]))
    out["fc1.bias"] = _np(p["fc1"]["bias"]).copy()
    out["fc2.weight"] = np.ascontiguousarray(_np(p["fc2"]["kernel"]).T)
    out["fc2.bias"] = _np(p["fc2"]["bias"]).copy()
    return out


def cnn_from_canonical(sd: dict) -> dict:
    """torch state_dict (NumPy arrays, canonical names) -> JAX variables."""
    if _is_net4(sd):
        return _net4_from_canonical(sd)
    out = {"params": cnn_params_from_canonical(sd)}
    stats = {}
    for i in (1, 2):
        if f"bn{i}.running_mean" in sd:
            stats[f"bn{i}"] = {
                "mean": _np(sd[f"bn{i}.running_mean"]).copy(),
                "var": _np(sd[f"bn{i}.running_var"]).copy(),
                # JAX's default integer width is 32 bits; 2**31 batches is out of reach
                "num_batches_tracked": np.asarray(sd[f"bn{i}.num_batches_tracked"], np.int32)}
    if stats:
        out["batch_stats"] = stats
    return out


def cnn_to_canonical(variables: dict) -> dict[str, np.ndarray]:
    """JAX variables -> torch state_dict as NumPy arrays, names and order of ``state_dict()``."""
    if "stem" in variables["params"]:
        return _net4_to_canonical(variables, buffers=True)
    flat = cnn_params_to_canonical(variables["params"])
    stats = variables.get("batch_stats", {})
    out = {}
    for k, v in flat.items():  # insert BN buffers right after each BN's weight/bias
        out[k] = v
        if k.endswith(".bias") and k.startswith("bn"):
            s = stats[k.split(".")[0]]
            b = k.split(".")[0]
            out[f"{b}.running_mean"] = _np(s["mean"]).copy()
            out[f"{b}.running_var"] = _np(s["var"]).copy()
            out[f"{b}.num_batches_tracked"] = np.asarray(s["num_batches_tracked"], np.int64)
    return out


# ---------------------------------------------------------------- net4
_STATS = {"running_mean": "mean", "running_var": "var",
          "num_batches_tracked": "num_batches_tracked"}


def _is_net4(sd: dict) -> bool:
    return "stem.conv.weight" in sd


def _net4_slot(name: str) -> tuple[str, list[str], str]:
    """Canonical net4 name -> (collection, module path, leaf): "block1.bn2.running_var"
    -> ("batch_stats", ["block1", "bn2"], "var")."""
    *path, kind = name.split(".")
    if kind in _STATS:
        return "batch_stats", path, _STATS[kind]
    if path[-1].startswith("bn"):
        return "params", path, {"weight": "scale", "bias": "bias"}[kind]
    return "params", path, {"weight": "kernel", "bias": "bias"}[kind]


def _net4_leaf_to_flax(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "kernel":  # conv OIHW -> HWIO, linear (out, in) -> (in, out)
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
    if kind == "num_batches_tracked":  # JAX's default integer width is 32 bits
        return np.asarray(a, np.int32)
    return a.copy()


def _net4_leaf_to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "kernel":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T)
    if kind == "num_batches_tracked":
        return np.asarray(a, np.int64)
    return a.copy()


def _net4_from_canonical(sd: dict) -> dict:
    """net4 tensors (a whole state_dict, or the parameters alone) -> variables."""
    out: dict = {}
    for name, a in sd.items():
        coll, path, leaf = _net4_slot(name)
        node = out.setdefault(coll, {})
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = _net4_leaf_to_flax(leaf, _np(a))
    return out


def _net4_to_canonical(variables: dict, buffers: bool) -> dict[str, np.ndarray]:
    """net4 variables -> tensors in state_dict order (``buffers``: BN's running
    statistics too, else the parameters alone)."""
    out = {}
    for name in cnn_tensors("net4"):
        coll, path, leaf = _net4_slot(name)
        if coll == "batch_stats" and not buffers:
            continue
        node = variables[coll]
        for k in path:
            node = node[k]
        out[name] = _net4_leaf_to_torch(leaf, _np(node[leaf]))
    return out


# ---------------------------------------------------------------- either family
def family_of(tensors: dict) -> str:
    return "mlp" if "W1" in tensors else "cnn"


def from_canonical(tensors: dict) -> dict:
    return mlp_from_canonical(tensors) if family_of(tensors) == "mlp" else cnn_from_canonical(tensors)


def to_canonical(variables: dict) -> dict[str, np.ndarray]:
    return mlp_to_canonical(variables) if "dense1" in variables["params"] \
        else cnn_to_canonical(variables)
