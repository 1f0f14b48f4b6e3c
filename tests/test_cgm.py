"""Clustered Generator Model: the hand-written energy against the Pyro model, Langevin on a
known target, per-pixel enumeration and segmentation, the E-step in the trainer, persistent
chains (prediction, checkpoints, exact resume), the CLI."""

import dataclasses
import json
import math

import numpy as np
import pyro
import pytest
import torch
from helpers import (
    SHAPE,
    assert_same_gradients,
    explicit_component_log_density,
    interrupted_and_uninterrupted,
    variant_like,
)
from ppl_cluster.guides.cgm import LangevinPosterior, fingerprint
from ppl_cluster.models.cgm import pyro_energy
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from ppl_cluster import REGISTRY, Clusterer
from ppl_cluster import checkpoint as ckpt
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.conformance import ConformanceError, check_variant
from ppl_cluster.errors import ConfigError
from ppl_cluster.init import principal_codes
from ppl_cluster.registry import get_variant
from ppl_cluster.train import Trainer, build

K, D = 3, 4
TINY = dict(hidden=[32], latent_dim=D, epochs=3, batch_size=50, lr=3e-3,
            langevin_steps=5, langevin_step_size=0.05, infer_steps=20)


def make(name="cgm", likelihood="gaussian", **extra):
    cfg = get_variant(name).resolve(FitConfig(model=name, n_clusters=K, latent_dim=D, likelihood=likelihood,
                    hidden=[16, 8], extra=extra))
    pyro.set_rng_seed(0)
    fitted = build(cfg, SHAPE, torch.device("cpu"))
    with torch.no_grad():  # a non-trivial mixture
        fitted.model.pi_logits.normal_()
        fitted.model.log_sigma.uniform_(-0.5, 0.5)
        if hasattr(fitted.model, "tril"):  # a correlated full covariance
            fitted.model.tril.normal_(0, 0.3)
    return fitted


def tiny_config(name, **fields):
    """TINY as a resolved FitConfig (the Langevin settings go to ``extra``)."""
    own = {k: v for k, v in TINY.items() if k.startswith(("langevin", "infer"))}
    settings = {**{k: v for k, v in TINY.items() if k not in own}, **fields}
    return get_variant(name).resolve(FitConfig(model=name, extra=own, **settings))


CASES = [("cgm", "gaussian", {}), ("cgm", "bernoulli", {}),
         ("cgm-pixel", "gaussian", {}), ("cgm-pixel", "bernoulli", {}),
         ("cgm-pixel", "gaussian", {"appearance": "full", "pixel_labels": 3}),
         ("cgm", "bernoulli", {"prior_covariance": "full"}),
         ("cgm-pixel", "gaussian", {"prior_covariance": "full"})]


@pytest.mark.parametrize(("name", "likelihood", "extra"), CASES)
def test_hand_written_energy_equals_the_pyro_model_value_and_gradient(name, likelihood, extra):
    f = make(name, likelihood, **extra)
    x = torch.rand(6, *SHAPE)
    z = torch.randn(6, D, requires_grad=True)
    params = list(f.model.parameters())
    fast = f.model.energy(x, z)  # per image
    ref = pyro_energy(f.model, x, z)  # summed, c (and every l) enumerated by Pyro
    assert fast.shape == (6,)
    assert fast.sum().item() == pytest.approx(ref.item(), rel=1e-5)
    # Image by image, too: the sum is not hiding compensating errors.
    for i in (0, 5):
        assert fast[i].item() == pytest.approx(pyro_energy(f.model, x[i : i + 1], z[i : i + 1]).item(),
                                               rel=1e-5)
    g_fast = torch.autograd.grad(fast.sum(), [z, *params])
    g_ref = torch.autograd.grad(ref, [z, *params])
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def explicit_energy(model, x, z):
    """U(z) = -log sum_c pi_c N(z; mu_c, Sigma_c) - log p(x | z) per image, from the formulas
    (the components' log-density as in helpers, the likelihoods written out)."""
    log_n = explicit_component_log_density(model, z)
    log_prior = torch.logsumexp(torch.log_softmax(model.pi_logits, -1) + log_n, -1)
    out, xf = model.decoder(z), x.flatten(1)
    if model.likelihood == "bernoulli":
        log_px = (xf * out - torch.nn.functional.softplus(out)).sum(-1)
    else:
        s = model.obs_scale
        log_px = (-0.5 * ((xf - out) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return -(log_prior + log_px)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_energy_equals_the_explicit_formula(likelihood, covariance):
    f = make("cgm", likelihood, prior_covariance=covariance)
    x = torch.rand(6, *SHAPE)
    z = torch.randn(6, D, requires_grad=True)
    params = list(f.model.parameters())
    fast, ref = f.model.energy(x, z), explicit_energy(f.model, x, z)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)
    g_fast = torch.autograd.grad(fast.sum(), [z, *params], allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), [z, *params], allow_unused=True)
    assert_same_gradients(g_fast, g_ref)


