"""Clustering scores: 1-to-1 accuracy by Hungarian matching, NMI and ARI."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts (n_pred_labels, n_true_labels) over the labels' integer values."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label arrays differ in shape: {y_true.shape} vs {y_pred.shape}")
    m = np.zeros((y_pred.max() + 1, y_true.max() + 1), dtype=np.int64)
    np.add.at(m, (y_pred, y_true), 1)
    return m


def hungarian_mapping(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """The one-to-one map predicted cluster -> true label maximising matches."""
    m = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return dict(zip(rows.tolist(), cols.tolist(), strict=True))


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """1-to-1 clustering accuracy: the best one-to-one matching of clusters to labels."""
    m = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / m.sum())


def many_to_one_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Each cluster mapped to its majority label (not one-to-one; label it as such)."""
    m = contingency(y_true, y_pred)
    return float(m.max(axis=1).sum() / m.sum())


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC (1-to-1, Hungarian), NMI and ARI."""
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
    }
