"""The published VaDE recipe's two warm-up steps, reusable by any variant whose guide has
``embed(x)`` and whose model has ``decoder``/``observation`` and ``set_mixture``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pyro.nn import PyroModule

from .config import FitConfig, is_vectors
from .data import chunks, unit


def autoencoder_loss(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                     method: str = "embed") -> torch.Tensor:
    """Deterministic autoencoder loss: -log p(x | z = m(x)) summed over the batch, the code
    m = ``guide.<method>`` (default ``embed``)."""
    return -model.observation(getattr(guide, method)(x)).log_prob(x.flatten(1)).sum()


@torch.no_grad()
def embed_all(guide: PyroModule, x: torch.Tensor, batch_size: int = 2048,
              method: str = "embed") -> torch.Tensor:
    """``guide.<method>`` (default ``embed``) of every image of ``x``, in batches."""
    code = getattr(guide, method)
    return torch.cat([code(xb) for xb in chunks(x, batch_size)])


# Above this many bytes of a float64 copy of the data, principal_codes works through chunks (a
# D x D scatter matrix) instead of an exact SVD of the whole copy; scikit-learn's PCA chooses its
# solver by size the same way. The 10,000 MNIST digits (63 MB) stay on the exact path.
EXACT_PCA_BYTES = 2**28


@torch.no_grad()
def principal_codes(x: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened principal-component scores (N, dim) of the flattened images ``x`` (unit
    variance per column, the ranking of the components kept) and the scores' standard
    deviations before whitening (d,), one per column that is a score: columns beyond the
    data's rank d are seeded standard-normal noise, so that every latent dimension has the
    prior's scale. Up to ``EXACT_PCA_BYTES`` of float64 copy, an SVD of that copy; above, the
    eigenvectors of the scatter matrix summed over chunks, each score column's sign fixed so
    that its largest loading is positive (the same components, no whole-data float copy)."""
    dtype = unit(x[:1]).dtype  # float32 for stored bytes
    n, width = x.shape[0], math.prod(x.shape[1:])
    root = math.sqrt(max(n - 1, 1))
    if n * width * 8 <= EXACT_PCA_BYTES:
        flat = unit(x).flatten(1).double()
        u, sv, _ = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
        rank = int((sv > sv[0] * 1e-6).sum()) if sv.numel() else 0
        d = min(dim, rank)
        codes = u[:, :d] * root
    else:
        mean = sum(c.flatten(1).double().sum(0) for c in chunks(x, 4096)) / n
        scatter = 0
        for c in chunks(x, 4096):
            centred = c.flatten(1).double() - mean
            scatter = scatter + centred.T @ centred
        values, vectors = torch.linalg.eigh(scatter)  # ascending
        sv = values.flip(0).clamp_min(0).sqrt()
        rank = int((sv > sv[0] * 1e-6).sum()) if sv.numel() else 0
        d = min(dim, rank)
        axes = vectors.flip(1)[:, :d]
        axes = axes * axes.gather(0, axes.abs().argmax(0)[None]).sign()
        codes = torch.cat([(c.flatten(1).double() - mean) @ axes for c in chunks(x, 4096)])
        codes = codes / sv[:d] * root
    if d < dim:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, dim - d, generator=gen, dtype=codes.dtype)
        codes = torch.cat([codes, noise.to(codes.device)], 1)
    return codes.to(dtype), (sv[:d] / root).to(dtype)


# The initialisation's map and mixture are fitted on at most this many embeddings (a seeded
# random subsample; ``cfg.init_subsample`` overrides it) and the other points are assigned
# from them: t-SNE and the spectral embedding grow faster than linearly with N (t-SNE at one
# thread: 5k points 39 s, 10k 89 s, 20k 211 s), the assignment linearly (docs/scaling.md).
# At the reference scale of 10,000 images nothing is subsampled.
INIT_SUBSAMPLE = 10_000
# Size of the k-NN query (capped at M - 1) that places a point outside the subsample in the
# map when the run sets no ``init_neighbors``: the map's own default neighbourhood.
PLACE_NEIGHBORS = 30
_QUERY_CHUNK = 8192  # points per k-NN query block (bounds memory to chunk x k)


