r"""Variational Clustering (Prasad, Das & Bhowmick, 2020), the generative story.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      # cluster
    z_n | c_n ~ Normal(mu[c_n], sigma[c_n])     # learned diagonal Gaussian prior per cluster
             or MultivariateNormal(mu[c_n], L[c_n] L[c_n]^T)   # covariance="full"
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))      # pixels in [0, 1]; or Normal(f(z_n), s)

With ``pose="affine"`` each image also has its own pose, an affine map the decoder's canvas
is drawn through (a spatial-transformer decoder, Jaderberg et al. 2015; transformation-
invariant clustering, Frey & Jojic 2003, Monnier et al. 2020)::

    a_n ~ Normal(0, I_6)                         # pose: A(a) = [I | 0] + 0.2 reshape(a, 2x3)
    x_n | z_n, a_n ~ Bernoulli(sigmoid(warp(f(z_n), A(a_n))))

so slant, size and position need not be spent in z, whose mixture is left with the shape.

that is :math:`p(x, z, c) = \pi_c \, N(z; \mu_c, \Sigma_c) \, p_f(x \mid z)`,
with ``pi`` (softmax of free logits), ``mu``, :math:`\Sigma_c = \mathrm{diag}\,\sigma_c^2`
(``sigma = exp(log_sigma)``) or, with ``covariance="full"``, :math:`L_c L_c^\top` (``L`` =
diag(sigma) + a free strictly lower triangle ``tril``), and the decoder ``f`` all learned from
scratch, end to end.

Unlike VaDE, the cluster is *not* enumerated here: the guide
(:mod:`ppl_cluster.guides.vc`) owns a real posterior factor :math:`q(c \mid x)` and either
enumerates it exactly or samples it with a straight-through Gumbel-softmax. In the first case
the site's value is an integer index (possibly an enumeration tensor of shape ``(K, 1)``); in
the second it is a one-hot vector of shape ``(N, K)``. :func:`select` serves both.
"""

from __future__ import annotations

import dataclasses

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from .. import nets
from ..data import chunks
from ..errors import ConfigError
from ..init import autoencoder_loss
from ..settings import setting
from ..variant import Variant
from .common import (
    MixtureLatentModel,
    MixtureSettings,
    SplitSettings,
    gaussian_components,
    scale_tril,
    split_due,
    split_emptied,
)

DISCRETE = ("enumerate", "relaxed")
POSES = ("none", "affine")
POSE_DIM = 6  # the free entries of a 2x3 affine map
# a ~ N(0, I) moves the affine map by POSE_SCALE a from the identity: one prior sd is about 11
# degrees of rotation or shear, a 20% zoom, or a shift of a tenth of the image.
POSE_SCALE = 0.2


def affine(a: torch.Tensor) -> torch.Tensor:
    """The 2x3 maps (..., 2, 3) of poses ``a`` (..., 6): the identity plus ``POSE_SCALE a``."""
    eye = torch.eye(2, 3, dtype=a.dtype, device=a.device)
    return eye + POSE_SCALE * a.unflatten(-1, (2, 3))


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse maps of ``theta`` (..., 2, 3): p -> A^-1 (p - b)."""
    inv = torch.linalg.inv(theta[..., :2])
    return torch.cat([inv, -inv @ theta[..., 2:]], -1)


def warp(images: torch.Tensor, theta: torch.Tensor, image_shape: tuple[int, ...],
         padding: str = "zeros") -> torch.Tensor:
    """Images (..., N, C*H*W) resampled at ``theta`` p (grid_sample), one map ``theta`` (N, 2, 3)
    per image shared by its leading dims (e.g. K enumerated clusters)."""
    c, h, w = image_shape
    n = theta.shape[0]
    # The leading dims ride along as channels: one sampling grid per image, not per cluster.
    stacked = images.reshape(-1, n, c, h, w).transpose(0, 1).reshape(n, -1, h, w)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(stacked, grid, align_corners=False, padding_mode=padding)
    return out.reshape(n, -1, c * h * w).transpose(0, 1).reshape(images.shape)


def one_hot(c: torch.Tensor, k: int) -> torch.Tensor:
    """The one-hot form of a cluster value: integer indices or (relaxed) one-hot vectors."""
    return c if c.is_floating_point() else F.one_hot(c, k).float()


def select(table: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row ``c`` of a ``(K, D)`` table, for index or one-hot ``c`` (gradients flow through a
    straight-through one-hot)."""
    return one_hot(c, table.shape[-2]) @ table


