"""Data-parallel training over ``torch.distributed`` (processes started by ``torchrun``).

The :class:`~ppl_cluster.train.Trainer` trains data-parallel whenever a default process group
is initialised (the CLI initialises one under ``torchrun``): every process holds the whole data
set and the same parameters, takes its own contiguous shard of each global batch, and
``DistributedDataParallel`` averages the gradients. Everything random is a pure function of
``(seed, epoch[, rank])`` so that every rank draws the same permutation and a resumed run
continues exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, PPLClusterError

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Rank 0 alone runs the mixture initialisation (t-SNE + GMM: minutes on 70,000 images) while the
# other ranks wait in a broadcast; the default collective timeout (10 min) would be too short.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class Group:
    """The initialised default process group, as seen by this process."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env() -> Launch | None:
    """The torchrun launch this process belongs to (``WORLD_SIZE > 1``), or None for an
    ordinary single-process run (a torchrun launch of one process is one)."""
    world = os.environ.get("WORLD_SIZE")
    try:
        world_size = int(world) if world is not None else 1
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {world!r}") from None
    if world_size <= 1:
        return None
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"distributed training needs the environment torchrun sets "
                          f"({', '.join(missing)} missing): launch it as "
                          "torchrun --nproc-per-node N -m ppl_cluster fit ...")
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise ConfigError("RANK and LOCAL_RANK must be integers") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK {rank}, "
                          f"WORLD_SIZE {world_size}, LOCAL_RANK {local_rank}")
    return Launch(rank, world_size, local_rank)


def device_for(name: str, launch: Launch) -> torch.device:
    """``cpu``, or ``cuda:LOCAL_RANK`` for ``cuda``/``auto`` (one GPU per process)."""
    if name.startswith("cuda:"):
        raise ConfigError(f"--device {name} does not apply to distributed training: each process "
                          "uses cuda:LOCAL_RANK (pass --device cuda or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    if launch.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {launch.local_rank} has no GPU: only "
                          f"{torch.cuda.device_count()} visible on this node")
    return torch.device("cuda", launch.local_rank)


def start(launch: Launch, device: torch.device) -> Group:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so that collectives and plain "cuda" mean this GPU
        dist.init_process_group("nccl", rank=launch.rank, world_size=launch.world_size,
                                timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                                timeout=TIMEOUT)
    dist.barrier()  # every rank has joined (and done what came before) when this returns
    group = current()
    assert group is not None
    return group


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Group | None:
    """The default process group, or None when this process trains alone."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return None


def is_main() -> bool:
    """True on rank 0, and in a process that trains alone."""
    group = current()
    return group is None or group.is_main


def barrier() -> None:
    if current() is not None:
        dist.barrier()


def check_batch(batch_size: int, n: int, world_size: int) -> None:
    """The global batch (``batch_size``, at most ``n``) must split into equal shards."""
    batch = min(batch_size, n)
    if batch % world_size:
        raise ConfigError(f"batch size {batch} is not divisible by the {world_size} processes: "
                          "each takes an equal share of every batch")


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (unlike ``seed + epoch``, different
    tuples such as restart seed 1 epoch 0 and seed 0 epoch 1 give unrelated streams)."""
    entropy = [k % 2**64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def broadcast_object(obj: T, src: int = 0) -> T:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its error, to every rank.

    Passing the error along makes every rank fail alike instead of leaving the others waiting
    in the next collective until the timeout.
    """
    ok, value, error = True, None, None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as exc:
            error = exc
            ok = False
            # Our own errors pickle; anything else is summarised.
            value = exc if isinstance(exc, PPLClusterError) else RuntimeError(
                f"rank 0 failed: {type(exc).__name__}: {exc}")
    ok, value = broadcast_object((ok, value))
    if error is not None:
        raise error
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


@torch.no_grad()
def broadcast_states(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s values."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.detach(), src)


def data_parallel(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap a loss module (forward returns a scalar) so that backward averages gradients over ranks.

    ``static_graph``: the set of parameters that receive a gradient is the same at every step
    (pretraining leaves the mixture parameters unused), which DDP then handles without a graph
    search per step.
    """
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   static_graph=True)


def load_data(cfg: Any, launch: Launch | None) -> tuple[torch.device, Any, bool]:
    """(device, data set, whether this process is rank 0) for a fit: without ``launch`` the
    plain device; with one, the group joined first (every rank has checked the run directory
    by then, before rank 0 writes into it) and rank 0 alone downloading."""
    from .data import load_run_dataset
    from .train import resolve_device

    if launch is None:
        device = resolve_device(cfg.device)
        return device, load_run_dataset(cfg, download=cfg.download, device=device), True
    device = device_for(cfg.device, launch)
    main = start(launch, device).is_main
    if cfg.download and not main:  # the others read what rank 0 fetched
        barrier()
    ds = load_run_dataset(cfg, download=cfg.download, device=device)
    if cfg.download and main:
        barrier()
    return device, ds, main