def test_m_step_loss_is_the_pyro_energy_at_the_chains():
    f = make(chain_init="prior")  # 8 images: too few to cluster
    x = torch.rand(8, *SHAPE)
    f.variant.initialize(f.model, f.guide, x, f.cfg, 0)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, f.guide, x)
    assert loss.item() == pytest.approx(pyro_energy(f.model, x, f.guide.chains).item(), rel=1e-6)


def test_langevin_reproduces_the_moments_of_a_2d_gaussian_mixture():
    w = torch.tensor([0.3, 0.7])
    mu = torch.tensor([[-1.0, 0.0], [1.0, 0.5]])
    sd = torch.tensor([[0.6, 0.6], [0.8, 0.5]])

    def energy(x, z):  # -log sum_k w_k N(z; mu_k, sd_k), per chain
        return -(w.log() + torch.distributions.Normal(mu, sd).log_prob(z[:, None]).sum(-1)
                 ).logsumexp(-1)

    def prior(n, gen):  # deliberately off-target starting points
        return 2.0 * torch.randn(n, 2, generator=gen)

    mean = (w[:, None] * mu).sum(0)
    var = (w[:, None] * (sd**2 + mu**2)).sum(0) - mean**2
    sampler = LangevinPosterior(energy, prior, 2, step_size=5e-3)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    z = sampler.langevin(torch.zeros(n, 1), prior(n, gen), 2000, gen)
    # Tolerances: 4 Monte Carlo standard errors of 4000 draws, plus the O(eps) bias of the
    # unadjusted discretisation (about 1% of the variance at eps = 5e-3).
    se = (var / n).sqrt()
    assert ((z.mean(0) - mean).abs() < 4 * se + 0.01).all(), (z.mean(0), mean)
    assert ((z.var(0) / var - 1).abs() < 0.06).all(), (z.var(0), var)
    # The mode share: the chains found both components in the right proportion.
    left = (z[:, 0] < 0).float().mean()
    assert abs(left - 0.3 * torch.distributions.Normal(-1.0, 0.6).cdf(torch.tensor(0.0))
               - 0.7 * torch.distributions.Normal(1.0, 0.8).cdf(torch.tensor(0.0))) < 0.03
    # Without noise, Langevin is gradient descent: it stops at a mode.
    sampler.noise = 0.0
    z = sampler.langevin(torch.zeros(1, 1), torch.tensor([[1.5, 1.0]]), 3000)
    torch.testing.assert_close(z, mu[1:], atol=0.05, rtol=0)


def hand_written_pixel_log_likelihood(model, x, z):
    """sum_p log sum_l softmax(h_p)_l N(x_p; a_{l,p}, s^2), one label and pixel at a time."""
    logits, app = model.layers(z)  # (N, L, P), (N, L, C, P or 1)
    n, labels, pixels = logits.shape
    xs = x.reshape(n, x.shape[1], -1)
    total = torch.zeros(n)
    for p in range(pixels):
        terms = []
        for lab in range(labels):
            a = app[:, lab, :, min(p, app.shape[-1] - 1)]
            log_w = torch.log_softmax(logits[:, :, p], -1)[:, lab]
            terms.append(log_w + torch.distributions.Normal(a, model.obs_scale).log_prob(xs[:, :, p]).sum(-1))
        total = total + torch.stack(terms, -1).logsumexp(-1)
    return total


