r"""VaDE: Variational Deep Embedding (Jiang et al., 2017), the generative story.

For each image :math:`n = 1..N` (``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      # cluster, enumerated in parallel, never sampled
    z_n | c_n ~ Normal(mu[c_n], sigma[c_n])     # diagonal Gaussian per cluster, D dims
             or MultivariateNormal(mu[c_n], L[c_n] L[c_n]^T)   # prior_covariance="full"
    x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))      # pixels in [0, 1]; or Normal(f(z_n), s) for real data

with ``pi`` on the simplex (softmax of free logits), ``sigma > 0`` (exp of free log-scales) and
the decoder ``f`` all learned. Because ``c`` is enumerated, ``TraceEnum_ELBO`` uses the exact
marginal :math:`\log p(z) = \log \sum_c \pi_c N(z; \mu_c, \sigma_c)`: the same objective as the
paper's ELBO with its optimal :math:`q(c|x) = p(c|z)`.
"""

from __future__ import annotations

from .. import nets
from ..config import is_vectors
from ..init import autoencoder_loss, covariance_by_bic, gmm_initialize
from ..settings import declared
from ..variant import Variant
from .common import LIKELIHOODS, MixtureLatentModel, MixtureSettings

__all__ = ["LIKELIHOODS", "VaDE", "VaDEModel"]


class VaDEModel(MixtureLatentModel):
    """p(c) p(z|c) p(x|z) with a neural decoder ``decoder: z -> per-pixel outputs``: the story
    above is :meth:`MixtureLatentModel.forward` with its Gaussian components."""


class VaDE(Variant):
    """The recipe: pretrain an autoencoder, initialise the mixture from its embeddings, then
    SVI on the ELBO with ``c`` enumerated."""

    name = "vade"
    Settings = MixtureSettings
    summary = ("VaDE (Jiang et al. 2017): GMM prior, AE pretraining + mixture init, c enumerated "
               "in the model")
    uses = ("pretrain", "init")
    byte_storage = True  # its hooks read uint8 data through data.unit
    # Measured on the 10,000-digit MNIST subset (docs/vade.md): pretraining on slightly
    # perturbed digits and a mixture initialised on a t-SNE map of the embeddings decide the
    # accuracy; a lower SVI learning rate than the paper's 2e-3 keeps what the initialisation
    # found.
    defaults = dict(arch="mlp", hidden=[500, 500, 2000], latent_dim=10, pretrain_epochs=50,
                    pretrain_lr=1e-3, pretrain_augment=True, init="tsne", init_neighbors=30,
                    gmm_covariance="full", gmm_inits=10, epochs=30, batch_size=256, lr=5e-4,
                    lr_decay=0.95, lr_step=1)
    initialize = staticmethod(gmm_initialize)
    pretrain_loss = staticmethod(autoencoder_loss)

    def scaled(self, n, shape):
        """As :meth:`Variant.scaled`; feature vectors (1, 1, D) no wider than the code get a
        code as wide as the data, started from a Gaussian mixture fitted to the features
        themselves (gmm_initialize): measured on the suite's tables (docs/suite.md)."""
        out = super().scaled(n, shape)
        if is_vectors(shape) and shape[-1] <= self.defaults["latent_dim"]:
            out.update(latent_dim=shape[-1], init="gmm")
        return out

    def chosen(self, cfg, x):
        """On feature vectors, the components' covariance that the data pay for: full or
        diagonal, whichever Gaussian mixture of the features has the lower BIC."""
        if (not is_vectors(x.shape[1:]) or "prior_covariance" in cfg.extra
                or "prior_covariance" not in declared(self.Settings)
                or x.shape[0] <= cfg.n_clusters):  # refused later, naming n-clusters
            return {}
        return {"prior_covariance": covariance_by_bic(x, cfg.n_clusters, cfg.seed)}

    def build(self, cfg, image_shape):
        from ..guides.vade import VaDEGuide

        encoder = nets.encoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape)
        decoder = nets.decoder(cfg.arch, cfg.hidden, cfg.latent_dim, image_shape)
        return self.story(cfg, decoder, image_shape), VaDEGuide(encoder)

    def story(self, cfg, decoder, image_shape) -> MixtureLatentModel:
        return VaDEModel(decoder, cfg.n_clusters, cfg.latent_dim, image_shape, cfg.likelihood,
                         self.settings(cfg).prior_covariance)

    def cluster_logits(self, model, guide, x):
        return model.cluster_logits(guide.embed(x))
