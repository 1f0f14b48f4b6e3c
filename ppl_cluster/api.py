"""``Clusterer``: the scikit-learn-style face of every registered variant."""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from . import checkpoint, distributed, rundir, usage
from .config import FitConfig
from .data import as_images, check_unit_interval, chunks, unit
from .errors import ConfigError, DataError
from .registry import DEFAULT, get_variant
from .train import (
    Fitted,
    Trainer,
    cluster_probs,
    elbo_per_point,
    facet_usage,
    from_state,
    resolve_device,
    standardized,
    standardizer,
)


def _has_density(fitted: Fitted, x: torch.Tensor) -> bool:
    """Whether every latent the guide draws on ``x`` has a density (not a point mass such as
    CGM's persistent chains), so that importance weights and a per-point ELBO exist."""
    import pyro.distributions as pdist
    from pyro import poutine

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        trace = poutine.trace(fitted.guide).get_trace(x)
    return not any(s["type"] == "sample" and isinstance(s["fn"], pdist.Delta)
                   for s in trace.nodes.values())


class Clusterer:
    """Fit a deep generative clustering model and use it.

    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().images / 16.0
    >>> clu = Clusterer(n_clusters=10, dataset="digits").fit(X)   # doctest: +SKIP
    >>> clu.predict(X[:5]), clu.sample(4, cluster=0).shape                # doctest: +SKIP

    ``dataset`` only names the data in the run's configuration: the defaults follow the data
    themselves, and ``preset="NAME"`` applies a recipe the variant keeps. Any
    :class:`~ppl_cluster.config.FitConfig` field can be passed as a keyword, and so can a
    variant's own settings (those named in its registry defaults, kept in ``config.extra``),
    e.g. ``Clusterer(NAME, 10, facets=2, clusters_per_facet=[10, 8])`` for a multi-facet variant.

    Multi-facet variants number their facets 1..J: ``predict``,
    ``predict_proba``, ``sample`` and ``embed`` take ``facet=j`` and default to facet 1 (the
    facet whose K is ``n_clusters``); single-facet variants accept only ``facet`` None or 1.
    """

    def __init__(self, model: str = DEFAULT, n_clusters: int = 10, *, dataset: str = "custom",
                 progress: bool = False, **settings: Any) -> None:
        variant = get_variant(model)
        fields = {f.name for f in dataclasses.fields(FitConfig)}
        own = {k: settings.pop(k) for k in list(settings)
               if k not in fields and k in variant.defaults_for()}
        if own:
            settings["extra"] = {**settings.get("extra", {}), **own}
        try:
            self.config = FitConfig(model=model, n_clusters=n_clusters, dataset=dataset, **settings)
        except TypeError as exc:  # a keyword no setting has
            name = str(exc).rsplit(" ", 1)[-1].strip("'")
            raise ConfigError(f"{name} is not a setting of {model}", setting=name) from None
        variant.check_applies(self.config)
        self.resolved_config()  # every setting checked now, not at fit()
        self.progress = progress
        self.fitted: Fitted | None = None
        self.restarts_: list[dict[str, float]] = []

    @classmethod
    def from_config(cls, cfg: FitConfig, progress: bool = False) -> Clusterer:
        """A Clusterer for a whole configuration, such as a run's ``config.json`` (validated;
        settings of groups the variant does not use are ignored, as old runs may hold them)."""
        clu = cls.__new__(cls)
        clu.config, clu.progress, clu.fitted, clu.restarts_ = cfg, progress, None, []
        clu.resolved_config()
        return clu

    # -- training -------------------------------------------------------------------------
    def resolved_config(self, data: tuple[int, tuple[int, ...]] | None = None,
                        x: torch.Tensor | None = None) -> FitConfig:
        """The configuration with every unset setting filled, for ``data`` = (N, (C, H, W)) or
        the data ``x`` when given (:meth:`~ppl_cluster.variant.Variant.resolve`), validated."""
        return get_variant(self.config.model).resolve(self.config, data=data, x=x)

    def fit(self, X: np.ndarray | torch.Tensor, *, run_dir: str | None = None,
            resume: bool = False) -> Clusterer:
        """Train ``restarts`` seeds and keep the one with the best ELBO among those that did not
        collapse (:func:`ppl_cluster.usage.choose`; labels never used).

        With ``run_dir`` every seed checkpoints each epoch there, and ``resume=True``
        continues from those checkpoints.
        """
        x = self._tensor(X, None)
        cfg = self.resolved_config(x=x)
        if cfg.n_clusters > x.shape[0]:
            raise ConfigError(f"n-clusters ({cfg.n_clusters}) exceeds the number of samples ({x.shape[0]})")
        check_unit_interval(x, cfg.likelihood)
        x = x.to(resolve_device(cfg.device))
        if bool((x == x[:1]).all()):
            raise DataError(f"all {x.shape[0]} data points are identical: nothing to cluster")
        info = {"standardize": standardizer(x)} if cfg.standardize else {}
        if info:
            x = standardized(x, info["standardize"])
        # One writer per run directory (re-entrant: the CLI already holds it).
        with rundir.locked(run_dir) if run_dir is not None and distributed.is_main() else nullcontext():
            return self._fit(x, cfg, info, run_dir, resume)

    def _fit(self, x: torch.Tensor, cfg: FitConfig, info: dict[str, Any], run_dir: str | None,
             resume: bool) -> Clusterer:
        results = []
        for r in range(cfg.restarts):
            path = None
            if run_dir is not None:
                path = os.path.join(run_dir, "checkpoint.pt" if cfg.restarts == 1
                                    else os.path.join("restarts", f"seed{cfg.seed + r}.pt"))
            desc = f"{cfg.model} seed {cfg.seed + r}"
            fitted = Trainer(cfg, x, seed=cfg.seed + r, checkpoint_path=path,
                             progress=self.progress, desc=desc, info=info).run(resume=resume)
            results.append((elbo_per_point(fitted, x), path, fitted, facet_usage(fitted, x)))
        # The best ELBO among the runs that did not collapse (usage.choose).
        best = usage.choose([r[0] for r in results], [r[3] for r in results])
        self.restarts_ = [{"seed": f.info["seed"], "elbo": e, "chosen": i == best,
                           "collapsed": usage.any_collapsed(u), "used": usage.line(u)}
                          for i, (e, _, f, u) in enumerate(results)]
        self.fitted = results[best][2]
        self.fitted.info["restarts"] = self.restarts_
        # Under torchrun only rank 0 writes checkpoints, so only it has the best one to copy.
        if run_dir is not None and cfg.restarts > 1 and distributed.is_main():
            with open(results[best][1], "rb") as fh:
                checkpoint.atomic_write_bytes(os.path.join(run_dir, "checkpoint.pt"), fh.read())
        return self

    # -- using a fitted model -------------------------------------------------------------
    def _require(self) -> Fitted:
        if self.fitted is None:
            raise ConfigError("this Clusterer is not fitted yet: call fit() or Clusterer.load()")
        return self.fitted

    def _tensor(self, X: np.ndarray | torch.Tensor, cfg: FitConfig | None) -> torch.Tensor:
        x = as_images(X, unit_interval=False)
        if self.fitted is not None and tuple(x.shape[1:]) != self.fitted.image_shape:
            raise DataError(f"data of shape {tuple(x.shape[1:])} given to a model fitted on "
                            f"{self.fitted.image_shape}")
        if cfg is not None:
            check_unit_interval(x, cfg.likelihood)
        return x

    def _input(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``X`` as the fitted model sees it: checked, on its device, standardised if it was."""
        fitted = self._require()
        return fitted.inputs(self._tensor(X, fitted.cfg).to(fitted.device))

    def _facet(self, facet: int | None) -> int | None:
        """``facet`` checked against the model (None: the default facet)."""
        if facet is None:
            return None
        n = self.n_facets
        if isinstance(facet, bool) or not isinstance(facet, int | np.integer) or not 1 <= facet <= n:
            raise ConfigError(f"facet must be in 1..{n} (this {self._require().cfg.model} model "
                              f"has {n} facet{'s' if n > 1 else ''}), got {facet!r}")
        return int(facet)

    def predict_proba(self, X: np.ndarray | torch.Tensor, facet: int | None = None) -> np.ndarray:
        """Cluster probabilities p(c | x) (of facet ``facet``, default 1), shape (N, K), rows
        summing to one."""
        return cluster_probs(self._require(), self._input(X),
                             facet=self._facet(facet)).cpu().numpy()

    def usage(self, X: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
        """Each facet's cluster usage on ``X`` (:func:`ppl_cluster.usage.usage`): clusters used
        by >= 1 % of the points, effective number, confident share, and whether it collapsed."""
        return facet_usage(self._require(), self._input(X), size=None)

    def predict(self, X: np.ndarray | torch.Tensor, facet: int | None = None) -> np.ndarray:
        """Most probable cluster of each image (of facet ``facet``, default 1)."""
        return self.predict_proba(X, facet).argmax(1)

    def predict_frame(self, X: np.ndarray | torch.Tensor, *, proba: bool = False,
                      embed: bool = False, elbo: bool = True, num_samples: int = 8) -> Any:
        """One row per data point as a pandas DataFrame: ``cluster`` and its ``probability``
        (multi-facet: ``cluster_j``/``probability_j`` for every facet j), with ``proba`` every
        cluster's probability (``p_k``, multi-facet ``p{j}_{k}``), ``elbo`` per point (mean
        log importance weight over ``num_samples`` guide draws, fixed seed; left out for
        guides without a density), and with ``embed`` the posterior mean of z (``z_d``)."""
        import pandas as pd

        fitted = self._require()
        x = self._input(X)
        multi = self.n_facets > 1
        columns: dict[str, np.ndarray] = {}
        for j in range(1, self.n_facets + 1):
            probs = cluster_probs(fitted, x, facet=j if multi else None).cpu().numpy()
            tag = f"_{j}" if multi else ""
            columns[f"cluster{tag}"] = probs.argmax(1)
            columns[f"probability{tag}"] = probs.max(1)
            if proba:
                columns.update({f"p{j if multi else ''}_{k}": probs[:, k]
                                for k in range(probs.shape[1])})
        if elbo and _has_density(fitted, unit(x[:1])):
            from .diagnostics import importance_samples

            columns["elbo"] = importance_samples(fitted, x, num_samples).elbo()
        if embed:
            from .init import embed_all

            z = embed_all(fitted.guide, x).cpu().numpy()
            columns.update({f"z_{d}": z[:, d] for d in range(z.shape[1])})
        return pd.DataFrame(columns)

    def embed(self, X: np.ndarray | torch.Tensor, facet: int | None = None) -> np.ndarray:
        """Posterior mean of the continuous latent z for each image (multi-facet: all facets'
        latents concatenated, or facet ``facet``'s alone)."""
        fitted = self._require()
        facet = self._facet(facet)
        x = self._input(X)
        if facet is not None and self.n_facets > 1:
            with torch.no_grad():
                return fitted.guide.facet_embeddings(x)[facet - 1].cpu().numpy()
        from .init import embed_all

        return embed_all(fitted.guide, x).cpu().numpy()

    def elbo(self, X: np.ndarray | torch.Tensor) -> float:
        """ELBO per data point in nats."""
        return elbo_per_point(self._require(), self._input(X))

    def sample(self, n: int, cluster: int | None = None, facet: int | None = None) -> np.ndarray:
        """``n`` generated images (likelihood means) from the prior or from one cluster (of facet
        ``facet``, default 1; the other facets drawn from their priors)."""
        fitted = self._require()
        facet = self._facet(facet)
        k = self.clusters_per_facet[(facet or 1) - 1]
        if cluster is not None and not 0 <= cluster < k:
            raise ConfigError(f"cluster must be in [0, {k}), got {cluster}")
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        with torch.no_grad():
            if facet is not None and self.n_facets > 1:
                return fitted.outputs(fitted.model.generate(n, cluster, facet=facet)).cpu().numpy()
            return fitted.outputs(fitted.model.generate(n, cluster)).cpu().numpy()

    def _require_facets(self, facet: int | None) -> int:
        if self.n_facets < 2:
            raise ConfigError(f"this {self._require().cfg.model} model has a single facet; "
                              "facet grids and composition need a multi-facet model")
        return self._facet(facet) or 1

    def sample_facet(self, n: int, facet: int | None = None) -> np.ndarray:
        """Images (n, K_j, C, H, W): column k draws facet j's latent from its cluster k, and all
        of row i share the other facets' latents (drawn once per row from their priors)."""
        j = self._require_facets(facet)
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        model = self._require().model
        k = self.clusters_per_facet[j - 1]
        with torch.no_grad():
            others = model.sample_latents(n)
            zj = torch.stack([model.facet(j).sample(n, c) for c in range(k)], 1)  # (n, K, D)
            zs = [zj if i == j else z.unsqueeze(1).expand(n, k, z.shape[-1])
                  for i, z in enumerate(others, 1)]
            return self._require().outputs(model.decode_mean(zs)).cpu().numpy()

    def compose(self, X: np.ndarray | torch.Tensor, X_facet: np.ndarray | torch.Tensor,
                facet: int | None = None) -> np.ndarray:
        """Swap facet ``facet``'s latent between images: (len(X), len(X_facet), C, H, W), cell
        (r, c) decoded from image r's posterior means with facet j's taken from X_facet[c]."""
        j = self._require_facets(facet)
        fitted = self._require()
        with torch.no_grad():
            rows = fitted.guide.facet_means(unit(self._input(X)))
            cols = fitted.guide.facet_means(unit(self._input(X_facet)))
            r, c = rows[0].shape[0], cols[0].shape[0]
            zs = [(cz.unsqueeze(0).expand(r, c, -1) if i == j else rz.unsqueeze(1).expand(r, c, -1))
                  for i, (rz, cz) in enumerate(zip(rows, cols, strict=True), 1)]
            return fitted.outputs(fitted.model.decode_mean(zs)).cpu().numpy()

    def segment(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-pixel label probabilities p(l_p | x), shape (N, L, H, W), for per-pixel
        variants."""
        fitted = self._require_segments()
        segment_logits = fitted.variant.segment_logits
        assert segment_logits is not None
        x = self._input(X)
        with torch.no_grad():
            out = [segment_logits(fitted.model, fitted.guide, xb).exp() for xb in chunks(x, 2048)]
        return torch.cat(out).cpu().numpy()

    def _require_segments(self) -> Fitted:
        fitted = self._require()
        if fitted.variant.segment_logits is None:
            raise ConfigError(f"model {fitted.cfg.model} has no per-pixel labels to segment "
                              "with (that needs a per-pixel variant)")
        return fitted

    @property
    def n_clusters(self) -> int:
        return self._require().model.n_clusters

    @property
    def n_facets(self) -> int:
        """Number of facets (clusterings) of the model: 1 for single-facet variants."""
        return int(getattr(self._require().model, "n_facets", 1))

    @property
    def clusters_per_facet(self) -> list[int]:
        """K of every facet, facet 1 first (``[n_clusters]`` for single-facet variants)."""
        model = self._require().model
        return list(getattr(model, "clusters_per_facet", [model.n_clusters]))

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the fitted model to one file (atomically)."""
        checkpoint.save(path, self._require().state())

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> Clusterer:
        where = resolve_device(device)  # a bad name is named as such, not as a bad file
        state = checkpoint.load(path, map_location=device)
        fitted = from_state(state, where)
        clu = cls.__new__(cls)
        clu.config = fitted.cfg
        clu.progress = False
        clu.fitted = fitted
        clu.restarts_ = fitted.info.get("restarts", [])
        return clu
