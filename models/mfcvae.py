r"""MFCVAE: Multi-Facet Clustering Variational Autoencoder (Falck et al., 2021), the story.

J facets, each a mixture of Gaussians over its own latent. For each image :math:`n = 1..N`
(``pyro.plate("data")``) and each facet :math:`j = 1..J`::

    c_{n,j} ~ Categorical(pi_j)                                # facet j's cluster, K_j values
    z_{n,j} | c_{n,j} ~ Normal(mu_j[c_{n,j}], sigma_j[c_{n,j}])  # diagonal, D_j dims
                   or MultivariateNormal(mu_j[c], L_j[c] L_j[c]^T)  # covariance "full"
    x_n | z_{n,1..J} ~ Bernoulli(sigmoid(g(alpha_1 z_{n,1}, ..., alpha_J z_{n,J})))
                                                               # or Normal(g(...), s)

that is

.. math::

    p(x, z, c) = p_g(x \mid z_1, \dots, z_J) \prod_{j=1}^{J} \pi_{j, c_j}\,
                 N(z_j; \mu_{j, c_j}, \Sigma_{j, c_j}),

with every :math:`\pi_j` on the simplex (softmax of free logits), :math:`\Sigma_{j,k}` diagonal
(:math:`\mathrm{diag}\,\sigma_{j,k}^2`, :math:`\sigma_j > 0` the exp of free log-scales) or,
for a facet with full covariance, :math:`L L^\top` with the Cholesky factor :math:`L =
\mathrm{diag}(\sigma_{j,k})` plus a free strictly lower triangle, and the ladder decoder
:math:`g` learned. :math:`g` is VLAE-style: the deepest latent :math:`z_J` starts it and each
shallower :math:`z_j` joins at the mirrored depth (:mod:`ppl_cluster.nets`). :math:`\alpha_j \in [0, 1]` are constants of the decoder (not learned,
not latent): progressive training raises them from 0 to 1 facet by facet (:func:`progressive_alpha`);
they are 1 in the finished model. For any fixed :math:`\alpha` the model is a proper density, so
the ELBO stays a valid bound at every stage of the schedule.

Each :math:`c_j` is enumerated on its own (``infer={"enumerate": "parallel"}``). Only
:math:`z_j` depends on :math:`c_j` and :math:`x` depends on no :math:`c`, so ``TraceEnum_ELBO``
sums each facet out separately:

.. math::

    \log p(x, z) = \log p_g(x \mid z) + \sum_j \log \sum_{k=1}^{K_j} \pi_{j,k}\,
                   N(z_j; \mu_{j,k}, \sigma_{j,k}),

at a cost of :math:`\sum_j K_j` (never :math:`\prod_j K_j`) component densities per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .. import nets
from ..config import FitConfig
from ..errors import ConfigError
from ..settings import declared, setting
from ..variant import Variant
from .common import (
    COVARIANCES,
    LocalPyroModule,
    MixturePrior,
    PixelLikelihood,
    SplitSettings,
    split_due,
    split_emptied,
)

__all__ = ["MFCVAE", "FacetMixture", "MFCVAEModel", "progressive_alpha"]


def progressive_alpha(position: int, n_facets: int, step_epochs: int, fade_epochs: int,
                      enabled: bool = True) -> list[float]:
    """Decoder fade-in coefficients alpha_1..alpha_J at training position ``position`` (epochs
    done, pretraining included), as in VLAE progressive learning.

    The deepest facet J is on from the start; facet j < J starts fading in at
    ``(J - j) * step_epochs`` and rises linearly to 1 over ``fade_epochs`` epochs
    (alpha = 1/F, 2/F, ..., 1 in its first F epochs; F = 0 switches it on at once). A pure function of its arguments, so a
    resumed run sees exactly the values the uninterrupted run saw. ``enabled=False``: all 1.
    """
    if not enabled:
        return [1.0] * n_facets
    alphas = []
    for j in range(1, n_facets + 1):
        start = (n_facets - j) * step_epochs
        if j == n_facets or fade_epochs < 1:
            alphas.append(1.0 if position >= start else 0.0)
        else:
            alphas.append(min(1.0, max(0.0, (position - start + 1) / fade_epochs)))
    return alphas


class FacetMixture(MixturePrior, nn.Module):
    """One facet's prior p(c_j) p(z_j | c_j): the shared :class:`MixturePrior` block."""

    def __init__(self, n_clusters: int, latent_dim: int, covariance: str = "diag") -> None:
        super().__init__()
        self.init_mixture(n_clusters, latent_dim, covariance)


