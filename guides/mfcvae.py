r"""MFCVAE's amortized posterior: q(z_1..z_J | x) = prod_j Normal(m_j(h_j), diag s_j(h_j)^2).

A ladder encoder (VLAE-style) reads the facets from increasing depths::

    h_1 = f_1(x),   h_j = f_j(h_{j-1}),   q(z_j | x) = Normal(m_j(h_j), s_j(h_j))

**How q(c_j | x) is handled.** The clusters have no guide site: each :math:`c_j` is enumerated
in the model, i.e. summed out exactly. The objective is therefore

.. math::

    \mathrm{ELBO}(x) = E_{q(z|x)}\Big[\log p(x \mid z)
        + \sum_j \log \sum_k \pi_{j,k} N(z_j; \mu_{j,k}, \sigma_{j,k}) - \log q(z \mid x)\Big]
        \le \log p(x),

a valid bound for any :math:`q(z \mid x)` because :math:`\log p(x, z)` is computed exactly (Jensen
is applied to :math:`z` alone). It equals the paper's ELBO with the cluster posterior at its
optimum for the drawn :math:`z`, :math:`q(c_j \mid x, z) = p(c_j \mid z_j)`, so it is never
looser. The reported assignment is, as in VaDE and the paper,
:math:`q(c_j \mid x) := p(c_j \mid z_j = E_q[z_j \mid x])`
(:meth:`ppl_cluster.models.mfcvae.MFCVAEModel.cluster_logits` on :meth:`MFCVAEGuide.facet_means`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..data import chunks
from ..models.common import LocalPyroModule


class MFCVAEGuide(LocalPyroModule):
    """``encoder: x -> [(loc_j, scale_j)]_{j=1..J}`` (a ladder encoder) as a Pyro guide."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> None:
        params = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            for j, (loc, scale) in enumerate(params, 1):
                pyro.sample(f"z_{j}", dist.Normal(loc, scale).to_event(1))

    def facet_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        """E_q[z_j | x] for j = 1..J."""
        return self.encoder.means(x)

    @torch.no_grad()
    def facet_embeddings(self, x: torch.Tensor, batch_size: int = 2048) -> list[torch.Tensor]:
        """E_q[z_j | x] of every image of ``x`` for j = 1..J, computed in batches."""
        parts = [self.facet_means(xb) for xb in chunks(x, batch_size)]
        return [torch.cat(facet) for facet in zip(*parts, strict=True)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior means of all facets, concatenated: (N, D_1 + ... + D_J)."""
        return torch.cat(self.facet_means(x), -1)
