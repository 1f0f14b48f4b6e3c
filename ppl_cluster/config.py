"""The fit configuration: validated once, then passed down unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class FitConfig:
    """Every setting of a run. ``None`` means "the variant's default for this dataset"."""

    model: str = "vade"
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    split: str = "all"
    n_clusters: int = 10
    latent_dim: int | None = None
    arch: str | None = None  # "mlp" or "conv"
    hidden: list[int] | None = None  # MLP widths (encoder order) or conv channels
    likelihood: str = "bernoulli"
    epochs: int | None = None
    pretrain_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    pretrain_lr: float | None = None
    pretrain_augment: bool | None = None  # random small affine perturbations while pretraining
    lr_decay: float | None = None  # multiply lr by this every lr_step epochs of the main phase
    lr_step: int | None = None
    init: str | None = None  # mixture initialisation: "gmm" (published), "spectral" or "tsne"
    init_neighbors: int | None = None  # k-NN graph size (spectral) or perplexity (tsne)
    gmm_inits: int | None = None
    gmm_covariance: str | None = None  # covariance fitted at initialisation: "diag" or "full"
    restarts: int | None = None  # seeds trained, best ELBO kept; 1 unless a variant says otherwise
    device: str = "auto"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # variant-specific settings
    data_options: dict[str, Any] = field(default_factory=dict)  # the dataset's own options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    def resolved(self, defaults: dict[str, Any]) -> FitConfig:
        """Fill unset fields from ``defaults`` and validate."""
        cfg = dataclasses.replace(self, extra=dict(self.extra))
        for key, value in defaults.items():
            if hasattr(cfg, key):
                if getattr(cfg, key) is None:
                    setattr(cfg, key, value)
            else:
                cfg.extra.setdefault(key, value)
        if cfg.restarts is None:
            cfg.restarts = 1
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive(name: str, minimum: float = 1) -> None:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name.replace('_', '-')} must be >= {minimum}, got {value}")

        if self.n_clusters < 2:
            raise ConfigError(f"n-clusters must be >= 2, got {self.n_clusters}")
        for name in ("epochs", "batch_size", "latent_dim", "restarts", "lr_step", "gmm_inits",
                     "init_neighbors"):
            positive(name)
        positive("pretrain_epochs", 0)
        for name in ("lr", "pretrain_lr", "lr_decay"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name.replace('_', '-')} must be > 0, got {value}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ConfigError(f"likelihood must be bernoulli or gaussian, got {self.likelihood!r}")
        if self.arch is not None and self.arch not in ("mlp", "conv"):
            raise ConfigError(f"arch must be mlp or conv, got {self.arch!r}")
        if self.init is not None and self.init not in ("gmm", "spectral", "tsne"):
            raise ConfigError(f"init must be gmm, spectral or tsne, got {self.init!r}")
        if self.gmm_covariance is not None and self.gmm_covariance not in ("diag", "full"):
            raise ConfigError(f"gmm-covariance must be diag or full, got {self.gmm_covariance!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
