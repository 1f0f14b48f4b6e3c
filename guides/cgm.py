r"""CGM's posterior: no inference network, Langevin chains on z, one persistent chain per image.

The posterior :math:`p(z \mid x) \propto \exp(-U(z))`, :math:`U(z) = -\log p(x, z)` (the model's
energy, ``c`` summed out), is sampled by short-run Langevin dynamics::

    z <- z - eps * grad U(z) + tau * sqrt(2 eps) * xi,    xi ~ N(0, I)

(``step_size`` eps, ``noise`` tau: 1 samples the posterior, 0 descends to a mode). Every
training image keeps its chain between epochs (``chains``, a buffer saved in checkpoints):
each time the image comes up in a batch, the E-step (:meth:`LangevinPosterior.e_step`, called
by the trainer before the loss) continues its chain for ``steps`` steps from where it stopped.

As a Pyro guide the chain's state is a point mass, ``z ~ Delta(z_chain)``, so
``TraceEnum_ELBO(model, guide)`` is :math:`-\log p(x, z_{chain})` with ``c`` enumerated: the
M-step loss of alternating back-propagation, whose gradient updates the generator and the
mixture. The guide finds an image's chain by the image itself (an exact fingerprint of its
pixels, :func:`fingerprint`), so prediction on the training images reads their chains; any
other image gets a fresh chain, started from the prior and run for ``infer_steps`` steps on a
private, fixed-seed generator (deterministic, and the global RNG is left alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from ..data import chunks
from ..models.common import LocalPyroModule

Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Prior = Callable[[int, torch.Generator | None], torch.Tensor]


def fingerprint(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """An exact integer key per image (N,), from the bit patterns of its float32 pixels
    (stored bytes k read as k / 255, :func:`~ppl_cluster.data.unit`, so both storages agree).

    Integer arithmetic, so the key of an image does not depend on the batch or the device;
    two different images share a key only by a coincidence of a random linear form (and then
    share a chain, which is harmless). Identical images share one chain.
    """
    p = x[0].numel() if x.shape[0] else 1
    # Weights small enough that the sum of P products stays below 2^63.
    high = 2 ** max(1, 62 - 31 - math.ceil(math.log2(max(p, 2))))
    gen = torch.Generator().manual_seed(20191119)
    weights = torch.randint(1, high, (p,), generator=gen).to(x.device)
    keys = [torch.zeros(0, dtype=torch.long, device=x.device)]
    for part in chunks(x.detach(), chunk):  # the int64 bits are 8 bytes a pixel: chunk by chunk
        part = part.float().reshape(-1, p).contiguous()
        bits = part.view(torch.int32).long() % 2147483647  # < 2^31
        keys.append((bits * weights).sum(-1))
    return torch.cat(keys)


class LangevinPosterior(LocalPyroModule):
    """Persistent Langevin chains on ``z`` for the images of the training set.

    ``energy(x, z)`` gives U per image (N,) and ``prior(n, generator)`` draws ``n`` starting
    points; both belong to the model (bound methods: the guide owns no parameters).
    """

    def __init__(self, energy: Energy, prior: Prior, latent_dim: int, steps: int = 20,
                 step_size: float = 1e-3, noise: float = 1.0, infer_steps: int = 200,
                 seed: int = 0) -> None:
        super().__init__()
        if steps < 1 or infer_steps < 1:
            raise ValueError("steps and infer_steps must be >= 1")
        if not step_size > 0 or not noise >= 0:
            raise ValueError("step_size must be > 0 and noise >= 0")
        self.energy, self.prior = energy, prior
        self.latent_dim = latent_dim
        self.steps, self.step_size, self.noise = steps, step_size, noise
        self.infer_steps, self.seed = infer_steps, seed
        # The training set's chains and their images' keys (sorted; ``rows`` maps a sorted key
        # back to its image). Sized by initialize(), or by a loaded state dict.
        self.register_buffer("chains", torch.zeros(0, latent_dim))
        self.register_buffer("keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("rows", torch.zeros(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> None:
        z = self.posterior(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Delta(z, event_dim=1))

    def langevin(self, x: torch.Tensor, z: torch.Tensor, steps: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``steps`` Langevin steps on U from ``z``; the noise from ``generator`` (default: the
        global RNG, which checkpoints save). Only z is differentiated: no parameter gradient."""
        scale = self.noise * math.sqrt(2 * self.step_size)
        z = z.detach()
        for _ in range(steps):
            with torch.enable_grad():
                z.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.energy(x, z).sum(), z)
            xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = (z.detach() - self.step_size * grad + scale * xi).detach()
        return z

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """One chain per image of ``x`` (the training set), started from the prior."""
        keys = fingerprint(x)
        self.keys, self.rows = torch.sort(keys, stable=True)
        self.chains = self.prior(x.shape[0], None)

    def e_step(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """Continue the chains of training images ``index`` (their pixels ``x``) by ``steps``."""
        self.chains[index] = self.langevin(x, self.chains[index], self.steps)

    def known(self, x: torch.Tensor) -> torch.Tensor:
        """The training-set row of each image of ``x``, or -1 for an image not seen there."""
        keys = fingerprint(x)
        if self.keys.numel() == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self.keys, keys).clamp_max(self.keys.numel() - 1)
        return torch.where(self.keys[pos] == keys, self.rows[pos], -1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """A posterior draw of z for each image (N, D): its chain's state if it is a training
        image, else the end of a fresh chain (deterministic)."""
        rows = self.known(x)
        new = rows < 0
        z = self.chains[rows.clamp_min(0)] if self.chains.numel() else x.new_zeros(
            x.shape[0], self.latent_dim)
        if new.any():
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
            fresh = self.prior(int(new.sum()), gen)
            z = z.clone()
            z[new] = self.langevin(x[new], fresh, self.infer_steps, gen)
        return z.detach()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """z of each image (a posterior draw; see :meth:`posterior`)."""
        return self.posterior(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # The chains are sized by the training set: take the saved sizes before copying.
        for name in ("chains", "keys", "rows"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                self._buffers[name] = torch.empty_like(saved, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
