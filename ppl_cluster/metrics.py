"""Clustering scores: 1-to-1 accuracy by Hungarian matching, NMI and ARI; per-facet tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


def facet_table(predictions: Sequence[np.ndarray], factors: Mapping[str, np.ndarray],
                n_clusters: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Score every learned facet against every known factor (multi-facet clustering).

    ``predictions[j]`` holds facet j's cluster assignments (N,); ``factors`` maps a factor name to
    its true labels (N,). Row j is ``{"facet": j, "k": K, "k_used": distinct predicted clusters,
    "scores": {factor: {"acc", "nmi", "ari"}}}`` with ``K = n_clusters[j]`` when given, else
    ``k_used``. Plain ints and floats only, so the table can go straight into JSON.
    """
    if len(predictions) == 0:
        raise ValueError("facet_table needs at least one facet's predictions")
    if n_clusters is not None and len(n_clusters) != len(predictions):
        raise ValueError(f"{len(n_clusters)} values of K for {len(predictions)} facets")
    # Codes 0..L-1 whatever the label values (negative ids too): contingency() indexes by value.
    truth = {name: np.unique(np.asarray(y), return_inverse=True)[1].reshape(-1)
             for name, y in factors.items()}
    table = []
    for j, pred in enumerate(predictions):
        pred = np.unique(np.asarray(pred), return_inverse=True)[1].reshape(-1)
        used = int(pred.max()) + 1
        table.append({
            "facet": j,
            "k": int(n_clusters[j]) if n_clusters is not None else used,
            "k_used": used,
            "scores": {name: scores(y, pred) for name, y in truth.items()},
        })
    return table


def best_match(table: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each factor, the facet of :func:`facet_table` with the best ACC and its scores.

    Ties in ACC go to the higher NMI, then to the lower facet index. Returns
    ``{factor: {"facet": j, "acc", "nmi", "ari"}}``.
    """
    if len(table) == 0:
        raise ValueError("best_match needs a non-empty facet table")
    best: dict[str, dict[str, Any]] = {}
    for name in table[0]["scores"]:
        row = max(table, key=lambda r: (r["scores"][name]["acc"], r["scores"][name]["nmi"], -r["facet"]))
        best[name] = {"facet": row["facet"], **row["scores"][name]}
    return best
