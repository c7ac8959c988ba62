"""The validation split: disjoint (in position and in content) from what is trained on,
stratified, drawn independently of the training seed, identical in every stack, recorded
in config.json and metrics, and refused on a resume that would change it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data import load_cifake
from data.validation import class_shares, hold_out, split_digest
from tests.helpers import assert_ok, assert_user_error, image_bytes, make_archive, run, \
    synthetic_image, train_argv

COPIES = 3  # train/FAKE images that also appear under a second name (as CIFAKE's pairs)


@pytest.fixture
def dup_zip(tmp_path):
    extra = {f"train/FAKE/copy{i}.jpg": image_bytes(synthetic_image(0, i), quality=95)
             for i in range(COPIES)}  # byte-identical to train/FAKE/{i}...
    return make_archive(tmp_path / "dup.zip", n_train=20, n_test=4, extra=extra)


def test_hold_out_is_stratified_disjoint_and_seeded(dup_zip, cache_dir):
    train = load_cifake(dup_zip, cache_dir, verbose=False).train
    rest, val = hold_out(train, 10, val_seed=0)
    assert len(rest) + len(val) == len(train) and len(val) == 10
    counts = [int((val.labels == c).sum()) for c in (0, 1)]
    assert counts == list(class_shares(np.array([20 + COPIES, 20]), 10)) == [5, 5]
    # disjoint by name and by content: no copy of a held-out image is left to train on
    assert not set(map(str, val.names)) & set(map(str, rest.names))
    assert not np.isin(val.digests, rest.digests).any()
    # both parts keep the stored order
    order = {n: i for i, n in enumerate(map(str, train.names))}
    for part in (rest, val):
        idx = [order[str(n)] for n in part.names]
        assert idx == sorted(idx)
    # the same draw every time; another --val-seed draws another split
    assert split_digest(hold_out(train, 10, 0)[1]) == split_digest(val)
    assert split_digest(hold_out(train, 10, 1)[1]) != split_digest(val)


def test_duplicated_images_are_never_held_out(dup_zip, cache_dir):
    train = load_cifake(dup_zip, cache_dir, verbose=False).train
    copied = {d for d in train.digests if (train.digests == d).sum() > 1}
    assert len(copied) == COPIES
    for seed in range(20):
        _, val = hold_out(train, 30, seed)
        assert not copied & set(val.digests)


def test_class_shares_sum_to_n():
    assert list(class_shares(np.array([50_000, 50_000]), 5000)) == [2500, 2500]
    assert list(class_shares(np.array([3, 1]), 3)) == [2, 1]
    assert class_shares(np.array([7, 5]), 5).sum() == 5


def test_too_large_a_split_is_refused(tiny_zip, cache_dir, tmp_path):
    p = run("numpy_mlp.train", *train_argv(tiny_zip, cache_dir, tmp_path / "r", "--val", "12",
                                           fresh=("--model", "mlp2", "--epochs", "1")))
    assert_user_error(p, "--val 12", "hold out fewer")
    assert not (tmp_path / "r" / "config.json").exists()


STACKS = {"numpy_mlp": ("--model", "mlp2", "--batch-size", "8"),
          "torch_cnn": ("--model", "baseline", "--batch-size", "8"),
          "jax_port": ("--model", "baseline", "--batch-size", "8")}


def test_every_stack_holds_out_the_same_images_and_reports_them(dup_zip, cache_dir,
                                                                 tmp_path):
    digests = {}
    for stack, flags in STACKS.items():
        out = tmp_path / stack
        p = run(stack + ".train", *train_argv(dup_zip, cache_dir, out, "--val", "8",
                                              fresh=(*flags, "--epochs", "2", "--seed", "5")))
        assert_ok(p)
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["val"], cfg["val_seed"], cfg["n_train"]) == (8, 0, 2 * 20 + COPIES - 8)
        digests[stack] = cfg["val_digest"]
        m = json.loads((out / "metrics.json").read_text())
        for row in m["history"]:
            assert {"val_acc", "val_loss", "test_acc"} <= set(row)
        assert m["final"]["val"]["n"] == 8 and "val_acc" in m["final"]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all("val_acc" in r for r in lines)
        assert " val loss " in p.stderr and "val " in p.stderr.splitlines()[-1]
    assert len(set(digests.values())) == 1
    # the training seed does not move the split
    out = tmp_path / "seed9"
    assert_ok(run("numpy_mlp.train", *train_argv(dup_zip, cache_dir, out, "--val", "8",
                                                 fresh=(*STACKS["numpy_mlp"], "--epochs", "1",
                                                        "--seed", "9"))))
    assert json.loads((out / "config.json").read_text())["val_digest"] == digests["numpy_mlp"]


def test_resume_keeps_the_split_or_refuses(dup_zip, cache_dir, tmp_path):
    out = tmp_path / "r"
    fresh = (*STACKS["numpy_mlp"], "--epochs", "1")
    assert_ok(run("numpy_mlp.train", *train_argv(dup_zip, cache_dir, out, "--val", "8",
                                                 fresh=fresh)))
    p = run("numpy_mlp.train", *train_argv(dup_zip, cache_dir, out, "--resume", "--val", "4"))
    assert_user_error(p, "--val")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, val_digest="0" * 64)))
    p = run("numpy_mlp.train", *train_argv(dup_zip, cache_dir, out, "--resume",
                                           "--epochs", "2"))
    assert_user_error(p, "validation images", "new run")
    cfg_path.write_text(json.dumps(cfg))
    assert_ok(run("numpy_mlp.train", *train_argv(dup_zip, cache_dir, out, "--resume",
                                                 "--epochs", "2")))
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all("val_acc" in h for h in hist)


def test_original_presets_train_on_every_image(tiny_zip, cache_dir, tmp_path):
    out = tmp_path / "r"
    assert_ok(run("numpy_mlp.train", *train_argv(tiny_zip, cache_dir, out,
                                                 fresh=("--preset", "mlp2-mini", "--epochs",
                                                        "1"))))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["val"] == 0 and "val_digest" not in cfg and cfg["n_train"] == 12
    m = json.loads((out / "metrics.json").read_text())
    assert "val" not in m["final"] and "val_acc" not in m["history"][0]
