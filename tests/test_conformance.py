"""Every registered variant keeps the contract; a variant that breaks it fails naming the rule.

Adding a variant (models/<name>.py + guides/<name>.py + one registry entry) adds it here
automatically: nothing in this file names a variant.
"""

import dataclasses
import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import applicable, variant_like

from ppl_cluster import REGISTRY, Clusterer
from ppl_cluster.cli import main
from ppl_cluster.conformance import RULES, ConformanceError, check_variant
from ppl_cluster.registry import all_variants
from ppl_cluster.settings import setting

NAMES = sorted(all_variants())  # built-ins and installed plugins
TINY = dict(hidden=[32], latent_dim=4, epochs=3, pretrain_epochs=2, batch_size=64, gmm_inits=1)


@pytest.fixture(scope="module")
def x300(digits):
    return digits.x[:300]


@pytest.mark.parametrize("name", NAMES)
def test_variant_keeps_the_contract(name, digits):
    check_variant(REGISTRY[name], x=digits.x[:24])


@pytest.mark.parametrize("name", NAMES)
def test_variant_fits_predicts_samples_saves_and_loads(name, x300, tmp_path):
    clu = Clusterer(name, 5, seed=0, **applicable(name, TINY)).fit(x300)
    train = clu.fitted.history["train"]
    assert len(train) == 3 and all(np.isfinite(train)), train
    assert train[-1] < train[0], f"{name}: loss did not decrease: {train}"

    p = clu.predict_proba(x300[:50])
    assert p.shape == (50, 5) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    for k in (0, 4):
        assert clu.sample(3, cluster=k).shape == (3, 1, 8, 8)
    assert clu.sample(2).shape == (2, 1, 8, 8)
    assert clu.embed(x300[:7]).shape[0] == 7

    path = tmp_path / "model.pt"
    clu.save(str(path))
    again = Clusterer.load(str(path))
    np.testing.assert_array_equal(again.predict_proba(x300[:50]), clu.predict_proba(x300[:50]))


@pytest.mark.parametrize("name", NAMES)
def test_variant_fits_through_the_cli(name, tmp_path):
    out = tmp_path / name
    pretrain = ["--pretrain-epochs", "1"] if "pretrain" in REGISTRY[name].uses else []
    assert main(["fit", "--model", name, "--n-clusters", "4", "--epochs", "2", *pretrain,
                 "--batch-size", "512", "--quiet", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == name and np.isfinite(m["elbo"]) and len(m["history"]["train"]) == 2
    assert (out / "checkpoint.pt").exists() and (out / "samples.png").exists()


# --- a variant that breaks the contract fails with the rule's name ------------------------

def _broken(base, name, *, model=None, guide=None, **fields):
    """``base`` with its built model/guide patched (``model(m)``/``guide(g)`` wrap them)."""
    variant = REGISTRY[base]

    def build(cfg, shape):
        m, g = variant.build(cfg, shape)
        return (model(m) if model else m), (guide(g) if guide else g)

    return variant_like(variant, name=name, build=build, **fields)


def _model_without_x(m):
    def forward(x):  # the images are never observed
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", m.prior_c())
            pyro.sample("z", dist.Normal(m.mu[c], m.sigma[c]).to_event(1))
    m.forward = forward
    return m


def _guide_with_score_function_c(g):
    def forward(x):  # c sampled without enumeration or reparameterisation
        logits, loc, scale = g.heads(x)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=logits))
            pyro.sample("z", dist.Normal(loc[torch.arange(x.shape[0]), c],
                                         scale[torch.arange(x.shape[0]), c]).to_event(1))
    g.forward = forward
    return g


def _guide_without_z(g):
    def forward(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=g.heads(x)[0]), infer={"enumerate": "parallel"})
    g.forward = forward
    return g


def _dead_parameter(m):
    m.unused = torch.nn.Parameter(torch.zeros(3))
    return m


def _impure_on_epoch(model, guide, epoch, n_epochs):
    guide.temperature = guide.temperature * 0.5  # depends on history, not on the epoch


def _relaxed(variant):
    def build(cfg, shape):
        return variant.build(dataclasses.replace(cfg, extra={**cfg.extra, "discrete": "relaxed"}),
                             shape)
    return variant_like(variant, build=build)


def _on_epoch_training_parameters(model, guide, epoch, n_epochs):
    with torch.no_grad():
        model.mu.mul_(0.9)