def subsample_index(n: int, size: int, seed: int) -> np.ndarray | None:
    """The sorted indices of the seeded subsample of ``size`` of ``n`` points that the
    initialisation is fitted on, or None when ``n <= size`` (all points, no subsampling)."""
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _place(emb: np.ndarray, fit: np.ndarray, fit_space: np.ndarray, rest: np.ndarray,
           k: int) -> np.ndarray:
    """Map coordinates of the points ``rest`` of ``emb``: the coordinate-wise median of the map
    coordinates ``fit_space`` of their ``k`` nearest neighbours (Euclidean, in embedding space)
    among the fitted points ``fit``."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=min(k, len(fit))).fit(emb[fit])
    out = np.empty((len(rest), fit_space.shape[1]), dtype=fit_space.dtype)
    for i in range(0, len(rest), _QUERY_CHUNK):
        ind = nn.kneighbors(emb[rest[i : i + _QUERY_CHUNK]], return_distance=False)
        out[i : i + _QUERY_CHUNK] = np.median(fit_space[ind], axis=1)
    return out


def cluster_embeddings(emb: np.ndarray, k: int, cfg: FitConfig, seed: int) -> tuple[np.ndarray, float]:
    """Soft assignments (N, K) of the embeddings, and the log-likelihood of the fit that gave them.

    ``cfg.init == "gmm"`` (the published recipe): a Gaussian mixture on the embeddings.
    ``cfg.init == "spectral"``: the mixture is fitted in a spectral embedding of the embeddings'
    k-nearest-neighbour graph, which follows curved clusters that a Gaussian mixture in the raw
    autoencoder space splits or merges.
    ``cfg.init == "tsne"``: the mixture is fitted in a 2-D t-SNE map of the embeddings, whose
    local-neighbourhood objective pulls each class into a compact blob (the N2D recipe of
    McConville et al. 2019, with t-SNE in place of UMAP).
    None looks at labels; among ``cfg.gmm_inits`` fits scikit-learn keeps the one with the
    highest likelihood.

    Above ``cfg.init_subsample`` points (default ``INIT_SUBSAMPLE``) the map and its mixture
    are fitted on a seeded random subsample of that many embeddings (:func:`subsample_index`);
    every other point is placed in the map at the coordinate-wise median of the map
    coordinates of its nearest subsample neighbours in embedding space (as many as the map's
    neighbourhood, ``init_neighbors``; for ``gmm`` the map is the embedding itself, so no
    placement is needed), and the fitted mixture gives its responsibilities there. That is
    the out-of-sample rule of neighbourhood maps (openTSNE places new points at the median of
    their neighbours' positions; the Nyström extension of a k-NN-graph spectral embedding is a
    neighbour average), so a point joins the cluster its neighbourhood is in, even for curved
    clusters that a Gaussian in embedding space would cut. The cost is the subsample's fit
    plus O(N log M) neighbour queries. The log-likelihood is then the mean over all N points
    in the map. At N <= the subsample size nothing changes.
    """
    from sklearn.mixture import GaussianMixture

    size = cfg.init_subsample or INIT_SUBSAMPLE
    fit = subsample_index(len(emb), size, seed)
    sub = emb if fit is None else emb[fit]
    space = sub
    if cfg.init == "spectral":
        from sklearn.manifold import SpectralEmbedding

        space = SpectralEmbedding(n_components=k, affinity="nearest_neighbors",
                                  n_neighbors=min(cfg.init_neighbors or 30, len(sub) - 1),
                                  random_state=seed).fit_transform(sub)
        space = space * np.sqrt(len(sub))  # unit-norm eigenvectors -> O(1) coordinates
    elif cfg.init == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(float(cfg.init_neighbors or 30), (len(sub) - 1) / 3)
        space = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(sub)
    gmm = GaussianMixture(n_components=k, covariance_type=cfg.gmm_covariance or "diag",
                          n_init=cfg.gmm_inits or 1, reg_covar=1e-5, max_iter=300,
                          random_state=seed).fit(space)
    if fit is not None:
        if cfg.init in ("spectral", "tsne"):
            rest = np.setdiff1d(np.arange(len(emb)), fit, assume_unique=True)
            full = np.empty((len(emb), space.shape[1]), dtype=space.dtype)
            full[fit] = space
            full[rest] = _place(emb, fit, space, rest, cfg.init_neighbors or PLACE_NEIGHBORS)
            space = full
        else:
            space = emb
    return gmm.predict_proba(space), float(gmm.score(space))


def gmm_initialize(model: PyroModule, guide: PyroModule, x: torch.Tensor, cfg: FitConfig,
                   seed: int) -> dict[str, float]:
    """Initialise the model's mixture prior from a clustering of the embeddings.

    π, μ and σ² (or the covariances, for full-covariance components, shrunk:
    :func:`set_mixture_from`) are the responsibility-weighted moments of the embeddings in z
    space, whatever space the clustering was fitted in. Feature vectors no wider than the code
    (D <= latent_dim) are clustered as they are: an autoencoder cannot compress them, and its
    codes are only a warped copy of the features.
    """
    emb = embed_all(guide, x).double().cpu().numpy()
    space = None
    if is_vectors(x.shape[1:]) and x.shape[-1] <= emb.shape[1]:
        space = unit(x).flatten(1).double().cpu().numpy()
    _, log_lik = fit_mixture(model, emb, cfg, seed, space=space, shrink=True)
    return {"init_log_likelihood": log_lik}


def covariance_by_bic(x: torch.Tensor, k: int, seed: int, size: int = INIT_SUBSAMPLE) -> str:
    """"full" or "diag": the covariance of the ``k``-component Gaussian mixture of the
    flattened data ``x`` (standardised, constant columns dropped; a seeded subsample of
    ``size`` points) with the lower BIC, i.e. whether the data pay for correlated clusters."""
    from sklearn.mixture import GaussianMixture

    index = subsample_index(x.shape[0], size, seed)
    feats = unit(x if index is None else x[torch.as_tensor(index, device=x.device)])
    feats = feats.flatten(1).double().cpu().numpy()
    spread = feats.std(0)
    if not (spread > 0).any():
        return "diag"  # nothing varies: no clusters to shape (refused later, as identical data)
    feats = (feats[:, spread > 0] - feats.mean(0)[spread > 0]) / spread[spread > 0]
    bic = {cov: GaussianMixture(k, covariance_type=cov, n_init=2, reg_covar=1e-5, max_iter=300,
                                random_state=seed).fit(feats).bic(feats)
           for cov in ("diag", "full")}
    return min(bic, key=bic.get)


def fit_mixture(target: Any, emb: np.ndarray, cfg: FitConfig, seed: int,
                space: np.ndarray | None = None, shrink: bool = False
                ) -> tuple[np.ndarray, float]:
    """Cluster the embeddings ``emb`` (or ``space``, the same points in another space, when
    given; :func:`cluster_embeddings`, ``target.n_clusters``) and set ``target``'s mixture to
    those clusters' moments in ``emb`` (:func:`set_mixture_from`); returns the assignments and
    the clustering's log-likelihood."""
    resp, log_lik = cluster_embeddings(emb if space is None else space, target.n_clusters, cfg, seed)
    set_mixture_from(target, emb, resp, shrink)
    return resp, log_lik


