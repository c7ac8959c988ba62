"""Integration: the shared cifake-mini.zip through the real data layer (a fresh cache).

Skipped where ../shared is absent; a failure in CI (CIFAKE_REQUIRE_SHARED=1)."""
from __future__ import annotations

import numpy as np

from data import load_cifake
from data.prepare import report


def test_mini_archive(mini_zip, tmp_path, capsys):
    cache = tmp_path / "cache"  # never the user's default cache
    ds = load_cifake(mini_zip, cache_dir=cache)
    assert "building CIFAKE cache" in capsys.readouterr().err  # really built here
    assert len(list(cache.iterdir())) == 1  # the one cache folder, in tmp_path
    for split, n in (("train", 2000), ("test", 500)):
        s = getattr(ds, split)
        assert s.images.shape == (2 * n, 32, 32, 3) and s.images.dtype == np.uint8
        assert (s.labels == 0).sum() == n and (s.labels == 1).sum() == n
        folder = np.array([name.split("/")[0] for name in s.names])
        np.testing.assert_array_equal(s.labels, (folder == "REAL").astype(np.uint8))
        assert set(np.unique(s.cifar_class)) == set(range(1, 11))
        assert len(np.unique(s.names)) == 2 * n
        # real pixels, not blank decodes: images differ and use the range
        assert s.images.std() > 30 and len(np.unique(s.digests)) == 2 * n
    r = report(ds)
    assert r["duplicates"] == {"train": {"FAKE": 0, "REAL": 0}, "test": {"FAKE": 0, "REAL": 0}}
    assert r["test_in_train"] == {"images": 0, "distinct": 0}
    assert len(ds.test_deduplicated()) == 1000 and r["files_ignored"] == 0
    # the second load reuses that cache
    again = load_cifake(mini_zip, cache_dir=cache)
    assert "building" not in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.images, ds.train.images)
