"""Cluster usage and collapse: how many of its clusters a mixture (or each facet) really uses.

Computed from responsibilities p(c | x) on a fixed subset of the data, once per epoch (one host
sync), and again for ``diagnose`` and selection. A mixture is *collapsed* when fewer than
``MIN_USED`` of its K clusters hold at least ``USED_SHARE`` of the points (argmax), or when one
cluster holds ``DOMINANT`` of them however many others keep a few, or when its clustering
carries no information about x: the mutual information I(c; x) of the responsibilities is
below ``UNINFORMATIVE`` of its maximum log K. The last catches a facet whose latent carries no
information: q(c | x) is then nearly the same for every x, while its argmax may still spread
the points over several clusters.
"""

from __future__ import annotations

import math
from typing import Any

import torch

USED_SHARE = 0.01  # a cluster is used when it is the argmax of at least 1 % of the points
MIN_USED = 0.5  # ... and a mixture collapsed when fewer than half of its clusters are used
DOMINANT = 0.95  # ... or when one cluster is the argmax of at least 95 % of them
UNINFORMATIVE = 0.05  # ... or when I(c; x) < 5 % of log K (a dead facet measured 0.001,
# healthy ones 0.43-0.94: docs/suite.md)
CONFIDENT = 0.9  # a point's assignment is confident when max_c p(c | x) >= 0.9
SUBSET = 1000  # points the trainer scores each epoch


def usage(probs: torch.Tensor) -> dict[str, Any]:
    """Usage statistics of responsibilities ``probs`` (N, K), rows on the simplex.

    ``effective``: exp of the entropy of the mean responsibility (K when the mass is spread
    evenly, 1 when one cluster takes it all); ``used``: clusters that are the argmax of at least
    ``USED_SHARE`` of the points; ``confident``: the fraction of points with max p >= CONFIDENT;
    ``information``: I(c; x) / log K = (H(mean p) - mean H(p)) / log K, 0 when every point has
    the same responsibilities, 1 when each is certain and the clusters are equally used;
    ``collapsed``: ``used < MIN_USED * K``, ``largest_share >= DOMINANT`` or
    ``information < UNINFORMATIVE``.
    """
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"responsibilities must be (N, K) with N >= 1, got {tuple(probs.shape)}")
    probs = probs.detach().double()
    n, k = probs.shape
    mean = probs.mean(0)
    entropy = -(mean * mean.clamp_min(1e-300).log()).sum()
    within = -(probs * probs.clamp_min(1e-300).log()).sum(1).mean()
    shares = torch.bincount(probs.argmax(1), minlength=k).double() / n
    used = int((shares >= USED_SHARE).sum())
    record = {
        "k": k,
        "used": used,
        "effective": float(entropy.exp()),
        "confident": float((probs.max(1).values >= CONFIDENT).double().mean()),
        "largest_share": float(shares.max()),
        "information": float((entropy - within).clamp_min(0) / math.log(k)) if k > 1 else 0.0,
    }
    return {**record, "collapsed": rule(record)}


def rule(record: dict[str, Any]) -> bool:
    """Whether a :func:`usage` record (``used``, ``k``, ``largest_share``, ``information``) is
    collapsed, by the current rule (also for records saved under an earlier one, which may
    lack ``information``)."""
    return (record["used"] < math.ceil(MIN_USED * record["k"])
            or record["largest_share"] >= DOMINANT - 1e-12
            or record.get("information", 1.0) < UNINFORMATIVE)


def subset_index(n: int, size: int = SUBSET) -> torch.Tensor:
    """A fixed subset of ``size`` of ``n`` points (all when n <= size), from its own generator,
    so scoring never touches the training RNG."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values


def any_collapsed(records: list[dict[str, Any]]) -> bool:
    """Whether any facet's record (from :func:`usage`) is collapsed: as saved, or by the
    current rule where the record has its fields (a record saved under an earlier rule)."""
    return any(r["collapsed"] or ("largest_share" in r and rule(r)) for r in records)


def line(records: list[dict[str, Any]]) -> str:
    """Short form for the progress bar: used/K per facet, e.g. ``9/10`` or ``10/10,3/8``."""
    return ",".join(f"{r['used']}/{r['k']}" for r in records)


def choose(scores: list[float], records: list[list[dict[str, Any]]]) -> int:
    """Index of the run to keep: the highest ``score`` (ELBO, IWAE) among the runs with no
    collapsed facet. If every run collapsed, the one that uses the largest share of its
    clusters (its worst facet's), then the highest score: a collapsed run never beats a
    healthy one, whatever its bound."""
    if not scores or len(scores) != len(records):
        raise ValueError("choose needs one usage record list per score")

    def worst(rs: list[dict[str, Any]]) -> float:
        return min(r["used"] / r["k"] for r in rs)

    healthy = [i for i, rs in enumerate(records) if not any_collapsed(rs)]
    if healthy:
        return max(healthy, key=lambda i: scores[i])
    return max(range(len(scores)), key=lambda i: (worst(records[i]), scores[i]))
