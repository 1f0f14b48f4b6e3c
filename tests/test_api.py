import numpy as np
import pyro
import pytest
import torch

from ppl_cluster import Clusterer
from ppl_cluster.errors import CheckpointError, ConfigError, DataError

SMALL = dict(hidden=[32, 32], latent_dim=4, batch_size=64, pretrain_epochs=2, epochs=2,
             gmm_inits=1, init="gmm")  # the cheap initialisation: these tests are not about it


@pytest.fixture(scope="module")
def fitted(digits):
    return Clusterer("vade", 6, **SMALL).fit(digits.x[:300].numpy())


def test_predict_proba_rows_on_simplex(fitted, digits):
    p = fitted.predict_proba(digits.x[:50])
    assert p.shape == (50, 6)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert (p >= 0).all()
    np.testing.assert_array_equal(fitted.predict(digits.x[:50]), p.argmax(1))


def test_sample_shapes(fitted):
    assert fitted.sample(5, cluster=3).shape == (5, 1, 8, 8)
    assert fitted.sample(2).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError):
        fitted.sample(2, cluster=6)


def test_sample_for_a_cluster_draws_that_clusters_latents(fitted, monkeypatch):
    # The model's own posterior p(c | z) assigns most latents drawn for cluster k to k; a
    # generate that ignored ``cluster`` would spread them by the mixture weights.
    # Components set well apart (a 2-epoch fit leaves them overlapping by chance), put back after.
    model = fitted.fitted.model
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.mu.copy_(4 * torch.randn(model.mu.shape, generator=torch.Generator().manual_seed(0)))
        model.log_sigma.zero_()
    drawn = []
    decode = model.decode_mean
    monkeypatch.setattr(model, "decode_mean", lambda z: drawn.append(z) or decode(z))
    pyro.set_rng_seed(0)
    try:
        for k in range(6):
            fitted.sample(200, cluster=k)
            with torch.no_grad():
                share = (model.cluster_logits(drawn[-1]).argmax(-1) == k).float().mean().item()
            assert share > 0.5, f"cluster {k}: only {share:.2f} of its samples are assigned to it"
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_save_load_round_trip(fitted, digits, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(str(path))
    again = Clusterer.load(str(path))
    np.testing.assert_allclose(again.predict_proba(digits.x[:40]), fitted.predict_proba(digits.x[:40]))
    assert again.elbo(digits.x[:40]) == pytest.approx(fitted.elbo(digits.x[:40]))


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Clusterer.load(str(bad))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown model"):
        Clusterer("nope")
    with pytest.raises(ConfigError, match="n_clusters"):
        Clusterer("vade", 1)
    with pytest.raises(ConfigError, match="epochs"):
        Clusterer("vade", 3, epochs=0)
    with pytest.raises(ConfigError, match="batch_size"):
        Clusterer("vade", 3, batch_size=-4)
    with pytest.raises(ConfigError):
        Clusterer("vade", 3, not_a_setting=1)
    with pytest.raises(ConfigError, match="exceeds"):
        Clusterer("vade", 20).fit(np.random.rand(10, 4))
    with pytest.raises(ConfigError, match="not fitted"):
        Clusterer("vade", 3).predict(np.random.rand(10, 4))


def test_bad_data(fitted):
    with pytest.raises(DataError, match="NaN"):
        Clusterer("vade", 3).fit(np.full((20, 4), np.nan))
    with pytest.raises(DataError, match="shape"):
        fitted.predict(np.random.rand(5, 3, 3))
