r"""VaDE's amortized posterior: q(z | x) = Normal(m(x), diag s(x)^2).

The cluster ``c`` has no guide site: it is enumerated in the model, which is exact because
the optimal q(c | x) of the paper is p(c | z).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..models.common import LocalPyroModule


class VaDEGuide(LocalPyroModule):
    """Encoder network ``encoder: x -> (loc, scale)`` wrapped as a Pyro guide."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> None:
        loc, scale = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of z, used for prediction and GMM initialisation."""
        return self.encoder.mean(x)
