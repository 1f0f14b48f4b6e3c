"""Posterior diagnostics: importance weights against a hand-written VaDE log p(x, z), IWAE vs
ELBO, PSIS k-hat, the InferenceData round trip, the CLI and label-free run selection."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import SHAPE, small_fitted
from scipy.special import logsumexp

from ppl_cluster import checkpoint as ckpt
from ppl_cluster import diagnostics as dg
from ppl_cluster.cli import main
from ppl_cluster.registry import REGISTRY

TINY = ["--pretrain-epochs", "3", "--epochs", "3", "--hidden", "64,64", "--latent-dim", "5",
        "--quiet"]


def make(model="vade", k=4, d=3, **extra):
    return small_fitted(model, k, d, **extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "tiny"
    assert main(["fit", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def digits_x(digits):
    return digits.x


def test_log_weights_equal_hand_written_vade():
    """log w = log p(x|z) + logsumexp_c(log pi_c + log N(z|mu_c, sigma_c)) - log q(z|x)."""
    f = make()
    x = torch.rand(7, *SHAPE).round()
    s = dg.importance_samples(f, x, num_samples=5, seed=1, max_rows=16)  # several chunks
    assert s.log_weights.shape == (5, 7) and s.latents["z"].shape == (5, 7, 3)
    m = f.model
    z = torch.as_tensor(s.latents["z"])
    with torch.no_grad():
        loc, scale = f.guide.encoder(x)
        logits = m.decoder(z)
        log_px = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
        log_pzc = torch.distributions.Normal(m.mu, m.sigma).log_prob(z[..., None, :]).sum(-1)
        log_pz = torch.logsumexp(torch.log_softmax(m.pi_logits, -1) + log_pzc, -1)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        expected = log_px + log_pz - log_q
        probs = m.cluster_logits(z.reshape(-1, 3)).exp().reshape(5, 7, -1)
    np.testing.assert_allclose(s.log_weights, expected.double().numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.cluster_probs, probs.numpy(), rtol=1e-5, atol=1e-6)


def assert_bounds_match_their_formulas(s) -> None:
    """IWAE = log mean_s w_s and ELBO = mean_s log w_s, recomputed here; with weights that vary,
    Jensen's gap is strictly positive for every point."""
    lw = s.log_weights.astype(np.float64)
    np.testing.assert_allclose(s.iwae(), logsumexp(lw, axis=0) - np.log(lw.shape[0]), rtol=1e-10)
    np.testing.assert_allclose(s.elbo(), lw.mean(0), rtol=1e-10)
    assert (lw.std(0) > 0).all() and (s.iwae() > s.elbo()).all()


@pytest.mark.parametrize("model, extra", [("vade", {}), ("vade-t", {}),
                                          ("vc", {"discrete": "enumerate"}),
                                          ("vc", {"discrete": "relaxed"})])
def test_generic_over_variants(model, extra):
    if model not in REGISTRY:
        pytest.skip(f"{model} not registered")
    f = make(model, **extra)
    s = dg.importance_samples(f, torch.rand(6, *SHAPE).round(), num_samples=30)
    assert np.isfinite(s.log_weights).all()
    assert_bounds_match_their_formulas(s)
    assert s.cluster_probs is not None and s.cluster_probs.shape == (30, 6, 4)
    np.testing.assert_allclose(s.cluster_probs.sum(-1), 1, rtol=1e-5)
    assert np.isfinite(s.khat()).all()


def test_iwae_is_above_the_elbo_and_grows_with_samples(run_dir, digits_x):
    f = dg.load_run(str(run_dir))
    x = digits_x[:300]
    one = dg.importance_samples(f, x, num_samples=1, seed=0)
    np.testing.assert_allclose(one.iwae(), one.elbo())  # S = 1: IWAE is the ELBO
    many = dg.importance_samples(f, x, num_samples=50, seed=1)
    assert_bounds_match_their_formulas(many)
    diff = many.iwae() - one.iwae()  # paired by image, independent draws
    mean, se = dg.mean_se(diff)
    assert mean > 3 * se > 0, (mean, se)
    k = many.khat()
    assert k.shape == (300,) and np.isfinite(k).all()
    assert dg.importance_samples(f, x[:10], num_samples=10).khat() is None  # too few draws