@pytest.mark.parametrize("appearance", ["constant", "full"])
def test_per_pixel_enumeration_equals_a_hand_written_per_pixel_logsumexp(appearance):
    f = make("cgm-pixel", appearance=appearance)
    x = torch.rand(5, *SHAPE)
    z = torch.randn(5, D)
    # Pyro's enumeration of every pixel label, with the mixture part of the energy removed.
    log_pz = f.model.prior_joint(z).logsumexp(-1).sum()
    pyro_ll = -pyro_energy(f.model, x, z) - log_pz
    ref = hand_written_pixel_log_likelihood(f.model, x, z)
    assert pyro_ll.item() == pytest.approx(ref.sum().item(), rel=1e-5)
    torch.testing.assert_close(f.model.log_likelihood(x, z), ref, rtol=1e-5, atol=1e-4)


def test_segmentation_is_pyros_posterior_of_the_pixel_labels():
    f = make("cgm-pixel", pixel_labels=3)
    x = torch.rand(4, *SHAPE)
    z = torch.randn(4, D)
    conditioned = poutine.condition(f.model, data={"z": z})
    marginals = TraceEnum_ELBO(max_plate_nesting=2).compute_marginals(
        conditioned, lambda *_: None, x)
    ref = torch.log_softmax(marginals["l"].logits, -1)  # (P, N, L)
    ours = f.model.label_logits(x, z)  # (N, L, H, W)
    torch.testing.assert_close(ours.flatten(2).permute(2, 0, 1), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.model.cluster_logits(z),
                               torch.log_softmax(marginals["c"].logits, -1), rtol=1e-4, atol=1e-5)


def test_fingerprints_are_exact_and_batch_independent():
    x = torch.rand(50, 3, 8, 8)
    keys = fingerprint(x)
    assert keys.dtype == torch.long and keys.unique().numel() == 50
    torch.testing.assert_close(fingerprint(x[10:13]), keys[10:13], rtol=0, atol=0)
    y = x.clone()
    y[0, 2, 7, 7] = torch.nextafter(y[0, 2, 7, 7], torch.tensor(2.0))  # one ulp in one pixel
    assert fingerprint(y)[0] != keys[0]


def test_short_fit_decreases_the_energy_and_keeps_one_chain_per_image(digits, tmp_path):
    x = digits.x[:300]
    clu = Clusterer("cgm", 4, seed=0, likelihood="gaussian", **TINY).fit(x, run_dir=str(tmp_path))
    train = clu.fitted.history["train"]
    assert len(train) == 3 and all(np.isfinite(train)) and train[-1] < train[0], train
    guide = clu.fitted.guide
    assert guide.chains.shape == (300, D)
    # Training images read their own chain; p(c | x) is p(c | z) there.
    torch.testing.assert_close(torch.as_tensor(clu.embed(x[:20])), guide.chains[:20], rtol=0, atol=0)
    p = clu.predict_proba(x[:20])
    ref = clu.fitted.model.cluster_logits(guide.chains[:20]).exp()
    np.testing.assert_allclose(p, ref.detach().numpy(), rtol=1e-6)
    # An unseen image gets a fresh chain: deterministic, and the global RNG is left alone.
    new = torch.rand(5, *x.shape[1:])
    state = torch.get_rng_state()
    a, b = clu.embed(new), clu.embed(new)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()
    # The chains are in the checkpoint as plain tensors (weights_only load).
    saved = ckpt.load(str(tmp_path / "checkpoint.pt"))
    assert torch.equal(saved["guide"]["chains"], guide.chains)
    again = Clusterer.load(str(tmp_path / "checkpoint.pt"))
    np.testing.assert_array_equal(again.predict_proba(x[:50]), clu.predict_proba(x[:50]))