class MFCVAEModel(PixelLikelihood, LocalPyroModule):
    """p(c_1..c_J) p(z_1..z_J | c) p(x | z) with a ladder decoder ``decoder: [z_1..z_J] -> pixels``.

    Facets are numbered 1..J (sites ``c_1, z_1, ..., c_J, z_J``); facet 1 reads the shallowest
    encoder features. ``n_clusters`` is K of the default facet, facet 1.
    """

    def __init__(self, decoder: nn.Module, clusters_per_facet: Sequence[int],
                 latent_dims: Sequence[int], image_shape: tuple[int, ...],
                 likelihood: str = "bernoulli",
                 covariances: Sequence[str] | None = None) -> None:
        super().__init__()
        if len(clusters_per_facet) != len(latent_dims) or not clusters_per_facet:
            raise ValueError("one K and one latent size per facet")
        covariances = list(covariances or ["diag"] * len(latent_dims))
        self.decoder = decoder
        self.facets = nn.ModuleList(FacetMixture(k, d, cov) for k, d, cov
                                    in zip(clusters_per_facet, latent_dims, covariances, strict=True))
        self.n_facets = len(clusters_per_facet)
        self.clusters_per_facet = [int(k) for k in clusters_per_facet]
        self.latent_dims = [int(d) for d in latent_dims]
        self.n_clusters = self.clusters_per_facet[0]
        self.init_likelihood(likelihood, image_shape)

    # The default facet's mixture under VaDE's names, for generic code (diagnostics, plots).
    @property
    def pi_logits(self) -> torch.Tensor:
        return self.facets[0].pi_logits

    @property
    def mu(self) -> torch.Tensor:
        return self.facets[0].mu

    @property
    def sigma(self) -> torch.Tensor:
        return self.facets[0].sigma

    def facet(self, j: int) -> FacetMixture:
        """Facet ``j`` (1-based)."""
        return self.facets[j - 1]  # type: ignore[return-value]

    def set_alpha(self, alpha: Sequence[float]) -> None:
        """Set the decoder's fade-in constants (a buffer, saved with the model)."""
        self.decoder.alpha.copy_(torch.as_tensor(alpha, dtype=self.decoder.alpha.dtype))

    def observation(self, zs: Sequence[torch.Tensor]) -> dist.Distribution:
        """p(x | z_1..z_J) over flattened images (event dim 1)."""
        return self.likelihood_of(self.decoder(zs))

    def forward(self, x: torch.Tensor) -> None:
        x = x.flatten(1)
        zs = []
        with pyro.plate("data", x.shape[0]):
            for j, facet in enumerate(self.facets, 1):
                c = pyro.sample(f"c_{j}", dist.Categorical(logits=facet.pi_logits),
                                infer={"enumerate": "parallel"})
                zs.append(pyro.sample(f"z_{j}", facet.component(c)))
            pyro.sample("x", self.observation(zs), obs=x)

    # Helpers used outside inference (prediction, generation, initialisation).
    def cluster_logits(self, z: torch.Tensor, facet: int = 1) -> torch.Tensor:
        """log p(c_j | z_j) of facet ``facet``, shape (N, K_j)."""
        return self.facet(facet).cluster_logits(z)

    def decode_mean(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """E[x | z_1..z_J] reshaped to images."""
        return self.mean_of(self.decoder(zs)).reshape(*zs[0].shape[:-1], *self.image_shape)

    def sample_latents(self, n: int, clusters: dict[int, int] | None = None) -> list[torch.Tensor]:
        """``n`` draws of z_1..z_J from the prior, facet j from cluster ``clusters[j]`` if given."""
        clusters = clusters or {}
        return [f.sample(n, clusters.get(j)) for j, f in enumerate(self.facets, 1)]

    def generate(self, n: int, cluster: int | None = None, facet: int = 1) -> torch.Tensor:
        """Draw ``n`` images (likelihood means) from the prior, optionally with facet ``facet``
        in one cluster (the other facets drawn from their mixtures)."""
        clusters = {} if cluster is None else {facet: cluster}
        return self.decode_mean(self.sample_latents(n, clusters))


# --- the recipe ---------------------------------------------------------------------------

_INITS = declared(FitConfig)["init"].metadata["choices"]


@dataclasses.dataclass
class MFCVAESettings(SplitSettings):
    facets: int = setting(2, "number of facets J (clusterings)", minimum=1)
    clusters_per_facet: list[int] | None = setting(
        None, "K of each facet, facet 1 (the default facet) first, e.g. 10,8 (default: "
        "n_clusters for every facet; sets n_clusters to the first)", minimum=2)
    latent_dims: list[int] | None = setting(None, "latent size of each facet (default: "
                                            "latent_dim shared out over the facets, the "
                                            "shallower first, at least 2 each)", minimum=1)
    progressive: bool = setting(True, "progressive training: the deepest facet first, the "
                                "others faded in one at a time")
    progressive_epochs: int = setting(5, "epochs (pretraining first, then SVI) before the next "
                                      "shallower facet starts fading in", minimum=0)
    fade_in_epochs: int = setting(3, "epochs over which a facet's decoder input rises from 0 "
                                  "to 1", minimum=0)
    facet_init: list[str] | None = setting(None, "each facet's mixture initialisation, e.g. "
                                           "tsne,gmm (default: init for every facet)",
                                           choices=_INITS)
    facet_covariance: list[str] | None = setting(None, "each facet's component covariance, e.g. "
                                                 "diag,full (default diag)", choices=COVARIANCES)


def shared_latent(total: int, facets: int) -> list[int]:
    """``total`` latent dimensions shared out over ``facets``, the shallower facets first
    where they do not divide evenly, at least 2 each: one budget, so that no facet can encode
    the whole image and leave the others nothing (a facet's latent dies; docs/mfcvae.md)."""
    base, extra = divmod(total, facets)
    return [max(2, base + (j < extra)) for j in range(facets)]


class MFCVAE(Variant):
    """A ladder-autoencoder warm-up with the progressive schedule, then each facet's mixture
    initialised from its own embeddings (VaDE's recipe per facet), then SVI."""

    name = "mfcvae"
    summary = ("MFCVAE (Falck et al. 2021): J facets, each a mixture prior with its own c_j "
               "enumerated in the model; ladder encoder/decoder, progressive training")
    Settings = MFCVAESettings
    uses = ("pretrain", "init")
    byte_storage = True  # its hooks read uint8 data through data.unit
    pretrain_epoch_settings = ("progressive_epochs", "fade_in_epochs")
    epoch_settings = ("split_every", "split_until")
    absent = dict(split_every=0)  # runs saved before the split move
    # Measured on colored MNIST (docs/mfcvae.md): from scratch (the paper's recipe,
    # pretrain_epochs 0) the mixtures collapse, and so did the paper code's progressive ELBO
    # warm-up (facet 1 collapses while it is switched off).
    defaults = dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, epochs=40,
                    pretrain_epochs=50, pretrain_lr=2e-3, pretrain_augment=True, init="tsne",
                    gmm_covariance="full", gmm_inits=3, batch_size=256, lr=1e-3, lr_decay=0.97,
                    lr_step=1, split_until=20)
    presets = {
        # Facet 2, the deepest, is trained first and alone: with a 3-dim latent it takes the
        # most salient factor (colour) and the digit goes to facet 1. t-SNE for both facets and
        # full-covariance components: each facet's classes lie on curved sheets (colour x
        # ink; digit x style) that a mixture fitted there, or diagonal components, cut across
        # (docs/mfcvae.md).
        # Measured before the split move existed: kept without it.
        "colored-mnist": dict(clusters_per_facet=[10, 8], latent_dims=[10, 3],
                              pretrain_epochs=120, facet_covariance=["full", "full"],
                              split_every=0),
    }

    def implied(self, own: dict) -> dict:
        """Common settings that the user's own settings imply: K of the default facet."""
        ks = own.get("clusters_per_facet")
        return {"n_clusters": ks[0]} if ks else {}

    def resolve(self, cfg, data=None, x=None):
        """As :meth:`Variant.resolve`; unset ``latent_dims`` become ``latent_dim`` shared out
        over the facets (:func:`shared_latent`), recorded in the run's settings. A run saved
        before this rule has ``latent_dims`` None, read as ``latent_dim`` each."""
        cfg = super().resolve(cfg, data, x)
        if cfg.extra["latent_dims"] is None:
            cfg.extra["latent_dims"] = shared_latent(cfg.latent_dim, cfg.extra["facets"])
        return cfg

    def facet_lists(self, cfg) -> tuple[list[int], list[int], list[str], list[str]]:
        """K_j, D_j, covariance and initialisation of every facet, defaults filled in."""
        s = self.settings(cfg)
        n = s.facets
        return (s.clusters_per_facet or [cfg.n_clusters] * n, s.latent_dims or [cfg.latent_dim] * n,
                s.facet_covariance or ["diag"] * n, s.facet_init or [cfg.init] * n)

    def validate(self, cfg, s):
        n = s.facets
        for name in ("clusters_per_facet", "latent_dims", "facet_covariance", "facet_init"):
            values = getattr(s, name)
            if values is not None and len(values) != n:
                raise ConfigError(f"{name} gives {len(values)} values for {n} facets (set "
                                  f"facets {len(values)} or give {n} values)", setting=name)
        if s.clusters_per_facet and s.clusters_per_facet[0] != cfg.n_clusters:
            raise ConfigError(f"n_clusters ({cfg.n_clusters}) must equal the default facet's K, "
                              f"the first of clusters_per_facet "
                              f"({','.join(map(str, s.clusters_per_facet))})",
                              setting="n_clusters")

    def build(self, cfg, image_shape):
        from ..guides.mfcvae import MFCVAEGuide

        s = self.settings(cfg)
        ks, ds, covs, _ = self.facet_lists(cfg)
        ladder = nets.conv_ladder if cfg.arch == "conv" else nets.mlp_ladder
        encoder, decoder = ladder(image_shape, cfg.hidden, ds)
        model = MFCVAEModel(decoder, ks, ds, image_shape, cfg.likelihood, covs)
        # The progressive schedule's settings travel with the model (plain attributes, not
        # state); positions count pretraining epochs first, then SVI epochs.
        model.schedule = dict(step_epochs=s.progressive_epochs, fade_epochs=s.fade_in_epochs,
                              enabled=s.progressive)
        model.schedule_offset = cfg.pretrain_epochs or 0
        model.split_every, model.split_until = s.split_every, s.split_until
        return model, MFCVAEGuide(encoder)

    def on_pretrain_epoch(self, model, guide, epoch, n):
        model.set_alpha(progressive_alpha(epoch, model.n_facets, **model.schedule))

    def on_epoch(self, model, guide, epoch, n):
        model.set_alpha(progressive_alpha(model.schedule_offset + epoch, model.n_facets,
                                          **model.schedule))

    def maintain(self, model, guide, x, epoch, n_epochs):
        """Every ``split_every`` SVI epochs up to ``split_until``: in each facet, split the most
        used cluster into every cluster that lost its share of the points
        (:func:`~ppl_cluster.models.common.split_emptied` on E_q[z_j | x]), the recovery of a
        facet that gradient steps have emptied."""
        if not split_due(model.split_every, model.split_until, epoch):
            return None
        split = {}
        for j, (facet, z) in enumerate(zip(model.facets, guide.facet_embeddings(x), strict=True), 1):
            pairs = split_emptied(facet, facet.cluster_logits(z).exp(), z)
            if pairs:
                split[str(j)] = [list(p) for p in pairs]
        return {"split": split} if split else None

    def facet_logits(self, model, guide, x, facet):
        """log p(c_j | z_j = E_q[z_j | x]) (the paper's and VaDE's q(c_j | x))."""
        return model.cluster_logits(guide.facet_means(x)[facet - 1], facet)

    def cluster_logits(self, model, guide, x):
        return model.cluster_logits(guide.facet_means(x)[0], 1)

    def pretrain_loss(self, model, guide, x):
        """Warm-up before the mixtures are initialised: a deterministic ladder autoencoder,
        -log p(x | z = E_q[z]) summed over the batch (the decoder's fade-in alphas applied)."""
        return -model.observation(guide.facet_means(x)).log_prob(x.flatten(1)).sum()

    @torch.no_grad()
    def initialize(self, model, guide, x, cfg, seed):
        """Each facet's mixture from a clustering of its own embeddings E_q[z_j | x] (VaDE's
        recipe, facet by facet). Without pretraining (the paper's from-scratch recipe) the
        embeddings are untrained, so the mixtures keep their random initialisation."""
        from ..init import fit_mixture

        if not cfg.pretrain_epochs:
            return {}
        inits = self.facet_lists(cfg)[3]
        info = {}
        for j, (facet, z) in enumerate(zip(model.facets, guide.facet_embeddings(x), strict=True), 1):
            emb = z.double().cpu().numpy()
            _, log_lik = fit_mixture(facet, emb, dataclasses.replace(cfg, init=inits[j - 1]), seed)
            info[f"init_log_likelihood_{j}"] = log_lik
        return info
