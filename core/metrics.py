"""Evaluation metrics every stack reports, computed in NumPy from logits of P(REAL)."""
from __future__ import annotations

import math

import numpy as np

from data.errors import UserError


def bce_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against 0/1 labels, computed stably."""
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction). Label 1 is positive."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_report(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy (%), BCE loss, ROC-AUC and confusion matrix from logits of P(REAL).

    Non-finite logits (NaN/inf: weights that diverged, e.g. a learning rate far too large
    when an epoch has a single step, so the training loss never saw it) raise UserError:
    no number in such a report means anything, and metrics.json (strict JSON) could not
    hold it. Callers evaluate before saving an epoch, so the last good checkpoint stays.
    """
    z = np.asarray(logits, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    bad = int((~np.isfinite(z)).sum())
    if bad:
        raise UserError(f"evaluation produced {bad:,} non-finite logits (NaN/inf) out of "
                        f"{len(z):,}: the model diverged; try a smaller --lr")
    pred = (z > 0).astype(np.int64)  # sigmoid(z) > 0.5
    cm = np.zeros((2, 2), np.int64)
    np.add.at(cm, (y, pred), 1)
    auc = roc_auc(z, y)
    return {
        "accuracy": float(100.0 * (pred == y).mean()) if len(y) else float("nan"),
        "loss": bce_from_logits(z, y),
        "roc_auc": None if math.isnan(auc) else auc,
        # rows: true class, columns: predicted class, in label order (FAKE, REAL)
        "confusion": cm.tolist(),
        "n": int(len(y)),
    }


def final_report(logits_of, ds) -> dict:
    """The ``final`` block of metrics.json: a report on the train split, the test split and
    the de-duplicated test view, plus the headline numbers. ``logits_of(split)`` -> logits."""
    dedup = ds.test_deduplicated()
    splits = (("train", ds.train), ("val", ds.val), ("test", ds.test),
              ("test_dedup", dedup))
    final = {name: classification_report(logits_of(split), split.labels)
             for name, split in splits if split is not None}
    final.update(train_acc=final["train"]["accuracy"], test_acc=final["test"]["accuracy"],
                 gap_pp=final["train"]["accuracy"] - final["test"]["accuracy"],
                 test_loss=final["test"]["loss"], test_auc=final["test"]["roc_auc"])
    if "val" in final:  # (a run without a validation split has none of these keys)
        final.update(val_acc=final["val"]["accuracy"], val_loss=final["val"]["loss"])
    return final