@pytest.mark.parametrize("model", ["cgm-pixel", "cgm"])
def test_resume_is_exact_with_persistent_chains(model, digits, tmp_path):
    cfg = tiny_config(model, n_clusters=3, likelihood="gaussian", epochs=4)
    if model == "cgm":  # through the mixture re-initialisation, made right at the resumed epoch
        cfg = dataclasses.replace(cfg, init="gmm", extra={**cfg.extra, "reinit_epoch": 2})
    x = digits.x[:200]
    full, resumed = interrupted_and_uninterrupted(cfg, x, 2, 1, tmp_path)
    for part in ("model", "guide"):
        a, b = getattr(full, part).state_dict(), getattr(resumed, part).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name} differs after resume"
    assert full.history == resumed.history
    assert full.info.get("moves") == resumed.info.get("moves")
    assert [m["epoch"] for m in full.info.get("moves", [])] == ([2] if model == "cgm" else [])


def test_cli_fit_and_segment_write_their_files(tmp_path, capsys):
    out = tmp_path / "pix"
    assert main(["fit", "--model", "cgm-pixel", "--likelihood", "gaussian", "--n-clusters", "3",
                 "--epochs", "2", "--batch-size", "300", "--hidden", "32", "--latent-dim", "4",
                 "--langevin-steps", "3", "--langevin-step-size", "0.05", "--infer-steps", "5",
                 "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["extra"]["langevin_steps"] == 3 and cfg["extra"]["pixel_labels"] == 2
    assert (out / "metrics.json").exists() and (out / "samples.png").exists()
    seg = tmp_path / "seg.png"
    assert main(["segment", str(out), "--out", str(seg), "--n", "6"]) == 0
    assert seg.exists() and seg.stat().st_size > 0
    assert main(["segment", str(out), "--n", "3", "--split", "test"]) == 0  # unseen images
    assert (out / "segment.png").exists()
    assert f"written {seg}" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["segment", "{nonrun}"], "not a ppl-cluster run directory"),
    (["segment", "{cgm}"], "has no per-pixel labels"),
    (["segment", "{cgm}", "--n", "0"], "--n must be >= 1"),
    (["diagnose", "{cgm}", "--no-plots", "--max-points", "20", "--num-samples", "2"],
     "is a point mass"),
    (["fit", "--model", "cgm", "--langevin-step-size", "0", "--out", "{new}"],
     "langevin-step-size must be a number > 0"),
    (["fit", "--model", "cgm", "--langevin-steps", "0", "--out", "{new}"],
     "langevin-steps must be an integer >= 1"),
    (["fit", "--model", "cgm", "--pixel-labels", "3", "--out", "{new}"],
     "--pixel-labels is a setting of model cgm-pixel, not cgm"),
    (["fit", "--model", "cgm-pixel", "--pixel-labels", "1", "--out", "{new}"],
     "pixel-labels must be an integer >= 2"),
    (["fit", "--model", "vade", "--langevin-steps", "3", "--out", "{new}"],
     "--langevin-steps is a setting of model cgm, cgm-pixel, not vade"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    run = tmp_path / "cgm"
    assert main(["fit", "--model", "cgm", "--n-clusters", "3", "--epochs", "1", "--batch-size",
                 "600", "--hidden", "16", "--langevin-steps", "1", "--infer-steps", "1",
                 "--quiet", "--out", str(run)]) == 0
    (tmp_path / "nonrun").mkdir()
    capsys.readouterr()
    paths = dict(nonrun=tmp_path / "nonrun", cgm=run, new=tmp_path / "new")
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "new").exists()


def test_clusterer_api_takes_cgm_settings_and_refuses_segment_on_cgm(digits):
    clu = Clusterer("cgm", 3, seed=0, **{**TINY, "epochs": 1}).fit(digits.x[:100])
    assert clu.fitted.guide.steps == 5 and clu.sample(2, cluster=1).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match="no per-pixel labels"):
        clu.segment(digits.x[:3])
    with pytest.raises(ConfigError, match="appearance"):
        Clusterer("cgm-pixel", 3, appearance="layered")