def set_mixture_from(target: Any, emb: np.ndarray, resp: np.ndarray, shrink: bool = False) -> None:
    """``target.set_mixture(pi, mu, cov)`` with the responsibility-weighted moments of the
    embeddings (N, D) under soft assignments ``resp`` (N, K): a Gaussian mixture in the
    embeddings' own space, whatever space the assignments came from. A target with
    full-covariance components (a ``tril`` factor) gets the weighted covariance matrices, any
    other the weighted variances. With ``shrink``, each covariance matrix is pulled towards
    its own diagonal by the Ledoit-Wolf intensity of its cluster's points: fitted to a few
    dozen codes, a component keeps near-zero variance off the sheet its points lie on, where
    the posterior's samples then fall, and one component takes every point."""
    weight = resp.sum(0) + 1e-10
    mu = resp.T @ emb / weight[:, None]
    if getattr(target, "tril", None) is not None:
        dev = emb[None] - mu[:, None]  # (K, N, D)
        cov = np.einsum("nk,kni,knj->kij", resp, dev, dev) / weight[:, None, None]
        if shrink:
            from sklearn.covariance import ledoit_wolf_shrinkage

            hard = resp.argmax(1)
            for k in range(len(cov)):
                points = emb[hard == k]
                amount = float(ledoit_wolf_shrinkage(points)) if len(points) > 1 else 1.0
                cov[k] = (1 - amount) * cov[k] + amount * np.diag(np.diag(cov[k]))
        cov = cov + 1e-5 * np.eye(emb.shape[1])
    else:
        cov = np.maximum(resp.T @ emb**2 / weight[:, None] - mu**2 + 1e-5, 1e-5)
    device = target.mu.device
    target.set_mixture(*(torch.as_tensor(a, dtype=torch.float32, device=device)
                         for a in (weight / weight.sum(), mu, cov)))
