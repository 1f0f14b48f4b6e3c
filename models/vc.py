r"""Variational Clustering (Prasad, Das & Bhowmick, 2020), the generative story.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      # cluster
    z_n | c_n ~ Normal(mu[c_n], sigma[c_n])     # learned diagonal Gaussian prior per cluster
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))      # pixels in [0, 1]; or Normal(f(z_n), s)

that is :math:`p(x, z, c) = \pi_c \, N(z; \mu_c, \mathrm{diag}\,\sigma_c^2) \, p_f(x \mid z)`,
with ``pi`` (softmax of free logits), ``mu``, ``sigma = exp(log_sigma)`` and the decoder ``f``
all learned from scratch, end to end.

Unlike VaDE, the cluster is *not* enumerated here: the guide
(:mod:`ppl_cluster.guides.vc`) owns a real posterior factor :math:`q(c \mid x)` and either
enumerates it exactly or samples it with a straight-through Gumbel-softmax. In the first case
the site's value is an integer index (possibly an enumeration tensor of shape ``(K, 1)``); in
the second it is a one-hot vector of shape ``(N, K)``. :func:`select` serves both.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
DISCRETE = ("enumerate", "relaxed")


def one_hot(c: torch.Tensor, k: int) -> torch.Tensor:
    """The one-hot form of a cluster value: integer indices or (relaxed) one-hot vectors."""
    return c if c.is_floating_point() else F.one_hot(c, k).float()


def select(table: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row ``c`` of a ``(K, D)`` table, for index or one-hot ``c`` (gradients flow through a
    straight-through one-hot)."""
    return one_hot(c, table.shape[-2]) @ table


class VCModel(PyroModule):
    """p(c) p(z|c) p(x|z) with a neural decoder ``decoder: z -> per-pixel outputs``."""

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "bernoulli",
                 discrete: str = "enumerate") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        if discrete not in DISCRETE:
            raise ValueError(f"discrete must be one of {DISCRETE}")
        self.decoder = decoder
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        self.likelihood = likelihood
        self.discrete = discrete
        self.pi_logits = nn.Parameter(torch.zeros(n_clusters))
        # Spread-out random prior means break the symmetry between clusters (no GMM init).
        self.mu = nn.Parameter(torch.randn(n_clusters, latent_dim))
        self.log_sigma = nn.Parameter(torch.zeros(n_clusters, latent_dim))
        if likelihood == "gaussian":
            self.x_log_scale = nn.Parameter(torch.zeros(math.prod(self.image_shape)))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def prior_c(self) -> dist.Distribution:
        """p(c): over indices when the guide enumerates c, over one-hot vectors when relaxed."""
        if self.discrete == "relaxed":
            return dist.OneHotCategorical(logits=self.pi_logits)
        return dist.Categorical(logits=self.pi_logits)

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) as a distribution over flattened images (event dim 1)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.x_log_scale.exp()).to_event(1)

    def forward(self, x: torch.Tensor) -> None:
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", self.prior_c())
            z = pyro.sample("z", dist.Normal(select(self.mu, c), select(self.sigma, c)).to_event(1))
            pyro.sample("x", self.observation(z), obs=x)

    # Helpers used outside inference (generation).
    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] reshaped to images."""
        out = self.decoder(z)
        out = torch.sigmoid(out) if self.likelihood == "bernoulli" else out
        return out.reshape(*z.shape[:-1], *self.image_shape)

    def generate(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """Draw ``n`` images (likelihood means) from the prior, optionally from one cluster."""
        if cluster is None:
            c = dist.Categorical(logits=self.pi_logits).sample((n,))
        else:
            c = torch.full((n,), int(cluster), dtype=torch.long, device=self.mu.device)
        z = dist.Normal(self.mu[c], self.sigma[c]).sample()
        return self.decode_mean(z)
