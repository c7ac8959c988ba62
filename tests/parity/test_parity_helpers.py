"""The parity suite's comparison (tests/helpers.py: ``assert_close_tree``), tested."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_close_tree


def test_assert_close_tree_names_the_tensor_and_the_size_of_the_difference():
    a = {"conv1.weight": np.ones((2, 2)), "fc2.bias": np.zeros(1)}
    b = {"conv1.weight": np.ones((2, 2)), "fc2.bias": np.full(1, 1e-3)}
    assert assert_close_tree(a, a, 1e-12, "same") == 0.0
    with pytest.raises(AssertionError, match=r"fc2\.bias: max abs diff 1\.000e-03") as e:
        assert_close_tree(a, b, 1e-6, "after 3 steps", relative=False)
    assert "conv1.weight" not in str(e.value) and "after 3 steps" in str(e.value)
    with pytest.raises(AssertionError, match="only in first"):
        assert_close_tree({"x": np.ones(1)}, {"y": np.ones(1)}, 1.0, "names")
