"""The resize-and-compress augmentation (data.degrade) and the v3-robust preset: drawn
from (seed, epoch) alone, the same images for every stack, honoured by both CNN trainers,
refused where it cannot apply, and resumable bit for bit."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from data import degrade
from core.catalog import PRESETS
from core.driver import Stack, _train_epoch
from data.errors import UserError
from tests.helpers import require, assert_same_weights, load_weights, make_archive, train_argv


def images(n=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_draws_depend_on_seed_and_epoch_only_and_workers_do_not_matter():
    x = images()
    a = degrade.degrade_split(x, 3, 1, 0.5, workers=1)
    b = degrade.degrade_split(x, 3, 1, 0.5, workers=2)
    np.testing.assert_array_equal(a, b)
    changed = (a != x).any(axis=(1, 2, 3))
    d = degrade.draws(3, 1, len(x), 0.5)
    # only the drawn images change, and nearly all of them (nearest shrinking without JPEG
    # can give the source back: it samples the enlarged image at the source's pixel centres)
    assert set(np.flatnonzero(changed)) <= set(d.which)
    assert changed.sum() >= 0.8 * len(d.which)
    assert 0.25 < changed.mean() < 0.75
    assert not np.array_equal(a, degrade.degrade_split(x, 3, 2, 0.5))   # another epoch
    assert not np.array_equal(a, degrade.degrade_split(x, 4, 1, 0.5))   # another seed
    assert a.dtype == np.uint8 and a.shape == x.shape


def test_input_is_untouched_and_zero_probability_is_the_identity():
    x = images()
    keep = x.copy()
    degrade.degrade_split(x, 0, 1, 1.0)
    np.testing.assert_array_equal(x, keep)
    assert degrade.degrade_split(x, 0, 1, 0.0) is x
    changed = (degrade.degrade_split(x, 0, 1, 1.0) != x).any(axis=(1, 2, 3))
    d = degrade.draws(0, 1, len(x), 1.0)
    nearest_down = d.down == degrade.DOWN_FILTERS.index(degrade.R.NEAREST)
    assert changed[~nearest_down | (d.quality > 0)].all()


def test_every_choice_of_the_pipeline_is_reachable_and_valid():
    d = degrade.draws(0, 1, 20000, 1.0)
    assert set(d.scale) == set(degrade.SCALES)
    assert set(d.up) == set(range(len(degrade.UP_FILTERS)))
    assert set(d.down) == set(range(len(degrade.DOWN_FILTERS)))
    q = d.quality[d.quality > 0]
    assert q.min() == degrade.JPEG_QUALITY[0] and q.max() == degrade.JPEG_QUALITY[1]
    assert abs((d.quality > 0).mean() - degrade.JPEG_P) < 0.02


def test_a_smooth_image_survives_a_round_trip_roughly():
    # a gradient is what resampling preserves: the augmentation perturbs, it does not scramble
    g = np.linspace(0, 255, 32)
    x = np.stack(np.broadcast_arrays(g[None, :], g[:, None], np.full((32, 32), 128.0)), -1)
    x = x.astype(np.uint8)
    y = degrade.degrade_image(x, scale=4, up=2, down=1, quality=60, subsampling=2)
    assert np.abs(y.astype(int) - x).mean() < 8


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "nan", "half"])
def test_probability_is_checked(bad):
    with pytest.raises(UserError, match="--degrade"):
        degrade.check_probability(bad)


def test_the_driver_hands_each_epoch_its_own_degraded_copy():
    class Recorder(Stack):
        name = "recorder"

        def __init__(self):
            self.seen = []

        def set_train_images(self, imgs):
            self.seen.append(imgs)

        def train_epoch(self, epoch, progress):
            return {"lr": 0.0, "train_loss": 0.0, "train_acc": 0.0}

    from types import SimpleNamespace
    x = images(40)
    # only what _train_epoch reads of a dataset
    DS = SimpleNamespace(train=type("Train", (), {"images": x, "__len__": lambda self: len(x)})())
    rec = Recorder()
    cfg = {"epochs": 3, "seed": 7, "degrade": 0.5, "eval_every": 10}
    feed = degrade.DegradeFeed(x, 7, 0.5, 3, workers=2)
    for e in range(2):
        _train_epoch(rec, cfg, DS, None, e, bars=False, feed=feed)
    feed.close()
    assert len(rec.seen) == 2
    for e, imgs in enumerate(rec.seen):
        np.testing.assert_array_equal(imgs, degrade.degrade_split(DS.train.images, 7, e + 1, 0.5))
    off = Recorder()
    _train_epoch(off, {**cfg, "degrade": 0.0}, DS, None, 0, bars=False)
    assert off.seen == []


def test_the_feed_prepares_the_next_epoch_and_gives_degrade_split_s_copies():
    x = images(1200)  # three worker tasks per epoch
    feed = degrade.DegradeFeed(x, 5, 0.5, last_epoch=4, workers=2)
    try:
        for e in (1, 2):
            got = feed.get(e)
            assert feed._next is not None and feed._next[0] == e + 1  # handed to the pool
            np.testing.assert_array_equal(got, degrade.degrade_split(x, 5, e, 0.5, workers=1))
        # a jump (a resumed run) drops the prepared epoch and makes the one asked for
        np.testing.assert_array_equal(feed.get(4), degrade.degrade_split(x, 5, 4, 0.5, workers=1))
        assert feed._next is None  # nothing beyond the last epoch
    finally:
        feed.close()
    assert degrade.DegradeFeed(x, 5, 0.0, 4).get(1) is x


def test_the_robust_preset_is_v3_plus_degrade_only():
    r, v3 = dict(PRESETS["v3-robust"]), PRESETS["v3"]
    assert r.pop("degrade") == 0.5 and r == v3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("degrade")
    return {"zip": make_archive(d / "a.zip", n_train=12, n_test=4), "cache": d / "cache"}


def train(stack, data, out, *extra):
    main = importlib.import_module(f"{stack}.train").main
    return main(train_argv(data["zip"], data["cache"], out, *extra))


@pytest.mark.parametrize("stack", ["torch_cnn", "jax_port"])
def test_both_cnn_stacks_train_the_robust_preset_and_resume_it_bit_for_bit(stack, data, tmp_path):
    require("torch" if stack == "torch_cnn" else "jax")
    fresh = ("--preset", "v3-robust", "--batch-size", "8")
    assert train(stack, data, tmp_path / "whole", *fresh, "--epochs", "2") == 0
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert cfg["degrade"] == 0.5 and cfg["preset"] == "v3-robust"
    assert train(stack, data, tmp_path / "half", *fresh, "--epochs", "1") == 0
    assert train(stack, data, tmp_path / "half", "--resume", "--epochs", "2") == 0
    assert_same_weights(tmp_path / "whole" / "model.safetensors",
                        tmp_path / "half" / "model.safetensors")
    # and the augmentation changed what was learned
    assert train(stack, data, tmp_path / "plain", "--preset", "v3", "--batch-size", "8",
                 "--epochs", "2") == 0
    w1 = load_weights(tmp_path / "whole" / "model.safetensors")
    w2 = load_weights(tmp_path / "plain" / "model.safetensors")
    assert any(not np.array_equal(w1[k], w2[k]) for k in w1)


def test_degrade_is_refused_for_the_mlps_with_one_line(data, tmp_path):
    require("jax")
    with pytest.raises(UserError, match="--degrade applies to the CNN models only"):
        train("jax_port", data, tmp_path / "m", "--model", "mlp2", "--degrade", "0.5",
              "--epochs", "1")
