r"""Clustered Generator Model (Zhu, Han, Zhou, Yang & Wu 2019), the generative story.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      # cluster, enumerated in parallel, never sampled
    z_n | c_n ~ Normal(mu[c_n], sigma[c_n])     # diagonal Gaussian per cluster, D dims
             or MultivariateNormal(mu[c_n], L[c_n] L[c_n]^T)   # covariance="full"
    x_n | z_n ~ Normal(g(z_n), s^2 I)           # the generator g, a fixed noise scale s
             or Bernoulli(sigmoid(g(z_n)))      # for binary-ish images (pixels in [0, 1])

``pi`` (softmax of free logits), ``mu``, ``sigma = exp(log_sigma)`` (with ``covariance="full"``
the Cholesky factor ``L`` = diag(sigma) + a free strictly lower triangle) and ``g`` are learned; ``s``
is a setting (``obs_scale``), as in alternating back-propagation, where a learned ``s`` would
shrink onto the chains. There is no inference network: the posterior of ``z`` is sampled by
Langevin dynamics (:mod:`ppl_cluster.guides.cgm`) on the energy

.. math:: U(z) = -\log p(x, z) = -\log \sum_c \pi_c N(z; \mu_c, \sigma_c) - \log p(x \mid z),

with ``c`` summed out exactly: :func:`pyro_energy` asks Pyro for it (``c`` enumerated, ``z``
conditioned), and :meth:`CGMModel.energy` writes the same sum by hand for the inner loop.
The cluster of an image is :math:`p(c \mid z)` at its chain's state.

**Per-pixel clustering** (:class:`CGMPixelModel`, variant ``cgm-pixel``): the generator emits
``L`` appearance layers :math:`a_l(z)` and per-pixel label logits :math:`h(z)_p`, and every
pixel ``p`` (``pyro.plate("pixels")``, nested in ``"data"``) picks its layer::

    l_{n,p} | z_n ~ Categorical(softmax(h(z_n)_p))          # pixel label, enumerated
    x_{n,p} | z_n, l_{n,p} ~ Normal(a_{l_{n,p}}(z_n)_p, s^2)  # all channels of pixel p

so :math:`\log p(x \mid z) = \sum_p \log \sum_l \mathrm{softmax}(h_p)_l\, N(x_p; a_{l,p}, s^2)`,
and :math:`p(l_p \mid x, z)` is the segmentation of the image.
"""

from __future__ import annotations

import dataclasses
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex
from pyro.poutine import condition
from torch import nn

from .. import nets
from ..data import chunks, unit
from ..errors import ConfigError
from ..settings import setting
from ..variant import REFERENCE, Variant
from .common import (
    MixtureLatentModel,
    MixtureSettings,
    scale_tril,
)

APPEARANCES = ("constant", "full")
CHAIN_INITS = ("prior", "pca")
# Generator steps that fit g to the principal-component codes before the chains start there
# (chain_init="pca"): enough for g to decode them roughly, so that the first Langevin steps
# refine the codes instead of following a random generator away from them.
WARM_STEPS = 1000


class CGMModel(MixtureLatentModel):
    """p(c) p(z|c) p(x|z) with a generator ``decoder: z -> per-pixel outputs``."""

    max_plate_nesting = 1

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "gaussian",
                 obs_scale: float = 0.3, mu_init_scale: float = 0.3,
                 covariance: str = "diag") -> None:
        super().__init__(decoder, n_clusters, latent_dim, image_shape, likelihood, covariance)
        if not obs_scale > 0:
            raise ValueError(f"obs_scale must be > 0, got {obs_scale}")
        if likelihood == "gaussian":
            del self.x_log_scale  # s is fixed here, not learned
        self.obs_scale = float(obs_scale)
        # Chains start from the prior and Langevin rarely crosses between well-separated
        # components: overlapping components at first (means ~ N(0, 0.3^2)) let the chains
        # sort themselves while the generator takes shape (measured on MNIST, docs/cgm.md).
        with torch.no_grad():
            self.mu.mul_(mu_init_scale)

    def noise_scale(self) -> float:
        return self.obs_scale  # fixed, not learned

    @property
    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors L (K, D, D) of the components' covariances (diagonal: diag(sigma))."""
        return scale_tril(self.sigma, getattr(self, "tril", None))

    # The energy by hand (the Langevin inner loop; tested equal to Pyro's).
    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per image, shape (N,)."""
        return self.observation(z).log_prob(x.flatten(1))

    def energy(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """U(z) = -log p(x, z) per image, shape (N,), with c summed out."""
        return -(self.prior_joint(z).logsumexp(-1) + self.log_likelihood(x, z))

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of z from the mixture prior (no gradient), from ``generator`` if given."""
        with torch.no_grad():
            c = torch.multinomial(self.pi_logits.softmax(-1), n, replacement=True,
                                  generator=generator)
            eps = torch.randn(n, self.latent_dim, generator=generator, device=self.mu.device)
            return self.mu[c] + (self.scale_tril[c] @ eps.unsqueeze(-1)).squeeze(-1)


