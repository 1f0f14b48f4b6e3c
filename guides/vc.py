r"""Variational Clustering's posterior: q(z, c | x) = q(c | x) q(z | x, c).

A shared trunk ``h = g(x)`` feeds three heads::

    q(c | x)    = Categorical(softmax(W_c h))                 # the cluster assignment
    q(z | x, c) = Normal(W_mu[c] h, exp(W_s[c] h / 2))         # one Gaussian head per cluster

With ``pose="affine"`` a small network first gives q(a | x) = Normal(loc_a(x), scale_a(x)),
and the trunk reads ``x`` moved by the inverse of A(a) (its canonical pose) for a sampled
``a``: q(a, c, z | x) = q(a | x) q(c | x, a) q(z | x, a, c). Prediction reads ``x`` in the
mean pose.

``discrete="enumerate"`` (default) enumerates ``c`` in the guide, so ``TraceEnum_ELBO``
computes the exact sum over clusters::

    ELBO(x) = sum_c q(c|x) [ log p(x|z_c) + log p(z_c|c) + log pi_c - log q(z_c|x,c) - log q(c|x) ]

with one reparametrised ``z_c ~ q(z | x, c)`` per cluster (K decoder passes per image).

``discrete="relaxed"`` is the paper's reparametrised variant: ``c`` is drawn as a
straight-through Gumbel-softmax one-hot vector at temperature ``tau`` (annealed per epoch by
:meth:`VCGuide.set_epoch`), one decoder pass per image. The forward value is an exact
categorical sample and is scored with the exact categorical pmf, so the loss is an unbiased
estimate of the *same* ELBO as enumeration (comparable numbers); only the gradient through
``c`` uses the relaxation.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..data import chunks
from ..models.common import LocalPyroModule
from ..models.vc import (
    DISCRETE,
    POSE_DIM,
    POSES,
    affine,
    invert_affine,
    one_hot,
    warp,
)


class GumbelSoftmaxStraightThrough(dist.RelaxedOneHotCategoricalStraightThrough):
    """One-hot samples with Gumbel-softmax straight-through gradients, scored with the exact
    categorical log-probability of the (hard) sample."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return (value * torch.log_softmax(self.logits, -1)).sum(-1)


