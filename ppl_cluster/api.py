"""``Clusterer``: the scikit-learn-style face of every registered variant."""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import torch

from . import checkpoint, distributed
from .config import FitConfig
from .data import as_images
from .errors import ConfigError, DataError
from .registry import get_variant
from .train import Fitted, Trainer, cluster_probs, elbo_per_point, from_state, resolve_device


class Clusterer:
    """Fit a deep generative clustering model and use it.

    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().images / 16.0
    >>> clu = Clusterer("vade", n_clusters=10, dataset="digits").fit(X)   # doctest: +SKIP
    >>> clu.predict(X[:5]), clu.sample(4, cluster=0).shape                # doctest: +SKIP

    ``dataset`` only selects the variant's default settings for that kind of data; any
    :class:`~ppl_cluster.config.FitConfig` field can be passed as a keyword.
    """

    def __init__(self, model: str = "vade", n_clusters: int = 10, *, dataset: str = "custom",
                 progress: bool = False, **settings: Any) -> None:
        get_variant(model)
        try:
            self.config = FitConfig(model=model, n_clusters=n_clusters, dataset=dataset, **settings)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        self.config.validate()
        self.progress = progress
        self.fitted: Fitted | None = None
        self.restarts_: list[dict[str, float]] = []

    # -- training -------------------------------------------------------------------------
    def resolved_config(self) -> FitConfig:
        return self.config.resolved(get_variant(self.config.model).defaults_for(self.config.dataset))

    def fit(self, X: np.ndarray | torch.Tensor, *, run_dir: str | None = None,
            resume: bool = False) -> Clusterer:
        """Train ``restarts`` seeds and keep the one with the best ELBO (labels never used).

        With ``run_dir`` every seed checkpoints each epoch there, and ``resume=True``
        continues from those checkpoints.
        """
        cfg = self.resolved_config()
        x = self._tensor(X, cfg)
        if cfg.n_clusters > x.shape[0]:
            raise ConfigError(f"n-clusters ({cfg.n_clusters}) exceeds the number of samples ({x.shape[0]})")
        x = x.to(resolve_device(cfg.device))
        results = []
        for r in range(cfg.restarts):
            path = None
            if run_dir is not None:
                path = os.path.join(run_dir, "checkpoint.pt" if cfg.restarts == 1
                                    else os.path.join("restarts", f"seed{cfg.seed + r}.pt"))
            desc = f"{cfg.model} seed {cfg.seed + r}"
            fitted = Trainer(cfg, x, seed=cfg.seed + r, checkpoint_path=path,
                             progress=self.progress, desc=desc).run(resume=resume)
            results.append((elbo_per_point(fitted, x), path, fitted))
        best = max(range(len(results)), key=lambda i: results[i][0])
        self.restarts_ = [{"seed": f.info["seed"], "elbo": e, "chosen": i == best}
                          for i, (e, _, f) in enumerate(results)]
        self.fitted = results[best][2]
        self.fitted.info["restarts"] = self.restarts_
        # Under torchrun only rank 0 writes checkpoints, so only it has the best one to copy.
        if run_dir is not None and cfg.restarts > 1 and distributed.is_main():
            tmp = os.path.join(run_dir, ".checkpoint.pt.copy")
            shutil.copyfile(results[best][1], tmp)
            os.replace(tmp, os.path.join(run_dir, "checkpoint.pt"))
        return self

    # -- using a fitted model -------------------------------------------------------------
    def _require(self) -> Fitted:
        if self.fitted is None:
            raise ConfigError("this Clusterer is not fitted yet: call fit() or Clusterer.load()")
        return self.fitted

    def _tensor(self, X: np.ndarray | torch.Tensor, cfg: FitConfig) -> torch.Tensor:
        x = as_images(X, unit_interval=cfg.likelihood == "bernoulli")
        if self.fitted is not None and tuple(x.shape[1:]) != self.fitted.image_shape:
            raise DataError(f"data of shape {tuple(x.shape[1:])} given to a model fitted on "
                            f"{self.fitted.image_shape}")
        return x

    def _input(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        fitted = self._require()
        return self._tensor(X, fitted.cfg).to(fitted.device)

    def predict_proba(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cluster probabilities p(c | x), shape (N, K), rows summing to one."""
        return cluster_probs(self._require(), self._input(X)).cpu().numpy()

    def predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Most probable cluster of each image."""
        return self.predict_proba(X).argmax(1)

    def embed(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Posterior mean of the continuous latent z for each image."""
        fitted = self._require()
        with torch.no_grad():
            return fitted.guide.embed(self._input(X)).cpu().numpy()

    def elbo(self, X: np.ndarray | torch.Tensor) -> float:
        """ELBO per data point in nats."""
        return elbo_per_point(self._require(), self._input(X))

    def sample(self, n: int, cluster: int | None = None) -> np.ndarray:
        """``n`` generated images (likelihood means) from the prior or from one cluster."""
        fitted = self._require()
        k = fitted.model.n_clusters
        if cluster is not None and not 0 <= cluster < k:
            raise ConfigError(f"cluster must be in [0, {k}), got {cluster}")
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        with torch.no_grad():
            return fitted.model.generate(n, cluster).cpu().numpy()

    @property
    def n_clusters(self) -> int:
        return self._require().model.n_clusters

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the fitted model to one file (atomically)."""
        checkpoint.save(path, self._require().state())

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> Clusterer:
        state = checkpoint.load(path, map_location=device)
        fitted = from_state(state, resolve_device(device))
        clu = cls.__new__(cls)
        clu.config = fitted.cfg
        clu.progress = False
        clu.fitted = fitted
        clu.restarts_ = fitted.info.get("restarts", [])
        return clu