class CGMPixelModel(CGMModel):
    """CGM whose generator emits ``n_labels`` appearance layers and per-pixel label logits.

    ``decoder: z -> (L + L*C) maps of H x W`` (flattened): the first ``L`` are the label logits
    ``h(z)``, the rest the layers ``a_l(z)`` (means, or Bernoulli logits). With
    ``appearance="constant"`` each layer is its maps' spatial mean, one colour per layer and
    image: the layers cannot draw shapes, so the shape must go into the labels, which is what
    makes the labels a segmentation; ``"full"`` keeps the full maps.
    """

    max_plate_nesting = 2

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "gaussian",
                 obs_scale: float = 0.3, n_labels: int = 2, appearance: str = "constant",
                 mu_init_scale: float = 0.3, covariance: str = "diag") -> None:
        super().__init__(decoder, n_clusters, latent_dim, image_shape, likelihood, obs_scale,
                         mu_init_scale, covariance)
        if appearance not in APPEARANCES:
            raise ValueError(f"appearance must be one of {APPEARANCES}")
        if n_labels < 2:
            raise ValueError(f"n_labels must be >= 2, got {n_labels}")
        self.n_labels = n_labels
        self.appearance = appearance

    def layers(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label logits (..., L, P) and appearance layers (..., L, C, P or 1)."""
        c, h, w = self.image_shape
        lab = self.n_labels
        out = self.decoder(z).reshape(*z.shape[:-1], lab * (1 + c), h * w)
        app = out[..., lab:, :].reshape(*z.shape[:-1], lab, c, h * w)
        if self.appearance == "constant":
            app = app.mean(-1, keepdim=True)
        return out[..., :lab, :], app

    def pixel_log_probs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log softmax(h_p)_l + log p(x_p | a_{l,p}), shape (N, L, P)."""
        c, h, w = self.image_shape
        logits, app = self.layers(z)
        xp = x.reshape(x.shape[0], 1, c, h * w)
        if self.likelihood == "bernoulli":
            log_px = dist.Bernoulli(logits=app, validate_args=False).log_prob(xp).sum(-2)
        else:
            log_px = dist.Normal(app, self.obs_scale).log_prob(xp).sum(-2)
        return torch.log_softmax(logits, -2) + log_px

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.pixel_log_probs(x, z).logsumexp(-2).sum(-1)

    def label_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(l_p | x, z), shape (N, L, H, W): the segmentation (exact, l summed out)."""
        post = torch.log_softmax(self.pixel_log_probs(x, z), -2)
        return post.reshape(x.shape[0], self.n_labels, *self.image_shape[1:])

    def forward(self, x: torch.Tensor) -> None:
        c, h, w = self.image_shape
        n = x.shape[0]
        xp = x.reshape(n, c, h * w).permute(2, 0, 1)  # (P, N, C): pixels, images, channels
        with pyro.plate("data", n, dim=-1):
            k = pyro.sample("c", dist.Categorical(logits=self.pi_logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", self.component(k))
            logits, app = self.layers(z)
            app = app.expand(*app.shape[:-1], h * w).permute(3, 0, 1, 2)  # (P, N, L, C)
            with pyro.plate("pixels", h * w, dim=-2):
                lab = pyro.sample("l", dist.Categorical(logits=logits.permute(2, 0, 1)),
                                  infer={"enumerate": "parallel"})
                out = Vindex(app)[..., lab, :]  # layer l_p at pixel p: (..., P, N, C)
                pyro.sample("x", self.likelihood_of(out), obs=xp)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] = sum_l softmax(h_p)_l E[x_p | a_{l,p}], reshaped to images."""
        logits, app = self.layers(z)
        mean = (logits.softmax(-2).unsqueeze(-2) * self.mean_of(app)).sum(-3)  # (..., C, P)
        return mean.reshape(*z.shape[:-1], *self.image_shape)


def _no_guide(x: torch.Tensor) -> None:
    pass


def pyro_energy(model: CGMModel, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """U(z) = -log p(x, z) summed over the images, straight from the Pyro model: ``z``
    conditioned, ``c`` (and every pixel label) enumerated by ``TraceEnum_ELBO``."""
    elbo = TraceEnum_ELBO(max_plate_nesting=model.max_plate_nesting)
    return elbo.differentiable_loss(condition(model, data={"z": z}), _no_guide, x)



def fit_generator(model: CGMModel, x: torch.Tensor, z: torch.Tensor, batch_size: int,
                  lr: float, seed: int, steps: int = WARM_STEPS) -> float:
    """Fit the generator alone to decode the fixed codes ``z`` of images ``x``: ``steps``
    Adam steps on -log p(x | z) over seeded mini-batches (the global RNG untouched). Returns
    the last batch's loss per image."""
    params = list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, loss = x.shape[0], torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x.device)
        opt.zero_grad(set_to_none=True)
        loss = -model.log_likelihood(unit(x[idx]), z[idx]).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


# --- the recipes --------------------------------------------------------------------------

@dataclasses.dataclass
class CGMSettings(MixtureSettings):
    langevin_steps: int = setting(20, "Langevin steps on an image's chain each time its batch "
                                  "comes up", minimum=1)
    langevin_step_size: float = setting(1e-2, "Langevin step size eps (z -= eps grad U + "
                                        "noise sqrt(2 eps) xi)", above=0)
    langevin_noise: float = setting(1.0, "Langevin noise scale (1 samples the posterior, 0 "
                                    "finds a mode)", minimum=0)
    infer_steps: int = setting(200, "Langevin steps of a fresh chain for an image not seen in "
                               "training", minimum=1)
    obs_scale: float = setting(0.3, "the fixed noise scale s of the Gaussian likelihood", above=0)
    reinit_epoch: int = setting(50, "re-initialise the mixture from a clustering of the chains "
                                "before this epoch (0: never)", minimum=0)
    chain_init: str = setting("pca", "where the chains start: the paper's draws from the prior, "
                              "or the data's whitened principal components, with the mixture "
                              "fitted on them (init) and the generator fitted to decode them",
                              choices=CHAIN_INITS)


@dataclasses.dataclass
class CGMPixelSettings(CGMSettings):
    pixel_labels: int = setting(2, "number of pixel labels (appearance layers)", minimum=2)
    appearance: str = setting("constant", "one colour per layer and image, or full maps",
                              choices=APPEARANCES)


class CGM(Variant):
    """No encoder: persistent Langevin chains on z (E-step) alternate with generator and
    mixture updates (M-step). By default the chains start at each image's whitened principal
    components, with the mixture fitted there and the generator fitted to decode them
    (``chain_init="pca"``; ``"prior"`` is the paper's start); before epoch ``reinit_epoch``
    the mixture is re-fitted to a clustering of the chains (docs/cgm.md)."""

    name = "cgm"
    summary = ("Clustered Generator Model (Zhu et al. 2019): no encoder; persistent Langevin "
               "chains on z (E-step) alternate with generator/mixture updates (M-step), "
               "c enumerated")
    Settings: type = CGMSettings
    uses = ("init",)  # the re-initialisation clusters the chains as VaDE clusters embeddings
    byte_storage = True  # its hooks read uint8 data through data.unit
    absent = dict(chain_init="prior")  # runs saved before the principal-component start
    # reinit_epoch stays in epochs, not in ``epoch_settings``: moved with the steps it lost on
    # two of three small members (docs/suite.md).
    # Explored on MNIST with seed 7 and on digits (docs/cgm.md): larger Langevin steps let the
    # chains sort into clusters faster (1e-3 leaves them where the prior put them).
    defaults = dict(arch="mlp", hidden=[512, 512], latent_dim=10, epochs=100, batch_size=100,
                    lr=1e-3, lr_decay=1.0, lr_step=1, init="tsne", gmm_inits=3,
                    gmm_covariance="full")

    def scaled(self, n, shape):
        """Chains that start from the prior (a recipe whose default ``chain_init`` is "prior")
        need a larger Langevin step on smaller images to sort themselves into clusters: the
        step grows with 784 / D (64-value digits took ~10x the MNIST step; capped there).
        Chains started at the principal components are sorted already and keep the step."""
        out = super().scaled(n, shape)
        if self.defaults.get("chain_init", self.Settings().chain_init) == "prior":
            step = self.defaults.get("langevin_step_size", self.Settings().langevin_step_size)
            ratio = min(REFERENCE[1] / 64, REFERENCE[1] / math.prod(shape))
            out["langevin_step_size"] = step * ratio
        return out

    def build(self, cfg, image_shape):
        from ..guides.cgm import LangevinPosterior

        s = self.settings(cfg)
        model = self.story(cfg, s, image_shape)
        # The mixture re-initialisation move's settings (plain attributes, not state).
        model.reinit_epoch, model.init_config = s.reinit_epoch, cfg
        guide = LangevinPosterior(model.energy, model.sample_prior, cfg.latent_dim,
                                  s.langevin_steps, s.langevin_step_size, s.langevin_noise,
                                  s.infer_steps)
        return model, guide

    def story(self, cfg, s, image_shape) -> CGMModel:
        return CGMModel(nets.decoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape),
                        cfg.n_clusters, cfg.latent_dim, image_shape, cfg.likelihood,
                        s.obs_scale, covariance=s.prior_covariance)

    def cluster_logits(self, model, guide, x):
        """log p(c | z) at each image's chain state (a fresh chain for an unseen image)."""
        return model.cluster_logits(guide.posterior(x))

    def initialize(self, model, guide, x, cfg, seed):
        """One chain per training image, drawn from the prior (``chain_init="prior"``, the
        paper's) or started at the image's whitened principal components ("pca"): the mixture
        is then fitted on those codes (``init``, as VaDE's on its autoencoder's) and the
        generator fitted to decode them, so that the chains start sorted. Returns the chains'
        mean energy."""
        from ..init import fit_mixture, principal_codes

        guide.initialize(x)
        info: dict = {}
        if self.settings(cfg).chain_init == "pca":
            codes, scales = principal_codes(x, cfg.latent_dim, seed)
            # Clustered at the data's own scale (whitening would weigh the faintest component
            # like the first) and without the noise columns that fill a latent wider than the
            # data's rank; the mixture is then the clusters' moments in the whitened codes.
            scores = (codes[:, : scales.numel()] * scales).double().cpu().numpy()
            _, info["init_log_likelihood"] = fit_mixture(
                model, codes.double().cpu().numpy(), cfg, seed, space=scores)
            info["warm_loss"] = fit_generator(model, x, codes, cfg.batch_size, cfg.lr, seed)
            with torch.no_grad():
                guide.chains.copy_(codes)
        with torch.no_grad():
            energy = sum(float(model.energy(xb, zb).sum())
                         for xb, zb in zip(chunks(x, 2048), guide.chains.split(2048), strict=True))
        return {**info, "initial_energy": energy / x.shape[0]}

    def maintain(self, model, guide, x, epoch, n_epochs):
        """Before epoch ``reinit_epoch``: re-initialise the mixture from a clustering of the
        chains, the model's own posterior draws of z. Gradient steps on the mixture only follow
        its current local optimum, into which the chains sorted themselves from the prior; a
        fresh clustering of the chains (``init``, VaDE's recipe applied to the chains) gives the
        next epochs a better-separated start. Deterministic in the chains and the seed."""
        from ..init import fit_mixture

        if not model.reinit_epoch or epoch != model.reinit_epoch:
            return None
        z = guide.chains.double().cpu().numpy()
        cfg = model.init_config
        _, log_lik = fit_mixture(model, z, cfg, cfg.seed or 0)
        return {"reinit": cfg.init, "init_log_likelihood": log_lik}

    def e_step(self, model, guide, x, index):
        guide.e_step(x, index)


