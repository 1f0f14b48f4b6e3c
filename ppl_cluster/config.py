"""The fit configuration: validated once, then passed down unchanged."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .settings import check, setting

# Settings removed after they lost on every data set measured (docs/ keeps their figures),
# with the value that meant today's behaviour: an old run that kept it still loads.
REMOVED = {"views": 1, "kl_warmup": 0, "pretrain_objective": "ae"}
# How a run is computed, not what it computes: these may change when a run is resumed.
EXECUTION = ("device", "compile")
SEED_MAX = 2**32 - 1  # numpy's seeds: restart r uses seed + r, so that must stay below too


def check_seed(value: int) -> int:
    """``value`` if it is a seed numpy and torch both take, else ConfigError."""
    if not 0 <= value <= SEED_MAX:
        raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {value}", setting="seed")
    return value


def check_device(name: str) -> str:
    """``name`` if it names a device ppl-cluster runs on, else ConfigError."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}",
                          setting="device")
    return name


def is_vectors(shape: tuple[int, ...]) -> bool:
    """Whether data of (C, H, W) ``shape`` are feature vectors (1 x 1 x D), not images."""
    return tuple(shape[:2]) == (1, 1)


def data_defaults(shape: tuple[int, ...] | None) -> dict[str, Any]:
    """The settings that follow the kind of data, (C, H, W) ``shape`` (None: images): feature
    vectors (1 x 1 x D) get a Gaussian likelihood on standardised features, images a Bernoulli
    one on their [0, 1] pixels."""
    vectors = shape is not None and is_vectors(shape)
    return {"likelihood": "gaussian" if vectors else "bernoulli", "standardize": vectors}


@dataclass
class FitConfig:
    """The settings every variant shares. ``None`` means "the variant's value for this data
    set" (its ``defaults``, or a ``preset`` it keeps); a variant's own settings are kept in ``extra``
    (validated by its ``Settings`` dataclass)."""

    model: str = "vade"
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    split: str = "all"
    n_clusters: int = setting(10, "number of clusters K", minimum=2)
    preset: str | None = setting(None, "a recipe the model keeps under this name, tuned on one "
                                 "data set (its presets; default none: the generic defaults)",
                                 group="preset")
    latent_dim: int | None = setting(None, "size of the latent z", minimum=1)
    arch: str | None = setting(None, "network family", choices=("mlp", "conv"))
    hidden: list[int] | None = setting(None, "encoder widths (MLP) or channels (conv), e.g. "
                                       "500,500,2000", minimum=1)
    likelihood: str | None = setting(None, "p(x | z): pixels in [0, 1] or real values (default: "
                                     "gaussian for feature vectors, bernoulli for images)",
                                     choices=("bernoulli", "gaussian"))
    standardize: bool | None = setting(None, "standardise each feature with the training data's "
                                       "mean and sd, kept in the run and applied to new data "
                                       "(default: on for feature vectors)")
    epochs: int | None = setting(None, "SVI epochs", minimum=1)
    pretrain_epochs: int | None = setting(None, "autoencoder pretraining epochs", minimum=0,
                                          group="pretrain")
    batch_size: int | None = setting(None, "images per SVI step", minimum=1)
    lr: float | None = setting(None, "Adam learning rate of SVI", above=0, maximum=1)
    pretrain_lr: float | None = setting(None, "Adam learning rate of the pretraining", above=0, maximum=1,
                                        group="pretrain")
    pretrain_augment: bool | None = setting(None, "pretrain on randomly rotated, shifted and "
                                            "zoomed images", group="pretrain")
    lr_decay: float | None = setting(None, "multiply the SVI learning rate by this every "
                                     "--lr-step epochs", above=0, maximum=1)
    lr_step: int | None = setting(None, "epochs between learning-rate decays", minimum=1)
    init: str | None = setting(None, "mixture initialisation: a GMM fitted on the embeddings "
                               "(published), on their k-NN graph's spectral embedding, or on "
                               "their 2-D t-SNE map", choices=("gmm", "spectral", "tsne"),
                               group="init")
    init_neighbors: int | None = setting(None, "k-NN graph size (--init spectral) or perplexity "
                                         "(--init tsne)", minimum=1, group="init")
    gmm_inits: int | None = setting(None, "GMM fits at initialisation (best kept)", minimum=1,
                                    group="init")
    init_subsample: int | None = setting(None, "fit the initialisation's map and mixture on a "
                                         "seeded subsample of this many embeddings and assign "
                                         "the rest (default 10000)", minimum=100, group="init")
    gmm_covariance: str | None = setting(None, "covariance fitted at initialisation",
                                         choices=("diag", "full"), group="init")
    restarts: int | None = setting(None, "seeds to train; the best ELBO is kept", minimum=1)
    compile: str = setting("auto", "trace each training step through Pyro once and compile it "
                           "(one static graph per batch shape); auto: where Pyro's overhead bounds the step "
                           "and the phase is long enough to repay it",
                           choices=("auto", "on", "off"))
    device: str = "auto"
    seed: int = setting(0, "random seed (restarts use seed, seed + 1, ...)", minimum=0,
                       maximum=SEED_MAX)
    extra: dict[str, Any] = field(default_factory=dict)  # the variant's own settings
    data_options: dict[str, Any] = field(default_factory=dict)  # the dataset's own options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        """A saved configuration (config.json, a checkpoint's), as the run it describes."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        extra = dict(d.get("extra", {}))
        for key, same in REMOVED.items():
            if key in extra and extra.pop(key) != same:
                raise ConfigError(f"this run used {key}={d['extra'][key]!r}, an option since "
                                  "removed (docs/ keeps its figures)", setting=key)
        cfg = cls(**{**d, "extra": extra})
        from .registry import absent

        for key, value in absent(cfg.model).items():  # the run predates the setting:
            if key not in names:  # an own setting, missing from the saved ones
                if extra:
                    cfg.extra.setdefault(key, value)
            elif getattr(cfg, key) is None:  # what it ran without
                setattr(cfg, key, value)
        return cfg

    def resolved(self, defaults: dict[str, Any]) -> FitConfig:
        """Fill unset fields from ``defaults`` and validate."""
        cfg = dataclasses.replace(self, extra=dict(self.extra))
        for key, value in defaults.items():
            if not hasattr(cfg, key):
                raise ConfigError(f"{key} is not a setting", setting=key)
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.restarts is None:
            cfg.restarts = 1
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check(self)
        if self.standardize and self.likelihood == "bernoulli":
            raise ConfigError("standardized values are not in [0, 1]: use likelihood gaussian "
                              "with standardize", setting="standardize")
        if self.restarts is not None and self.seed + self.restarts - 1 > SEED_MAX:
            raise ConfigError(f"seed must be <= {SEED_MAX - self.restarts + 1} with {self.restarts} "
                              f"restarts (they use seed ... seed + {self.restarts - 1}), got "
                              f"{self.seed}", setting="seed")
        check_device(self.device)
