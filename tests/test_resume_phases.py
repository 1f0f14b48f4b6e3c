"""Exact resume from every phase boundary: inside pretraining, at its last epoch (the
initialisation then runs on resume) and right after the initialisation (the first SVI epoch)."""

import pytest
import torch
from helpers import interrupted_and_uninterrupted

from ppl_cluster.config import FitConfig
from ppl_cluster.registry import get_variant

N_PRE = 3


def _cfg(model: str) -> FitConfig:
    extra = dict(clusters_per_facet=[4, 3], progressive_epochs=2, fade_in_epochs=1) \
        if model == "mfcvae" else {}
    return get_variant(model).resolve(FitConfig(model=model, dataset="digits", n_clusters=4, hidden=[32, 32], latent_dim=3,
                     epochs=2, pretrain_epochs=N_PRE, batch_size=128, init="gmm", gmm_inits=1,
                     extra=extra))


@pytest.mark.parametrize("model", ["vade", "mfcvae"])
@pytest.mark.parametrize("stop_after", [0, N_PRE - 1, N_PRE],
                         ids=["first-pretrain-epoch", "last-pretrain-epoch", "after-init"])
def test_resume_from_each_phase_is_exact(digits, tmp_path, model, stop_after):
    cfg = _cfg(model)
    assert get_variant(model).pretrain_loss is not None and cfg.pretrain_epochs == N_PRE
    full, resumed = interrupted_and_uninterrupted(cfg, digits.x[:300], 4, stop_after, tmp_path)
    for part in ("model", "guide"):
        a = getattr(full, part).state_dict()
        b = getattr(resumed, part).state_dict()
        assert a.keys() == b.keys()
        for name, tensor in a.items():
            assert torch.equal(tensor, b[name]), f"{part}.{name} differs after resume"
    assert len(full.history["pretrain"]) == N_PRE and len(full.history["train"]) == cfg.epochs
    assert full.history == resumed.history
    # The initialisation ran exactly once in both runs and recorded the same result.
    strip = {"seconds"}
    assert {k: v for k, v in full.info.items() if k not in strip} == \
        {k: v for k, v in resumed.info.items() if k not in strip}
