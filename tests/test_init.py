"""Mixture initialisation from embeddings (label-free)."""

import numpy as np
import pytest
import torch

from ppl_cluster.config import FitConfig
from ppl_cluster.errors import ConfigError
from ppl_cluster.init import cluster_embeddings, gmm_initialize
from ppl_cluster.metrics import cluster_accuracy


def blobs(n=300, k=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, (k, d))
    y = rng.integers(0, k, n)
    return centres[y] + rng.normal(0, 1, (n, d)), y


def rings(n=600, seed=0):
    """Two concentric circles: one Gaussian per ring cannot separate them, a k-NN graph can."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(y == 0, 1.0, 4.0) + rng.normal(0, 0.1, n)
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)], y


@pytest.mark.parametrize("init", ["gmm", "spectral", "tsne"])
def test_well_separated_blobs_are_recovered(init):
    emb, y = blobs()
    cfg = FitConfig(init=init, gmm_inits=2, gmm_covariance="full", init_neighbors=10)
    resp, log_lik = cluster_embeddings(emb, 3, cfg, seed=0)
    np.testing.assert_allclose(resp.sum(1), 1, rtol=1e-6)
    assert cluster_accuracy(y, resp.argmax(1)) == 1.0 and np.isfinite(log_lik)


def test_spectral_follows_curved_clusters_where_a_gmm_cannot():
    emb, y = rings()
    acc = {init: cluster_accuracy(y, cluster_embeddings(
        emb, 2, FitConfig(init=init, gmm_inits=3, gmm_covariance="full", init_neighbors=10),
        seed=0)[0].argmax(1)) for init in ("gmm", "spectral")}
    assert acc["spectral"] > 0.99 and acc["gmm"] < 0.8, acc


class _Guide(torch.nn.Module):
    def embed(self, x):
        return x.flatten(1)


class _Model(torch.nn.Module):
    n_clusters = 3

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(3, 4))
        self.got = None

    def set_mixture(self, pi, mu, var):
        self.got = (pi, mu, var)


def test_prior_is_the_moments_of_the_found_clusters():
    emb, y = blobs()
    model = _Model()
    gmm_initialize(model, _Guide(), torch.tensor(emb, dtype=torch.float32),
                   FitConfig(init="gmm", gmm_inits=2), seed=0)
    pi, mu, var = model.got
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0))
    found = sorted(mu[:, 0].tolist())
    expected = sorted(emb[y == k, 0].mean() for k in range(3))
    np.testing.assert_allclose(found, expected, atol=1e-3)
    assert (var > 0.5).all() and (var < 2).all()  # unit within-cluster variance


def test_unknown_init_is_refused():
    with pytest.raises(ConfigError, match="init"):
        FitConfig(init="kmeans").validate()