def test_inference_data_round_trips_through_netcdf(run_dir, digits, tmp_path):
    az = dg._arviz()
    f = dg.load_run(str(run_dir))
    rep = dg.diagnose_fitted(f, digits.x, digits.y, num_samples=30, max_points=120,
                             out_dir=str(tmp_path), plots=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_netcdf(str(tmp_path / "diagnostics.nc"))
    assert {"posterior", "log_likelihood", "observed_data", "constant_data"} <= set(idata.groups())
    post = idata.posterior
    k, d = f.cfg.n_clusters, f.cfg.latent_dim
    assert post["z"].dims == ("chain", "draw", "point", "latent")
    assert post["z"].shape == (1, 30, 120, d)
    assert post["cluster_probs"].dims == ("chain", "draw", "point", "cluster")
    assert post["cluster_probs"].shape == (1, 30, 120, k)
    assert post["pi"].dims == ("chain", "draw", "cluster")
    assert post["mu"].shape == (1, 30, k, d)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "point")
    assert idata.observed_data["x"].shape == (120, 1, 8, 8)
    assert idata.constant_data["khat"].dims == ("point",)
    idx = idata.posterior["point"].values
    assert len(set(idx.tolist())) == 120 and idx.max() < len(digits)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], rep.samples.log_weights)
    np.testing.assert_array_equal(idata.constant_data["label"].values, digits.y[idx])
    # The IWAE in the summary is recoverable from the saved log-likelihood group.
    lw = idata.log_likelihood["x"].values[0]
    iwae = (np.logaddexp.reduce(lw, 0) - np.log(30)).mean()
    assert iwae == pytest.approx(rep.summary["iwae"]["mean"])
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert saved["n_points"] == 120 and saved["subset"] is True


def test_cluster_health_flags():
    probs = np.zeros((100, 4))
    probs[:60, 0] = probs[60:99, 1] = probs[99:, 2] = 1
    h = dg.cluster_health(probs, np.array([0.5, 0.45, 0.04, 0.01]))
    assert h["sizes"] == [60, 39, 1, 0] and h["n_used"] == 3
    assert {(f["cluster"], f["flag"]) for f in h["flags"]} == {(2, "collapsed"), (3, "empty")}
    assert h["mean_entropy"] == pytest.approx(0, abs=1e-6)


def test_cli_diagnose_smoke(run_dir, capsys):
    assert main(["diagnose", str(run_dir), "--num-samples", "30", "--max-points", "150"]) == 0
    out = capsys.readouterr().out
    assert "IWAE log-likelihood" in out and "ELBO" in out and "PSIS k̂" in out
    assert "random subset of 150 of 1797" in out
    s = json.loads((run_dir / "diagnostics.json").read_text())
    for key in ("iwae", "elbo", "khat", "clusters", "scores", "num_samples"):
        assert key in s, key
    assert s["iwae"]["mean"] > s["elbo"]["mean"]  # S = 30 varying weights: a strict Jensen gap
    assert len(s["clusters"]["sizes"]) == 10 and sum(s["clusters"]["sizes"]) == 1797
    for name in ("khat_hist", "khat_worst", "samples_per_cluster", "latent_pca",
                 "cluster_sizes", "confusion"):
        assert (run_dir / "diagnostics" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert (run_dir / "diagnostics.nc").exists()


@pytest.mark.parametrize("args, message", [
    (["diagnose", "/no/such/run"], "not a directory"),
    (["diagnose", "RUN", "--num-samples", "0"], "num-samples"),
    (["diagnose", "RUN", "--max-points", "0"], "max-points"),
    (["diagnose", "RUN", "RUN"], "--select"),
    (["diagnose", "RUN", "--dataset", "mnist", "--data-root", "/no/such"], "does not exist"),
    (["diagnose", "RUN", "--dataset", "nope"], "unknown dataset"),
])
def test_cli_diagnose_bad_input(args, message, run_dir, capsys):
    assert main([str(run_dir) if a == "RUN" else a for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_diagnose_empty_dir(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_select_run_picks_the_best(run_dir, tmp_path, capsys):
    worse = tmp_path / "worse"
    shutil.copytree(run_dir, worse)
    state = ckpt.load(str(worse / "checkpoint.pt"))
    torch.manual_seed(0)
    for name, value in state["model"].items():  # a damaged decoder: a clearly worse model
        if name.startswith("decoder"):
            value.add_(0.5 * torch.randn_like(value))
    ckpt.save(str(worse / "checkpoint.pt"), {k: v for k, v in state.items() if k != "format"})
    for criterion in ("iwae", "elbo"):
        sel = dg.select_run([str(worse), str(run_dir)], criterion=criterion, num_samples=30,
                            max_points=150)
        assert sel.best == str(run_dir)
        assert sel.table[1]["iwae"] > sel.table[0]["iwae"]
    assert main(["diagnose", "--select", str(worse), str(run_dir), "--num-samples", "30",
                 "--max-points", "100"]) == 0
    out = capsys.readouterr().out
    assert f"selected by IWAE: {run_dir}" in out and "<- selected" in out
