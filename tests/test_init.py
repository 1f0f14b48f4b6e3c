"""Mixture initialisation from embeddings (label-free)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from ppl_cluster import init as init_module
from ppl_cluster.config import FitConfig
from ppl_cluster.errors import ConfigError
from ppl_cluster.init import (
    INIT_SUBSAMPLE,
    cluster_embeddings,
    gmm_initialize,
    principal_codes,
    set_mixture_from,
    subsample_index,
)
from ppl_cluster.metrics import cluster_accuracy
from ppl_cluster.settings import declared


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


class _FullModel(_Model):
    def __init__(self, d):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(3, d))
        self.tril = torch.nn.Parameter(torch.zeros(3, d, d))


def test_full_covariances_are_shrunk_towards_their_diagonal():
    """Codes on a 2-D sheet of a 6-D latent have singular covariances; shrunk, each keeps its
    diagonal and its cluster's weight and mean, and gains variance off the sheet. With many
    points per cluster the Ledoit-Wolf intensity, and so the change, vanishes."""
    emb, y = blobs(n=90, d=2)
    codes = emb @ np.random.default_rng(1).normal(size=(2, 6))
    resp = np.eye(3)[y]
    plain, shrunk = _FullModel(6), _FullModel(6)
    set_mixture_from(plain, codes, resp)
    set_mixture_from(shrunk, codes, resp, shrink=True)
    for a, b in zip(plain.got[:2], shrunk.got[:2], strict=True):
        torch.testing.assert_close(a, b)
    cov_plain, cov_shrunk = plain.got[2].double(), shrunk.got[2].double()
    torch.testing.assert_close(cov_plain.diagonal(dim1=1, dim2=2),
                               cov_shrunk.diagonal(dim1=1, dim2=2))
    diag_mean = cov_plain.diagonal(dim1=1, dim2=2).mean(1)
    assert (torch.linalg.eigvalsh(cov_plain)[:, 0] < 1e-4).all()  # the jitter only
    assert (torch.linalg.eigvalsh(cov_shrunk)[:, 0] > 1e-3 * diag_mean).all()
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 30_000)  # correlated clusters: far from their diagonal
    many = rng.normal(0, 8, (3, 6))[y] + rng.normal(size=(30_000, 6)) @ rng.normal(size=(6, 6))
    resp = np.eye(3)[y]
    plain, shrunk = _FullModel(6), _FullModel(6)
    set_mixture_from(plain, many, resp)
    set_mixture_from(shrunk, many, resp, shrink=True)
    torch.testing.assert_close(shrunk.got[2], plain.got[2], rtol=3e-3, atol=1e-6)


@pytest.mark.parametrize("shape, clustered", [((1, 1, 3), "features"), ((1, 1, 8), "codes"),
                                              ((1, 2, 2), "codes")])
def test_features_no_wider_than_the_code_are_clustered_as_they_are(monkeypatch, shape, clustered):
    seen = []

    def record(emb, k, cfg, seed):
        seen.append(emb)
        return np.full((len(emb), k), 1 / k), 0.0

    class Warped(torch.nn.Module):  # a 6-D code: a warped copy of (at most 6) features
        def embed(self, x):
            flat = x.flatten(1)[:, :3]
            return torch.cat([flat**3, flat], 1)

    monkeypatch.setattr(init_module, "cluster_embeddings", record)
    x = torch.randn(40, *shape)
    gmm_initialize(_Model(), Warped(), x, FitConfig(init="gmm"), seed=0)
    want = x.flatten(1) if clustered == "features" else Warped().embed(x)
    np.testing.assert_allclose(seen[-1], want.double().numpy(), rtol=1e-6)


def test_unknown_init_is_refused():
    with pytest.raises(ConfigError, match="init"):
        FitConfig(init="kmeans").validate()


def _before_subsampling(emb, k, cfg, seed):
    """cluster_embeddings as it was before init_subsample (gmm and tsne), verbatim."""
    from sklearn.manifold import TSNE
    from sklearn.mixture import GaussianMixture

    space = emb
    if cfg.init == "tsne":
        perplexity = min(float(cfg.init_neighbors or 30), (len(emb) - 1) / 3)
        space = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(emb)
    gmm = GaussianMixture(n_components=k, covariance_type=cfg.gmm_covariance or "diag",
                          n_init=cfg.gmm_inits or 1, reg_covar=1e-5, max_iter=300,
                          random_state=seed).fit(space)
    return gmm.predict_proba(space), float(gmm.score(space))


@pytest.mark.parametrize("init", ["gmm", "tsne"])
def test_up_to_the_subsample_size_nothing_is_subsampled(init):
    emb, _ = blobs(n=200)
    expected = _before_subsampling(emb, 3, FitConfig(init=init, gmm_inits=2), 0)
    for size in (None, 200, 10**6):  # the default, exactly N, far above N
        resp, log_lik = cluster_embeddings(emb, 3, FitConfig(init=init, gmm_inits=2,
                                                             init_subsample=size), seed=0)
        assert np.array_equal(resp, expected[0]) and log_lik == expected[1]
    assert subsample_index(200, 200, 0) is None and INIT_SUBSAMPLE >= 10_000


@pytest.mark.parametrize("init", ["gmm", "tsne", "spectral"])
def test_a_subsample_recovers_well_separated_blobs_for_every_point(init):
    emb, y = blobs(n=2000, k=5, d=10)
    cfg = FitConfig(init=init, gmm_covariance="full", init_subsample=200)
    resp, log_lik = cluster_embeddings(emb, 5, cfg, seed=0)
    assert resp.shape == (2000, 5) and (resp >= 0).all() and np.isfinite(log_lik)
    np.testing.assert_allclose(resp.sum(1), 1, rtol=1e-6)
    assert adjusted_rand_score(y, resp.argmax(1)) > 0.95


def test_points_outside_the_subsample_follow_curved_clusters():
    emb, y = rings(n=2000)
    cfg = FitConfig(init="spectral", gmm_inits=3, gmm_covariance="full", init_neighbors=10,
                    init_subsample=400)
    assert cluster_accuracy(y, cluster_embeddings(emb, 2, cfg, seed=0)[0].argmax(1)) > 0.99


def test_the_subsample_is_deterministic_given_the_seed():
    idx = subsample_index(1000, 100, 0)
    assert len(np.unique(idx)) == 100 and np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, subsample_index(1000, 100, 0))
    assert not np.array_equal(idx, subsample_index(1000, 100, 1))
    emb, _ = blobs(n=1000)
    cfg = FitConfig(init="tsne", init_subsample=100)
    first, again = (cluster_embeddings(emb, 3, cfg, seed=0) for _ in range(2))
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]


def test_a_subsampled_initialisation_sets_the_moments_of_all_points():
    emb, y = blobs(n=1000)
    model = _Model()
    gmm_initialize(model, _Guide(), torch.tensor(emb, dtype=torch.float32),
                   FitConfig(init="gmm", init_subsample=100), seed=0)
    found = sorted(model.got[1][:, 0].tolist())
    np.testing.assert_allclose(found, sorted(emb[y == k, 0].mean() for k in range(3)), atol=1e-3)


def test_the_subsample_setting_states_its_default_and_range():
    meta = declared(FitConfig)["init_subsample"].metadata
    assert f"default {INIT_SUBSAMPLE}" in meta["help"] and meta["group"] == "init"
    with pytest.raises(ConfigError, match="init_subsample"):
        FitConfig(init_subsample=10).validate()


def test_principal_codes_of_large_data_come_from_chunks_with_the_same_components(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    x = (torch.randn(9000, 3, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 2.0, 1.0])
         @ basis.T + 0.3).reshape(9000, 2, 4)  # three chunks
    exact, exact_scales = principal_codes(x, 5, seed=1)
    monkeypatch.setattr(init_module, "EXACT_PCA_BYTES", 0)
    chunked, scales = principal_codes(x, 5, seed=1)
    torch.testing.assert_close(scales, exact_scales)
    sign = (chunked[:, :3] * exact[:, :3]).sum(0).sign()
    torch.testing.assert_close(chunked[:, :3], exact[:, :3] * sign)
    assert torch.equal(chunked[:, 3:], exact[:, 3:])  # the same seeded noise beyond the rank
    # Each score's sign: its largest loading (covariance with a centred pixel) is positive.
    centred = x.flatten(1) - x.flatten(1).mean(0)
    loadings = chunked[:, :3].T @ centred
    assert (loadings.gather(1, loadings.abs().argmax(1, keepdim=True)) > 0).all()


def test_principal_codes_are_whitened_ranked_scores_padded_with_noise():
    gen = torch.Generator().manual_seed(0)
    # 3 informative directions of decreasing spread in 8 pixels (rank 3), as 2 x 4 images.
    basis = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    x = (torch.randn(500, 3, generator=gen, dtype=torch.float64) * torch.tensor([5.0, 2.0, 1.0])
         @ basis.T + 0.3).reshape(500, 2, 4)
    codes, scales = principal_codes(x, 5, seed=1)
    assert codes.shape == (500, 5) and codes.dtype == x.dtype and scales.shape == (3,)
    # The scores' spreads before whitening: those of the three directions, in their order.
    torch.testing.assert_close(scales / scales[0], torch.tensor([1.0, 0.4, 0.2], dtype=scales.dtype),
                               atol=0.06, rtol=0)
    cov = torch.cov(codes[:, :3].T)
    torch.testing.assert_close(cov, torch.eye(3, dtype=cov.dtype), atol=1e-8, rtol=0)
    # The first column is the top component: it explains the data's largest spread.
    top = x.flatten(1) - x.flatten(1).mean(0)
    assert abs(float(torch.corrcoef(torch.stack([codes[:, 0], top @ basis[:, 0]]))[0, 1])) > 0.99
    # Beyond the rank: noise of the prior's scale, seeded.
    assert 0.8 < float(codes[:, 3:].std()) < 1.2
    assert torch.equal(principal_codes(x, 5, seed=1)[0], codes)
    assert not torch.equal(principal_codes(x, 5, seed=2)[0][:, 3:], codes[:, 3:])
    torch.testing.assert_close(principal_codes(x, 2, seed=1), (codes[:, :2], scales[:2]))
