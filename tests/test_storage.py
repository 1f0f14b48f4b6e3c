"""Pixels stored as bytes: uint8 data stay uint8 on the device and become floats a batch at a
time (``ppl_cluster.data.unit``), with exactly the losses and assignments of float storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pinned import CASES, COMMON, DIGITS
from ppl_cluster.guides.cgm import fingerprint
from sklearn.datasets import load_digits

from ppl_cluster import Clusterer
from ppl_cluster.data import as_images, load_dataset, unit
from ppl_cluster.errors import DataError


def _bytes(n: int = 360) -> torch.Tensor:
    """The pinned digits rounded to uint8 pixels (N, 8, 8)."""
    x = load_digits().images[:n] / 16.0
    return torch.tensor(np.round(x * 255), dtype=torch.uint8)


def test_unit_gives_the_floats_a_float_loader_gives():
    b = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit(b), torch.from_numpy(b.numpy().astype(np.float32) / 255.0))
    f = torch.rand(5)
    assert unit(f) is f  # anything but bytes passes through


def test_bytes_are_kept_and_never_judged_as_0_to_255():
    x = as_images(_bytes(10))
    assert x.dtype == torch.uint8 and x.shape == (10, 1, 8, 8)
    with pytest.raises(DataError, match="must lie in"):  # floats 0..255 are not pixels k / 255
        as_images(_bytes(10).float())
    Clusterer("vade", 2, dataset="digits", hidden=[8], latent_dim=2, epochs=1, pretrain_epochs=0,
              batch_size=5, init="gmm", gmm_inits=1, progress=False).fit(_bytes(10))  # Bernoulli


def test_the_chain_keys_of_bytes_and_of_their_floats_agree_in_any_chunks():
    b = _bytes(50)
    keys = fingerprint(b)
    assert torch.equal(keys, fingerprint(unit(b)))
    assert torch.equal(keys, fingerprint(b, chunk=7))
    assert keys.unique().numel() == 50


@pytest.mark.parametrize("name", ["vade", "vc", "vc-warm", "mfcvae", "cgm-pca", "cgm-pixel"])
def test_byte_storage_trains_exactly_like_float_storage(name):
    model, k, settings = CASES[name]
    b = _bytes()
    runs = []
    for x in (b, unit(b)):
        clu = Clusterer(model, k, **COMMON, **settings, **DIGITS[name], progress=False).fit(x)
        runs.append((clu.fitted.history, clu.predict_proba(x), clu.predict_proba(b),
                     clu.embed(x)))
    (h_b, p_b, q_b, z_b), (h_f, p_f, q_f, z_f) = runs
    assert h_b == h_f
    np.testing.assert_array_equal(p_b, p_f)
    np.testing.assert_array_equal(q_b, q_f)  # bytes given to a float-trained model
    np.testing.assert_array_equal(z_b, z_f)


def test_mnist_is_stored_as_bytes(mnist_root):
    ds = load_dataset("mnist", mnist_root, "test")
    assert ds.x.dtype == torch.uint8 and ds.x.shape[1:] == (1, 28, 28)
    coloured = load_dataset("colored-mnist", mnist_root, "test")
    assert coloured.x.dtype == torch.float32 and float(coloured.x.max()) <= 1.0


def test_fitting_bytes_converts_a_batch_or_chunk_at_a_time(monkeypatch):
    import importlib

    x = _bytes(1797).repeat(3, 1, 1)  # 5391 images: more than one chunk
    rows: list[int] = []

    def recording(t):
        if t.dtype == torch.uint8:
            rows.append(t.shape[0])
        return unit(t)

    for name in ("data", "train", "init", "api", "diagnostics", "report"):  # data: chunks
        monkeypatch.setattr(importlib.import_module(f"ppl_cluster.{name}"), "unit", recording)
    from ppl_cluster import init

    monkeypatch.setattr(init, "EXACT_PCA_BYTES", 0)  # cgm's principal components: by chunks
    for model, settings in (("vade", dict(pretrain_epochs=1)), ("vc", dict(pretrain_epochs=1)),
                            ("mfcvae", dict(pretrain_epochs=1, clusters_per_facet=[4, 3])),
                            ("cgm", dict(langevin_steps=1, infer_steps=1))):
        rows.clear()
        clu = Clusterer(model, 4, dataset="digits", hidden=[16], latent_dim=2, epochs=1,
                        batch_size=500, init="gmm", gmm_inits=1, progress=False, **settings).fit(x)
        clu.predict_frame(x, embed=True)
        assert rows and max(rows) <= 4096 < len(x), (model, max(rows))  # chunks of <= 4096


@pytest.mark.parametrize("byte_storage", [True, False])
def test_hooks_get_bytes_only_from_a_variant_that_reads_them(monkeypatch, byte_storage):
    from helpers import variant_like

    from ppl_cluster.registry import REGISTRY

    vade, seen = REGISTRY["vade"], []

    def initialize(model, guide, x, cfg, seed):
        seen.append(x.dtype)
        return vade.initialize(model, guide, x, cfg, seed)

    monkeypatch.setitem(REGISTRY, "vade", variant_like(vade, byte_storage=byte_storage,
                                                       initialize=initialize))
    Clusterer("vade", 2, dataset="digits", hidden=[8], latent_dim=2, epochs=1, pretrain_epochs=1,
              batch_size=20, init="gmm", gmm_inits=1, progress=False).fit(_bytes(40))
    assert seen == [torch.uint8 if byte_storage else torch.float32]
