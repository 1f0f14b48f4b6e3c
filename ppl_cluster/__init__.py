"""ppl-cluster: deep generative clustering as explicit Pyro model/guide pairs."""

# Importing changes no global setting: the models keep their parameters on themselves
# (models.common.LocalPyroModule) and the engine runs variants under variant.local_params.
from .api import Clusterer
from .registry import REGISTRY, get_variant, register
from .variant import Variant

__all__ = ["Clusterer", "REGISTRY", "Variant", "get_variant", "register"]
__version__ = "0.1.0"
