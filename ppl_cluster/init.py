"""The published VaDE recipe's two warm-up steps, reusable by any variant whose guide has
``embed(x)`` and whose model has ``decoder``/``observation`` and ``set_mixture``."""

from __future__ import annotations

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


def gmm_initialize(model: PyroModule, guide: PyroModule, x: torch.Tensor, cfg: FitConfig,
                   seed: int) -> dict[str, float]:
    """Fit a Gaussian mixture to the embeddings and copy it into the model's prior.

    ``cfg.gmm_inits`` k-means-initialised fits are run and scikit-learn keeps the one with the
    highest likelihood (no labels involved). A full-covariance fit keeps only its diagonal.
    """
    from sklearn.mixture import GaussianMixture

    emb = embed_all(guide, x).double().cpu().numpy()
    gmm = GaussianMixture(
        n_components=model.n_clusters,
        covariance_type=cfg.gmm_covariance or "diag",
        n_init=cfg.gmm_inits or 1,
        reg_covar=1e-5,
        max_iter=300,
        random_state=seed,
    ).fit(emb)
    var = gmm.covariances_
    if var.ndim == 3:
        var = np.diagonal(var, axis1=1, axis2=2)
    dev = model.mu.device
    model.set_mixture(
        torch.as_tensor(gmm.weights_, dtype=torch.float32, device=dev),
        torch.as_tensor(gmm.means_, dtype=torch.float32, device=dev),
        torch.as_tensor(var, dtype=torch.float32, device=dev),
    )
    return {"gmm_log_likelihood": float(gmm.score(emb))}
