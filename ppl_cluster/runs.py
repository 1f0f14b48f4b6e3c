"""A fit as a run directory: one writer (the lock), ``--overwrite`` that never mixes two runs,
config.json before training, checkpoints during it, scores, grids and the manifest after."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import report, rundir
from .config import EXECUTION, FitConfig
from .errors import ConfigError, RunDirError
from .registry import get_variant

if TYPE_CHECKING:
    from .distributed import Launch

Checked = tuple[FitConfig, str, bool]  # (configuration as given, run directory, resuming)


def check_run(cfg: FitConfig, own: dict[str, Any], given: list[str], out: str | None, *,
              resume: bool, overwrite: bool) -> Checked:
    """``cfg`` checked against its run directory ``out`` (default runs/MODEL-DATA-seedS).
    On ``resume`` the saved configuration is returned, with the execution settings (device,
    compile) among ``given`` taken from ``cfg``; any other setting in ``given`` or ``own`` (the
    variant's) that differs from the saved one raises ConfigError."""
    if out is not None and not out.strip():
        raise ConfigError("out must name a directory, got an empty string", setting="out")
    data_name = cfg.dataset
    if cfg.dataset == "file" and cfg.data_root:
        data_name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data_root)))[0]
    out = out or os.path.join("runs", f"{cfg.model}-{data_name}-seed{cfg.seed}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirError(f"{out} exists and is not a directory")
    exists = not rundir.is_empty(out)
    if not resume:
        if exists and not overwrite:
            raise RunDirError(f"{out} is not empty: pass --resume to continue it or --overwrite "
                              "to replace it")
        get_variant(cfg.model).check_applies(cfg)
        return cfg, out, False
    if not exists:
        raise RunDirError(f"nothing to resume in {out}")
    saved = report.read_config(out)
    pairs = [(k, getattr(cfg, k), getattr(saved, k)) for k in given if k not in EXECUTION]
    pairs += [(k, v, saved.extra.get(k)) for k, v in own.items()]
    for key, value, old in pairs:
        if old != value:
            raise ConfigError(f"{key} {value} differs from the run in {out} ({old})", setting=key)
    for key in given:
        if key in EXECUTION:
            setattr(saved, key, getattr(cfg, key))
    return saved, out, True


def fit_run(check: Callable[[], Checked], *, overwrite: bool, launch: Launch | None,
            progress: bool) -> str:
    """Train what ``check()`` names into its run directory; returns the summary (empty on
    ranks other than 0). ``check`` runs again under the lock: another writer may have filled
    or finished the run meanwhile."""
    if launch is not None and launch.rank != 0:  # rank 0 alone writes, and locks
        return _train(*check(), launch, progress)
    with rundir.locked(check()[1]):  # every check made once before the lock is taken
        given, out, resume = check()
        if overwrite and not resume and not rundir.is_empty(out):
            rundir.set_aside(out)
        try:
            return _train(given, out, resume, launch, progress)
        finally:
            rundir.settle(out)  # the new run once it has a checkpoint, else the old one


def _train(given: FitConfig, out: str, resume: bool, launch: Launch | None,
           progress: bool) -> str:
    from . import distributed
    from .api import Clusterer

    variant = get_variant(given.model)
    cfg = variant.resolve(given)  # before anything is written or loaded
    device, ds, is_main = distributed.load_data(cfg, launch)
    cfg = variant.resolve(given, x=ds.x)  # the defaults for these data
    if cfg.n_clusters > len(ds):
        raise ConfigError(f"n-clusters ({cfg.n_clusters}) exceeds the number of samples ({len(ds)})")
    if launch is not None:  # checked here too, before anything is written
        distributed.check_batch(cfg.batch_size, len(ds), launch.world_size)
    if resume:
        report.check_source(out, ds, resuming=True)
    if is_main:
        os.makedirs(out, exist_ok=True)
        report.write_json(os.path.join(out, "config.json"), cfg.to_dict())
        if ds.source is not None:
            report.write_json(os.path.join(out, report.SOURCE), ds.source)
    clu = Clusterer.from_config(cfg, progress=progress)
    t0 = time.perf_counter()
    # Only rank 0 gets the run directory: it alone reads and writes checkpoints (the Trainer
    # hands the resumed state to the other ranks).
    clu.fit(ds.x, run_dir=out if is_main else None, resume=resume)
    wall = time.perf_counter() - t0
    if not is_main:
        return ""
    where = str(device) + (f" x {launch.world_size} processes" if launch is not None else "")
    extra: dict[str, Any] = {"world_size": launch.world_size} if launch is not None else {}
    if ds.source is not None:
        extra["data"] = ds.source
    metrics = report.write_run(out, clu, ds, cfg, device=str(device), wall=wall, **extra)
    rundir.record(out, *run_files(out))
    return (f"{cfg.model} on {cfg.dataset} ({len(ds)} images, {metrics['seconds']:.0f} s, "
            f"{where}): {report.summary(metrics)}\nrun saved in {out}")


def run_files(out: str) -> list[str]:
    """The files of the run in ``out`` (not the hidden lock, temp and set-aside files)."""
    found = []
    for root, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names
                  if not n.startswith(".") and n != rundir.MANIFEST]
    return sorted(found)
