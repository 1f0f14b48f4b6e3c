"""The variant registry: each entry pairs a model with its guide, networks and defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro.distributions  # noqa: F401  (imported for its side effect on torch.distributions)
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn

from . import nets
from .config import FitConfig
from .data import random_affine
from .errors import ConfigError
from .init import autoencoder_loss, gmm_initialize

Builder = Callable[[FitConfig, tuple[int, int, int]], tuple[PyroModule, PyroModule]]
ClusterLogits = Callable[[PyroModule, PyroModule, torch.Tensor], torch.Tensor]


def enumerated_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                              site: str = "c") -> torch.Tensor:
    """log p(c | x) from Pyro's enumeration, the guide's continuous latents at their means.

    Generic (works for any model with an enumerated site ``site``); variants may register a
    faster hand-written function, which the tests check against this one.
    """
    trace = poutine.trace(guide).get_trace(x)
    means = {name: s["fn"].mean for name, s in trace.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    conditioned = poutine.condition(model, data=means)
    marginals = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(
        conditioned, lambda *_: None, x)
    return torch.log_softmax(marginals[site].logits, -1)


@dataclass(frozen=True)
class Variant:
    """One registered variant. ``build(cfg, image_shape) -> (model, guide)``."""

    name: str
    summary: str
    build: Builder
    defaults: dict[str, Any] = field(default_factory=dict)
    dataset_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster_logits: ClusterLogits = enumerated_cluster_logits
    pretrain_loss: Callable[[PyroModule, PyroModule, torch.Tensor], torch.Tensor] | None = None
    initialize: Callable[..., dict[str, float]] | None = None
    max_plate_nesting: int = 1
    # Called before every SVI epoch with (model, guide, epoch, n_epochs), epoch counted from 0
    # in the main phase. It must be a pure function of the epoch (schedules such as a
    # temperature), so that a resumed run sees exactly what an uninterrupted one saw.
    on_epoch: Callable[[PyroModule, PyroModule, int, int], None] | None = None
    # Called before every SVI epoch after ``on_epoch`` with (model, guide, x, epoch, n_epochs):
    # data-dependent moves on the parameters (e.g. re-seeding an emptied cluster). It must be
    # deterministic given the parameters and the data (no RNG), so that a resumed run and every
    # data-parallel rank make the same moves; it returns a JSON-able record of what it did, or
    # None when it did nothing.
    maintain: Callable[[PyroModule, PyroModule, torch.Tensor, int, int], dict[str, Any] | None] | None = None
    # The same as ``on_epoch`` for pretraining epochs: (model, guide, epoch, n_pretrain_epochs).
    on_pretrain_epoch: Callable[[PyroModule, PyroModule, int, int], None] | None = None
    # Multi-facet variants (a model with ``n_facets > 1`` and ``clusters_per_facet``):
    # log q(c_j | x) of facet j (1-based), shape (N, K_j); ``cluster_logits`` gives facet 1.
    facet_logits: Callable[[PyroModule, PyroModule, torch.Tensor, int], torch.Tensor] | None = None
    # Raises ConfigError for variant-specific settings (``cfg.extra``) it cannot use; called
    # on the resolved configuration before anything is written or built (what it returns is
    # ignored, so a variant's settings parser can serve).
    check_config: Callable[[FitConfig], Any] | None = None
    # Variants without an inference network (CGM): called in the main phase for every training
    # batch before its loss, with (model, guide, x_batch, index), ``index`` the batch's rows in
    # the training data. It updates per-image latent state that the guide keeps (an E-step,
    # e.g. Langevin chains); the loss that follows is the M-step. It must not change
    # parameters, and must draw its noise from torch's global RNG (saved in checkpoints) so
    # that a resumed run repeats it exactly.
    e_step: Callable[[PyroModule, PyroModule, torch.Tensor, torch.Tensor], None] | None = None
    # Called on every training batch of the main phase, (model, guide, x_batch) -> what the
    # ELBO is evaluated on (e.g. several randomly posed views of each image, see vc). Its noise
    # must come from torch's global RNG (saved in checkpoints), so a resumed run repeats it.
    # Evaluation, the ELBO report and ``maintain`` see the plain images.
    batch_transform: Callable[[PyroModule, PyroModule, torch.Tensor], torch.Tensor] | None = None
    # Per-pixel variants: log p(l_p | x) of every pixel's label, shape (N, L, H, W).
    segment_logits: Callable[[PyroModule, PyroModule, torch.Tensor], torch.Tensor] | None = None

    def defaults_for(self, dataset: str) -> dict[str, Any]:
        return {**self.defaults, **self.dataset_defaults.get(dataset, {})}


REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in REGISTRY:
        raise ValueError(f"variant {variant.name!r} is already registered")
    REGISTRY[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def encoder_decoder(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    """The networks named by ``cfg.arch``/``cfg.hidden``/``cfg.latent_dim``."""
    assert cfg.latent_dim is not None and cfg.hidden is not None
    if cfg.arch == "conv":
        encoder: nn.Module = nets.ConvEncoder(image_shape, cfg.hidden, cfg.latent_dim)
    else:
        encoder = nets.GaussianEncoder(math.prod(image_shape), cfg.hidden, cfg.latent_dim)
    return encoder, decoder_for(cfg, image_shape)


# --- built-in variants -------------------------------------------------------------------

def _build_vade(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[PyroModule, PyroModule]:
    from .guides.vade import VaDEGuide
    from .models.vade import VaDEModel

    encoder, decoder = encoder_decoder(cfg, image_shape)
    model = VaDEModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape, cfg.likelihood)
    return model, VaDEGuide(encoder)


def _vade_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    return model.cluster_logits(guide.embed(x))


register(Variant(
    name="vade",
    summary="VaDE (Jiang et al. 2017): GMM prior, AE pretraining + mixture init, c enumerated in the model",
    build=_build_vade,
    # Measured on the 10,000-digit MNIST subset (README): pretraining on slightly perturbed
    # digits and a mixture initialised on a t-SNE map of the embeddings decide the accuracy;
    # a lower SVI learning rate than the paper's 2e-3 keeps what the initialisation found.
    defaults=dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, pretrain_epochs=50,
                  pretrain_lr=1e-3, pretrain_augment=True, init="tsne", init_neighbors=30,
                  gmm_covariance="full", gmm_inits=10, epochs=30, batch_size=256, lr=5e-4,
                  lr_decay=0.95, lr_step=1),
    dataset_defaults={
        # 1,797 8x8 images: no augmentation (a 10% shift is under a pixel), more SVI epochs.
        "digits": dict(pretrain_augment=False, epochs=100, batch_size=128, lr=2e-3,
                       lr_decay=0.9, lr_step=10),
    },
    cluster_logits=_vade_cluster_logits,
    pretrain_loss=autoencoder_loss,
    initialize=gmm_initialize,
))


# --- Variational Clustering (Prasad et al. 2020) -------------------------------------------

def decoder_for(cfg: FitConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The decoder named by ``cfg.arch``/``cfg.hidden``/``cfg.latent_dim`` alone."""
    assert cfg.latent_dim is not None and cfg.hidden is not None
    if cfg.arch == "conv":
        return nets.ConvDecoder(cfg.latent_dim, cfg.hidden, image_shape)
    return nets.Decoder(cfg.latent_dim, cfg.hidden, math.prod(image_shape))


