"""The variant contract: what a model/guide pair provides to be trained, used and checked.

A variant is a subclass of :class:`Variant` with a ``name``, a ``build`` that returns the
Pyro ``(model, guide)`` pair, and its own settings declared once as a dataclass (``Settings``,
fields made with :func:`~ppl_cluster.settings.setting`). Optional capabilities are methods found
by name: a class attribute left at ``None`` means "this variant has none".

====================  ============================================================  ==========
hook                  called with / when                                            returns
====================  ============================================================  ==========
pretrain_loss         (model, guide, x_batch), each pretraining step                 loss (sum)
initialize            (model, guide, x, cfg, seed), once, before the first SVI epoch  info dict
on_pretrain_epoch     (model, guide, epoch, n_pretrain_epochs), each pretraining epoch  None
on_epoch              (model, guide, epoch, n_epochs), each SVI epoch (schedules)     None
maintain              (model, guide, x, epoch, n_epochs), each SVI epoch after          record or
                      ``on_epoch`` (data-dependent moves, e.g. a split)              None
e_step                (model, guide, x_batch, index), each SVI batch before its loss  None
facet_logits          (model, guide, x, facet) -> log q(c_j | x), multi-facet models  (N, K_j)
segment_logits        (model, guide, x) -> log p(l_p | x), per-pixel models           (N, L, H, W)
====================  ============================================================  ==========

Defaults follow the data through two overridable methods: ``scaled(n, shape)`` carries the
declared ones over to N points of a shape, ``chosen(cfg, x)`` picks some from the data (as
stored, read through :func:`~ppl_cluster.data.unit`) by a label-free criterion.

``on_epoch``/``on_pretrain_epoch`` must be pure functions of the epoch, and ``maintain`` and
``e_step`` deterministic given the parameters, the data and torch's
global RNG (saved in checkpoints): a resumed run then repeats exactly what an uninterrupted one
did. ``e_step`` must not change parameters (it updates per-image state the guide keeps).

Batches (``x_batch``) and the ``x`` of ``cluster_logits``, ``facet_logits`` and
``segment_logits`` are float32. ``initialize`` and ``maintain`` get the whole training set: as
float32 too, unless the variant sets ``byte_storage``; then pixels that came as uint8 stay uint8
on the device (a quarter of the memory) and the hooks read them through
:func:`ppl_cluster.data.chunks` or :func:`~ppl_cluster.data.unit` per slice (rule
``stored-bytes`` of the conformance check).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample

from . import settings as _settings
from .config import FitConfig, data_defaults
from .errors import ConfigError

# The data scale a variant's ``defaults`` are stated for: (images, values per image), the
# 10,000 MNIST digits; ``Variant.scaled`` carries them over to other data.
REFERENCE = (10_000, 784)
MAX_EPOCH_FACTOR = 10  # tiny data: at most 10x the reference epochs

# The engine builds and runs variants with module-local parameters (so that several models can
# live in one process) without setting it for the whole process. A decorator (each call
# enters it anew), not a `with` statement.
local_params = pyro.settings.context(module_local_params=True)


@dataclasses.dataclass
class NoSettings:
    """A variant without settings of its own."""


def enumerated_cluster_logits(model: PyroModule, guide: PyroModule, x: torch.Tensor,
                              site: str = "c") -> torch.Tensor:
    """log p(c | x) from Pyro's enumeration, the guide's continuous latents at their means.

    Generic (works for any model with an enumerated site ``site``); variants may define a
    faster hand-written ``cluster_logits``, which the tests check against this one.
    """
    trace = poutine.trace(guide).get_trace(x)
    means = {name: s["fn"].mean for name, s in trace.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    conditioned = poutine.condition(model, data=means)
    marginals = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(
        conditioned, lambda *_: None, x)
    return torch.log_softmax(marginals[site].logits, -1)


class Variant:
    """Base class of every variant; see the module docstring for the hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # The variant's own settings: a dataclass whose fields are made with ``setting``.
    Settings: ClassVar[type] = NoSettings
    # Its values of the common settings (FitConfig fields left None), e.g. epochs or lr; and
    # named recipes (overrides of those and of its own settings), applied only when a run's
    # ``preset`` names one, never because of a data set's name.
    defaults: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Groups of common settings it reads: "pretrain" (pretrain_epochs, ...), "init" (the
    # mixture initialisation's init, gmm_inits, ...). Others are refused as flags.
    uses: ClassVar[tuple[str, ...]] = ()
    # Own settings counted in SVI (``epoch_settings``) or pretraining epochs: ``scaled`` carries
    # them over with the epochs, so that a schedule keeps its place in the run.
    epoch_settings: ClassVar[tuple[str, ...]] = ()
    pretrain_epoch_settings: ClassVar[tuple[str, ...]] = ()
    # Settings (common or own) a variant took up after runs were saved without them: the value
    # those runs stand for (e.g. pretrain_epochs 0 for a variant that used to train from scratch).
    absent: ClassVar[dict[str, Any]] = {}
    max_plate_nesting: ClassVar[int] = 1
    # initialize/maintain read uint8 data through data.unit (module docstring): pixels stay bytes.
    byte_storage: ClassVar[bool] = False
    # Set by the registry: the distribution (package) that provides the variant.
    distribution: str = ""

    pretrain_loss: Any = None
    initialize: Any = None
    on_pretrain_epoch: Any = None
    on_epoch: Any = None
    maintain: Any = None
    e_step: Any = None
    facet_logits: Any = None
    segment_logits: Any = None

    def build(self, cfg: FitConfig, image_shape: tuple[int, int, int]
              ) -> tuple[PyroModule, PyroModule]:
        """The (model, guide) pair for the resolved ``cfg`` (own settings: ``self.settings``)."""
        raise NotImplementedError

    def validate(self, cfg: FitConfig, s: Any) -> None:
        """Checks that involve several settings (ConfigError); one setting's type and range
        are checked from its declaration."""

    def check_data(self, cfg: FitConfig, s: Any, shape: tuple[int, ...]) -> None:
        """Refuse data of ``shape`` (C, H, W) that the resolved settings cannot model
        (ConfigError), before anything is trained or written; e.g. a per-pixel variant given
        feature vectors (1, 1, D)."""

    def implied(self, own: dict[str, Any]) -> dict[str, Any]:
        """Common settings implied by the user's own settings (the CLI fills them unless the
        user set them too), e.g. the number of clusters from a per-facet list."""
        return {}

    def cluster_logits(self, model: PyroModule, guide: PyroModule,
                       x: torch.Tensor) -> torch.Tensor:
        """log p(c | x), shape (N, K)."""
        return enumerated_cluster_logits(model, guide, x)

    def scaled(self, n: int, shape: tuple[int, ...]) -> dict[str, Any]:
        """The variant's ``defaults`` (stated for ``REFERENCE``: 10,000 images of 784 values)
        carried over to ``n`` images of ``shape`` (C, H, W): the same number of optimisation
        steps, not of epochs (schedules in ``epoch_settings`` too), batches that leave ~14 steps
        per epoch on small data, MLP widths shrunk with the input, no pose augmentation on
        images smaller than 16 pixels.
        Overridden by variants with scale-dependent settings of their own."""
        base, out = self.defaults, {}
        d = math.prod(shape)
        ref_batch = base.get("batch_size")
        batch = ref_batch
        if ref_batch:
            batch = int(min(ref_batch, max(32, 2 ** round(math.log2(max(n, 1) / 14)))))
            out["batch_size"] = batch
            factor = (REFERENCE[0] // ref_batch) / max(1, n // batch)  # steps per epoch, ratio
            for key in ("epochs", "pretrain_epochs"):
                if base.get(key):
                    out[key] = int(min(MAX_EPOCH_FACTOR * base[key],
                                       max(base[key], round(base[key] * factor))))
            if base.get("epochs") and base.get("lr_step"):
                out["lr_step"] = max(1, round(base["lr_step"] * out["epochs"] / base["epochs"]))
            own = dataclasses.asdict(self.Settings())
            for phase, names in (("epochs", self.epoch_settings),
                                 ("pretrain_epochs", self.pretrain_epoch_settings)):
                for key in names if base.get(phase) else ():
                    out[key] = round(base.get(key, own[key]) * out[phase] / base[phase])
        if base.get("pretrain_augment"):
            out["pretrain_augment"] = min(shape[1:]) >= 16
        shrink = max(0.25, math.sqrt(d / REFERENCE[1]))
        if base.get("hidden") and base.get("arch", "mlp") == "mlp" and shrink < 0.9:
            out["hidden"] = [max(64, 32 * round(w * shrink / 32)) for w in base["hidden"]]
        return out

    def chosen(self, cfg: FitConfig, x: torch.Tensor) -> dict[str, Any]:
        """Defaults chosen from the data ``x`` themselves (label-free) where a fit has them,
        e.g. a covariance by BIC; below what the user sets. ``cfg`` holds the user's
        settings."""
        return {}

    # -- settings, derived from the declarations ------------------------------------------
    def settings(self, cfg: FitConfig) -> Any:
        """The variant's own settings of the resolved ``cfg``, validated."""
        return _settings.build(self.Settings, cfg.extra, f"model {self.name}")

    def defaults_for(self, preset: str | None = None,
                     data: tuple[int, tuple[int, ...]] | None = None) -> dict[str, Any]:
        """Every setting's value unless the user sets it, own and common: those that follow
        the kind of data (:func:`~ppl_cluster.config.data_defaults`), the declared defaults
        carried over to ``data`` = (N, (C, H, W)) when given (:meth:`scaled`), then the recipe
        kept as ``presets[preset]`` when ``preset`` is given."""
        if preset is not None and preset not in self.presets:
            kept = ", ".join(self.presets) or "none"
            raise ConfigError(f"preset {preset!r} is not one of model {self.name}'s (its "
                              f"presets: {kept})", setting="preset")
        own = dataclasses.asdict(self.Settings())
        fitted = self.scaled(*data) if data is not None else {}
        kind = data_defaults(data[1] if data is not None else None)
        recipe = self.presets[preset] if preset is not None else {}
        return {**own, **kind, **self.defaults, **fitted, **recipe}

    def resolve(self, cfg: FitConfig, data: tuple[int, tuple[int, ...]] | None = None,
                x: torch.Tensor | None = None) -> FitConfig:
        """``cfg`` with the unset common settings and the own settings filled for its data
        (``data`` = (N, (C, H, W)), or the data ``x`` themselves, which add :meth:`chosen`;
        without either, at the ``REFERENCE`` scale) and its ``preset``, all validated
        (ConfigError naming the setting)."""
        if x is not None:
            data = (x.shape[0], tuple(x.shape[1:]))
        values = self.defaults_for(cfg.preset, data)
        if x is not None:
            values.update(self.chosen(cfg, x))
        own_names = {f.name for f in dataclasses.fields(self.Settings)}
        common = {k: v for k, v in values.items() if k not in own_names}
        own = {k: v for k, v in values.items() if k in own_names}
        if cfg.standardize is None and cfg.likelihood == "bernoulli":
            common["standardize"] = False  # the vector default yields to a chosen Bernoulli
        cfg = cfg.resolved(common)
        s = _settings.build(self.Settings, {**own, **cfg.extra}, f"model {self.name}")
        if data is not None:
            self.check_data(cfg, s, tuple(data[1]))
        self.validate(cfg, s)
        cfg.extra = dataclasses.asdict(s)
        return cfg

    def takes(self, name: str) -> bool:
        """Whether ``name`` is a setting of this variant: its own, or a common one that belongs
        to no group or to a group it ``uses`` (``preset``: when it keeps presets)."""
        if name in _settings.declared(self.Settings):
            return True
        f = _settings.declared(FitConfig).get(name)
        group = f.metadata["group"] if f is not None else None
        return f is not None and (not group or group in self.uses
                                  or (group == "preset" and bool(self.presets)))

    def check_applies(self, cfg: FitConfig) -> None:
        """A common setting of a group the variant does not use, set in ``cfg``, is refused."""
        for name in _settings.declared(FitConfig):
            if getattr(cfg, name) is not None and not self.takes(name):
                raise ConfigError(f"{name} does not apply to model {self.name}", setting=name)
