"""What the mixture-prior stories share: a decoder likelihood p(x | z) and the mixture's
parameters. Each story keeps its own ``forward`` (the generative equations)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")


class MixtureLatentModel(PyroModule):
    """Holds the decoder ``f`` of p(x | z) and the prior's ``pi_logits``, ``mu``, ``log_sigma``.

    ``pi = softmax(pi_logits)`` lies on the simplex and ``sigma = exp(log_sigma) > 0``.
    """

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

    @torch.no_grad()
    def set_mixture(self, pi: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
        """Set the prior to a fitted diagonal Gaussian mixture (weights, means, variances)."""
        self.pi_logits.copy_(pi.clamp_min(1e-6).log())
        self.mu.copy_(mu)
        self.log_sigma.copy_(0.5 * var.log())

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) as a distribution over flattened images (event dim 1)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # Grey levels in [0, 1] are scored with the Bernoulli cross-entropy, as in VaDE.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.x_log_scale.exp()).to_event(1)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] reshaped to images."""
        out = self.decoder(z)
        out = torch.sigmoid(out) if self.likelihood == "bernoulli" else out
        return out.reshape(*z.shape[:-1], *self.image_shape)

    def clusters_for(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """``n`` cluster indices: drawn from pi, or all equal to ``cluster``."""
        if cluster is None:
            return dist.Categorical(logits=self.pi_logits).sample((n,))
        return torch.full((n,), int(cluster), dtype=torch.long, device=self.mu.device)
