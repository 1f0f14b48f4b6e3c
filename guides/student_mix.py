r"""The guide of "vade-t": VaDE's amortized q(z | x) = Normal(m(x), diag s(x)^2).

As in VaDE, ``c`` has no guide site; it is enumerated in the model (exact), and the cluster
assignment is the model's p(c | z = m(x)).
"""

from __future__ import annotations

from .vade import VaDEGuide


class StudentMixtureGuide(VaDEGuide):
    """Same encoder and ``embed`` as VaDE (the pretraining and GMM init hooks rely on it)."""
