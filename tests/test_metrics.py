import numpy as np
import pytest

from ppl_cluster.metrics import (
    cluster_accuracy,
    contingency,
    hungarian_mapping,
    many_to_one_accuracy,
    scores,
)


def test_permuted_labels_score_perfectly():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([2, 2, 0, 0, 1, 1, 1])  # a relabelling
    s = scores(y, pred)
    assert s["acc"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)
    assert hungarian_mapping(y, pred) == {2: 0, 0: 1, 1: 2}


def test_hand_worked_accuracy():
    # Contingency (pred x true): [[3,1],[2,4]] -> best one-to-one match 3 + 4 = 7 of 10.
    y = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert contingency(y, pred).tolist() == [[3, 1], [2, 4]]
    assert cluster_accuracy(y, pred) == pytest.approx(0.7)


def test_one_to_one_is_stricter_than_many_to_one():
    # Everything in one cluster: many-to-one gets the majority, one-to-one too, but splitting a
    # true class over two clusters is only rewarded by many-to-one.
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(y, pred) == pytest.approx(4 / 6)
    assert many_to_one_accuracy(y, pred) == pytest.approx(1.0)


def test_more_clusters_than_classes_and_chance_level():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 5000)
    pred = rng.integers(0, 10, 5000)
    assert cluster_accuracy(y, pred) < 0.15
    assert abs(scores(y, pred)["ari"]) < 0.01


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        cluster_accuracy(np.zeros(3, int), np.zeros(4, int))
