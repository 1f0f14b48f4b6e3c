"""What the mixture-prior stories share: the mixture p(c) p(z | c) (diagonal or full Gaussian
components; a story may replace ``component``, e.g. by Student-t ones), its posterior p(c | z),
generation, and the decoder likelihood p(x | z). Each story keeps its own ``forward`` (the
generative equations)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..settings import setting

LIKELIHOODS = ("bernoulli", "gaussian")
COVARIANCES = ("diag", "full")


@dataclasses.dataclass
class MixtureSettings:
    """The settings of a Gaussian mixture prior (a variant's ``Settings`` may extend it)."""

    prior_covariance: str = setting("diag", "covariance of each mixture component of p(z | c) "
                                    "(vade on feature vectors: the one the features' BIC prefers)",
                                    choices=COVARIANCES)


@dataclasses.dataclass
class SplitSettings:
    """The schedule of the split move (:func:`split_emptied`), for a variant's ``Settings``."""

    split_every: int = setting(5, "every N SVI epochs, re-seed emptied clusters by splitting the "
                               "most used one (0: never)", minimum=0)
    split_until: int = setting(60, "last SVI epoch at which clusters may be split", minimum=0)


# A mixture's Gaussian components, diagonal or full covariance. With covariance="full" the
# Cholesky factor is L = diag(sigma) + the strictly lower triangle of a free ``tril`` (K, D, D):
# zeros start it diagonal, and sigma = exp(log_sigma) keeps L's diagonal positive.
def init_covariance(module: nn.Module, covariance: str, n_clusters: int, latent_dim: int) -> None:
    """Validate ``covariance`` and give ``module`` its ``covariance`` setting and, for "full",
    the free lower triangle ``tril`` (K, D, D), zeros so that the components start diagonal."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    module.covariance = covariance
    if covariance == "full":
        module.tril = nn.Parameter(torch.zeros(n_clusters, latent_dim, latent_dim))


def scale_tril(sigma: torch.Tensor, tril: torch.Tensor | None) -> torch.Tensor:
    """Cholesky factors (K, D, D) of the components' covariances."""
    lower = torch.diag_embed(sigma)
    return lower if tril is None else lower + tril.tril(-1)


def gaussian_components(mu: torch.Tensor, sigma: torch.Tensor, tril: torch.Tensor | None,
                        c: torch.Tensor | None = None) -> dist.Distribution:
    """p(z | c) for clusters ``c`` (any shape; None: all K, batch shape (K,)), event dim 1."""
    if tril is not None:
        lower = scale_tril(sigma, tril)
        return dist.MultivariateNormal(mu if c is None else mu[c],
                                       scale_tril=lower if c is None else lower[c])
    if c is None:
        return dist.Normal(mu, sigma).to_event(1)
    return dist.Normal(mu[c], sigma[c]).to_event(1)


@torch.no_grad()
def set_gaussian_mixture(target: nn.Module, pi: torch.Tensor, mu: torch.Tensor,
                         cov: torch.Tensor) -> None:
    """Set ``target``'s ``pi_logits``, ``mu``, ``log_sigma`` (and ``tril`` when it has one) to a
    fitted mixture: ``cov`` holds variances (K, D) or covariance matrices (K, D, D). A diagonal
    target keeps the diagonal of a full ``cov``; a full target gets its Cholesky factor."""
    target.pi_logits.copy_(pi.clamp_min(1e-6).log())
    target.mu.copy_(mu)
    tril = getattr(target, "tril", None)
    if cov.dim() == 2:
        target.log_sigma.copy_(0.5 * cov.log())
        if tril is not None:
            tril.zero_()
        return
    if tril is None:
        target.log_sigma.copy_(0.5 * cov.diagonal(dim1=-2, dim2=-1).log())
        return
    lower = torch.linalg.cholesky(cov)
    target.log_sigma.copy_(lower.diagonal(dim1=-2, dim2=-1).log())
    tril.copy_(lower.tril(-1))


class LocalPyroModule(PyroModule):
    """A PyroModule that keeps its parameters on itself (Pyro's ``module_local_params``) whatever
    the process-wide setting: several models (restarts, tests, notebooks) then live in one
    process, and ppl-cluster never changes the setting for other code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with pyro.settings.context(module_local_params=True):
            super().__init__(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)


class MixturePrior:
    """The mixture p(c) p(z | c) as a block of parameters and methods: ``pi_logits`` (K,),
    ``mu`` and ``log_sigma`` (K, D), and for ``covariance="full"`` ``tril`` (K, D, D).
    ``pi = softmax(pi_logits)`` lies on the simplex and ``sigma = exp(log_sigma) > 0``. A story
    may replace ``component`` (e.g. by Student-t components); the rest follows from it."""

    mu: nn.Parameter
    log_sigma: nn.Parameter
    pi_logits: nn.Parameter

    def init_mixture(self, n_clusters: int, latent_dim: int, covariance: str = "diag") -> None:
        self.n_clusters, self.latent_dim = n_clusters, latent_dim
        self.pi_logits = nn.Parameter(torch.zeros(n_clusters))
        self.mu = nn.Parameter(torch.randn(n_clusters, latent_dim))
        self.log_sigma = nn.Parameter(torch.zeros(n_clusters, latent_dim))
        init_covariance(self, covariance, n_clusters, latent_dim)  # type: ignore[arg-type]

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def component(self, c: torch.Tensor | None = None) -> dist.Distribution:
        """p(z | c) for the clusters ``c`` (any shape; None: all K, batch shape (K,))."""
        return gaussian_components(self.mu, self.sigma, getattr(self, "tril", None), c)

    def prior_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log pi_c + log p(z | c), shape (..., K)."""
        return torch.log_softmax(self.pi_logits, -1) + self.component().log_prob(z.unsqueeze(-2))

    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c | z), shape (N, K): the exact posterior of the enumerated site."""
        return torch.log_softmax(self.prior_joint(z), -1)

    def clusters_for(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """``n`` cluster indices: drawn from pi, or all equal to ``cluster``."""
        if cluster is None:
            return dist.Categorical(logits=self.pi_logits).sample((n,))
        return torch.full((n,), int(cluster), dtype=torch.long, device=self.mu.device)

    def sample(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """``n`` draws of z, from the mixture or from component ``cluster``."""
        return self.component(self.clusters_for(n, cluster)).sample()

    def set_mixture(self, pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> None:
        """Set the prior to a fitted Gaussian mixture (weights, means, variances (K, D) or
        covariances (K, D, D); see :func:`set_gaussian_mixture`)."""
        set_gaussian_mixture(self, pi, mu, cov)  # type: ignore[arg-type]

    @torch.no_grad()
    def split_cluster(self, new: int, old: int, offset: torch.Tensor) -> None:
        """Re-seed component ``new`` by splitting ``old`` in two along ``offset``: the means
        move to mu_old +- offset, both keep sigma_old and share pi_old equally."""
        self.mu[new] = self.mu[old] + offset
        self.mu[old] -= offset
        self.log_sigma[new] = self.log_sigma[old]
        if self.covariance == "full":  # type: ignore[attr-defined]
            self.tril[new] = self.tril[old]  # type: ignore[attr-defined]
        half = self.pi_logits[old] - math.log(2.0)
        self.pi_logits[new] = half
        self.pi_logits[old] = half


def split_due(every: int, until: int, epoch: int) -> bool:
    """Whether the split move runs before SVI epoch ``epoch`` (:class:`SplitSettings`): every
    ``every`` epochs (0: never), from epoch ``every`` up to ``until``."""
    return bool(every) and epoch > 0 and epoch % every == 0 and epoch <= until


@torch.no_grad()
def split_emptied(prior: MixturePrior, q: torch.Tensor, loc: torch.Tensor,
                  threshold: float = 0.3,
                  on_split: Callable[[int, int], None] | None = None) -> list[tuple[int, int]]:
    """Split the most used component of ``prior`` into every component whose share of the
    responsibilities ``q`` (N, K) fell below ``threshold / K``; returns the (emptied, split)
    pairs. ``loc``: the points' posterior means of z, (N, D), or (N, K, D) per cluster.

    The split move of split-and-merge EM (Ueda et al. 2000): a mixture trained by gradient
    steps loses components (the rich get richer); the two halves start at mu +- one standard
    deviation of the split component's points along their first principal axis, and the ELBO
    then separates them. ``on_split(emptied, split)`` mirrors each split in a guide with
    per-cluster parts. Deterministic given the inputs.
    """
    k = q.shape[1]
    use, hard = q.mean(0), q.argmax(1)
    pairs = []
    for dead in (use < threshold / k).nonzero().flatten().tolist():
        old = int(use.argmax())
        in_old = (hard == old).nonzero().flatten()
        members = loc[in_old, old] if loc.ndim == 3 else loc[in_old]
        if members.shape[0] < 2:
            break
        centred = members - members.mean(0)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        prior.split_cluster(dead, old, vh[0] * sv[0] / math.sqrt(members.shape[0]))
        if on_split is not None:
            on_split(dead, old)
        use[old] /= 2
        use[dead] = use[old]
        hard[in_old[centred @ vh[0] > 0]] = dead  # the half nearer the new mean
        pairs.append((dead, old))
    return pairs


class PixelLikelihood:
    """The observation model p(x | z) shared by every story: the decoder's output ``out``
    (..., D) for flattened images, scored as Bernoulli logits (grey levels in [0, 1] with the
    Bernoulli cross-entropy, as in VaDE) or as the mean of a Normal with a learned scale per
    value (``x_log_scale``; a story with a fixed scale overrides :meth:`noise_scale`)."""

    likelihood: str
    image_shape: tuple[int, ...]
    x_log_scale: nn.Parameter

    def init_likelihood(self, likelihood: str, image_shape: tuple[int, ...]) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        self.likelihood, self.image_shape = likelihood, tuple(image_shape)
        if likelihood == "gaussian":
            self.x_log_scale = nn.Parameter(torch.zeros(math.prod(self.image_shape)))

    def noise_scale(self) -> torch.Tensor | float:
        return self.x_log_scale.exp()

    def likelihood_of(self, out: torch.Tensor) -> dist.Distribution:
        """p(x | the decoder's output ``out``) over flattened images (event dim 1)."""
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        return dist.Normal(out, self.noise_scale()).to_event(1)

    def mean_of(self, out: torch.Tensor) -> torch.Tensor:
        """E[x | the decoder's output ``out``], still flat."""
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out


class MixtureLatentModel(MixturePrior, PixelLikelihood, LocalPyroModule):
    """The story with one mixture-distributed latent, told by vade, vade-t and cgm (which
    differ in ``component`` and ``observation``)::

        c_n ~ Categorical(pi)        # enumerated in the model, never sampled
        z_n | c_n ~ p(z | c_n)       # component(c)
        x_n | z_n ~ p_f(x | z_n)     # observation(z), the decoder f
    """

    def __init__(self, decoder: nn.Module, n_clusters: int, latent_dim: int,
                 image_shape: tuple[int, ...], likelihood: str = "bernoulli",
                 covariance: str = "diag") -> None:
        super().__init__()
        self.decoder = decoder
        self.init_likelihood(likelihood, image_shape)
        self.init_mixture(n_clusters, latent_dim, covariance)

    def forward(self, x: torch.Tensor) -> None:
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.pi_logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", self.component(c))
            pyro.sample("x", self.observation(z), obs=x)

    def generate(self, n: int, cluster: int | None = None) -> torch.Tensor:
        """Draw ``n`` images (likelihood means) from the prior, optionally from one cluster."""
        return self.decode_mean(self.sample(n, cluster))

    def observation(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) as a distribution over flattened images (event dim 1)."""
        return self.likelihood_of(self.decoder(z))

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] reshaped to images."""
        return self.mean_of(self.decoder(z)).reshape(*z.shape[:-1], *self.image_shape)
