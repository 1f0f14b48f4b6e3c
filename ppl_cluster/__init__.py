"""ppl-cluster: deep generative clustering as explicit Pyro model/guide pairs."""

import pyro

# Keep each PyroModule's parameters on the module rather than in Pyro's global param store,
# so that several models (restarts, tests, notebooks) can live in one process and be
# optimised with torch optimizers through the ELBO module.
pyro.settings.set(module_local_params=True)

from .api import Clusterer  # noqa: E402
from .registry import REGISTRY, Variant, get_variant, register  # noqa: E402

__all__ = ["Clusterer", "REGISTRY", "Variant", "get_variant", "register"]
__version__ = "0.1.0"
