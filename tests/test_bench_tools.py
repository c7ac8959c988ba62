"""bench.seed_spread's statistics and bench.gpu's summary, on made-up inputs."""
from __future__ import annotations

import json
import math

import pytest

from bench import gpu, seed_spread
from data.errors import UserError


def test_seed_spread_summary_is_mean_sample_std_and_standard_error():
    s = seed_spread.summarize([80.0, 82.0, 84.0, 86.0])
    assert s["mean"] == 83.0 and s["min"] == 80.0 and s["max"] == 86.0
    assert s["std"] == pytest.approx(math.sqrt(20 / 3))          # n - 1 in the denominator
    assert s["sem"] == pytest.approx(math.sqrt(20 / 3) / 2)
    assert seed_spread.summarize([81.5])["std"] == 0.0


def _run(d, secs, accs, complete=True):
    d.mkdir(parents=True)
    hist = [{"epoch": i + 1, "seconds": s, "images_per_s": 1000 / s, "test_acc": a}
            for i, (s, a) in enumerate(zip(secs, accs))]
    (d / "config.json").write_text(json.dumps({"device": "gpu:0", "device_kind": "H"}))
    (d / "metrics.json").write_text(json.dumps({
        "history": hist, "complete": complete, "wall_seconds": 99.0,
        "final": {"train_acc": 97.0, "test_acc": accs[-1], "gap_pp": 97.0 - accs[-1],
                  "test_dedup": {"accuracy": 96.0}}}))
    return d


def test_gpu_training_summary_separates_the_compiling_first_epoch(tmp_path):
    r = gpu.training_summary(_run(tmp_path / "r", [7.0, 1.0, 2.0, 3.0], [90, 95, 96, 96.5]))
    assert r["train_seconds_sum"] == 13.0 and r["first_epoch_seconds"] == 7.0
    assert r["train_seconds_without_first"] == 6.0 and r["median_epoch_seconds"] == 2.0
    assert r["epochs_done"] == 4 and r["complete"] and r["test_acc"] == 96.5
    assert gpu.training_summary(tmp_path / "absent") == {}


def test_gpu_refuses_unknown_or_all_skipped_steps(tmp_path):
    with pytest.raises(UserError, match="unknown step"):
        gpu.main(["--data", "x", "--skip", "bench,gpu", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="nothing to measure"):
        gpu.main(["--data", "x", "--skip", "bench,jax,torch", "--out", str(tmp_path)])
