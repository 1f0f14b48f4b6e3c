"""Encoders and decoders. Plain torch: no Pyro sites here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


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


# --- Ladder networks (VLAE-style) for multi-facet models --------------------------------------

def split_blocks(sizes: Sequence[int], n_blocks: int) -> list[list[int]]:
    """Split layer sizes into ``n_blocks`` consecutive blocks, the earlier ones one layer longer
    when they do not divide evenly (block 1 works on raw pixels); a block may be empty."""
    base, extra = divmod(len(sizes), n_blocks)
    out, i = [], 0
    for b in range(n_blocks):
        n = base + (1 if b < extra else 0)
        out.append(list(sizes[i : i + n]))
        i += n
    return out


class _GaussianHeads(nn.Module):
    """One (loc, scale) head per facet on that facet's features."""

    def __init__(self, widths: Sequence[int], latent_dims: Sequence[int]) -> None:
        super().__init__()
        self.loc = nn.ModuleList(nn.Linear(w, d) for w, d in zip(widths, latent_dims, strict=True))
        self.log_var = nn.ModuleList(nn.Linear(w, d)
                                     for w, d in zip(widths, latent_dims, strict=True))


class LadderEncoder(nn.Module):
    """x -> [(loc_j, scale_j)]_{j=1..J} with h_1 = f_1(x), h_j = f_j(h_{j-1}), q(z_j|x) from h_j.

    ``blocks[j]`` is f_{j+1}; ``taps[j]`` maps h_{j+1} to a flat feature vector of width
    ``widths[j]`` for the heads. Facet 1 reads the shallowest features, facet J the deepest.
    """

    def __init__(self, blocks: Sequence[nn.Module], taps: Sequence[nn.Module],
                 widths: Sequence[int], latent_dims: Sequence[int],
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = nn.ModuleList(taps)
        self.heads = _GaussianHeads(widths, latent_dims)
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x.reshape(-1, *self.image_shape) if self.image_shape is not None else x.flatten(1)
        out = []
        for block, tap in zip(self.blocks, self.taps, strict=True):
            h = block(h)
            out.append(tap(h))
        return out

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(loc(f), torch.exp(0.5 * log_var(f))) for f, loc, log_var
                in zip(self.features(x), self.heads.loc, self.heads.log_var, strict=True)]

    def means(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [loc(f) for f, loc in zip(self.features(x), self.heads.loc, strict=True)]


class LadderDecoder(nn.Module):
    """[z_1..z_J] -> per-pixel outputs: the deepest z_J starts the decoder, each shallower z_j
    joins it at the mirrored depth (VLAE). ``alpha[j]`` scales z_j where it enters: a constant
    (buffer) set by the progressive-training schedule, 1 once a facet is fully faded in."""

    def __init__(self, latent_dims: Sequence[int]) -> None:
        super().__init__()
        self.latent_dims = list(latent_dims)
        self.register_buffer("alpha", torch.ones(len(latent_dims)))

    def scaled(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [z * self.alpha[j] for j, z in enumerate(zs)]


class MLPLadderDecoder(LadderDecoder):
    """Mirror of an MLP :class:`LadderEncoder`: block J's widths reversed from z_J, then for
    j = J-1..1 the running features concatenated with alpha_j z_j through block j's widths
    reversed, then a linear map to the pixels."""

    def __init__(self, latent_dims: Sequence[int], blocks: Sequence[Sequence[int]],
                 out_dim: int) -> None:
        super().__init__(latent_dims)
        layers, width = [], 0
        for j in reversed(range(len(latent_dims))):
            sizes = [width + latent_dims[j], *reversed(list(blocks[j]))]
            layers.append(mlp(sizes, activate_last=True) if len(sizes) > 1 else nn.Identity())
            width = sizes[-1]
        self.layers = nn.ModuleList(layers)  # layers[0] reads z_J
        self.out = nn.Linear(width, out_dim)

    def forward(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        zs = self.scaled(zs)
        h = zs[-1]
        for i, layer in enumerate(self.layers):
            if i > 0:
                z = zs[len(zs) - 1 - i]
                h = torch.cat([h, z.expand(*h.shape[:-1], z.shape[-1])], -1)
            h = layer(h)
        return self.out(h)


def conv_ladder(image_shape: Sequence[int], channels: Sequence[int], latent_dims: Sequence[int],
                hidden: int = 256) -> tuple[LadderEncoder, LadderDecoder]:
    """A stride-2 convolutional ladder encoder and its mirrored decoder."""
    c, h, w = image_shape
    groups = split_blocks(channels, len(latent_dims))
    blocks, taps, sizes = [], [], []
    for group in groups:
        convs: list[nn.Module] = []
        for out in group:
            convs += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.ReLU()]
            c, h, w = out, h // 2, w // 2
        blocks.append(nn.Sequential(*convs) if convs else nn.Identity())
        taps.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()))
        sizes.append((c, h, w))
    encoder = LadderEncoder(blocks, taps, [hidden] * len(groups), latent_dims, image_shape)
    return encoder, ConvLadderDecoder(latent_dims, groups, image_shape, hidden)