def test_an_e_step_that_moves_parameters_breaks_the_contract(digits):
    def e_step(model, guide, x, index):
        guide.e_step(x, index)
        with torch.no_grad():
            model.mu.add_(0.1)

    broken = variant_like(REGISTRY["cgm"], name="cgm-moves-mu", e_step=e_step)
    with pytest.raises(ConformanceError, match=r"breaks rule \[e-step\]"):
        check_variant(broken, x=digits.x[:24])

    def noisy(model, guide, x, index):  # noise from a source the checkpoint does not save
        guide.chains[index] += torch.randn(len(index), guide.latent_dim,
                                           generator=torch.Generator().manual_seed(noisy.calls))
        noisy.calls += 1

    noisy.calls = 0
    broken = variant_like(REGISTRY["cgm"], name="cgm-unseeded", e_step=noisy)
    with pytest.raises(ConformanceError, match="differ"):
        check_variant(broken, x=digits.x[:24])


def test_data_parallel_training_is_refused(digits, tmp_path):
    import torch.distributed as dist

    cfg = tiny_config("cgm", n_clusters=3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="does not train data-parallel"):
            Trainer(cfg, digits.x[:100], seed=0, progress=False).run()
    finally:
        dist.destroy_process_group()


def test_langevin_settings_reach_the_sampler():
    f = make(langevin_steps=7, langevin_step_size=0.02, langevin_noise=0.5, infer_steps=9)
    g = f.guide
    assert (g.steps, g.step_size, g.noise, g.infer_steps) == (7, 0.02, 0.5, 9)
    assert not list(g.parameters())  # the guide owns no parameters: the model's are learned
    assert math.isclose(f.model.obs_scale, 0.3)


