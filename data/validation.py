"""The validation split: training images held out, so that every choice (hyperparameters,
preset values, the epoch count) is made without looking at the test split.

``hold_out(train, n, val_seed)`` draws ``n`` images of the training split:
- stratified: each class gives its share of ``n`` (in proportion to its size, largest
  remainders first; CIFAKE's balanced split gives n / 2 per class);
- disjoint in content, not only in position: only images whose bytes occur once in the
  split are candidates, so no copy of a held-out image is trained on (CIFAKE's
  train/FAKE holds 920 byte-identical pairs);
- drawn from ``val_rng(val_seed)``, independent of the training seed: every seed of a
  study is validated on the same images, and every stack gets the same split (it is
  drawn here, before any stack sees the data).
Both parts keep the split's stored order. ``split_digest`` names the held-out images (a
SHA-256 of their sorted names), which a run records and a resume checks.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .batching import val_rng
from .cache import Split
from .errors import DataError


def class_shares(counts: np.ndarray, n: int) -> np.ndarray:
    """``n`` split over the classes in proportion to ``counts``, largest remainders first."""
    exact = n * counts / counts.sum()
    share = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - share), kind="stable")
    share[order[:n - share.sum()]] += 1
    return share


def hold_out(train: Split, n: int, val_seed: int) -> tuple[Split, Split]:
    """(the images left to train on, the ``n`` held out), both in stored order."""
    labels = np.asarray(train.labels)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    shares = class_shares(counts, n)
    _, first, seen = np.unique(train.digests, return_index=True, return_counts=True)
    unique = np.zeros(len(train), bool)
    unique[first[seen == 1]] = True
    g = val_rng(val_seed)
    picked = []
    for c, k, total in zip(classes, shares, counts):
        candidates = np.flatnonzero((labels == c) & unique)
        if k > len(candidates) or k >= total:
            raise DataError(f"--val {n}: class {int(c)} would give {k} of its {total:,} "
                            f"training images ({len(candidates):,} without copies), leaving "
                            f"too few to train on; hold out fewer")
        picked.append(g.choice(candidates, size=int(k), replace=False))
    val = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(train)), val)
    return train.take(keep), train.take(val)


def split_digest(val: Split) -> str:
    """SHA-256 of the held-out images' names, sorted: what a run records of its split."""
    h = hashlib.sha256()
    for name in sorted(map(str, val.names)):
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()