class ConvLadderDecoder(LadderDecoder):
    """Mirror of :func:`conv_ladder`'s encoder: z_J -> a small feature map, up-sampled by
    transposed convolutions; each shallower z_j is projected to the feature map of its depth
    and added there."""

    def __init__(self, latent_dims: Sequence[int], groups: Sequence[Sequence[int]],
                 image_shape: Sequence[int], hidden: int = 256) -> None:
        super().__init__(latent_dims)
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        n = sum(len(g) for g in groups)
        # Feature-map shape at each depth, from the top (the decoder's start) down.
        chans = [c] + [ch for g in groups for ch in g]  # depth 0 (pixels) .. n
        # The decoder starts at ceil(H / 2^n) and doubles per transposed convolution (the
        # output is cropped to H x W at the end).
        hs = [-(-h // 2**n) * 2 ** (n - i) for i in range(n + 1)]
        ws = [-(-w // 2**n) * 2 ** (n - i) for i in range(n + 1)]
        self.shapes: list[tuple[int, int, int]] = []
        depth = n
        self.inject = nn.ModuleList()
        self.stages = nn.ModuleList()
        for j in reversed(range(len(latent_dims))):
            shape = (chans[depth], hs[depth], ws[depth])
            self.shapes.append(shape)
            size = shape[0] * shape[1] * shape[2]
            if j == len(latent_dims) - 1:
                self.inject.append(nn.Sequential(nn.Linear(latent_dims[j], hidden), nn.ReLU(),
                                                 nn.Linear(hidden, size)))
            else:
                self.inject.append(nn.Linear(latent_dims[j], size))
            layers: list[nn.Module] = [nn.ReLU()]
            for _ in groups[j]:
                last = depth == 1
                layers.append(nn.ConvTranspose2d(chans[depth], chans[depth - 1], 4, stride=2,
                                                 padding=1))
                if not last:
                    layers.append(nn.ReLU())
                depth -= 1
            self.stages.append(nn.Sequential(*layers))
        if depth != 0:  # no conv layers at all: a linear map from the last features to pixels
            raise ValueError("conv ladder needs at least one channel per image")

    def forward(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        zs = self.scaled(zs)
        batch = zs[0].shape[:-1]
        h = None
        for i, (inject, stage) in enumerate(zip(self.inject, self.stages, strict=True)):
            z = zs[len(zs) - 1 - i].reshape(-1, zs[len(zs) - 1 - i].shape[-1])
            add = inject(z).reshape(-1, *self.shapes[i])
            h = add if h is None else h + add
            h = stage(h)
        assert h is not None
        out = h[..., : self.image_shape[1], : self.image_shape[2]]
        return out.reshape(*batch, -1)


def mlp_ladder(image_shape: Sequence[int], hidden: Sequence[int],
               latent_dims: Sequence[int]) -> tuple[LadderEncoder, LadderDecoder]:
    """An MLP ladder encoder (``hidden`` split into J consecutive blocks) and its mirror."""
    in_dim = math.prod(image_shape)
    groups = split_blocks(hidden, len(latent_dims))
    blocks, widths, width = [], [], in_dim
    for group in groups:
        blocks.append(mlp([width, *group], activate_last=True) if group else nn.Identity())
        width = group[-1] if group else width
        widths.append(width)
    encoder = LadderEncoder(blocks, [nn.Identity() for _ in groups], widths, latent_dims)
    return encoder, MLPLadderDecoder(latent_dims, groups, in_dim)


# --- the networks a variant's settings name (arch, hidden widths, latent size) ---------------

def encoder(arch: str, hidden: Sequence[int], latent_dim: int,
            image_shape: Sequence[int]) -> nn.Module:
    """x -> (loc, scale) of a diagonal Gaussian over z."""
    if arch == "conv":
        return ConvEncoder(tuple(image_shape), list(hidden), latent_dim)
    return GaussianEncoder(math.prod(image_shape), list(hidden), latent_dim)


def decoder(arch: str, hidden: Sequence[int], latent_dim: int,
            image_shape: Sequence[int]) -> nn.Module:
    """z -> per-pixel outputs of shape ``image_shape`` (flattened for the MLP)."""
    if arch == "conv":
        return ConvDecoder(latent_dim, list(hidden), tuple(image_shape))
    return Decoder(latent_dim, list(hidden), math.prod(image_shape))


def trunk(arch: str, hidden: Sequence[int], latent_dim: int,
          image_shape: Sequence[int]) -> tuple[nn.Module, int]:
    """An encoder body ``x -> h`` (no output heads) and the width of ``h``."""
    if arch == "conv":
        return ConvEncoder(tuple(image_shape), list(hidden), latent_dim).body, 256
    body = mlp([math.prod(image_shape), *hidden], activate_last=True)
    return nn.Sequential(nn.Flatten(), body), hidden[-1] if hidden else math.prod(image_shape)
