"""Small builders shared by the tests (importable: pytest puts tests/ on sys.path)."""

import pyro
import torch

from ppl_cluster.config import FitConfig
from ppl_cluster.registry import get_variant
from ppl_cluster.train import Fitted, build

SHAPE = (1, 6, 6)


def small_fitted(model: str = "vade", k: int = 4, d: int = 3, likelihood: str = "bernoulli",
                 **extra) -> Fitted:
    """A tiny built variant with non-trivial prior parameters (seeded)."""
    cfg = FitConfig(model=model, n_clusters=k, latent_dim=d, likelihood=likelihood,
                    hidden=[16, 8], extra=extra).resolved(get_variant(model).defaults_for("custom"))
    pyro.set_rng_seed(0)
    fitted = build(cfg, SHAPE, torch.device("cpu"))
    with torch.no_grad():
        fitted.model.pi_logits.normal_()
        fitted.model.log_sigma.uniform_(-0.5, 0.5)
    return fitted
