"""Variational Clustering: the guide-enumerated ELBO against a hand-written sum over clusters,
the relaxed (straight-through Gumbel-softmax) option, its temperature schedule and resume, the
CLI flag, and the Student-t mixture variant."""

import functools
import json
import math

import numpy as np
import pyro
import pytest
import torch
from helpers import (
    SHAPE,
    assert_enumerated_loss_equals,
    interrupted_and_uninterrupted,
    small_fitted,
)
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from ppl_cluster import Clusterer
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.errors import ConfigError
from ppl_cluster.registry import get_variant
from ppl_cluster.variant import enumerated_cluster_logits

K, D = 4, 3


def make(discrete="enumerate", likelihood="bernoulli", name="vc", **extra):
    if name == "vc":
        extra["discrete"] = discrete
    return small_fitted(name, K, D, likelihood, **extra)


def hand_written_elbo(model, guide, x, eps):
    """sum_n sum_c q(c|x)[log p(x|z_c) + log p(z_c|c) - log q(z_c|x,c) + log pi_c - log q(c|x)]
    with z_c = loc_c(x) + scale_c(x) * eps_c, eps of shape (K, N, D)."""
    views, eps = x[:, None], eps[:, None]  # one view of each image: (N, 1, ...), (K, 1, N, D)
    n, v = views.shape[:2]
    logits = guide.heads(views[:, 0])[0]
    _, loc, scale = guide.heads(views.flatten(0, 1))
    loc, scale = (t.reshape(n, v, K, D).permute(2, 1, 0, 3) for t in (loc, scale))  # (K, V, N, D)
    z = loc + scale * eps
    out = model.decoder(z)
    pixels = views.flatten(2).transpose(0, 1)  # (V, N, P)
    log_px = (pixels * out - torch.nn.functional.softplus(out)).sum(-1)  # (K, V, N)
    if model.covariance == "full":  # Sigma_c = L_c L_c^T, L_c = diag(sigma_c) + lower triangle
        lower = torch.diag_embed(model.log_sigma.exp()) + torch.tril(model.tril, -1)
        log_pz = torch.distributions.MultivariateNormal(
            model.mu[:, None, None], covariance_matrix=(lower @ lower.transpose(-1, -2))[:, None, None]
        ).log_prob(z)
    else:
        log_pz = torch.distributions.Normal(model.mu[:, None, None],
                                            model.log_sigma.exp()[:, None, None]).log_prob(z).sum(-1)
    log_pi = torch.log_softmax(model.pi_logits, -1)[:, None]
    log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    log_qc = torch.log_softmax(logits, -1).T
    per_view = (log_px + log_pz - log_qz).sum(1)  # (K, N)
    return (log_qc.exp() * (per_view + log_pi - log_qc)).sum()


