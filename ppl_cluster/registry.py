"""The variant registry: names to :class:`~ppl_cluster.variant.Variant` objects, as data.

Built-in variants are listed here; variants from other packages are found through the
``ppl_cluster.variants`` entry-point group (``name = "package.module:VariantClass"``) or
registered by code already imported (:func:`register`, usable as a class decorator). Nothing is
imported because a checkpoint names it: only installed entry points are loaded.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

from .errors import ConfigError
from .variant import Variant

# name -> "module:class" of the built-in variants (imported on first use).
BUILTIN = {
    "vade": "ppl_cluster.models.vade:VaDE",
    "vc": "ppl_cluster.models.vc:VariationalClustering",
    "vade-t": "ppl_cluster.models.student_mix:VaDEStudent",
    "mfcvae": "ppl_cluster.models.mfcvae:MFCVAE",
    "cgm": "ppl_cluster.models.cgm:CGM",
    "cgm-pixel": "ppl_cluster.models.cgm:CGMPixel",
}
DEFAULT = "vade"  # the model `fit` and `Clusterer` train unless told otherwise
GROUP = "ppl_cluster.variants"
DISTRIBUTION = "ppl-cluster"

REGISTRY: dict[str, Variant] = {}
_discovered = False


def register(variant: type[Variant] | Variant, distribution: str | None = None) -> Any:
    """Register a variant (class or instance) under its ``name``; returns what it was given,
    so that it can decorate a class."""
    obj = variant() if isinstance(variant, type) else variant
    if not isinstance(obj, Variant) or not obj.name:
        raise ConfigError(f"{variant!r} is not a Variant with a name")
    if obj.name in REGISTRY and type(REGISTRY[obj.name]) is not type(obj):
        raise ConfigError(f"variant {obj.name!r} is already registered "
                          f"(by {REGISTRY[obj.name].distribution})")
    obj.distribution = distribution or obj.distribution or type(obj).__module__.split(".")[0]
    REGISTRY[obj.name] = obj
    return variant


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _builtins() -> None:
    for name, target in BUILTIN.items():
        if name not in REGISTRY:
            register(_load(target), DISTRIBUTION)


def absent(name: str) -> dict[str, Any]:
    """The common settings that a saved configuration of variant ``name`` without them
    (written before the variant used them) stands for; {} for a variant not registered."""
    if name in BUILTIN:
        _builtins()
    variant = REGISTRY.get(name)
    return dict(variant.absent) if variant is not None else {}


def discover() -> list[str]:
    """Load the installed plugins (once); returns one line per plugin that failed to load."""
    global _discovered
    _builtins()
    problems: list[str] = []
    if _discovered:
        return problems
    _discovered = True
    for ep in metadata.entry_points(group=GROUP):
        if ep.name in REGISTRY:
            continue
        dist = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        try:
            obj = ep.load()
            register(obj, dist)
        except Exception as exc:  # a broken plugin must not break the others
            problems.append(f"plugin {ep.name!r} from {dist} failed to load: {exc}")
            continue
        if REGISTRY.get(ep.name) is None:
            problems.append(f"plugin entry point {ep.name!r} ({dist}) names a variant called "
                            f"{getattr(obj, 'name', '?')!r}")
    return problems


def get_variant(name: str, distribution: str | None = None) -> Variant:
    """The registered variant ``name`` (built-in, imported or installed); ``distribution``, if
    known (a checkpoint records it), names what to install when it is missing."""
    if name not in REGISTRY:
        discover()  # the built-ins first, then the installed plugins
    try:
        return REGISTRY[name]
    except KeyError:
        where = f" (it came from {distribution}: is that package installed?)" if (
            distribution and distribution != DISTRIBUTION) else ""
        raise ConfigError(f"unknown model {name!r}{where}; registered: "
                          f"{', '.join(sorted(REGISTRY))}") from None


def all_variants() -> dict[str, Variant]:
    discover()
    return dict(sorted(REGISTRY.items()))


def owners(setting: str, besides: str = "") -> list[str]:
    """The registered variants, other than ``besides``, that take ``setting``."""
    return [v.name for v in all_variants().values() if v.name != besides and v.takes(setting)]


_builtins()
