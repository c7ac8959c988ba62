"""The behaviour does not change: tiny fixed-seed runs of every stack and preset, through
the public ``train`` entry points, end at the recorded weights. NumPy and torch must be
bit-identical; JAX identical or within float32 rounding (its fusion choices may reorder
sums). ``CIFAKE_GOLDEN_WRITE=1`` records the fingerprints anew (only when a change of
behaviour is intended, and said so in the commit)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.parity.golden.runner import STACK_PRESETS
from tests.helpers import PY, REPO, env, load_weights

GOLDEN = Path(__file__).parent / "golden" / "weights.json"
JAX_RTOL = 1e-4  # of each tensor's norm


def fingerprint(w: np.ndarray) -> dict:
    x = np.asarray(w, np.float64).reshape(-1)
    r = np.random.default_rng(x.size)  # the same probe vectors for the same tensor size
    return {"sha256": hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest(),
            "dtype": str(w.dtype), "shape": list(w.shape),
            "norm": float(np.linalg.norm(x)), "sum": float(x.sum()),
            "proj": [float(x @ r.standard_normal(x.size)) for _ in range(2)]}


def run_stack(stack: str, data: Path, tmp: Path) -> dict:
    p = subprocess.run([PY, "-m", "tests.parity.golden.runner", stack, str(data), str(tmp / "cache"),
                        str(tmp / "runs")], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    return {f"{stack}/{preset}": {k: fingerprint(v) for k, v in sorted(
        load_weights(tmp / "runs" / f"{stack}-{preset}" / "model.safetensors").items())}
        for preset in STACK_PRESETS[stack]}


@pytest.mark.slow
@pytest.mark.parametrize("stack", sorted(STACK_PRESETS))
def test_final_weights_unchanged(stack, mini_zip, tmp_path):
    got = run_stack(stack, mini_zip, tmp_path)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("CIFAKE_GOLDEN_WRITE") == "1":
        recorded.update(got)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    for run, tensors in got.items():
        want = recorded[run]
        assert sorted(tensors) == sorted(want), f"{run}: tensor names changed"
        for name, fp in tensors.items():
            w = want[name]
            assert (fp["dtype"], fp["shape"]) == (w["dtype"], w["shape"]), f"{run} {name}"
            if stack != "jax_port":
                assert fp["sha256"] == w["sha256"], f"{run} {name}: not bit-identical"
                continue
            # a change d of the weights moves the norm by at most |d|, and the sum and a
            # projection on random unit-variance probes by about |d| each
            for key, slack in (("norm", 1.0), ("sum", 10.0), ("proj", 10.0)):
                a, b = np.asarray(fp[key]), np.asarray(w[key])
                assert np.all(np.abs(a - b) <= JAX_RTOL * slack * max(w["norm"], 1e-12)), \
                    f"{run} {name}: {key} {a} against {b}"
