"""The one training loop: optional pretraining, initialisation, then SVI epochs.

The ELBO is built as a module (``TraceEnum_ELBO(...)(model, guide)``) and optimised with torch
Adam. Data stay on the device as one tensor; batches are indexed through a permutation; losses
are accumulated on the device and read once per epoch. A checkpoint is written atomically after
every epoch, so a killed run resumes exactly.

When a ``torch.distributed`` process group is initialised (``torchrun``; see
:mod:`ppl_cluster.distributed`) the same loop trains data-parallel: each rank takes its shard of
every global batch and DistributedDataParallel averages the gradients. Without one, nothing
changes: the single-process path draws the same random numbers as before.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from tqdm.auto import tqdm

from . import checkpoint, distributed, usage
from .compiled import CompiledStep, reason_not_to
from .config import EXECUTION, FitConfig, check_device
from .data import chunks, random_affine, unit
from .errors import CheckpointError, ConfigError, DivergedError
from .registry import get_variant
from .variant import Variant, local_params


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)  # seeds torch (CPU and CUDA), numpy and random


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Fitted:
    """A built (and possibly trained) model/guide pair with its configuration."""

    variant: Variant
    cfg: FitConfig
    model: PyroModule
    guide: PyroModule
    image_shape: tuple[int, int, int]
    history: dict[str, list[float]] = field(default_factory=lambda: {"pretrain": [], "train": []})
    info: dict[str, Any] = field(default_factory=dict)

    def elbo_module(self) -> torch.nn.Module:
        elbo = TraceEnum_ELBO(max_plate_nesting=self.variant.max_plate_nesting)
        return elbo(self.model, self.guide)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Data in the user's units as the model sees them (standardised when it was fitted on
        standardised data, :func:`standardizer`)."""
        s = self.info.get("standardize")
        return x if s is None else standardized(x, s)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Generated data (..., C, H, W) back in the user's units (:meth:`inputs` undone)."""
        s = self.info.get("standardize")
        return x if s is None else x * s["scale"].to(x.device) + s["mean"].to(x.device)

    def state(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "distribution": self.variant.distribution,
            "config": self.cfg.to_dict(),
            "image_shape": list(self.image_shape),
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "history": self.history,
            "info": self.info,
        }