def _model_without_c(m):
    def forward(x):  # the cluster site is named otherwise
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(logits=m.pi_logits),
                            infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(m.mu[k], m.sigma[k]).to_event(1))
            pyro.sample("x", m.observation(z), obs=x)
    m.forward = forward
    return m


def _nan_means(m):
    with torch.no_grad():
        m.mu.fill_(float("nan"))
    return m


def _unsaved_offset(variant):
    """cluster_logits read a plain attribute that state_dict does not carry."""
    def build(cfg, shape):
        m, g = variant.build(cfg, shape)
        g.offset = torch.randn(cfg.n_clusters)
        return m, g

    def logits(m, g, x):
        return (variant.cluster_logits(m, g, x) + g.offset).log_softmax(-1)
    return variant_like(variant, name="unsaved", build=build, cluster_logits=logits)


def _e_step_moving_the_prior(variant):
    def e_step(m, g, xb, index):  # an E-step may move only the chains, never the M-step's parameters
        variant.e_step(m, g, xb, index)
        with torch.no_grad():
            m.mu.mul_(0.9)
    return variant_like(variant, name="e-step-moves-mu", e_step=e_step)


@dataclasses.dataclass
class _OutOfRange:
    split_every: int = setting(-1, "a default its own declaration refuses", minimum=0)


BROKEN = {
    "settings": lambda: variant_like(REGISTRY["vc"], name="bad-default", Settings=_OutOfRange),
    "e-step": lambda: _e_step_moving_the_prior(REGISTRY["cgm"]),
    "cluster-site": lambda: _broken("vade", "no-c", model=_model_without_c),
    "n-clusters": lambda: _broken("vade", "wrong-k", model=lambda m: setattr(m, "n_clusters", 99) or m),
    "finite-elbo": lambda: _broken("vade", "nan-mu", model=_nan_means),
    "embed": lambda: _broken("vc", "flat-embed", guide=lambda g: (
        setattr(g, "embed", lambda x: torch.zeros(x.shape[0])) or g)),
    "facets": lambda: variant_like(REGISTRY["mfcvae"], name="no-facets", facet_logits=None),
    "state-dict": lambda: _unsaved_offset(REGISTRY["vade"]),
    "pretrain-loss": lambda: variant_like(REGISTRY["vade"], name="constant-pretrain",
                                                 pretrain_loss=lambda m, g, x: torch.tensor(1.0)),
    "initialize": lambda: variant_like(REGISTRY["vade"], name="bad-init",
                                              initialize=lambda m, g, x, cfg, seed: {"ll": "high"}),
    "stored-bytes": lambda: variant_like(  # x.float() reads byte k as k, not k / 255
        REGISTRY["vade"], name="raw-bytes",
        initialize=lambda m, g, x, cfg, seed: {"mean": float(g.embed(x.float()).mean())}),
    "defaults": lambda: variant_like(REGISTRY["vc"], name="no-lr", defaults={
        k: v for k, v in REGISTRY["vc"].defaults.items() if k != "lr"}),
    "build": lambda: variant_like(REGISTRY["vc"], name="one-module",
                                         build=lambda cfg, shape: REGISTRY["vc"].build(cfg, shape)[0]),
    "observed-x": lambda: _broken("vc", "no-x", model=_model_without_x),
    "guide-covers-latents": lambda: _broken("vc", "no-z", guide=_guide_without_z),
    "no-score-function": lambda: _broken("vc", "score", guide=_guide_with_score_function_c),
    "gradients": lambda: _broken("vc", "dead", model=_dead_parameter),
    "cluster-logits": lambda: variant_like(
        REGISTRY["vc"], name="unnormalised", cluster_logits=lambda m, g, x: g.heads(x)[0]),
    "generate": lambda: _broken("vc", "flat-samples", model=lambda m: (
        setattr(m, "generate", lambda n, cluster=None: torch.zeros(n, 64)) or m)),
    "on-epoch": lambda: _relaxed(variant_like(REGISTRY["vc"], name="impure",
                                                     on_epoch=_impure_on_epoch)),
    "on-epoch ": lambda: variant_like(REGISTRY["vc"], name="param-schedule",
                                             on_epoch=_on_epoch_training_parameters),
}


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
def test_every_rule_has_a_broken_variant():
    assert {case.strip() for case in BROKEN} == set(RULES)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_variant_fails_naming_the_rule(case):
    rule = case.strip()
    assert rule in RULES
    with pytest.raises(ConformanceError, match=rf"breaks rule \[{rule}\]") as info:
        check_variant(BROKEN[case]())
    assert info.value.rule == rule
    assert RULES[rule] in str(info.value)
