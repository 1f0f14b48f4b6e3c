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

import pyro
import pyro.distributions as dist
import torch

from .common import LIKELIHOODS, MixtureLatentModel

__all__ = ["LIKELIHOODS", "VaDEModel"]


class VaDEModel(MixtureLatentModel):
    """p(c) p(z|c) p(x|z) with a neural decoder ``decoder: z -> per-pixel outputs``."""

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

    def generate(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """Draw ``n`` images (likelihood means) from the prior, optionally from one cluster."""
        c = self.clusters_for(n, cluster)
        return self.decode_mean(dist.Normal(self.mu[c], self.sigma[c]).sample())