def test_sites_and_shapes_of_enumerated_guide():
    f = make()
    x = torch.rand(5, *SHAPE).round()
    tracer = poutine.trace(f.guide)
    TraceEnum_ELBO(max_plate_nesting=1).loss(f.model, tracer, x)
    tr = tracer.msngr.trace
    assert tr.nodes["c"]["infer"]["enumerate"] == "parallel"
    assert tr.nodes["c"]["value"].shape == (K, 1)
    assert tr.nodes["z"]["value"].shape == (K, 5, D)  # one z per cluster and image
    assert f.model.generate(7, cluster=2).shape == (7, *SHAPE)
    assert f.guide.embed(x).shape == (5, D)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_enumerated_guide_elbo_equals_hand_written_sum_over_clusters_with_gradients(covariance):
    f = make(prior_covariance=covariance)
    x = torch.rand(8, *SHAPE).round()
    params = [p for m in (f.model, f.guide) for p in m.parameters()]
    tracer = poutine.trace(f.guide)  # records the z per cluster that the ELBO used
    pyro.set_rng_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, tracer, x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    tr = tracer.msngr.trace
    z = tr.nodes["z"]["value"].detach()
    loc, scale = tr.nodes["z"]["fn"].base_dist.loc.detach(), tr.nodes["z"]["fn"].base_dist.scale.detach()
    eps = (z - loc) / scale  # the same noise, so both use the same z_c
    ref = -hand_written_elbo(f.model, f.guide, x, eps)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for p, g, r in zip(params, grads, ref_grads, strict=True):
        assert g is not None and r is not None, p.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_relaxed_loss_is_an_unbiased_estimate_of_the_enumerated_elbo(covariance):
    x = torch.rand(64, *SHAPE).round()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    exact = make("enumerate", prior_covariance=covariance)
    relaxed = make("relaxed", prior_covariance=covariance)
    relaxed.model.load_state_dict(exact.model.state_dict())
    relaxed.guide.load_state_dict(exact.guide.state_dict())
    pyro.set_rng_seed(0)
    with torch.no_grad(), pyro.validation_enabled(False):
        a = torch.tensor([elbo.loss(exact.model, exact.guide, x) for _ in range(100)])
        b = torch.tensor([elbo.loss(relaxed.model, relaxed.guide, x) for _ in range(300)])
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert b.var() > a.var()  # sampling c costs variance, as expected


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
def test_relaxed_sample_is_one_hot_with_gradients_to_q_c():
    f = make("relaxed")
    x = torch.rand(6, *SHAPE).round()
    tr = poutine.trace(f.guide).get_trace(x)
    c = tr.nodes["c"]["value"]
    assert c.shape == (6, K) and torch.equal(c.sum(-1), torch.ones(6)) and set(c.unique().tolist()) == {0.0, 1.0}
    # The pmf of the hard sample is the exact categorical one.
    log_q = torch.log_softmax(f.guide.heads(x)[0], -1)
    torch.testing.assert_close(tr.nodes["c"]["fn"].log_prob(c), (c * log_q).sum(-1))
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, f.guide, x)
    (g,) = torch.autograd.grad(loss, [f.guide.logits_head.weight])
    assert torch.count_nonzero(g) > 0


def test_temperature_schedule_is_a_pure_function_of_the_epoch():
    f = make("relaxed")
    on_epoch = f.variant.on_epoch
    on_epoch(f.model, f.guide, 40, 50)
    late = f.guide.temperature
    on_epoch(f.model, f.guide, 3, 50)
    assert f.guide.temperature == pytest.approx(math.exp(-0.05 * 3))
    assert late == 0.5  # the floor


def test_cluster_assignment_is_q_c_given_x():
    f = make()
    x = torch.rand(6, *SHAPE)
    logits = f.variant.cluster_logits(f.model, f.guide, x)
    torch.testing.assert_close(logits, torch.log_softmax(f.guide.heads(x)[0], -1))
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(6))


SMALL = dict(hidden=[64, 64], latent_dim=5, epochs=5, batch_size=64, lr=2e-3)


@pytest.mark.parametrize("discrete", ["enumerate", "relaxed"])
def test_both_modes_train_from_scratch_on_tiny_data(digits, discrete):
    clu = Clusterer("vc", 5, extra={"discrete": discrete}, seed=0, pretrain_epochs=0,
                    **SMALL).fit(digits.x[:300])
    hist = clu.fitted.history
    assert hist["pretrain"] == []  # no pretraining, no GMM init
    assert "init_log_likelihood" not in clu.fitted.info
    assert all(np.isfinite(hist["train"])) and hist["train"][-1] < hist["train"][0]
    assert clu.fitted.model.discrete == clu.fitted.guide.discrete == discrete


