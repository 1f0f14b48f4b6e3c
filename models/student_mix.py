r"""VaDE with a Student-t mixture prior ("vade-t"), written only through the variant API.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                              # cluster, enumerated in the model
    z_n | c_n ~ StudentT(nu[c_n], mu[c_n], sigma[c_n])  # heavy-tailed, independent per dimension
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))              # or Normal(f(z_n), s) for real data

with ``pi`` on the simplex, ``sigma = exp(log_sigma) > 0`` and one learned degrees-of-freedom
``nu[c] = 1 + softplus(raw_nu[c]) > 1`` per cluster (shared over dimensions). Heavy tails let a
cluster keep atypical images without stretching its scale. As ``nu -> inf`` this is VaDE.

The model exposes the methods that VaDE's warm-up hooks use (``observation``, ``mu``,
``set_mixture``), so the variant reuses the autoencoder pretraining and GMM initialisation of
:mod:`ppl_cluster.init`, and its guide is VaDE's (:mod:`ppl_cluster.guides.vade`).
"""

from __future__ import annotations

import dataclasses
import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..settings import setting
from .common import MixtureLatentModel
from .vade import VaDE


class StudentMixtureModel(MixtureLatentModel):
    """p(c) p(z|c) p(x|z) with a Student-t mixture prior and a neural decoder."""

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "bernoulli",
                 df: float = 5.0) -> None:
        super().__init__(decoder, n_clusters, latent_dim, image_shape, likelihood)
        # softplus^-1(df - 1): nu starts at df for every cluster.
        self.raw_nu = nn.Parameter(torch.full((n_clusters, 1), math.log(math.expm1(df - 1.0))))

    @property
    def nu(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.raw_nu)

    def component(self, c: torch.Tensor | None = None) -> dist.Distribution:
        """p(z | c) (None: all clusters, batch shape (K,)), event shape (D,)."""
        c = slice(None) if c is None else c
        return dist.StudentT(self.nu[c], self.mu[c], self.sigma[c]).to_event(1)

    @torch.no_grad()
    def set_mixture(self, pi: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
        """Initialise from a fitted diagonal Gaussian mixture, matching its variances:
        Var[StudentT(nu, mu, s)] = s^2 nu / (nu - 2) for nu > 2."""
        nu = self.nu.clamp_min(2.5)
        self.pi_logits.copy_(pi.clamp_min(1e-6).log())
        self.mu.copy_(mu)
        self.log_sigma.copy_(0.5 * (var * (nu - 2) / nu).log())


@dataclasses.dataclass
class StudentSettings:
    df: float = setting(5.0, "starting degrees of freedom nu of every cluster", above=1)


class VaDEStudent(VaDE):
    """VaDE's recipe (pretraining, mixture initialisation, SVI, its guide) with Student-t
    components."""

    name = "vade-t"
    summary = "VaDE with a Student-t mixture prior (learned degrees of freedom per cluster)"
    Settings = StudentSettings
    defaults = dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, epochs=100,
                    pretrain_epochs=50, batch_size=256, lr=2e-3, pretrain_lr=1e-3,
                    lr_decay=0.9, lr_step=10, gmm_inits=10, gmm_covariance="diag")

    def story(self, cfg, decoder, image_shape) -> MixtureLatentModel:
        return StudentMixtureModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape,
                                   cfg.likelihood, self.settings(cfg).df)