def trunk_for(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """An encoder body ``x -> h`` (no output heads) and the width of ``h``."""
    assert cfg.latent_dim is not None and cfg.hidden is not None
    if cfg.arch == "conv":
        return nets.ConvEncoder(image_shape, cfg.hidden, cfg.latent_dim).body, 256
    body = nets.mlp([math.prod(image_shape), *cfg.hidden], activate_last=True)
    return nn.Sequential(nn.Flatten(), body), cfg.hidden[-1] if cfg.hidden else math.prod(image_shape)


def vc_settings(cfg: FitConfig) -> dict[str, Any]:
    """VC's own settings from ``cfg.extra``, validated (ConfigError): ``discrete`` (enumerate or
    relaxed) and the relaxed temperature schedule (``temperature``, ``temperature_min``,
    ``anneal_rate``); ``prior_covariance`` (diag or full); ``kl_warmup`` (epochs, at most
    ``epochs``); ``split_every`` and ``split_until`` (see :func:`reseed_dead_clusters`);
    ``views`` (V >= 1 randomly posed views of each training image sharing its cluster);
    ``pose`` (none, or affine: a per-image affine pose a ~ N(0, I) the decoder draws with)."""
    from .models.common import COVARIANCES
    from .models.vc import DISCRETE, POSES

    e = cfg.extra
    out: dict[str, Any] = {
        "discrete": _choice_setting(e.get("discrete", "enumerate"), "discrete", DISCRETE),
        "prior_covariance": _choice_setting(e.get("prior_covariance", "diag"),
                                            "prior_covariance", COVARIANCES),
        "pose": _choice_setting(e.get("pose", "none"), "pose", POSES),
    }
    out["schedule"] = {k: float(e[k]) for k in ("temperature", "temperature_min", "anneal_rate")
                       if k in e}
    if (not out["schedule"].get("temperature", 1.0) > 0
            or not out["schedule"].get("temperature_min", 0.5) > 0):
        raise ConfigError("temperature and temperature_min must be > 0")
    for key in ("kl_warmup", "split_every", "split_until"):
        out[key] = _int_setting(e.get(key, 0), key, 0)
    out["views"] = _int_setting(e.get("views", 1), "views", 1)
    if out["kl_warmup"] > cfg.epochs:
        raise ConfigError(f"kl-warmup ({out['kl_warmup']}) must not exceed epochs ({cfg.epochs})")
    if out["pose"] != "none" and (out["views"] > 1 or cfg.likelihood != "bernoulli"):
        raise ConfigError("--pose affine needs --views 1 and the bernoulli likelihood")
    return out


def _build_vc(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[PyroModule, PyroModule]:
    from .guides.vc import VCGuide
    from .models.vc import VCModel

    s = vc_settings(cfg)
    # Views and the pose both move images around: they need images, before anything is built.
    posing = ([f"--views {s['views']}"] if s["views"] > 1 else []) + \
        ([f"--pose {s['pose']}"] if s["pose"] != "none" else [])
    if posing and min(image_shape[1:]) < 4:
        raise ConfigError(f"{' and '.join(posing)} pose images; these data are not images "
                          f"(shape {tuple(image_shape)}): use --views 1 --pose none")
    trunk, width = trunk_for(cfg, image_shape)
    model = VCModel(decoder_for(cfg, image_shape), cfg.n_clusters, cfg.latent_dim, image_shape,
                    cfg.likelihood, s["discrete"], s["prior_covariance"], s["pose"])
    guide = VCGuide(trunk, width, cfg.n_clusters, cfg.latent_dim, s["discrete"], **s["schedule"],
                    pose=s["pose"], image_shape=image_shape)
    # The warm-up and split schedules (plain attributes, not state).
    model.kl_warmup = s["kl_warmup"]
    guide.split_every, guide.split_until = s["split_every"], s["split_until"]
    guide.views = s["views"]
    return model, guide


def _vc_views(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    """(N, V, C, H, W): each image, then V - 1 randomly rotated, shifted and zoomed copies."""
    if guide.views == 1:
        return x
    return torch.stack([x, *(random_affine(x) for _ in range(guide.views - 1))], 1)


def _vc_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    return guide.cluster_logits(x)


def _vc_on_epoch(model: PyroModule, guide: PyroModule, epoch: int, n_epochs: int) -> None:
    guide.set_epoch(epoch)
    # KL warm-up (Bowman et al. 2016; Sonderby et al. 2016): the z terms log p(z|c) - log
    # q(z|x,c) weighted by beta = (epoch + 1) / kl_warmup, 1 from epoch kl_warmup - 1 on.
    beta = min(1.0, (epoch + 1) / model.kl_warmup) if model.kl_warmup else 1.0
    model.kl_scale = guide.kl_scale = beta


def reseed_dead_clusters(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                         threshold: float = 0.3, batch_size: int = 2048) -> list[tuple[int, int]]:
    """Split the most used cluster into every cluster whose share of q(c|x) over ``x`` fell
    below ``threshold / K``; returns the (emptied, split) pairs.

    Trained from scratch, a mixture prior loses clusters early on (the rich get richer: a
    cluster that explains more data gets better heads and a larger pi). This is the split move
    of split-and-merge EM (Ueda et al. 2000): the two halves start at mu +- one standard
    deviation of the split cluster's posterior means along their first principal axis, and the
    ELBO then separates them. Deterministic given the parameters and ``x``.
    """
    k = guide.n_clusters
    stats = [(guide.heads(x[i : i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    q = torch.cat([s[0] for s in stats]).softmax(-1)
    loc = torch.cat([s[1] for s in stats])  # E[z | x, c], (N, K, D)
    use, hard = q.mean(0), q.argmax(1)
    pairs = []
    for dead in (use < threshold / k).nonzero().flatten().tolist():
        old = int(use.argmax())
        in_old = (hard == old).nonzero().flatten()
        members = loc[in_old, old]
        if members.shape[0] < 2:
            break
        centred = members - members.mean(0)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        model.split_cluster(dead, old, vh[0] * sv[0] / math.sqrt(members.shape[0]))
        guide.split_cluster(dead, old)
        use[old] /= 2
        use[dead] = use[old]
        hard[in_old[centred @ vh[0] > 0]] = dead  # the half nearer the new mean
        pairs.append((dead, old))
    return pairs


def _vc_maintain(model: PyroModule, guide: PyroModule, x: torch.Tensor, epoch: int,
                 n_epochs: int) -> dict[str, Any] | None:
    every, until = guide.split_every, guide.split_until
    if not every or epoch == 0 or epoch % every or epoch > until:
        return None
    pairs = reseed_dead_clusters(model, guide, x)
    return {"split": [list(p) for p in pairs]} if pairs else None


register(Variant(
    name="vc",
    summary="Variational Clustering (Prasad et al. 2020): q(c|x) q(z|x,c), c enumerated in the "
            "guide (or relaxed), trained from scratch",
    build=_build_vc,
    defaults=dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, epochs=100,
                  batch_size=256, lr=1e-3, lr_decay=0.9, lr_step=10,
                  discrete="enumerate", temperature=1.0, temperature_min=0.5, anneal_rate=0.05,
                  split_every=5, split_until=60, prior_covariance="diag", kl_warmup=0,
                  views=1, pose="none"),
    dataset_defaults={
        "digits": dict(hidden=[256, 256, 512], latent_dim=10, epochs=100, batch_size=128),
        # Measured on the 10,000-digit subset (README): from scratch a 32-D latent separates
        # digits better than 10-D (0.72 vs 0.64 ACC after 40 epochs, seed 0), and 512-512 nets
        # keep the K decoder passes per image affordable on CPU. Full-covariance components
        # and 120 epochs: a higher ELBO (-93.5 vs -100.5 nats, seeds 0, 1) within 20 minutes.
        # An affine pose per image (--pose affine): slant, size and position no longer decide
        # the clusters (ACC 0.913 / 0.837 / 0.973 on seeds 0-2 against 0.730 / 0.748 / 0.621).
        "mnist": dict(hidden=[512, 512], latent_dim=32, epochs=120, prior_covariance="full",
                      pose="affine"),
    },
    cluster_logits=_vc_cluster_logits,
    on_epoch=_vc_on_epoch,
    maintain=_vc_maintain,
    check_config=vc_settings,
    batch_transform=_vc_views,
    max_plate_nesting=2,  # data, and the views of an image
))


# --- A Student-t mixture prior, through the same API ---------------------------------------

def _build_vade_t(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[PyroModule, PyroModule]:
    from .guides.student_mix import StudentMixtureGuide
    from .models.student_mix import StudentMixtureModel

    encoder, decoder = encoder_decoder(cfg, image_shape)
    model = StudentMixtureModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape,
                                cfg.likelihood, float(cfg.extra.get("df", 5.0)))
    return model, StudentMixtureGuide(encoder)


register(Variant(
    name="vade-t",
    summary="VaDE with a Student-t mixture prior (learned degrees of freedom per cluster)",
    build=_build_vade_t,
    defaults=dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, epochs=100,
                  pretrain_epochs=50, batch_size=256, lr=2e-3, pretrain_lr=1e-3,
                  lr_decay=0.9, lr_step=10, gmm_inits=10, gmm_covariance="diag", df=5.0),
    dataset_defaults={
        "digits": dict(hidden=[256, 256, 512], latent_dim=10, epochs=100, pretrain_epochs=50,
                       batch_size=128),
    },
    cluster_logits=_vade_cluster_logits,
    pretrain_loss=autoencoder_loss,
    initialize=gmm_initialize,
))


# --- Multi-Facet Clustering VAE (Falck et al. 2021) ----------------------------------------

def _int_setting(value: Any, key: str, minimum: int) -> int:
    """A variant's integer setting ``key`` (from ``cfg.extra``), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice_setting(value: Any, key: str, choices: tuple[str, ...]) -> str:
    """A variant's setting ``key`` that must be one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key.replace('_', '-')} must be {' or '.join(choices)}, got {value!r}")
    return value


def _int_list(value: Any, name: str, minimum: int) -> list[int]:
    if (not isinstance(value, list | tuple) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{name} must be a list of integers, got {value!r}")
    if min(value) < minimum:
        raise ConfigError(f"{name} must all be >= {minimum}, got {','.join(map(str, value))}")
    return [int(v) for v in value]


def mfcvae_settings(cfg: FitConfig) -> dict[str, Any]:
    """MFCVAE's own settings from ``cfg.extra``, validated (ConfigError).

    ``facets`` J; ``clusters_per_facet`` K_1..K_J (default: ``n_clusters`` for every facet;
    K_1, the default facet's, must equal ``n_clusters``); ``latent_dims`` D_1..D_J (default:
    ``latent_dim`` each); ``progressive`` (on/off), ``progressive_epochs`` (epochs before the
    next shallower facet starts fading in) and ``fade_in_epochs``; ``pretrain_objective``
    ("elbo" or "ae"); ``facet_init``: each facet's mixture initialisation (default ``init``);
    ``facet_covariance``: each facet's component covariance, diag or full (default diag;
    colored-mnist: full,full).
    """
    from .models.common import COVARIANCES

    e = cfg.extra
    n = _int_setting(e.get("facets", 2), "facets", 1)
    ks = e.get("clusters_per_facet")
    ks = [cfg.n_clusters] * n if ks is None else _int_list(ks, "clusters-per-facet", 2)
    if len(ks) != n:
        raise ConfigError(f"clusters-per-facet gives {len(ks)} values for {n} facets "
                          f"(set --facets {len(ks)} or give {n} values)")
    if ks[0] != cfg.n_clusters:
        raise ConfigError(f"n-clusters ({cfg.n_clusters}) must equal the default facet's K, the "
                          f"first of clusters-per-facet ({','.join(map(str, ks))})")
    ds = e.get("latent_dims")
    ds = [cfg.latent_dim] * n if ds is None else _int_list(ds, "latent-dims", 1)
    if len(ds) != n:
        raise ConfigError(f"latent-dims gives {len(ds)} values for {n} facets")
    out: dict[str, Any] = {"facets": n, "clusters_per_facet": ks, "latent_dims": ds}
    for key in ("progressive_epochs", "fade_in_epochs"):
        out[key] = _int_setting(e.get(key, 0), key, 0)
    if not isinstance(e.get("progressive", True), bool):
        raise ConfigError(f"progressive must be true or false, got {e['progressive']!r}")
    out["progressive"] = e.get("progressive", True)
    out["pretrain_objective"] = _choice_setting(e.get("pretrain_objective", "elbo"),
                                                "pretrain_objective", ("elbo", "ae"))
    inits = e.get("facet_init")
    if inits is not None:
        if (not isinstance(inits, list | tuple) or len(inits) != n
                or any(i not in ("gmm", "spectral", "tsne") for i in inits)):
            raise ConfigError(f"facet-init must give one of gmm, spectral, tsne for each of the "
                              f"{n} facets, got {inits!r}")
        inits = list(inits)
    out["facet_init"] = inits
    covs = e.get("facet_covariance")
    covs = ["diag"] * n if covs is None else covs
    if (not isinstance(covs, list | tuple) or len(covs) != n
            or any(c not in COVARIANCES for c in covs)):
        raise ConfigError(f"facet-covariance must give diag or full for each of the {n} facets "
                          f"(e.g. --facet-covariance {','.join(['diag'] * n)}), got {covs!r}")
    out["facet_covariance"] = list(covs)
    return out


def _build_mfcvae(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[PyroModule, PyroModule]:
    from .guides.mfcvae import MFCVAEGuide
    from .models.mfcvae import MFCVAEModel

    s = mfcvae_settings(cfg)
    assert cfg.hidden is not None
    if cfg.arch == "conv":
        encoder, decoder = nets.conv_ladder(image_shape, cfg.hidden, s["latent_dims"])
    else:
        encoder, decoder = nets.mlp_ladder(image_shape, cfg.hidden, s["latent_dims"])
    model = MFCVAEModel(decoder, s["clusters_per_facet"], s["latent_dims"], image_shape,
                        cfg.likelihood, s["facet_covariance"])
    # The progressive schedule's settings travel with the model (plain attributes, not
    # state); positions count pretraining epochs first, then SVI epochs.
    model.schedule = dict(step_epochs=s["progressive_epochs"], fade_epochs=s["fade_in_epochs"],
                          enabled=s["progressive"])
    model.schedule_offset = cfg.pretrain_epochs or 0
    model.pretrain_objective = s["pretrain_objective"]
    return model, MFCVAEGuide(encoder)


def _mfcvae_set_position(model: PyroModule, position: int) -> None:
    from .models.mfcvae import progressive_alpha

    model.set_alpha(progressive_alpha(position, model.n_facets, **model.schedule))


def _mfcvae_on_pretrain_epoch(model: PyroModule, guide: PyroModule, epoch: int, n: int) -> None:
    _mfcvae_set_position(model, epoch)


def _mfcvae_on_epoch(model: PyroModule, guide: PyroModule, epoch: int, n: int) -> None:
    _mfcvae_set_position(model, model.schedule_offset + epoch)


def _mfcvae_facet_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                         facet: int) -> torch.Tensor:
    """log p(c_j | z_j = E_q[z_j | x]) (the paper's and VaDE's q(c_j | x))."""
    return model.cluster_logits(guide.facet_means(x)[facet - 1], facet)


def _mfcvae_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    return _mfcvae_facet_logits(model, guide, x, 1)


def _mfcvae_pretrain_loss(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    """Warm-up loss before the mixtures are initialised, summed over the batch.

    ``pretrain_objective="ae"``: a deterministic ladder autoencoder, -log p(x | z = E_q[z]).
    ``"elbo"``: the progressive objective of the MFCVAE paper's code: the ELBO (one z sample,
    each facet's mixture summed out exactly) with facet j's KL term weighted by its fade-in
    alpha_j, so a facet that is not yet switched on is neither used nor pulled to its prior.
    With every alpha_j = 1 it is the ELBO.
    """
    xf = x.flatten(1)
    if model.pretrain_objective == "ae":
        return -model.observation(guide.facet_means(x)).log_prob(xf).sum()
    params = guide.encoder(x)
    zs = [loc + scale * torch.randn_like(loc) for loc, scale in params]
    loss = -model.observation(zs).log_prob(xf)
    weights = model.decoder.alpha
    for j, ((loc, scale), z, facet) in enumerate(zip(params, zs, model.facets, strict=True)):
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_p = torch.logsumexp(facet.log_joint(z), -1)
        loss = loss + weights[j] * (log_q - log_p)
    return loss.sum()


@torch.no_grad()
def _mfcvae_initialize(model: PyroModule, guide: PyroModule, x: torch.Tensor, cfg: FitConfig,
                       seed: int) -> dict[str, float]:
    """Each facet's mixture from a clustering of its own embeddings E_q[z_j | x] (VaDE's
    recipe, facet by facet; ``facet_init`` or ``cfg.init``). Without pretraining (the paper's
    from-scratch recipe) the embeddings are untrained, so the mixtures keep their random
    initialisation."""
    import dataclasses

    from .init import cluster_embeddings, set_mixture_from

    if not cfg.pretrain_epochs:
        return {}
    inits = mfcvae_settings(cfg)["facet_init"] or [cfg.init] * model.n_facets
    means = [guide.facet_means(x[i : i + 2048]) for i in range(0, x.shape[0], 2048)]
    info = {}
    for j, facet in enumerate(model.facets, 1):
        emb = torch.cat([m[j - 1] for m in means]).double().cpu().numpy()
        resp, log_lik = cluster_embeddings(emb, facet.n_clusters,
                                           dataclasses.replace(cfg, init=inits[j - 1]), seed)
        set_mixture_from(facet, emb, resp)
        info[f"init_log_likelihood_{j}"] = log_lik
    return info


register(Variant(
    name="mfcvae",
    summary="MFCVAE (Falck et al. 2021): J facets, each a mixture prior with its own c_j "
            "enumerated in the model; ladder encoder/decoder, progressive training",
    build=_build_mfcvae,
    # Measured on colored MNIST (README, tuned on seeds 10 and 11): from scratch (the paper's
    # recipe, --pretrain-epochs 0) the mixtures collapse; a ladder-autoencoder warm-up on
    # slightly perturbed images with the progressive schedule, then each facet's mixture
    # initialised from its own embeddings (VaDE's recipe per facet), is what works. The
    # ELBO warm-up (pretrain_objective="elbo") lets facet 1 collapse while it is switched off.
    defaults=dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, epochs=40,
                  pretrain_epochs=50, pretrain_lr=2e-3, pretrain_augment=True, init="tsne",
                  gmm_covariance="full", gmm_inits=3, batch_size=256, lr=1e-3, lr_decay=0.97,
                  lr_step=1, facets=2, clusters_per_facet=None, latent_dims=None,
                  progressive=True, progressive_epochs=5, fade_in_epochs=3,
                  pretrain_objective="ae", facet_init=None, facet_covariance=None),
    dataset_defaults={
        "digits": dict(hidden=[256, 256, 512], batch_size=128, pretrain_augment=False),
        # Facet 2, the deepest, is trained first and alone: with a 3-dim latent it takes the
        # most salient factor (colour) and the digit goes to facet 1. t-SNE for both facets:
        # the colours lie on curved, non-Gaussian sheets of the 3-dim embedding (a mixture
        # fitted there mixes them; colour ACC 0.58 -> 0.78 on seed 0 with t-SNE, README).
        # Full-covariance components for both facets: each facet's classes lie on curved
        # sheets (colour x ink; digit x style) that diagonal components cut across, so the
        # mixture set from the t-SNE clusters lost what they found (README: colour 0.78/0.90/
        # 0.93 -> 1.00/0.89/0.97 on seeds 0-2 with a full colour facet, then digit 0.66/0.76/
        # 0.75 -> 0.72/0.81/0.80 with a full digit facet as well; seeds 3, 4, 11 as checks).
        "colored-mnist": dict(clusters_per_facet=[10, 8], latent_dims=[10, 3],
                              pretrain_epochs=120, facet_covariance=["full", "full"]),
    },
    cluster_logits=_mfcvae_cluster_logits,
    facet_logits=_mfcvae_facet_logits,
    pretrain_loss=_mfcvae_pretrain_loss,
    initialize=_mfcvae_initialize,
    on_epoch=_mfcvae_on_epoch,
    on_pretrain_epoch=_mfcvae_on_pretrain_epoch,
    check_config=mfcvae_settings,
))


# --- Clustered Generator Model (Zhu et al. 2019): no encoder, Langevin E-steps -------------

def cgm_settings(cfg: FitConfig) -> dict[str, Any]:
    """CGM's own settings from ``cfg.extra``, validated (ConfigError): the Langevin chains'
    ``langevin_steps`` per batch, ``langevin_step_size``, ``langevin_noise`` and ``infer_steps``
    (fresh chains for unseen images); the Gaussian ``obs_scale`` s; for ``cgm-pixel`` the
    number of pixel labels ``pixel_labels`` and the ``appearance`` of the layers; the mixture's
    ``prior_covariance`` (diag or full) and ``reinit_epoch`` (0: never; see :func:`_cgm_maintain`)."""
    from .models.cgm import APPEARANCES
    from .models.common import COVARIANCES

    e = {**_CGM_PIXEL_DEFAULTS, **cfg.extra}
    out: dict[str, Any] = {}
    for key, minimum in (("langevin_steps", 1), ("infer_steps", 1), ("pixel_labels", 2),
                         ("reinit_epoch", 0)):
        out[key] = _int_setting(e[key], key, minimum)
    for key, strict in (("langevin_step_size", True), ("obs_scale", True), ("langevin_noise", False)):
        v = e[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0 if strict else v >= 0):
            raise ConfigError(f"{key.replace('_', '-')} must be a number {'>' if strict else '>='} 0, "
                              f"got {v!r}")
        out[key] = float(v)
    for key, choices in (("appearance", APPEARANCES), ("prior_covariance", COVARIANCES)):
        out[key] = _choice_setting(e[key], key, choices)
    return out


def _build_cgm(cfg: FitConfig, image_shape: tuple[int, int, int]) -> tuple[PyroModule, PyroModule]:
    from .guides.cgm import LangevinPosterior
    from .models.cgm import CGMModel, CGMPixelModel

    s = cgm_settings(cfg)
    assert cfg.latent_dim is not None
    if cfg.model == "cgm-pixel":
        c, h, w = image_shape
        decoder = decoder_for(cfg, (s["pixel_labels"] * (1 + c), h, w))  # logits, then layers
        model: CGMModel = CGMPixelModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape,
                                        cfg.likelihood, s["obs_scale"], s["pixel_labels"],
                                        s["appearance"], covariance=s["prior_covariance"])
    else:
        model = CGMModel(decoder_for(cfg, image_shape), cfg.n_clusters, cfg.latent_dim,
                         image_shape, cfg.likelihood, s["obs_scale"],
                         covariance=s["prior_covariance"])
    # The mixture re-initialisation move's settings (plain attributes, not state).
    model.reinit_epoch, model.init_config = s["reinit_epoch"], cfg
    guide = LangevinPosterior(model.energy, model.sample_prior, cfg.latent_dim,
                              s["langevin_steps"], s["langevin_step_size"], s["langevin_noise"],
                              s["infer_steps"])
    return model, guide


def _cgm_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    """log p(c | z) at each image's chain state (a fresh chain for an unseen image)."""
    return model.cluster_logits(guide.posterior(x))


def _cgm_segment_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor) -> torch.Tensor:
    return model.label_logits(x, guide.posterior(x))


@torch.no_grad()
def _cgm_initialize(model: PyroModule, guide: PyroModule, x: torch.Tensor, cfg: FitConfig,
                    seed: int) -> dict[str, float]:
    """One chain per training image, drawn from the prior; returns their mean energy."""
    guide.initialize(x)
    energy = sum(float(model.energy(x[i : i + 2048], guide.chains[i : i + 2048]).sum())
                 for i in range(0, x.shape[0], 2048))
    return {"initial_energy": energy / x.shape[0]}


def _cgm_maintain(model: PyroModule, guide: PyroModule, x: torch.Tensor, epoch: int,
                  n_epochs: int) -> dict[str, Any] | None:
    """Before epoch ``reinit_epoch``: re-initialise the mixture from a clustering of the chains.

    The chains are the model's own posterior draws of z. Gradient steps on the mixture only
    follow its current local optimum, into which the chains sorted themselves from the prior;
    a fresh clustering of the chains (``cfg.init``, t-SNE + mixture by default, VaDE's
    initialisation recipe applied to the chains) gives the next epochs a better-separated
    start. Deterministic in the chains and ``cfg.seed``, so a resumed run repeats it.
    """
    from .init import cluster_embeddings, set_mixture_from

    if not model.reinit_epoch or epoch != model.reinit_epoch:
        return None
    z = guide.chains.double().cpu().numpy()
    cfg = model.init_config
    resp, log_lik = cluster_embeddings(z, model.n_clusters, cfg, cfg.seed or 0)
    set_mixture_from(model, z, resp)
    return {"reinit": cfg.init, "init_log_likelihood": log_lik}


def _cgm_e_step(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                index: torch.Tensor) -> None:
    guide.e_step(x, index)


# Explored on MNIST with seed 7 and on digits (README): larger Langevin steps let the chains
# sort into clusters faster (1e-3 leaves them where the prior put them); about 10 s per epoch
# of the 10,000 digits on one core. 64-pixel digits have ~10x smaller energy gradients.
_CGM_DEFAULTS = dict(arch="mlp", hidden=[512, 512], latent_dim=10, epochs=100, batch_size=100,
                     lr=1e-3, lr_decay=1.0, lr_step=1, langevin_steps=20,
                     langevin_step_size=1e-2, langevin_noise=1.0, infer_steps=200, obs_scale=0.3,
                     prior_covariance="diag", reinit_epoch=50, init="tsne", gmm_inits=3,
                     gmm_covariance="full")
# Per-pixel: a smaller s lets each pixel's likelihood outweigh the generator's label prior
# at the digit's grey edges (MNIST seed 7, 10 epochs: IoU 0.95 with s = 0.15, 0.88 with 0.3);
# the step shrinks with the sharper energy. An epoch costs ~3x cgm's (4 maps per pixel).
_CGM_PIXEL_DEFAULTS = {**_CGM_DEFAULTS, "pixel_labels": 2, "appearance": "constant",
                       "epochs": 15, "obs_scale": 0.15, "langevin_step_size": 3e-3,
                       "reinit_epoch": 0}
_CGM_DATASET_DEFAULTS = {"digits": dict(hidden=[128, 256], epochs=100, langevin_step_size=0.1)}
_CGM_PIXEL_DATASET_DEFAULTS = {"digits": dict(hidden=[128, 256], epochs=30,
                                              langevin_step_size=0.03)}

register(Variant(
    name="cgm",
    summary="Clustered Generator Model (Zhu et al. 2019): no encoder; persistent Langevin chains "
            "on z (E-step) alternate with generator/mixture updates (M-step), c enumerated",
    build=_build_cgm,
    defaults=_CGM_DEFAULTS,
    dataset_defaults=_CGM_DATASET_DEFAULTS,
    cluster_logits=_cgm_cluster_logits,
    initialize=_cgm_initialize,
    maintain=_cgm_maintain,
    e_step=_cgm_e_step,
    check_config=cgm_settings,
))

register(Variant(
    name="cgm-pixel",
    summary="CGM with per-pixel clustering: L appearance layers and per-pixel labels l_p, "
            "enumerated in a plate over pixels; p(l_p | x, z) segments the image",
    build=_build_cgm,
    defaults=_CGM_PIXEL_DEFAULTS,
    dataset_defaults=_CGM_PIXEL_DATASET_DEFAULTS,
    cluster_logits=_cgm_cluster_logits,
    initialize=_cgm_initialize,
    maintain=_cgm_maintain,
    max_plate_nesting=2,
    e_step=_cgm_e_step,
    segment_logits=_cgm_segment_logits,
    check_config=cgm_settings,
))
