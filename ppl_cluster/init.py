"""The published VaDE recipe's two warm-up steps, reusable by any variant whose guide has
``embed(x)`` and whose model has ``decoder``/``observation`` and ``set_mixture``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pyro.nn import PyroModule

from .config import FitConfig


def autoencoder_loss(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    """Deterministic autoencoder loss: -log p(x | z = m(x)) summed over the batch."""
    return -model.observation(guide.embed(x)).log_prob(x.flatten(1)).sum()


@torch.no_grad()
def embed_all(guide: PyroModule, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    return torch.cat([guide.embed(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


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
    """
    from sklearn.mixture import GaussianMixture

    space = emb
    if cfg.init == "spectral":
        from sklearn.manifold import SpectralEmbedding

        space = SpectralEmbedding(n_components=k, affinity="nearest_neighbors",
                                  n_neighbors=min(cfg.init_neighbors or 30, len(emb) - 1),
                                  random_state=seed).fit_transform(emb)
        space = space * np.sqrt(len(emb))  # unit-norm eigenvectors -> O(1) coordinates
    elif cfg.init == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(float(cfg.init_neighbors or 30), (len(emb) - 1) / 3)
        space = TSNE(n_components=2, perplexity=perplexity, init="pca",
                     random_state=seed).fit_transform(emb)
    gmm = GaussianMixture(n_components=k, covariance_type=cfg.gmm_covariance or "diag",
                          n_init=cfg.gmm_inits or 1, reg_covar=1e-5, max_iter=300,
                          random_state=seed).fit(space)
    return gmm.predict_proba(space), float(gmm.score(space))


def gmm_initialize(model: PyroModule, guide: PyroModule, x: torch.Tensor, cfg: FitConfig,
                   seed: int) -> dict[str, float]:
    """Initialise the model's mixture prior from a clustering of the embeddings.

    π, μ and σ² (or the covariances, for full-covariance components) are the
    responsibility-weighted moments of the embeddings in z space, whatever space the
    clustering was fitted in.
    """
    emb = embed_all(guide, x).double().cpu().numpy()
    resp, log_lik = cluster_embeddings(emb, model.n_clusters, cfg, seed)
    set_mixture_from(model, emb, resp)
    return {"init_log_likelihood": log_lik}


def set_mixture_from(target: Any, emb: np.ndarray, resp: np.ndarray) -> None:
    """``target.set_mixture(pi, mu, cov)`` with the responsibility-weighted moments of the
    embeddings (N, D) under soft assignments ``resp`` (N, K): a Gaussian mixture in the
    embeddings' own space, whatever space the assignments came from. A target with
    full-covariance components (a ``tril`` factor) gets the weighted covariance matrices, any
    other the weighted variances."""
    weight = resp.sum(0) + 1e-10
    mu = resp.T @ emb / weight[:, None]
    if getattr(target, "tril", None) is not None:
        dev = emb[None] - mu[:, None]  # (K, N, D)
        cov = np.einsum("nk,kni,knj->kij", resp, dev, dev) / weight[:, None, None]
        cov = cov + 1e-5 * np.eye(emb.shape[1])
    else:
        cov = np.maximum(resp.T @ emb**2 / weight[:, None] - mu**2 + 1e-5, 1e-5)
    device = target.mu.device
    target.set_mixture(*(torch.as_tensor(a, dtype=torch.float32, device=device)
                         for a in (weight / weight.sum(), mu, cov)))
