"""The comparison helper of the parity suite (tests/test_parity_*.py), and its own tests.

``assert_close_tree`` compares two dicts of arrays (canonical names, e.g. torch
``state_dict`` keys or numpy_mlp's ``W1``/``dW1``) and, on failure, says which
tensor differs and by how much -- the parity suite's failure message.
"""
from __future__ import annotations

import numpy as np
import pytest


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}" if not prefix else f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def max_diffs(a, b) -> dict[str, tuple[float, float]]:
    """name -> (max |a - b|, max |a - b| / max |b|) for every leaf."""
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb), f"different tensors: only in first {sorted(set(fa) - set(fb))}, " \
                               f"only in second {sorted(set(fb) - set(fa))}"
    out = {}
    for k in fa:
        x, y = fa[k].astype(np.float64), fb[k].astype(np.float64)
        assert x.shape == y.shape, f"{k}: shapes {x.shape} vs {y.shape}"
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        out[k] = (d, d / scale if scale > 0 else d)
    return out


def assert_close_tree(a, b, tol: float, what: str, relative: bool = True) -> float:
    """Every leaf of ``a`` within ``tol`` of ``b``'s. ``relative``: the error is
    max |a - b| divided by max |b| of that tensor (one scale per tensor, so entries
    near zero in a tensor of ordinary magnitude do not blow up the ratio); otherwise
    absolute. Returns the worst error seen (for reporting)."""
    diffs = max_diffs(a, b)
    kind = "relative (to the tensor's max |value|)" if relative else "absolute"
    bad = {k: v for k, v in diffs.items() if v[1 if relative else 0] > tol}
    if bad:
        lines = [f"  {k}: max abs diff {d:.3e}, relative {r:.3e}" for k, (d, r) in sorted(bad.items())]
        raise AssertionError(f"{what}: {len(bad)} tensor(s) differ by more than {tol:g} "
                             f"{kind}:\n" + "\n".join(lines))
    return max((v[1 if relative else 0] for v in diffs.values()), default=0.0)


def test_assert_close_tree_names_the_tensor_and_the_size_of_the_difference():
    a = {"conv1.weight": np.ones((2, 2)), "fc2.bias": np.zeros(1)}
    b = {"conv1.weight": np.ones((2, 2)), "fc2.bias": np.full(1, 1e-3)}
    assert assert_close_tree(a, a, 1e-12, "same") == 0.0
    with pytest.raises(AssertionError, match=r"fc2\.bias: max abs diff 1\.000e-03") as e:
        assert_close_tree(a, b, 1e-6, "after 3 steps", relative=False)
    assert "conv1.weight" not in str(e.value) and "after 3 steps" in str(e.value)
    with pytest.raises(AssertionError, match="only in first"):
        assert_close_tree({"x": np.ones(1)}, {"y": np.ones(1)}, 1.0, "names")
