"""The one training loop: optional pretraining, initialisation, then SVI epochs.

The ELBO is built as a module (``TraceEnum_ELBO(...)(model, guide)``) and optimised with torch
Adam. Data stay on the device as one tensor; batches are indexed through a permutation; losses
are accumulated on the device and read once per epoch. A checkpoint is written atomically after
every epoch, so a killed run resumes exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from tqdm.auto import tqdm

from . import checkpoint
from .config import FitConfig
from .data import random_affine
from .errors import CheckpointError, ConfigError
from .registry import Variant, get_variant


def resolve_device(name: str) -> torch.device:
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

    def state(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "config": self.cfg.to_dict(),
            "image_shape": list(self.image_shape),
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "history": self.history,
            "info": self.info,
        }


def build(cfg: FitConfig, image_shape: tuple[int, int, int], device: torch.device) -> Fitted:
    variant = get_variant(cfg.model)
    model, guide = variant.build(cfg, image_shape)
    return Fitted(variant, cfg, model.to(device), guide.to(device), tuple(image_shape))


def from_state(state: dict[str, Any], device: torch.device) -> Fitted:
    """Rebuild a :class:`Fitted` from a checkpoint dict."""
    try:
        cfg = FitConfig.from_dict(state["config"])
        fitted = build(cfg, tuple(state["image_shape"]), device)
        fitted.model.load_state_dict(state["model"])
        fitted.guide.load_state_dict(state["guide"])
    except (KeyError, RuntimeError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint does not match its variant ({str(exc).splitlines()[0][:160]})") from None
    fitted.history = state.get("history", fitted.history)
    fitted.info = state.get("info", {})
    return fitted


@torch.no_grad()
def elbo_per_point(fitted: Fitted, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> float:
    """Mean ELBO per data point in nats (one z sample each, fixed seed, training RNG untouched)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=fitted.variant.max_plate_nesting)
    devices = [x.device] if x.device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        for i in range(0, x.shape[0], batch_size):
            total += elbo.loss(fitted.model, fitted.guide, x[i : i + batch_size])
    return -total / x.shape[0]


@torch.no_grad()
def cluster_probs(fitted: Fitted, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """p(c | x) (or the guide's q(c | x)), rows on the simplex, shape (N, K)."""
    fitted.model.eval()
    fitted.guide.eval()
    out = [fitted.variant.cluster_logits(fitted.model, fitted.guide, x[i : i + batch_size]).exp()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


class Trainer:
    """Runs one seed of a variant on ``x`` (N, C, H, W), checkpointing to ``checkpoint_path``."""

    def __init__(self, cfg: FitConfig, x: torch.Tensor, *, seed: int,
                 checkpoint_path: str | None = None, progress: bool = True,
                 desc: str = "", on_epoch: Callable[[int, float], None] | None = None) -> None:
        self.cfg = cfg
        self.x = x
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
        return torch.optim.Adam(params, lr=lr, foreach=True)

    def run(self, resume: bool = False) -> Fitted:
        cfg, x = self.cfg, self.x
        assert cfg.epochs is not None and cfg.batch_size is not None
        seed_everything(self.seed)
        fitted = build(cfg, tuple(x.shape[1:]), x.device)
        variant = fitted.variant
        n_pre = cfg.pretrain_epochs if variant.pretrain_loss is not None else 0
        total = n_pre + cfg.epochs
        params = [p for m in (fitted.model, fitted.guide) for p in m.parameters()]
        start, initialized, seconds, optim_state = 0, variant.initialize is None, 0.0, None

        if resume and self.checkpoint_path and os.path.exists(self.checkpoint_path):
            state = checkpoint.load(self.checkpoint_path, map_location=x.device)
            # The device may change between sessions; every other setting must be the same.
            same = {**state.get("config", {}), "device": cfg.device} == cfg.to_dict()
            if not same or state.get("seed") != self.seed:
                raise CheckpointError(f"{self.checkpoint_path} was written by a different configuration")
            try:
                fitted.model.load_state_dict(state["model"])
                fitted.guide.load_state_dict(state["guide"])
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint parameters do not fit the model ({str(exc)[:120]})") from None
            start, initialized = state["epoch"], state["initialized"]
            seconds, optim_state = state["seconds"], state["optim"]
            fitted.history, fitted.info = state["history"], state["info"]
            _set_rng_state(state["rng"])

        module = fitted.elbo_module()
        optim = self._optimizer(params, cfg.pretrain_lr or cfg.lr) if start < n_pre else None
        if optim is None and initialized:
            optim = self._optimizer(list(module.parameters()), cfg.lr)
        if optim is not None and optim_state is not None:
            optim.load_state_dict(optim_state)

        # Perturbing poses only makes sense for images, not for (N, 1, 1, D) vectors.
        augment = bool(cfg.pretrain_augment) and min(x.shape[-2:]) > 1

        def pretrain_step(xb: torch.Tensor) -> torch.Tensor:
            assert variant.pretrain_loss is not None
            return variant.pretrain_loss(fitted.model, fitted.guide,
                                         random_affine(xb) if augment else xb)

        bar = tqdm(range(start, total), initial=start, total=total, desc=self.desc or cfg.model,
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            if epoch < n_pre:
                assert optim is not None
                loss = self._epoch(pretrain_step, optim)
                fitted.history["pretrain"].append(loss)
            else:
                if not initialized:
                    assert variant.initialize is not None
                    fitted.info.update(variant.initialize(fitted.model, fitted.guide, x, cfg, self.seed))
                    initialized = True
                    optim = None
                if optim is None:
                    optim = self._optimizer(list(module.parameters()), cfg.lr)
                for group in optim.param_groups:
                    group["lr"] = self._lr(epoch - n_pre)
                if variant.on_epoch is not None:
                    variant.on_epoch(fitted.model, fitted.guide, epoch - n_pre, cfg.epochs)
                with pyro.validation_enabled(False):
                    loss = self._epoch(module, optim)
                fitted.history["train"].append(loss)
            seconds += time.perf_counter() - t0
            bar.set_postfix(phase="pretrain" if epoch < n_pre else "svi", loss=f"{loss:.2f}")
            if self.checkpoint_path:
                checkpoint.save(self.checkpoint_path, {
                    **fitted.state(), "seed": self.seed, "epoch": epoch + 1,
                    "initialized": initialized, "optim": optim.state_dict(),
                    "rng": _rng_state(), "seconds": seconds,
                })
            if self.on_epoch is not None:
                self.on_epoch(epoch, loss)
        bar.close()
        fitted.info["seconds"] = seconds
        fitted.info["seed"] = self.seed
        return fitted

    def _epoch(self, loss_fn: Callable[[torch.Tensor], torch.Tensor],
               optim: torch.optim.Optimizer) -> float:
        """One pass over a fresh permutation in fixed-size batches; returns mean loss per point."""
        x = self.x
        n = x.shape[0]
        batch = min(self.cfg.batch_size or n, n)
        steps = n // batch
        perm = torch.randperm(n, device=x.device)
        total = torch.zeros((), device=x.device)
        for i in range(steps):
            xb = x[perm[i * batch : (i + 1) * batch]]
            loss = loss_fn(xb) / batch
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += loss.detach()
        return float(total) / steps  # the one host sync of the epoch
