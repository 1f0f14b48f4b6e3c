r"""iso-mix: a mixture of isotropic Gaussians of one fixed scale in latent space.

For each image n (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                    # enumerated in the model, never sampled
    z_n | c_n ~ Normal(mu[c_n], s^2 I)       # s: the setting prior_scale, not learned
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))

The guide is q(z | x) = N(m(x), diag v(x)); c needs no guide site because the model sums it
out. The recipe is VaDE's: pretrain an autoencoder, set pi and mu from a clustering of the
embeddings, then SVI on the ELBO.
"""

from __future__ import annotations

import dataclasses

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ppl_cluster import nets
from ppl_cluster.init import autoencoder_loss, gmm_initialize
from ppl_cluster.settings import setting
from ppl_cluster.variant import Variant


class IsoMixModel(PyroModule):
    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], scale: float) -> None:
        super().__init__()
        self.decoder, self.n_clusters, self.image_shape = decoder, n_clusters, tuple(image_shape)
        self.scale = scale
        self.pi_logits = nn.Parameter(torch.zeros(n_clusters))
        self.mu = nn.Parameter(torch.randn(n_clusters, latent_dim))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.pi_logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mu[c], self.scale).to_event(1))
            pyro.sample("x", self.observation(z), obs=x.flatten(1))

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z); the autoencoder pretraining uses it too."""
        return dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1)

    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c | z) by Bayes' rule under the prior."""
        sq = ((z[:, None] - self.mu) ** 2).sum(-1)
        return (self.pi_logits.log_softmax(-1) - 0.5 * sq / self.scale**2).log_softmax(-1)

    def generate(self, n: int, cluster: int | None = None) -> torch.Tensor:
        c = (dist.Categorical(logits=self.pi_logits).sample((n,)) if cluster is None
             else torch.full((n,), cluster, dtype=torch.long))
        z = dist.Normal(self.mu[c], self.scale).sample()
        return torch.sigmoid(self.decoder(z)).reshape(n, *self.image_shape)

    @torch.no_grad()
    def set_mixture(self, pi: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
        """What the mixture initialisation calls; the fixed scale ignores ``var``."""
        self.pi_logits.copy_(pi.log())
        self.mu.copy_(mu)


class IsoMixGuide(PyroModule):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder  # x -> (loc, scale)

    def forward(self, x: torch.Tensor) -> None:
        loc, scale = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.mean(x)


@dataclasses.dataclass
class IsoMixSettings:
    prior_scale: float = setting(1.0, "the standard deviation s of every component", above=0)


class IsoMix(Variant):
    name = "iso-mix"
    summary = "mixture of fixed-scale isotropic Gaussians (examples/iso-mix)"
    Settings = IsoMixSettings
    uses = ("pretrain", "init")  # reads pretrain_epochs, ..., init, gmm_inits, ...
    defaults = dict(arch="mlp", hidden=[256, 256], latent_dim=10, epochs=30, batch_size=128,
                    lr=1e-3, pretrain_epochs=20, pretrain_lr=1e-3, init="gmm", gmm_inits=3)
    pretrain_loss = staticmethod(autoencoder_loss)
    initialize = staticmethod(gmm_initialize)

    def build(self, cfg, image_shape):
        s = self.settings(cfg)
        encoder = nets.encoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape)
        decoder = nets.decoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape)
        model = IsoMixModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape, s.prior_scale)
        return model, IsoMixGuide(encoder)

    def cluster_logits(self, model, guide, x):
        return model.cluster_logits(guide.embed(x))