class VCGuide(LocalPyroModule):
    """``trunk: x -> h`` (width ``width``) with a cluster head and per-cluster Gaussian heads."""

    def __init__(self, trunk: nn.Module, width: int, n_clusters: int, latent_dim: int,
                 discrete: str = "enumerate", temperature: float = 1.0,
                 temperature_min: float = 0.5, anneal_rate: float = 0.05, pose: str = "none",
                 image_shape: tuple[int, ...] | None = None, pose_hidden: int = 256) -> None:
        super().__init__()
        if discrete not in DISCRETE:
            raise ValueError(f"discrete must be one of {DISCRETE}")
        if pose not in POSES:
            raise ValueError(f"pose must be one of {POSES}")
        self.pose = pose
        if pose == "affine":
            assert image_shape is not None, "pose needs the image shape"
            self.image_shape = tuple(image_shape)
            self.pose_net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), pose_hidden),
                                          nn.ReLU(), nn.Linear(pose_hidden, 2 * POSE_DIM))
            # Start at the identity map with little pose noise: the clusters form first on
            # the images as they are, and the poses grow as the ELBO asks for them.
            last = self.pose_net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            with torch.no_grad():
                last.bias[POSE_DIM:] = -4.0
        self.trunk = trunk
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.discrete = discrete
        self.logits_head = nn.Linear(width, n_clusters)
        self.loc_head = nn.Linear(width, n_clusters * latent_dim)
        self.log_var_head = nn.Linear(width, n_clusters * latent_dim)
        self.temperature0 = temperature
        self.temperature_min = temperature_min
        self.anneal_rate = anneal_rate
        self.temperature = temperature

    def set_epoch(self, epoch: int) -> None:
        """tau = max(tau_min, tau_0 exp(-rate * epoch)): a pure function of the epoch. Only the
        relaxed guide reads it (left alone otherwise, so a compiled step stays valid)."""
        if self.discrete == "relaxed":
            self.temperature = max(self.temperature_min,
                                   self.temperature0 * math.exp(-self.anneal_rate * epoch))

    def pose_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(a | x): loc and scale (N, 6) of each image's pose."""
        loc, log_var = self.pose_net(x).chunk(2, -1)
        return loc, torch.exp(0.5 * log_var)

    def canonical(self, x: torch.Tensor, pose: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` undone by its pose ``a`` (default: the mean of q(a | x)): the image the
        decoder would draw before the affine map, which is what the cluster heads read."""
        if self.pose == "none":
            return x
        if pose is None:
            pose = self.pose_posterior(x)[0]
        flat = warp(x.flatten(1), invert_affine(affine(pose)), self.image_shape)
        return flat.reshape(x.shape)

    def heads(self, x: torch.Tensor, pose: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cluster logits (N, K), per-cluster locs and scales (N, K, D) of images ``x`` (put
        in their canonical pose first, see :meth:`canonical`)."""
        h = self.trunk(self.canonical(x, pose))
        shape = (h.shape[0], self.n_clusters, self.latent_dim)
        loc = self.loc_head(h).reshape(shape)
        scale = torch.exp(0.5 * self.log_var_head(h)).reshape(shape)
        return self.logits_head(h), loc, scale

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            # q(a | x) first: the cluster and z heads read x in the sampled pose undone.
            pose = None
            if self.pose == "affine":
                pose = pyro.sample("pose", dist.Normal(*self.pose_posterior(x)).to_event(1))
            logits, loc, scale = self.heads(x, pose)
            if self.discrete == "enumerate":
                c = pyro.sample("c", dist.Categorical(logits=logits),
                                infer={"enumerate": "parallel"})
            else:
                c = pyro.sample("c", GumbelSoftmaxStraightThrough(
                    torch.tensor(self.temperature, device=logits.device), logits=logits))
            # (..., 1, K) @ (N, K, D): picks cluster c's head; enumeration broadcasts to
            # (K, N, D).
            w = one_hot(c, self.n_clusters).unsqueeze(-2)
            pyro.sample("z", dist.Normal((w @ loc).squeeze(-2), (w @ scale).squeeze(-2)).to_event(1))

    @torch.no_grad()
    def split_cluster(self, new: int, old: int) -> None:
        """Make cluster ``new`` a copy of ``old`` (same z heads) and let the two share old's
        mass in q(c|x); the model's split (:meth:`VCModel.split_cluster`) breaks the tie."""
        d = self.latent_dim
        rows_new, rows_old = slice(new * d, (new + 1) * d), slice(old * d, (old + 1) * d)
        for head in (self.loc_head, self.log_var_head):
            head.weight[rows_new] = head.weight[rows_old]
            head.bias[rows_new] = head.bias[rows_old]
        self.logits_head.weight[new] = self.logits_head.weight[old]
        self.logits_head.bias[old] -= math.log(2.0)
        self.logits_head.bias[new] = self.logits_head.bias[old]

    def ae_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic code that autoencoder pretraining trains: cluster 0's z head on
        ``x`` as it is (the pose network is still at the identity)."""
        d = self.latent_dim
        return nn.functional.linear(self.trunk(x), self.loc_head.weight[:d], self.loc_head.bias[:d])

    @torch.no_grad()
    def tie_heads(self) -> None:
        """Give every cluster the z heads of cluster 0 (the pretrained code): q(z | x, c)
        then starts at the same point for every c, where the mixture was fitted."""
        d = self.latent_dim
        for head in (self.loc_head, self.log_var_head):
            head.weight.copy_(head.weight[:d].repeat(self.n_clusters, 1))
            head.bias.copy_(head.bias[:d].repeat(self.n_clusters))

    def fit_cluster_head(self, x: torch.Tensor, resp: torch.Tensor, steps: int = 300,
                         lr: float = 0.05, batch_size: int = 2048) -> float:
        """Fit q(c | x)'s head (the trunk fixed) to the soft assignments ``resp`` (N, K) by
        cross-entropy, full batch, deterministic; returns the final cross-entropy per point."""
        with torch.no_grad():
            h = torch.cat([self.trunk(self.canonical(xb)) for xb in chunks(x, batch_size)])
        head = self.logits_head
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = -(resp * torch.log_softmax(head(h), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
        return float(loss.detach())

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(c | x), shape (N, K): the cluster assignment."""
        return torch.log_softmax(self.logits_head(self.trunk(self.canonical(x))), -1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of z: sum_c q(c|x) E[z | x, c]."""
        logits, loc, _ = self.heads(x)
        return (logits.softmax(-1).unsqueeze(-1) * loc).sum(-2)