def test_full_covariance_prior_is_the_stated_mixture_of_multivariate_normals():
    f = make(prior_covariance="full")
    m = f.model
    lower = torch.diag_embed(m.sigma) + m.tril.tril(-1)
    cov = lower @ lower.transpose(-1, -2)
    z = torch.randn(7, D)
    ref = torch.stack([torch.distributions.MultivariateNormal(m.mu[k], covariance_matrix=cov[k])
                       .log_prob(z) for k in range(K)], -1) + torch.log_softmax(m.pi_logits, -1)
    torch.testing.assert_close(m.prior_joint(z), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m.prior_joint(z), make().model.prior_joint(z))  # it is not diagonal
    # The chains' starting points come from that prior: mean and covariance of one component.
    with torch.no_grad():
        m.pi_logits.copy_(torch.tensor([30.0, 0.0, 0.0]))  # all mass on component 0
    draws = m.sample_prior(40000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(draws.mean(0), m.mu[0].double().detach(), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.T.cov(), cov[0].double().detach(), atol=0.05, rtol=0)


def test_full_covariance_trains_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fit", "--model", "cgm", "--dataset", "digits", "--n-clusters", "3",
                 "--latent-dim", "3", "--hidden", "16", "--epochs", "2", "--batch-size", "200",
                 "--langevin-steps", "2", "--infer-steps", "2", "--prior-covariance", "full",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["extra"]["prior_covariance"] == "full"
    saved = ckpt.load(str(out / "checkpoint.pt"))
    assert saved["model"]["tril"].shape == (3, 3, 3)
    with pytest.raises(SystemExit) as exc:  # argparse: one usage line and status 2
        main(["fit", "--model", "cgm", "--prior-covariance", "low", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="prior_covariance must be diag or full"):
        Clusterer("cgm", 3, prior_covariance="low")


def test_mixture_reinitialisation_sets_the_moments_of_a_clustering_of_the_chains(
        digits, monkeypatch):
    import ppl_cluster.init as init

    cfg = dataclasses.replace(tiny_config("cgm", n_clusters=3, epochs=3), init="gmm",
                              gmm_inits=2)
    cfg = dataclasses.replace(cfg, extra={**cfg.extra, "reinit_epoch": 2, "chain_init": "prior"})
    seen = []
    real = init.set_mixture_from

    def spy(target, emb, resp, shrink=False):
        real(target, emb, resp, shrink)
        seen.append((emb.copy(), resp.copy(), target.mu.detach().clone(),
                     target.pi_logits.detach().softmax(-1).clone()))

    monkeypatch.setattr(init, "set_mixture_from", spy)
    fitted = Trainer(cfg, digits.x[:300], seed=1, progress=False).run()
    moves = fitted.info["moves"]
    assert [m["epoch"] for m in moves] == [2] and moves[0]["reinit"] == "gmm"
    assert len(seen) == 1
    z, resp, mu, pi = seen[0]
    assert z.shape == (300, D)  # one chain per training image
    again, _ = init.cluster_embeddings(z, 3, cfg, cfg.seed or 0)
    np.testing.assert_allclose(resp, again)  # deterministic: a resumed run repeats it
    w = resp.sum(0) + 1e-10
    torch.testing.assert_close(mu.double(), torch.as_tensor(resp.T @ z / w[:, None]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pi.double(), torch.as_tensor(w / w.sum()), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="reinit_epoch must be an integer >= 0"):
        Clusterer("cgm", 3, reinit_epoch=-1)


def test_principal_component_start_sorts_the_chains_before_training(digits):
    """chain_init="pca": the chains start at the whitened principal components, the mixture
    is their clustering's moments and the generator has learnt to decode them; "prior" keeps
    the paper's draws from the prior."""
    x = digits.x[:300]
    cfg = tiny_config("cgm", n_clusters=K, likelihood="gaussian", init="gmm", gmm_inits=1)
    assert cfg.extra["chain_init"] == "pca"  # the default
    variant = get_variant("cgm")
    fitted = build(cfg, tuple(x.shape[1:]), torch.device("cpu"))
    model, guide = fitted.model, fitted.guide
    codes, _ = principal_codes(x, D, 0)
    with torch.no_grad():
        before = float(-model.log_likelihood(x, codes).mean())
    info = variant.initialize(model, guide, x, cfg, 0)
    assert torch.equal(guide.chains, codes)
    with torch.no_grad():
        after = float(-model.log_likelihood(x, codes).mean())
    assert after < before - 1.0, (before, after)
    # The mixture is the moments of a clustering of the codes: responsibilities under it
    # put most points in a component whose mean is near their own cluster's.
    resp = model.cluster_logits(codes).exp()
    mu = (resp.T @ codes) / resp.sum(0)[:, None]
    torch.testing.assert_close(mu, model.mu.detach(), atol=0.35, rtol=0)
    assert set(info) >= {"init_log_likelihood", "warm_loss", "initial_energy"}

    prior_cfg = dataclasses.replace(cfg, extra={**cfg.extra, "chain_init": "prior"})
    prior = build(prior_cfg, tuple(x.shape[1:]), torch.device("cpu"))
    pyro.set_rng_seed(0)
    prior_info = variant.initialize(prior.model, prior.guide, x, prior_cfg, 0)
    assert set(prior_info) == {"initial_energy"}
    assert info["initial_energy"] < prior_info["initial_energy"]
    assert not torch.allclose(prior.guide.chains, codes, atol=0.5)


def test_the_langevin_step_grows_on_small_images_only_for_chains_started_from_the_prior():
    cgm, pixel = get_variant("cgm"), get_variant("cgm-pixel")
    assert cgm.scaled(1797, (1, 8, 8)).get("langevin_step_size") is None  # sorted chains
    assert cgm.Settings().langevin_step_size == 1e-2
    step = pixel.defaults["langevin_step_size"]
    assert pixel.scaled(1797, (1, 8, 8))["langevin_step_size"] == pytest.approx(step * 784 / 64)
    assert pixel.scaled(5000, (3, 16, 16))["langevin_step_size"] == pytest.approx(step * 784 / 768)
