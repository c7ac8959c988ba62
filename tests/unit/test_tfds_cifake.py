"""The TFDS builder `cifake` (data/tfds_cifake) builds and serves without TensorFlow,
and holds exactly what data.load_cifake returns for the same archive."""
from __future__ import annotations

import numpy as np
import pytest

from data import DataError, load_cifake
from tests.helpers import image_bytes, make_archive, require, synthetic_image

tfds = require("tensorflow_datasets")

from data.tfds_cifake import load_data_source  # noqa: E402


def by_name(source) -> dict:
    out = {}
    for i in range(len(source)):
        ex = source[i]
        out[ex["file_name"].decode()] = ex
    return out


def test_builds_without_tensorflow_and_matches_load_cifake(tmp_path):
    # PNG and grayscale members too: the builder must decode them as data.images does
    z = make_archive(tmp_path / "tiny.zip", extra={
        "train/REAL/50.png": image_bytes(synthetic_image(1, 50), fmt="PNG", mode="L"),
        "README.txt": b"ignored"})
    ds = load_data_source(z, tmp_path / "tfds")
    assert set(ds) == {"train", "test"}
    ref = load_cifake(z, cache_dir=tmp_path / "cache", verbose=False)
    for split in ("train", "test"):
        want = getattr(ref, split)
        got = by_name(ds[split])
        assert len(ds[split]) == len(want) and sorted(got) == sorted(want.names)
        for i, name in enumerate(want.names):
            ex = got[name]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(ex["image"], want.images[i], err_msg=name)
            assert ex["label"] == want.labels[i], name
            assert ex["cifar_class"] == want.cifar_class[i], name
    builder = tfds.builder("cifake", data_dir=str(tmp_path / "tfds"))
    assert builder.info.features["label"].names == ["FAKE", "REAL"]
    assert builder.info.splits["train"].num_examples == 13
    # served from disk by the registered name, without rebuilding
    again = tfds.data_source("cifake", data_dir=str(tmp_path / "tfds"), download=False)
    assert len(again["test"]) == 6


def test_manual_dir_and_stale_data_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    z = make_archive(manual / "cifake.zip", n_train=2, n_test=1)
    src = tfds.data_source("cifake", data_dir=str(tmp_path / "tfds"),
                           download_and_prepare_kwargs={
                               "download_config": tfds.download.DownloadConfig(
                                   manual_dir=str(manual))})
    assert len(src["train"]) == 4 and len(src["test"]) == 2
    # the same data_dir asked for another archive: an error, not stale examples
    other = make_archive(tmp_path / "other.zip", n_train=3, n_test=1)
    with pytest.raises(DataError, match="built from"):
        load_data_source(other, tmp_path / "tfds")
    assert len(load_data_source(z, tmp_path / "tfds")["train"]) == 4


def test_bad_archive_is_a_data_error(tmp_path):
    z = make_archive(tmp_path / "bad.zip", extra={"train/REAL/9.jpg": b"not a jpeg"})
    with pytest.raises(DataError, match=r"bad.zip:train/REAL/9.jpg: not a readable image"):
        load_data_source(z, tmp_path / "tfds")
    # nothing half-written is served afterwards
    assert not list((tmp_path / "tfds").glob("cifake/*/dataset_info.json"))
    with pytest.raises(DataError, match="no such archive"):
        load_data_source(tmp_path / "missing.zip", tmp_path / "tfds")


def test_find_archive_in_manual_dir(tmp_path):
    from data.tfds_cifake import find_archive
    with pytest.raises(DataError, match="no cifake.zip"):
        find_archive(tmp_path)
    a = make_archive(tmp_path / "download.zip", n_train=1, n_test=1)
    assert find_archive(tmp_path) == a  # the only zip
    make_archive(tmp_path / "other.zip", n_train=1, n_test=1)
    with pytest.raises(DataError, match="several zips"):
        find_archive(tmp_path)
    c = make_archive(tmp_path / "cifake.zip", n_train=1, n_test=1)
    assert find_archive(tmp_path) == c  # the preferred name wins