def standardizer(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each value's mean and standard deviation over the training data ``x`` (N, C, H, W), as
    :meth:`Fitted.inputs` applies them (sd 1 for a constant feature, which then stays 0)."""
    x = unit(x)
    mean = x.mean(0)
    sd = x.std(0, unbiased=False)
    sd = torch.where(sd > 1e-6 * (1 + mean.abs()), sd, torch.ones_like(sd))
    return {"mean": mean.cpu(), "scale": sd.cpu()}


def standardized(x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x`` with the standardisation ``s`` (:func:`standardizer`) applied."""
    return (unit(x) - s["mean"].to(x.device)) / s["scale"].to(x.device)


@local_params
def build(cfg: FitConfig, image_shape: tuple[int, int, int], device: torch.device) -> Fitted:
    variant = get_variant(cfg.model)
    model, guide = variant.build(cfg, image_shape)
    return Fitted(variant, cfg, model.to(device), guide.to(device), tuple(image_shape))


def from_state(state: dict[str, Any], device: torch.device) -> Fitted:
    """Rebuild a :class:`Fitted` from a checkpoint dict. Its variant must be registered (a
    built-in, imported code, or an installed plugin); the checkpoint names its distribution."""
    try:
        cfg = FitConfig.from_dict(state["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint has no valid configuration ({str(exc)[:160]})") from None
    get_variant(cfg.model, state.get("distribution"))
    try:
        fitted = build(cfg, tuple(state["image_shape"]), device)
        fitted.model.load_state_dict(state["model"])
        fitted.guide.load_state_dict(state["guide"])
    except (KeyError, RuntimeError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint does not match its variant ({str(exc).splitlines()[0][:160]})") from None
    fitted.history = state.get("history", fitted.history)
    fitted.info = state.get("info", {})
    return fitted


@torch.no_grad()
@local_params
def elbo_per_point(fitted: Fitted, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> float:
    """Mean ELBO per data point in nats (one z sample each, fixed seed, training RNG untouched)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=fitted.variant.max_plate_nesting)
    devices = [x.device] if x.device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        for xb in chunks(x, batch_size):
            total += elbo.loss(fitted.model, fitted.guide, xb)
    return -total / x.shape[0]


@torch.no_grad()
@local_params
def cluster_probs(fitted: Fitted, x: torch.Tensor, batch_size: int = 2048,
                  facet: int | None = None) -> torch.Tensor:
    """p(c | x) (or the guide's q(c | x)), rows on the simplex, shape (N, K); of facet ``facet``
    (1-based) for a multi-facet variant, facet 1 by default."""
    fitted.model.eval()
    fitted.guide.eval()
    variant = fitted.variant
    if facet is None or getattr(fitted.model, "n_facets", 1) == 1:
        def logits(xb: torch.Tensor) -> torch.Tensor:
            return variant.cluster_logits(fitted.model, fitted.guide, xb)
    else:
        assert variant.facet_logits is not None
        def logits(xb: torch.Tensor) -> torch.Tensor:
            return variant.facet_logits(fitted.model, fitted.guide, xb, facet)
    out = [logits(xb).exp() for xb in chunks(x, batch_size)]
    return torch.cat(out)


@torch.no_grad()
def facet_usage(fitted: Fitted, x: torch.Tensor, size: int | None = usage.SUBSET,
                first: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """:func:`ppl_cluster.usage.usage` of every facet (one record for single-facet variants) on
    the fixed subset :func:`~ppl_cluster.usage.subset_index` of ``size`` points of ``x`` (all of
    them for None). ``first``: facet 1's p(c | x) on all of ``x``, when the caller has it
    already. The training RNG and the modules' train/eval modes are left as they were."""
    if first is not None and size is not None:
        raise ValueError("first holds p(c | x) of every point: pass size=None with it")
    xs = x if size is None else x[usage.subset_index(x.shape[0], size).to(x.device)]
    modes = fitted.model.training, fitted.guide.training
    devices = [x.device] if x.device.type == "cuda" else []
    n_facets = int(getattr(fitted.model, "n_facets", 1))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        records = [usage.usage(first if j == 1 and first is not None else
                               cluster_probs(fitted, xs, facet=j if n_facets > 1 else None))
                   for j in range(1, n_facets + 1)]
    fitted.model.train(modes[0])
    fitted.guide.train(modes[1])
    return records


def make_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam as one fused kernel where PyTorch has one (float32 on CPU or CUDA): on 2 CPU cores
    it updates 1.3 M parameters (500-500-2000 nets) in 1.3 ms against 8 ms for ``foreach`` and 15 ms for the
    default per-tensor loop (benchmarks/step_time.py)."""
    if params and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params):
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


class Trainer:
    """Runs one seed of a variant on ``x`` (N, C, H, W), checkpointing to ``checkpoint_path``.

    Data-parallel when a default process group is initialised: every rank passes the whole
    ``x``; rank 0 alone reads and writes ``checkpoint_path`` (the others may pass None) and
    shows the progress bar.
    """

    def __init__(self, cfg: FitConfig, x: torch.Tensor, *, seed: int,
                 checkpoint_path: str | None = None, progress: bool = True,
                 desc: str = "", on_epoch: Callable[[int, float], None] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.info = info or {}  # starts the run's info (e.g. the standardisation of x)
        # uint8 pixels stay bytes (converted per batch) where the variant's hooks can read them.
        self.x = x if get_variant(cfg.model).byte_storage else unit(x)
        self.seed = seed
        self.checkpoint_path = checkpoint_path
        self.progress = progress
        self.desc = desc
        self.on_epoch = on_epoch

    def _lr(self, epoch: int) -> float:
        cfg = self.cfg
        assert cfg.lr is not None
        return cfg.lr * (cfg.lr_decay or 1.0) ** (epoch // (cfg.lr_step or 1))

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_adam(params, lr)

    def run(self, resume: bool = False) -> Fitted:
        # Non-finite losses are caught once per epoch (_check_finite), in one line; Pyro's
        # own per-step warning would repeat it on every step.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            return self._run(resume)

    @local_params
    def _run(self, resume: bool = False) -> Fitted:
        cfg, x = self.cfg, self.x
        assert cfg.epochs is not None and cfg.batch_size is not None
        seed_everything(self.seed)
        fitted = build(cfg, tuple(x.shape[1:]), x.device)
        fitted.info.update(self.info)
        variant = fitted.variant
        n_pre = cfg.pretrain_epochs if variant.pretrain_loss is not None else 0
        total = n_pre + cfg.epochs
        params = [p for m in (fitted.model, fitted.guide) for p in m.parameters()]
        start, initialized, seconds, optim_state = 0, variant.initialize is None, 0.0, None

        group = distributed.current()
        if group is not None:
            distributed.check_batch(cfg.batch_size, x.shape[0], group.world_size)
            if variant.e_step is not None:  # each rank would update only its shard's chains
                raise ConfigError(f"model {cfg.model} keeps per-image latent state (an E-step) "
                                  "and does not train data-parallel")

        if group is None:
            state = self._read_checkpoint(x.device) if resume else None
        else:
            # Rank 0 reads (only it may see the file) and hands the state to every rank; CPU
            # tensors, since unpickled tensors land on the device they were saved from.
            state = distributed.on_main(lambda: self._read_checkpoint("cpu") if resume else None)
        if state is not None:
            try:
                fitted.model.load_state_dict(state["model"])
                fitted.guide.load_state_dict(state["guide"])
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint parameters do not fit the model ({str(exc)[:120]})") from None
            start, initialized = state["epoch"], state["initialized"]
            seconds, optim_state = state["seconds"], state["optim"]
            fitted.history, fitted.info = state["history"], state["info"]
            if group is None:  # distributed runs reseed every epoch (below)
                _set_rng_state(state["rng"])

        module = fitted.elbo_module()
        # Distributed: the losses as DDP modules, built when their phase starts (svi_ddp after
        # the initialisation, which may move parameters; one DDP at a time owns the gradients).
        pre_ddp: torch.nn.Module | None = None
        svi_ddp: torch.nn.Module | None = None
        optim = self._optimizer(params, cfg.pretrain_lr or cfg.lr) if start < n_pre else None
        if optim is None and initialized:
            optim = self._optimizer(list(module.parameters()), cfg.lr)
        if optim is not None and optim_state is not None:
            optim.load_state_dict(optim_state)

        # Perturbing poses only makes sense for images, not for (N, 1, 1, D) vectors.
        augment = bool(cfg.pretrain_augment) and min(x.shape[-2:]) > 1

        def pretrain_step(xb: torch.Tensor) -> torch.Tensor:
            assert variant.pretrain_loss is not None
            xb = random_affine(xb) if augment else xb
            if pre_ddp is not None:
                return pre_ddp(xb)
            return variant.pretrain_loss(fitted.model, fitted.guide, xb)

        steps = x.shape[0] // min(cfg.batch_size, x.shape[0])
        compiled = {"pretrain": self._compiled(pretrain_step, fitted, n_pre * steps, "pretraining",
                                               group is not None),
                    "svi": None}
        bar = tqdm(range(start, total), initial=start, total=total, desc=self.desc or cfg.model,
                   disable=not self.progress or not distributed.is_main(), leave=False,
                   dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            if group is not None:
                # Each rank's own noise (z samples, augmentation), a pure function of
                # (seed, epoch, rank): independent across ranks, and exact on resume.
                torch.manual_seed(distributed.derived_seed(self.seed, epoch, 1, group.rank))
            if epoch < n_pre:
                assert optim is not None
                if group is not None and pre_ddp is None:
                    assert variant.pretrain_loss is not None
                    pre_ddp = distributed.data_parallel(
                        _LossModule(variant.pretrain_loss, fitted.model, fitted.guide), x.device)
                if variant.on_pretrain_epoch is not None:
                    variant.on_pretrain_epoch(fitted.model, fitted.guide, epoch, n_pre)
                if compiled["pretrain"] is not None:
                    compiled["pretrain"].refresh()
                loss = self._epoch(pretrain_step, optim, epoch, compiled=compiled["pretrain"])
                _check_finite(loss, params, epoch, total, "pretraining", "pretrain_lr",
                              optim.param_groups[0]["lr"])
                fitted.history["pretrain"].append(loss)
            else:
                pre_ddp = None
                if not initialized:
                    assert variant.initialize is not None
                    if group is None:
                        fitted.info.update(variant.initialize(fitted.model, fitted.guide, x, cfg, self.seed))
                    else:
                        # Once, on rank 0, on the full data; then every rank takes its result.
                        info = distributed.on_main(lambda: variant.initialize(  # type: ignore[misc]
                            fitted.model, fitted.guide, x, cfg, self.seed))
                        distributed.broadcast_states([fitted.model, fitted.guide])
                        fitted.info.update(info)
                    initialized = True
                    optim = None
                if optim is None:
                    optim = self._optimizer(list(module.parameters()), cfg.lr)
                if group is not None and svi_ddp is None:
                    svi_ddp = distributed.data_parallel(module, x.device)
                for param_group in optim.param_groups:
                    param_group["lr"] = self._lr(epoch - n_pre)
                if variant.on_epoch is not None:
                    variant.on_epoch(fitted.model, fitted.guide, epoch - n_pre, cfg.epochs)
                if variant.maintain is not None:
                    with torch.no_grad():
                        move = variant.maintain(fitted.model, fitted.guide, x, epoch - n_pre, cfg.epochs)
                    if move is not None:
                        fitted.info.setdefault("moves", []).append({"epoch": epoch - n_pre, **move})
                e_step = None
                if variant.e_step is not None:
                    def e_step(xb: torch.Tensor, index: torch.Tensor) -> None:
                        variant.e_step(fitted.model, fitted.guide, xb, index)  # type: ignore[misc]
                loss_fn: Callable[[torch.Tensor], torch.Tensor] = svi_ddp or module
                if compiled["svi"] is None:
                    compiled["svi"] = self._compiled(module, fitted, cfg.epochs * steps, "SVI",
                                                     group is not None) or False
                if compiled["svi"]:
                    compiled["svi"].refresh()  # after the epoch's hooks
                with pyro.validation_enabled(False):
                    loss = self._epoch(loss_fn, optim, epoch, e_step,
                                       compiled=compiled["svi"] or None)
                _check_finite(loss, params, epoch, total, "SVI", "lr", optim.param_groups[0]["lr"])
                fitted.history["train"].append(loss)
                # Once per epoch (one host sync): each facet's usage; collapse is reported.
                records = facet_usage(fitted, x)
                fitted.info.setdefault("usage", []).append(
                    {"epoch": epoch - n_pre, "facets": records})
                fitted.info["collapsed"] = usage.any_collapsed(records)
            seconds += time.perf_counter() - t0
            postfix = {"phase": "pretrain" if epoch < n_pre else "svi", "loss": f"{loss:.2f}"}
            if epoch >= n_pre:
                postfix["used"] = usage.line(records) + (" COLLAPSED" if fitted.info["collapsed"]
                                                         else "")
            bar.set_postfix(postfix)
            if self.checkpoint_path and distributed.is_main():
                checkpoint.save(self.checkpoint_path, {
                    **fitted.state(), "seed": self.seed, "epoch": epoch + 1,
                    "initialized": initialized, "optim": optim.state_dict(),
                    "rng": _rng_state(), "seconds": seconds,
                })
            distributed.barrier()  # the others wait until rank 0 has written the epoch
            if self.on_epoch is not None:
                self.on_epoch(epoch, loss)
        bar.close()
        fitted.info["seconds"] = seconds
        fitted.info["seed"] = self.seed
        return fitted

    def _compiled(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], fitted: Fitted,
                  steps: int, phase: str, parallel: bool) -> CompiledStep | None:
        """The phase's compiled step, or None where it runs eagerly (said when asked for)."""
        cfg = self.cfg
        if steps == 0:
            return None
        batch = min(cfg.batch_size or self.x.shape[0], self.x.shape[0])
        n_params = sum(p.numel() for m in (fitted.model, fitted.guide) for p in m.parameters()
                       if p.requires_grad)
        why = reason_not_to(cfg.compile, steps=steps, work=batch * n_params,
                            e_step=fitted.variant.e_step is not None, distributed=parallel)
        if why is not None:
            if cfg.compile == "on" and distributed.is_main():
                print(f"ppl-cluster: {cfg.model} {phase}: runs eagerly ({why})", file=sys.stderr)
            return None
        return CompiledStep(loss_fn, [fitted.model, fitted.guide], scale=1.0 / batch,
                            name=f"{cfg.model} {phase}",
                            say=None if distributed.is_main() else lambda text: None)

    def _read_checkpoint(self, map_location: str | torch.device) -> dict[str, Any] | None:
        """The checkpoint to resume from (None if there is none yet), checked against the run."""
        if not (self.checkpoint_path and os.path.exists(self.checkpoint_path)):
            return None
        state = checkpoint.load(self.checkpoint_path, map_location=map_location)
        # The device and compile mode may change between sessions; every other setting must be
        # the same.
        # Compared resolved, so that a setting added since (at its default) is no difference.
        try:
            saved = FitConfig.from_dict(state.get("config", {}))
            saved = get_variant(saved.model).resolve(saved).to_dict()
        except (ConfigError, TypeError):
            saved = None
        mine = get_variant(self.cfg.model).resolve(self.cfg).to_dict()
        same = saved is not None and {**saved, **{k: mine[k] for k in EXECUTION}} == mine
        if not same or state.get("seed") != self.seed:
            raise CheckpointError(f"{self.checkpoint_path} was written by a different configuration")
        return state

    def _epoch(self, loss_fn: Callable[[torch.Tensor], torch.Tensor],
               optim: torch.optim.Optimizer, epoch: int,
               e_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
               compiled: CompiledStep | None = None) -> float:
        """One pass over a fresh permutation in fixed-size batches; returns mean loss per point.
        ``e_step(x_batch, index)``, if given, runs before each batch's loss; ``compiled``, if
        given, computes the loss and gradients in place of ``loss_fn`` and backward."""
        group = distributed.current()
        if group is not None:
            return self._sharded_epoch(loss_fn, optim, epoch, group)
        x = self.x
        n = x.shape[0]
        batch = min(self.cfg.batch_size or n, n)
        steps = n // batch
        perm = torch.randperm(n, device=x.device)
        total = torch.zeros((), device=x.device)
        for i in range(steps):
            index = perm[i * batch : (i + 1) * batch]
            xb = unit(x[index])  # stored bytes become floats a batch at a time
            if e_step is not None:
                e_step(xb, index)
            if compiled is not None:
                loss = compiled(xb)  # sets every .grad
            else:
                loss = loss_fn(xb) / batch
                optim.zero_grad(set_to_none=True)
                loss.backward()
            optim.step()
            total += loss.detach()
        return float(total) / steps  # the one host sync of the epoch

    def _sharded_epoch(self, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                       optim: torch.optim.Optimizer, epoch: int, group: distributed.Group) -> float:
        """:meth:`_epoch` with each global batch split into one contiguous shard per rank.

        ``loss_fn`` is a DDP module, so backward averages the ranks' gradients; scaling each
        rank's shard sum by ``world_size / batch`` makes that average exactly the gradient of
        the single-process loss, the mean over the global batch.
        """
        x = self.x
        n = x.shape[0]
        batch = min(self.cfg.batch_size or n, n)
        shard, steps = batch // group.world_size, n // batch
        # The same permutation on every rank, from (seed, epoch) alone: no broadcast, and the
        # data order does not depend on the number of processes.
        gen = torch.Generator().manual_seed(distributed.derived_seed(self.seed, epoch, 0))
        perm = torch.randperm(n, generator=gen).to(x.device)
        lo = group.rank * shard
        total = torch.zeros((), device=x.device)
        for i in range(steps):
            xb = unit(x[perm[i * batch + lo : i * batch + lo + shard]])
            part = loss_fn(xb)  # summed over this rank's shard
            optim.zero_grad(set_to_none=True)
            (part * (group.world_size / batch)).backward()
            optim.step()
            total += part.detach()
        torch.distributed.all_reduce(total)  # the one sync of the epoch: sum over ranks and steps
        return float(total) / (batch * steps)


def _check_finite(loss: float, params: list[torch.nn.Parameter], epoch: int, total: int,
                  phase: str, lr_setting: str, lr: float) -> None:
    """DivergedError unless the epoch's loss and every parameter are finite: checked once per
    epoch (one host sync), before the epoch is checkpointed, so the checkpoint stays finite."""
    if math.isfinite(loss):
        if bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            return
        what = "a parameter is no longer finite"
    else:
        what = f"the loss is {loss}"
    raise DivergedError(
        f"training diverged in epoch {epoch + 1} of {total} ({phase}): {what}; the checkpoint "
        f"keeps the last finite epoch. Likely cause: a learning rate too large for these data "
        f"({lr_setting} {lr:g}); lower it and train again", setting=lr_setting)


class _LossModule(torch.nn.Module):
    """``fn(model, guide, x)`` as a module, so that DDP can own its parameters' gradients."""

    def __init__(self, fn: Callable[[PyroModule, PyroModule, torch.Tensor], torch.Tensor],
                 model: PyroModule, guide: PyroModule) -> None:
        super().__init__()
        self.fn, self.model, self.guide = fn, model, guide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, self.guide, x)