class VCModel(MixtureLatentModel):
    """p(c) p(z|c) p(x|z) with a neural decoder ``decoder: z -> per-pixel outputs``."""

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "bernoulli",
                 discrete: str = "enumerate", covariance: str = "diag", pose: str = "none") -> None:
        # Spread-out random prior means (N(0, I)) break the symmetry between clusters when the
        # run starts from scratch; the default warm start replaces them (VariationalClustering).
        super().__init__(decoder, n_clusters, latent_dim, image_shape, likelihood, covariance)
        if discrete not in DISCRETE:
            raise ValueError(f"discrete must be one of {DISCRETE}")
        if pose not in POSES:
            raise ValueError(f"pose must be one of {POSES}")
        self.discrete = discrete
        self.pose = pose

    def component(self, c: torch.Tensor | None = None) -> dist.Distribution:
        """p(z | c) for index or (straight-through) one-hot ``c`` (None: all K)."""
        tril = getattr(self, "tril", None)
        if c is None or not c.is_floating_point():
            return gaussian_components(self.mu, self.sigma, tril, c)
        if tril is None:
            return dist.Normal(select(self.mu, c), select(self.sigma, c)).to_event(1)
        lower = torch.einsum("...k,kij->...ij", c, scale_tril(self.sigma, tril))
        return dist.MultivariateNormal(select(self.mu, c), scale_tril=lower)

    def prior_c(self) -> dist.Distribution:
        """p(c): over indices when the guide enumerates c, over one-hot vectors when relaxed."""
        if self.discrete == "relaxed":
            return dist.OneHotCategorical(logits=self.pi_logits)
        return dist.Categorical(logits=self.pi_logits)

    def prior_pose(self, n: int) -> dist.Distribution:
        """p(a) = N(0, I) over the 6 affine parameters of each of ``n`` images."""
        return dist.Normal(self.mu.new_zeros(n, POSE_DIM), 1.0).to_event(1)

    def observation(self, z: torch.Tensor, pose: torch.Tensor | None = None) -> dist.Distribution:
        """p(x | z[, a]): with a pose, the decoder's logits are drawn through the affine map
        (border padding: the logits' own background continues past the frame)."""
        if pose is None:
            return super().observation(z)
        assert self.likelihood == "bernoulli", "pose needs the Bernoulli likelihood"
        return self.likelihood_of(warp(self.decoder(z), affine(pose), self.image_shape,
                                       padding="border"))

    def forward(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        with pyro.plate("data", n, dim=-1):
            c = pyro.sample("c", self.prior_c())
            a = pyro.sample("pose", self.prior_pose(n)) if self.pose == "affine" else None
            z = pyro.sample("z", self.component(c))
            pyro.sample("x", self.observation(z, a), obs=x.flatten(1))

    def generate(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """Draw ``n`` images (likelihood means) from the prior, optionally from one cluster."""
        c = self.clusters_for(n, cluster)
        z = self.component(c).sample()
        if self.pose == "none":
            return self.decode_mean(z)
        logits = self.observation(z, self.prior_pose(n).sample()).base_dist.logits
        return self.mean_of(logits).reshape(n, *self.image_shape)


# --- the recipe ---------------------------------------------------------------------------

@dataclasses.dataclass
class VCSettings(MixtureSettings, SplitSettings):
    discrete: str = setting("enumerate", "how the guide treats c: exact enumeration or a "
                            "straight-through Gumbel-softmax", choices=DISCRETE)
    temperature: float = setting(1.0, "relaxed c: starting Gumbel-softmax temperature", above=0)
    temperature_min: float = setting(0.5, "relaxed c: lowest temperature", above=0)
    anneal_rate: float = setting(0.05, "relaxed c: tau = max(tau_min, tau_0 exp(-rate epoch))",
                                 minimum=0)
    pose: str = setting("none", "affine: each image's own affine pose a ~ N(0, I) through which "
                        "the decoder draws it", choices=POSES)


def reseed_dead_clusters(model: VCModel, guide: PyroModule, x: torch.Tensor,
                         threshold: float = 0.3, batch_size: int = 2048) -> list[tuple[int, int]]:
    """Split the most used cluster into every cluster whose share of q(c|x) over ``x`` fell
    below ``threshold / K`` (:func:`~ppl_cluster.models.common.split_emptied`, on the
    per-cluster posterior means E[z | x, c]; the guide's heads split with the prior); returns
    the (emptied, split) pairs. Trained from scratch, a mixture prior loses clusters early on."""
    stats = [guide.heads(xb) for xb in chunks(x, batch_size)]
    q = torch.cat([s[0] for s in stats]).softmax(-1)
    loc = torch.cat([s[1] for s in stats])  # E[z | x, c], (N, K, D)
    return split_emptied(model, q, loc, threshold, guide.split_cluster)


class VariationalClustering(Variant):
    """By default VaDE's warm start, then SVI with split moves for emptied clusters; with
    ``pretrain_epochs=0`` the paper's recipe, from scratch (random prior means)."""

    name = "vc"
    summary = ("Variational Clustering (Prasad et al. 2020): q(c|x) q(z|x,c), c enumerated in "
               "the guide (or relaxed), trained from scratch")
    Settings = VCSettings
    uses = ("pretrain", "init")
    byte_storage = True  # its hooks read uint8 data through data.unit
    epoch_settings = ("split_every", "split_until")
    # Runs saved before the warm start trained from scratch; the other values are never read
    # without pretraining, fixed so that such a run compares equal to itself.
    absent = dict(pretrain_epochs=0, pretrain_lr=1e-3, pretrain_augment=False, init="tsne",
                  init_neighbors=30, gmm_inits=10, gmm_covariance="full")
    # The warm start is VaDE's (an autoencoder on cluster 0's z head, a mixture fitted on a
    # t-SNE map of its codes, q(c | x) fitted to that mixture's assignments): from scratch the
    # generic recipe stayed below k-means on every small member of the suite (docs/suite.md).
    defaults = dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, pretrain_epochs=50,
                    pretrain_lr=1e-3, pretrain_augment=True, init="tsne", init_neighbors=30,
                    gmm_covariance="full", gmm_inits=10, epochs=50, batch_size=256, lr=1e-3,
                    lr_decay=0.9, lr_step=5)
    presets = {
        # Measured on the 10,000-digit subset (docs/vc.md): from scratch a 32-D latent
        # separates digits better than 10-D, and 512-512 nets keep the K decoder passes per
        # image affordable on CPU. Full-covariance components and 120 epochs: a higher ELBO
        # within 20 minutes. An affine pose per image: slant, size and position no longer
        # decide the clusters.
        "mnist": dict(hidden=[512, 512], latent_dim=32, epochs=120, prior_covariance="full",
                      pose="affine", pretrain_epochs=0, lr_step=10),
    }

    def validate(self, cfg, s):
        if s.pose != "none" and cfg.likelihood != "bernoulli":
            raise ConfigError("pose affine needs the bernoulli likelihood", setting="pose")

    def check_data(self, cfg, s, shape):
        if s.pose != "none" and min(shape[1:]) < 4:
            raise ConfigError(f"pose affine poses images; these data are not images (shape "
                              f"{tuple(shape)}): set pose none", setting="pose")

    def build(self, cfg, image_shape):
        from ..guides.vc import VCGuide

        s = self.settings(cfg)
        self.check_data(cfg, s, image_shape)
        trunk, width = nets.trunk(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape)
        model = VCModel(nets.decoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape),
                        cfg.n_clusters, cfg.latent_dim, image_shape, cfg.likelihood, s.discrete,
                        s.prior_covariance, s.pose)
        guide = VCGuide(trunk, width, cfg.n_clusters, cfg.latent_dim, s.discrete,
                        s.temperature, s.temperature_min, s.anneal_rate, pose=s.pose,
                        image_shape=image_shape)
        # The split schedule (plain attributes, not state).
        guide.split_every, guide.split_until = s.split_every, s.split_until
        return model, guide

    def cluster_logits(self, model, guide, x):
        return guide.cluster_logits(x)

    def pretrain_loss(self, model, guide, x):
        """Deterministic autoencoder loss through cluster 0's z head: -log p(x | z = m_0(x))."""
        return autoencoder_loss(model, guide, x, method="ae_embed")

    def initialize(self, model, guide, x, cfg, seed):
        """After pretraining: the mixture fitted on the codes (``init``, as VaDE's), every
        cluster's z heads set to the pretrained one, q(c | x) fitted to the mixture's
        assignments, so that SVI starts where the three agree. Without pretraining
        (``pretrain_epochs=0``) nothing: the paper's start from scratch."""
        from ..init import embed_all, fit_mixture

        if not cfg.pretrain_epochs:
            return {}
        emb = embed_all(guide, x, method="ae_embed").double().cpu().numpy()
        resp, log_lik = fit_mixture(model, emb, cfg, seed)
        guide.tie_heads()
        cross_entropy = guide.fit_cluster_head(x, torch.as_tensor(resp, dtype=torch.float32,
                                                                  device=x.device))
        return {"init_log_likelihood": log_lik, "init_head_cross_entropy": cross_entropy}

    def on_epoch(self, model, guide, epoch, n_epochs):
        guide.set_epoch(epoch)  # the relaxed cluster's temperature

    def maintain(self, model, guide, x, epoch, n_epochs):
        if not split_due(guide.split_every, guide.split_until, epoch):
            return None
        pairs = reseed_dead_clusters(model, guide, x)
        return {"split": [list(p) for p in pairs]} if pairs else None
