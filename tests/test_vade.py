"""VaDE's model/guide against a hand-written VaDE ELBO and Pyro's own enumeration."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import (
    SHAPE,
    assert_enumerated_loss_equals,
    explicit_component_log_density,
    small_fitted,
)
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from ppl_cluster.variant import enumerated_cluster_logits


def make(likelihood="bernoulli", k=4, d=3):
    return small_fitted("vade", k, d, likelihood)


def hand_written_loss(model, guide, x, z):
    """-ELBO summed over the batch: log p(x|z) + log sum_c pi_c N(z|mu_c,sigma_c) - log q(z|x)."""
    loc, scale = guide.encoder(x)
    logits = model.decoder(z)
    log_px = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
    log_pi = torch.log_softmax(model.pi_logits, -1)
    log_pzc = torch.distributions.Normal(model.mu, model.log_sigma.exp()).log_prob(z[:, None]).sum(-1)
    log_pz = torch.logsumexp(log_pi + log_pzc, -1)
    log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return -(log_px + log_pz - log_qz).sum()


def test_gaussian_likelihood_elbo_equals_the_explicit_formula_with_gradients():
    # log N(x | m, s) = -(x - m)^2 / (2 s^2) - log s - log(2 pi) / 2, written out (no torch.distributions).
    f = make("gaussian")
    with torch.no_grad():
        f.model.x_log_scale.uniform_(-1.0, 0.5)
    x = torch.rand(8, *SHAPE)

    def reference(tr):
        z = tr.nodes["z"]["value"]
        loc, scale = f.guide.encoder(x)
        m, log_s = f.model.decoder(z), f.model.x_log_scale
        log_px = (-0.5 * ((x.flatten(1) - m) / log_s.exp()) ** 2 - log_s
                  - 0.5 * math.log(2 * math.pi)).sum(-1)
        var = (2 * f.model.log_sigma).exp()
        log_pzc = (-0.5 * (z[:, None] - f.model.mu) ** 2 / var - f.model.log_sigma
                   - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_pz = torch.logsumexp(torch.log_softmax(f.model.pi_logits, -1) + log_pzc, -1)
        log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        return -(log_px + log_pz - log_qz).sum()

    assert_enumerated_loss_equals(f, x, reference)


def test_shapes_of_model_and_guide_sites():
    f = make()
    x = torch.rand(5, *SHAPE)
    guide_tr = poutine.trace(f.guide).get_trace(x)
    assert guide_tr.nodes["z"]["value"].shape == (5, 3)
    model_tr = poutine.trace(poutine.replay(f.model, trace=guide_tr)).get_trace(x)
    assert model_tr.nodes["c"]["infer"]["enumerate"] == "parallel"
    assert model_tr.nodes["x"]["value"].shape == (5, 36)
    assert f.model.generate(7, cluster=2).shape == (7, *SHAPE)


def test_enumerated_elbo_equals_hand_written_logsumexp_with_gradients():
    f = make()
    x = torch.rand(8, *SHAPE).round()
    assert_enumerated_loss_equals(
        f, x, lambda tr: hand_written_loss(f.model, f.guide, x, tr.nodes["z"]["value"]))


def test_elbo_module_is_the_same_loss():
    f = make()
    x = torch.rand(8, *SHAPE)
    pyro.set_rng_seed(3)
    a = f.elbo_module()(x)
    pyro.set_rng_seed(3)
    b = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, f.guide, x)
    assert a.item() == pytest.approx(b.item())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_cluster_posterior_matches_pyro_enumeration(likelihood):
    f = make(likelihood)
    x = torch.rand(6, *SHAPE)
    fast = f.variant.cluster_logits(f.model, f.guide, x)
    pyro_logits = enumerated_cluster_logits(f.model, f.guide, x)
    torch.testing.assert_close(fast, pyro_logits, rtol=1e-5, atol=1e-5)
    probs = fast.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    assert (probs >= 0).all()


def test_cluster_posterior_is_bayes_rule_by_hand():
    f = make()
    z = torch.randn(5, 3)
    m = f.model
    joint = torch.stack([
        torch.log_softmax(m.pi_logits, -1)[k] + dist.Normal(m.mu[k], m.sigma[k]).log_prob(z).sum(-1)
        for k in range(m.n_clusters)], -1)
    torch.testing.assert_close(m.cluster_logits(z), joint - joint.logsumexp(-1, keepdim=True))


def test_prior_constraints_and_gmm_init():
    f = make()
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mu = torch.randn(4, 3)
    var = torch.rand(4, 3) + 0.1
    f.model.set_mixture(pi, mu, var)
    torch.testing.assert_close(f.model.pi_logits.softmax(-1), pi)
    torch.testing.assert_close(f.model.sigma ** 2, var)
    assert (f.model.sigma > 0).all()


def test_full_covariance_elbo_equals_the_explicit_formula_with_gradients():
    """VaDE with prior_covariance="full" (the shared mixture block): log p(z | c) from the
    covariance matrices themselves (solve, slogdet), and p(c | z) by Bayes' rule with them."""
    f = small_fitted("vade", 4, 3, prior_covariance="full")
    assert f.model.tril.shape == (4, 3, 3) and torch.count_nonzero(f.model.tril.tril(-1)) > 0
    x = torch.rand(8, *SHAPE).round()

    def reference(tr):
        z = tr.nodes["z"]["value"]
        loc, scale = f.guide.encoder(x)
        logits = f.model.decoder(z)
        log_px = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
        joint = torch.log_softmax(f.model.pi_logits, -1) + explicit_component_log_density(f.model, z)
        log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        return -(log_px + joint.logsumexp(-1) - log_qz).sum()

    assert_enumerated_loss_equals(f, x, reference)
    z = torch.randn(6, 3)
    joint = torch.log_softmax(f.model.pi_logits, -1) + explicit_component_log_density(f.model, z)
    torch.testing.assert_close(f.model.cluster_logits(z), joint.log_softmax(-1), rtol=1e-5,
                               atol=1e-5)
