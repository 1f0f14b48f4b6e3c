"""Encoders and decoders. Plain torch: no Pyro sites here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: Sequence[int], activate_last: bool = False) -> nn.Sequential:
    """Fully connected ReLU network through ``sizes``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if activate_last or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian over the latent (VaDE's 784-500-500-2000-D)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.body = mlp([in_dim, *hidden], activate_last=True)
        width = hidden[-1] if hidden else in_dim
        self.loc = nn.Linear(width, latent_dim)
        self.log_var = nn.Linear(width, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.flatten(1))
        return self.loc(h), torch.exp(0.5 * self.log_var(h))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc(self.body(x.flatten(1)))


class Decoder(nn.Module):
    """z -> unnormalised output per pixel (Bernoulli logits or Gaussian means), flattened."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.net = mlp([latent_dim, *reversed(list(hidden)), out_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvEncoder(nn.Module):
    """Small stride-2 convolutional encoder for C x H x W images -> (loc, scale)."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], latent_dim: int,
                 hidden: int = 256) -> None:
        super().__init__()
        c, h, w = image_shape
        convs: list[nn.Module] = []
        for out in channels:
            convs += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.ReLU()]
            c, h, w = out, h // 2, w // 2
        self.image_shape = tuple(image_shape)
        self.body = nn.Sequential(*convs, nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU())
        self.loc = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)

    def _h(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, *self.image_shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._h(x)
        return self.loc(h), torch.exp(0.5 * self.log_var(h))

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc(self._h(x))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: z -> flattened per-pixel outputs."""

    def __init__(self, latent_dim: int, channels: Sequence[int], image_shape: Sequence[int],
                 hidden: int = 256) -> None:
        super().__init__()
        c, h, w = image_shape
        n = len(channels)
        self.start = (channels[-1], -(-h // 2**n), -(-w // 2**n))
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        chans = list(reversed(list(channels))) + [c]
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                nn.Linear(hidden, int(torch.tensor(self.start).prod())), nn.ReLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.deconv(self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start))
        out = out[..., : self.image_shape[1], : self.image_shape[2]]
        return out.reshape(*batch, -1)


def bernoulli_reconstruction(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy per data point (the AE pretraining loss)."""
    return F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(-1)
