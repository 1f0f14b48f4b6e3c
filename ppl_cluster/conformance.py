"""The contract every registered variant keeps, as executable checks with named rules.

``check_variant(variant)`` builds a small instance of the variant and checks each rule on a
few images; the first rule broken raises :class:`ConformanceError` whose message names it::

    variant 'mine' breaks rule [observed-x]: the model must observe the images at a site 'x' ...

The rules (see :data:`RULES`) are what the trainer, ``Clusterer`` and the CLI rely on.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample

from .config import FitConfig
from .data import unit
from .errors import ConfigError
from .variant import Variant, local_params

RULES: dict[str, str] = {
    "settings": "Settings must be a dataclass of settings whose defaults (with the variant's "
                "defaults) pass their own validation",
    "defaults": "the variant's defaults must set epochs, batch_size, lr, latent_dim, hidden and "
                "arch (and pretrain_epochs, pretrain_lr when pretrain_loss is given)",
    "build": "build(cfg, image_shape) must return two PyroModules (model, guide)",
    "n-clusters": "the model must expose n_clusters equal to cfg.n_clusters",
    "cluster-site": "the model must sample the cluster at a site 'c' inside pyro.plate('data') "
                    "(a multi-facet model, n_facets = J > 1: one site per facet, 'c_1'..'c_J')",
    "observed-x": "the model must observe the images at a site 'x' inside pyro.plate('data')",
    "guide-covers-latents": "every latent site of the model must be enumerated in the model "
                            "or sampled by the guide",
    "no-score-function": "every guide site must be enumerated (infer={'enumerate': 'parallel'}) "
                         "or reparameterised (has_rsample); score-function gradients are not "
                         "part of the contract",
    "finite-elbo": "TraceEnum_ELBO(max_plate_nesting) must give a finite loss",
    "gradients": "every parameter of the model and guide must receive a gradient from the ELBO",
    "cluster-logits": "cluster_logits(model, guide, x) must return (N, K) finite log-probabilities "
                      "(rows of exp() on the simplex)",
    "facets": "a multi-facet model must expose clusters_per_facet (J values, the first equal to "
              "n_clusters) and facet_logits(model, guide, x, j) must return (N, K_j) "
              "log-probabilities for j = 1..J, facet 1 equal to cluster_logits",
    "embed": "guide.embed(x) must return an (N, D) tensor",
    "generate": "model.generate(n, cluster) must return n images of the data's shape",
    "state-dict": "a fresh build loaded with another's state_dict must predict identically",
    "pretrain-loss": "pretrain_loss(model, guide, x) must return a finite differentiable scalar",
    "initialize": "initialize(model, guide, x, cfg, seed) must return a dict of floats",
    "stored-bytes": "initialize and maintain get the training data as stored, uint8 pixels k "
                    "for k / 255 where they came as bytes: take slices through "
                    "ppl_cluster.data.unit, so that bytes give what their floats give",
    "on-epoch": "on_epoch(model, guide, epoch, n_epochs) (and on_pretrain_epoch) must leave "
                "parameters unchanged and be a pure function of the epoch",
    "e-step": "e_step(model, guide, x[index], index), after initialize, must leave parameters "
              "unchanged, repeat exactly from the same global RNG state and keep the ELBO finite",
}


class ConformanceError(AssertionError):
    """A variant broke a rule of the contract; ``rule`` names it."""

    def __init__(self, variant: str, rule: str, detail: str = "") -> None:
        self.variant, self.rule = variant, rule
        msg = f"variant {variant!r} breaks rule [{rule}]: {RULES[rule]}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


SMALL = dict(hidden=[16], latent_dim=3, arch="mlp")


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(f.name == "data" for f in site["cond_indep_stack"])


def _loss(variant: Variant, model: PyroModule, guide: PyroModule, x: torch.Tensor,
          seed: int = 0) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    return TraceEnum_ELBO(max_plate_nesting=variant.max_plate_nesting).differentiable_loss(
        model, guide, x)


@local_params
def check_variant(variant: Variant, x: torch.Tensor | None = None, n_clusters: int = 3,
                  **settings: Any) -> None:
    """Check every rule of :data:`RULES` on a small build of ``variant``.

    ``x``: a few images (N, C, H, W) in [0, 1] (default: 24 random binary 8x8 images);
    ``settings``: FitConfig fields overriding the small default networks.
    """
    with warnings.catch_warnings():
        # A reparameterised (relaxed) cluster leaves nothing to enumerate: that is allowed.
        warnings.filterwarnings("ignore", message=".*found no sample sites configured for enum")
        _check(variant, x, n_clusters, settings)


def _check(variant: Variant, x: torch.Tensor | None, n_clusters: int,
           settings: dict[str, Any]) -> None:
    name = variant.name

    def require(ok: Any, rule: str, detail: str = "") -> None:
        if not ok:
            raise ConformanceError(name, rule, detail)

    # The variant's own defaults make a complete training configuration.
    require(dataclasses.is_dataclass(variant.Settings), "settings",
            f"{variant.Settings!r} is not a dataclass")
    try:
        full = variant.resolve(FitConfig(model=name, n_clusters=n_clusters, dataset="custom"))
    except ConfigError as exc:
        raise ConformanceError(name, "settings", str(exc)) from None
    needed = ["epochs", "batch_size", "lr", "latent_dim", "hidden", "arch"]
    if variant.pretrain_loss is not None:
        needed += ["pretrain_epochs", "pretrain_lr"]
    missing = [k for k in needed if getattr(full, k) is None]
    require(not missing, "defaults", f"unset: {', '.join(missing)}")

    if x is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(24, 1, 8, 8, generator=gen).round()
    image_shape = tuple(x.shape[1:])
    cfg = dataclasses.replace(full, **{**SMALL, **settings}, extra=dict(full.extra))
    cfg.validate()

    def build(seed: int) -> tuple[PyroModule, PyroModule]:
        pyro.set_rng_seed(seed)
        built = variant.build(cfg, image_shape)
        require(isinstance(built, tuple) and len(built) == 2
                and all(isinstance(m, PyroModule) for m in built), "build",
                f"got {type(built).__name__}")
        return built

    model, guide = build(0)
    require(getattr(model, "n_clusters", None) == n_clusters, "n-clusters",
            f"got {getattr(model, 'n_clusters', None)!r}")

    # Trace structure, with enumeration set up exactly as TraceEnum_ELBO does it.
    elbo = TraceEnum_ELBO(max_plate_nesting=variant.max_plate_nesting)
    pyro.set_rng_seed(0)
    try:
        model_tr, guide_tr = next(elbo._get_traces(model, guide, (x,), {}))
    except Exception as exc:  # a broken variant can fail in many ways while tracing
        raise ConformanceError(name, "finite-elbo", f"tracing failed: {exc}") from exc
    sites = {n: s for n, s in model_tr.nodes.items()
             if s["type"] == "sample" and not site_is_subsample(s)}
    n_facets = getattr(model, "n_facets", 1)
    cluster_sites = ["c"] if n_facets == 1 else [f"c_{j}" for j in range(1, n_facets + 1)]
    for c in cluster_sites:
        require(c in sites and not sites[c]["is_observed"] and _in_data_plate(sites[c]),
                "cluster-site", f"site {c!r}")
    require("x" in sites and sites["x"]["is_observed"] and _in_data_plate(sites["x"]),
            "observed-x")
    guide_sites = {n: s for n, s in guide_tr.nodes.items()
                   if s["type"] == "sample" and not site_is_subsample(s)}
    for n, s in sites.items():
        if s["is_observed"] or s["infer"].get("enumerate") == "parallel":
            continue
        require(n in guide_sites, "guide-covers-latents", f"site {n!r}")
    for n, s in guide_sites.items():
        if s["is_observed"]:
            continue
        require(s["infer"].get("enumerate") == "parallel" or s["fn"].has_rsample,
                "no-score-function", f"guide site {n!r} is {type(s['fn']).__name__}")

    # The ELBO and its gradients.
    params = dict(model.named_parameters(prefix="model")) | dict(guide.named_parameters(prefix="guide"))
    with pyro.validation_enabled(True):
        loss = _loss(variant, model, guide, x)
    require(torch.isfinite(loss), "finite-elbo", f"loss {loss.item()}")
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    dead = [n for n, g in zip(params, grads, strict=True) if g is None]
    require(not dead, "gradients", f"no gradient: {', '.join(dead)}")

    # What Clusterer and the CLI call.
    with torch.no_grad():
        logits = variant.cluster_logits(model, guide, x)
        require(isinstance(logits, torch.Tensor) and logits.shape == (x.shape[0], n_clusters)
                and torch.isfinite(logits).all()
                and torch.allclose(logits.logsumexp(-1), torch.zeros(x.shape[0]), atol=1e-4),
                "cluster-logits", f"got {getattr(logits, 'shape', logits)}")
        if n_facets > 1:
            ks = list(getattr(model, "clusters_per_facet", []))
            require(len(ks) == n_facets and ks[0] == n_clusters
                    and variant.facet_logits is not None, "facets")
            for j, k in enumerate(ks, 1):
                lj = variant.facet_logits(model, guide, x, j)
                require(isinstance(lj, torch.Tensor) and lj.shape == (x.shape[0], k)
                        and torch.isfinite(lj).all()
                        and torch.allclose(lj.logsumexp(-1), torch.zeros(x.shape[0]), atol=1e-4)
                        and (j > 1 or torch.equal(lj, logits)), "facets", f"facet {j}")
        emb = guide.embed(x) if hasattr(guide, "embed") else None
        require(isinstance(emb, torch.Tensor) and emb.dim() == 2 and emb.shape[0] == x.shape[0],
                "embed")
        for cluster in (None, 0, n_clusters - 1):
            gen = model.generate(2, cluster) if hasattr(model, "generate") else None
            require(isinstance(gen, torch.Tensor) and tuple(gen.shape) == (2, *image_shape),
                    "generate", f"cluster={cluster}: got {getattr(gen, 'shape', gen)}")

    # Save/load: a fresh build (other random weights) loaded with the state predicts the same.
    model2, guide2 = build(1)
    try:
        model2.load_state_dict(model.state_dict())
        guide2.load_state_dict(guide.state_dict())
    except RuntimeError as exc:
        raise ConformanceError(name, "state-dict", str(exc).splitlines()[0]) from exc
    with torch.no_grad():
        require(torch.equal(variant.cluster_logits(model2, guide2, x), logits), "state-dict")

    if variant.pretrain_loss is not None:
        pre = variant.pretrain_loss(model, guide, x)
        require(isinstance(pre, torch.Tensor) and pre.dim() == 0 and torch.isfinite(pre)
                and pre.requires_grad, "pretrain-loss")
    if variant.initialize is not None:
        info = variant.initialize(model, guide, x, cfg, 0)
        require(isinstance(info, dict) and all(isinstance(v, float) for v in info.values()),
                "initialize", f"got {info!r}")
        if variant.byte_storage:
            _check_stored_bytes(variant, cfg, build, x, require)
    if variant.e_step is not None:
        _check_e_step(variant, model, guide, x, params, require)

    hooks = [h for h in (variant.on_epoch, variant.on_pretrain_epoch) if h is not None]
    for hook in hooks:
        n = cfg.epochs or 1
        before = {k: v.detach().clone() for k, v in params.items()}

        def fingerprint(epoch: int) -> list[torch.Tensor]:
            hook(model, guide, epoch, n)  # noqa: B023  (called within this iteration)
            loss = _loss(variant, model, guide, x, seed=5)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            return [loss.detach()] + [g for g in grads if g is not None]

        try:
            first = fingerprint(0)
            fingerprint(max(n - 1, 3))
            again = fingerprint(0)
        except Exception as exc:
            raise ConformanceError(name, "on-epoch", f"the ELBO failed after it: {exc}") from exc
        changed = [k for k, v in params.items() if not torch.equal(v, before[k])]
        require(not changed, "on-epoch", f"changed: {', '.join(changed)}")
        require(len(first) == len(again)
                and all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "on-epoch",
                "epoch 0 gave another loss or gradient after a later epoch")


def _check_e_step(variant: Variant, model: PyroModule, guide: PyroModule, x: torch.Tensor,
                  params: dict[str, torch.Tensor], require: Any) -> None:
    """Run the E-step twice from the same latent state and RNG seed: same result, no
    parameter moved (the trainer's optimizer owns them), a finite loss afterwards."""
    assert variant.e_step is not None
    index = torch.arange(0, x.shape[0], 2)
    before = {k: v.detach().clone() for k, v in params.items()}
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, guide)]

    def run() -> list[torch.Tensor]:
        for m, state in zip((model, guide), saved, strict=True):
            m.load_state_dict(state)
        pyro.set_rng_seed(3)
        variant.e_step(model, guide, x[index], index)  # type: ignore[misc]
        return [v.clone() for m in (model, guide) for v in m.state_dict().values()]

    try:
        first, again = run(), run()
        loss = _loss(variant, model, guide, x)
    except Exception as exc:
        raise ConformanceError(variant.name, "e-step", f"it failed: {exc}") from exc
    changed = [k for k, v in params.items() if not torch.equal(v, before[k])]
    require(not changed, "e-step", f"changed: {', '.join(changed)}")
    require(all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "e-step",
            "two runs from the same state and seed differ")
    require(torch.isfinite(loss), "e-step", f"loss {loss.item()} after it")


def _check_stored_bytes(variant: Variant, cfg: FitConfig, build: Any, x: torch.Tensor,
                        require: Any) -> None:
    """Two same-seed builds initialised on ``x`` rounded to bytes and on those bytes' floats
    must agree: the returned info and the cluster assignments."""
    stored = (unit(x).clamp(0, 1) * 255).round().to(torch.uint8)
    results = []
    for data in (stored, unit(stored)):
        model, guide = build(1)
        try:
            info = variant.initialize(model, guide, data, cfg, 0)
        except (RuntimeError, TypeError) as exc:
            raise ConformanceError(variant.name, "stored-bytes", str(exc).splitlines()[0]) from exc
        with torch.no_grad():
            results.append((info, variant.cluster_logits(model, guide, unit(stored))))
    (info_b, logits_b), (info_f, logits_f) = results
    require(info_b == info_f and torch.equal(logits_b, logits_f), "stored-bytes",
            "initialize gave other results on the bytes than on their floats")


def check_registry() -> None:
    """Check every registered variant."""
    from .registry import all_variants

    for variant in all_variants().values():
        check_variant(variant)


__all__ = ["RULES", "ConformanceError", "check_registry", "check_variant"]
