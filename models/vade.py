r"""VaDE: Variational Deep Embedding (Jiang et al., 2017), the generative story.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      # cluster, enumerated in parallel, never sampled
    z_n | c_n ~ Normal(mu[c_n], sigma[c_n])     # diagonal Gaussian per cluster, D dims
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))      # pixels in [0, 1]; or Normal(f(z_n), s) for real data

with ``pi`` on the simplex (softmax of free logits), ``sigma > 0`` (exp of free log-scales) and
the decoder ``f`` all learned. Because ``c`` is enumerated, ``TraceEnum_ELBO`` uses the exact
marginal :math:`\log p(z) = \log \sum_c \pi_c N(z; \mu_c, \sigma_c)`: the same objective as the
paper's ELBO with its optimal :math:`q(c|x) = p(c|z)`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")


class VaDEModel(PyroModule):
    """p(c) p(z|c) p(x|z) with a neural decoder ``decoder: z -> per-pixel outputs``."""

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "bernoulli") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        self.decoder = decoder
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        self.likelihood = likelihood
        self.pi_logits = nn.Parameter(torch.zeros(n_clusters))
        self.mu = nn.Parameter(torch.randn(n_clusters, latent_dim))
        self.log_sigma = nn.Parameter(torch.zeros(n_clusters, latent_dim))
        if likelihood == "gaussian":
            self.x_log_scale = nn.Parameter(torch.zeros(math.prod(self.image_shape)))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) as a distribution over flattened images (event dim 1)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # Grey levels in [0, 1] are scored with the Bernoulli cross-entropy, as in the paper.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.x_log_scale.exp()).to_event(1)

    def forward(self, x: torch.Tensor) -> None:
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.pi_logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mu[c], self.sigma[c]).to_event(1))
            pyro.sample("x", self.observation(z), obs=x)

    # Helpers used outside inference (prediction, generation, initialisation).
    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c | z), shape (N, K): the exact posterior of the enumerated site."""
        log_joint = torch.log_softmax(self.pi_logits, -1) + dist.Normal(
            self.mu, self.sigma).log_prob(z.unsqueeze(-2)).sum(-1)
        return torch.log_softmax(log_joint, -1)

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

    @torch.no_grad()
    def set_mixture(self, pi: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
        """Initialise the prior from a fitted diagonal Gaussian mixture."""
        self.pi_logits.copy_(pi.clamp_min(1e-6).log())
        self.mu.copy_(mu)
        self.log_sigma.copy_(0.5 * var.log())