class CGMPixel(CGM):
    """CGM with per-pixel labels, enumerated in a plate over pixels."""

    name = "cgm-pixel"
    summary = ("CGM with per-pixel clustering: L appearance layers and per-pixel labels l_p, "
               "enumerated in a plate over pixels; p(l_p | x, z) segments the image")
    Settings = CGMPixelSettings
    max_plate_nesting = 2
    # A smaller s lets each pixel's likelihood outweigh the generator's label prior at the
    # digit's grey edges (docs/cgm.md); the step shrinks with the sharper energy. An epoch
    # costs ~3x cgm's (4 maps per pixel).
    defaults = {**CGM.defaults, "epochs": 15, "obs_scale": 0.15, "langevin_step_size": 3e-3,
                "reinit_epoch": 0, "chain_init": "prior"}

    def check_data(self, cfg, s, shape):
        if min(shape[1:]) < 2:
            raise ConfigError(f"model {self.name} labels the pixels of images; these data are "
                              f"not images (shape {tuple(shape)}): use cgm")

    def story(self, cfg, s, image_shape) -> CGMModel:
        self.check_data(cfg, s, image_shape)
        c, h, w = image_shape
        decoder = nets.decoder(cfg.arch, cfg.hidden, cfg.latent_dim,
                               (s.pixel_labels * (1 + c), h, w))  # logits, then layers
        return CGMPixelModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape,
                             cfg.likelihood, s.obs_scale, s.pixel_labels, s.appearance,
                             covariance=s.prior_covariance)

    def segment_logits(self, model, guide, x):
        return model.label_logits(x, guide.posterior(x))