def test_warm_start_ties_the_z_heads_and_fits_q_c_to_the_mixture(digits):
    """After pretraining, every cluster's z head is the pretrained code, the mixture is fitted
    on those codes, and q(c | x) agrees with the mixture's own assignments p(c | z = code)."""
    from ppl_cluster.train import build

    x = digits.x[:300]
    torch.manual_seed(0)
    cfg = get_variant("vc").resolve(FitConfig(model="vc", n_clusters=K, pretrain_epochs=3,
                                              init="gmm", **SMALL))
    f = build(cfg, tuple(x.shape[1:]), x.device)
    info = f.variant.initialize(f.model, f.guide, x, cfg, 0)
    assert math.isfinite(info["init_log_likelihood"])
    # A linear head on the (here untrained) trunk: far below the uniform head's log K.
    assert info["init_head_cross_entropy"] < 0.5 * math.log(K)
    with torch.no_grad():
        code = f.guide.ae_embed(x)
        _, loc, _ = f.guide.heads(x)
        torch.testing.assert_close(loc, code.unsqueeze(1).expand_as(loc))
        mixture = f.model.cluster_logits(code).argmax(1)
        q = f.guide.cluster_logits(x).argmax(1)
    assert (q == mixture).float().mean() > 0.75
    assert len(set(q.tolist())) == K  # no cluster left empty by the start


def test_relaxed_run_resumes_exactly_under_the_schedule(digits, tmp_path, monkeypatch):
    # Splits every epoch where a cluster empties: the moves, too, must replay exactly. A
    # threshold of 1 calls every below-average cluster emptied, so that moves surely happen.
    from ppl_cluster.models import vc

    monkeypatch.setattr(vc, "reseed_dead_clusters",
                        functools.partial(vc.reseed_dead_clusters, threshold=1.0))
    cfg = get_variant("vc").resolve(FitConfig(model="vc", n_clusters=4, extra={"discrete": "relaxed", "split_every": 1},
                    **SMALL))
    x = digits.x[:200]
    full, resumed = interrupted_and_uninterrupted(cfg, x, 2, 2, tmp_path)
    assert resumed.guide.temperature == full.guide.temperature
    assert full.info["moves"], "no split happened: the resume of a move was never exercised"
    assert resumed.info["moves"] == full.info["moves"]
    assert resumed.history == full.history
    for a, b in ((full.model, resumed.model), (full.guide, resumed.guide)):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(ta, tb), name


def test_cli_discrete_flag(tmp_path, capsys):
    out = tmp_path / "relaxed"
    args = ["fit", "--model", "vc", "--discrete", "relaxed", "--n-clusters", "4", "--epochs", "1",
            "--pretrain-epochs", "1", "--batch-size", "512", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["extra"]["discrete"] == "relaxed"
    capsys.readouterr()
    assert main(["fit", "--model", "vc", "--discrete", "enumerate", "--resume", "--out", str(out)]) == 2
    assert "--discrete enumerate differs" in capsys.readouterr().err
    assert main(["fit", "--model", "vade", "--discrete", "relaxed", "--out", str(tmp_path / "v")]) == 2
    assert "--discrete is a setting of model vc, not vade" in capsys.readouterr().err


def test_vc_rejects_unknown_discrete_mode():
    with pytest.raises(ConfigError, match="discrete must be enumerate or relaxed"):
        Clusterer("vc", 3, extra={"discrete": "sampled"}, epochs=1).fit(np.random.rand(20, 4))


# --- vade-t: the Student-t mixture prior -------------------------------------------------

def test_student_mixture_posterior_matches_pyro_enumeration():
    f = make(name="vade-t")
    x = torch.rand(6, *SHAPE)
    fast = f.variant.cluster_logits(f.model, f.guide, x)
    torch.testing.assert_close(fast, enumerated_cluster_logits(f.model, f.guide, x),
                               rtol=1e-5, atol=1e-5)
    z = f.guide.embed(x)
    m = f.model
    joint = torch.stack([torch.log_softmax(m.pi_logits, -1)[k] + torch.distributions.StudentT(
        m.nu[k], m.mu[k], m.sigma[k]).log_prob(z).sum(-1) for k in range(K)], -1)
    torch.testing.assert_close(fast, joint - joint.logsumexp(-1, keepdim=True))


def test_student_mixture_elbo_equals_the_explicit_formula_with_gradients():
    # The Student-t log-density and the Bernoulli cross-entropy written out, no torch.distributions.
    f = small_fitted("vade-t", 4, 3)
    with torch.no_grad():
        f.model.raw_nu.uniform_(-1.0, 2.0)
    x = torch.rand(8, *SHAPE).round()

    def reference(tr):
        z = tr.nodes["z"]["value"]
        loc, scale = f.guide.encoder(x)
        logits = f.model.decoder(z)
        log_px = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
        nu, mu, sig = 1 + torch.nn.functional.softplus(f.model.raw_nu), f.model.mu, f.model.log_sigma.exp()
        u = (z[:, None] - mu) / sig
        log_t = (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(nu * math.pi)
                 - sig.log() - (nu + 1) / 2 * torch.log1p(u**2 / nu)).sum(-1)
        log_pz = torch.logsumexp(torch.log_softmax(f.model.pi_logits, -1) + log_t, -1)
        log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        return -(log_px + log_pz - log_qz).sum()

    assert_enumerated_loss_equals(f, x, reference)


def test_student_mixture_init_matches_gmm_variances():
    f = make(name="vade-t")
    var = torch.rand(K, D) + 0.1
    f.model.set_mixture(torch.full((K,), 1 / K), torch.zeros(K, D), var)
    nu = f.model.nu
    torch.testing.assert_close(f.model.sigma ** 2 * nu / (nu - 2), var)
    assert (nu > 1).all()


def test_an_emptied_cluster_is_reseeded_by_splitting_the_largest():
    from ppl_cluster.models.vc import reseed_dead_clusters

    f = make()
    x = torch.rand(200, *SHAPE)
    with torch.no_grad():
        f.guide.logits_head.bias.copy_(torch.tensor([3.0, 4.0, 3.0, -30.0]))  # 3 empty, 1 largest
    q_before = f.variant.cluster_logits(f.model, f.guide, x).exp()
    mu_before = f.model.mu.detach().clone()
    pairs = reseed_dead_clusters(f.model, f.guide, x)
    assert pairs == [(3, 1)]
    q = f.variant.cluster_logits(f.model, f.guide, x).exp()
    # The largest cluster's mass is shared equally by the two halves; the others keep theirs.
    torch.testing.assert_close(q[:, 1] + q[:, 3], q_before[:, 1])
    torch.testing.assert_close(q[:, 1], q[:, 3])
    torch.testing.assert_close(q[:, [0, 2]], q_before[:, [0, 2]])
    # Both halves start from the same z heads, at mu_1 -+ an offset in the prior.
    _, loc, _ = f.guide.heads(x)
    torch.testing.assert_close(loc[:, 1], loc[:, 3])
    offset = f.model.mu[3] - mu_before[1]
    assert offset.norm() > 0
    torch.testing.assert_close(f.model.mu[1], mu_before[1] - offset)
    torch.testing.assert_close(f.model.log_sigma[3], f.model.log_sigma[1])
    pi = f.model.pi_logits.softmax(-1)
    torch.testing.assert_close(pi[1], pi[3])
    # Nothing is emptied any more: a second call does nothing.
    assert reseed_dead_clusters(f.model, f.guide, x) == []


def test_split_schedule_and_record(digits):
    clu = Clusterer("vc", 8, extra={"split_every": 1, "split_until": 3}, seed=0,
                    pretrain_epochs=0, **{**SMALL, "epochs": 5}).fit(digits.x[:300])
    moves = clu.fitted.info.get("moves", [])
    assert moves, "no split happened: the schedule was never exercised"
    assert all(1 <= m["epoch"] <= 3 and m["split"] for m in moves)
    with pytest.raises(ConfigError, match="split_every must be an integer >= 0, got -1"):
        Clusterer("vc", 4, extra={"split_every": -1}, **SMALL)


def test_variant_defaults_may_set_restarts():
    assert FitConfig().resolved({"restarts": 3}).restarts == 3
    assert FitConfig(restarts=1).resolved({"restarts": 3}).restarts == 1
    assert get_variant("vade").resolve(FitConfig()).restarts == 1
    vc = get_variant("vc").resolve(FitConfig(model="vc", dataset="mnist", preset="mnist"))
    assert vc.latent_dim == 32 and vc.hidden == [512, 512]
