"""MFCVAE: per-facet enumeration against a hand-written ELBO, sum-K cost, the progressive
schedule and its exact resume, per-facet prediction, a short real fit, and the CLI."""

import json
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from helpers import (
    SUBPROCESS_TIMEOUT,
    assert_enumerated_loss_equals,
    interrupted_and_uninterrupted,
)
from ppl_cluster.models.mfcvae import progressive_alpha
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.utils._python_dispatch import TorchDispatchMode

from ppl_cluster import Clusterer
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.data import load_dataset
from ppl_cluster.errors import ConfigError
from ppl_cluster.registry import get_variant
from ppl_cluster.train import build
from ppl_cluster.variant import enumerated_cluster_logits

SHAPE = (1, 6, 6)
KS, DS = [3, 4], [2, 3]


def make(ks=KS, ds=DS, arch="mlp", hidden=(16, 8), shape=SHAPE, likelihood="bernoulli", **extra):
    cfg = get_variant("mfcvae").resolve(FitConfig(model="mfcvae", n_clusters=ks[0], arch=arch, hidden=list(hidden),
                    likelihood=likelihood,
                    extra=dict(facets=len(ks), clusters_per_facet=list(ks), latent_dims=list(ds),
                               **extra)))
    pyro.set_rng_seed(0)
    fitted = build(cfg, shape, torch.device("cpu"))
    with torch.no_grad():  # non-trivial mixtures
        for f in fitted.model.facets:
            f.pi_logits.normal_()
            f.log_sigma.uniform_(-0.5, 0.5)
            if f.covariance == "full":  # correlated components
                f.tril.normal_(0, 0.3)
    return fitted


def hand_written_loss(model, guide, x, zs):
    """-ELBO summed over the batch: log p(x|z) + sum_j logsumexp_k [log pi_jk + log N(z_j |
    mu_jk, sigma_jk)] - sum_j log q(z_j|x), one facet's clusters at a time."""
    logits = model.decoder(zs)
    elbo = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
    for (loc, scale), z, f in zip(guide.encoder(x), zs, model.facets, strict=True):
        log_pi = torch.log_softmax(f.pi_logits, -1)
        if f.covariance == "full":  # Sigma_k = L_k L_k^T, L_k = diag(sigma_k) + lower triangle
            lower = torch.diag_embed(f.log_sigma.exp()) + torch.tril(f.tril, -1)
            log_pzc = torch.distributions.MultivariateNormal(
                f.mu, covariance_matrix=lower @ lower.transpose(-1, -2)).log_prob(z[:, None])
        else:
            log_pzc = torch.distributions.Normal(f.mu, f.log_sigma.exp()).log_prob(z[:, None]).sum(-1)
        elbo = elbo + torch.logsumexp(log_pi + log_pzc, -1)
        elbo = elbo - torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return -elbo.sum()


@pytest.mark.parametrize("alpha, covariance", [([1.0, 1.0], ["diag", "diag"]),
                                               ([0.25, 1.0], ["diag", "diag"]),
                                               ([1.0, 1.0], ["diag", "full"]),
                                               ([0.25, 1.0], ["full", "full"])])
def test_enumerated_elbo_equals_hand_written_sum_per_facet_with_gradients(alpha, covariance):
    f = make(facet_covariance=covariance)
    f.model.set_alpha(alpha)  # a fixed decoder constant: the same ELBO either way
    x = torch.rand(8, *SHAPE).round()
    assert_enumerated_loss_equals(f, x, lambda tr: hand_written_loss(
        f.model, f.guide, x, [tr.nodes[f"z_{j}"]["value"] for j in (1, 2)]))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_each_facet_is_enumerated_alone_cost_sum_not_product():
    k1, k2 = 5, 7  # primes that no other size (N=4, D=2/3, 36 pixels, 16/8 hidden) shares
    f = make(ks=[k1, k2])
    x = torch.rand(4, *SHAPE).round()
    # The enumerated model trace: c_j's enumeration dimension holds its own K_j only.
    guide_tr = poutine.trace(f.guide).get_trace(x)
    model = poutine.enum(poutine.replay(f.model, trace=guide_tr), first_available_dim=-2)
    tr = poutine.trace(model).get_trace(x)
    tr.compute_log_prob()
    assert tr.nodes["c_1"]["value"].shape == (k1, 1)
    assert tr.nodes["c_2"]["value"].shape == (k2, 1, 1)
    assert tr.nodes["z_1"]["log_prob"].shape == (k1, 4)
    assert tr.nodes["z_2"]["log_prob"].shape == (k2, 1, 4)
    assert tr.nodes["x"]["log_prob"].shape == (4,)  # the decoder runs once, on no c
    # Nothing computed by the ELBO, forward or backward, is a K1 x K2 product.
    with _Shapes() as rec:
        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(f.model, f.guide, x)
        loss.backward()
    assert rec.shapes and any(k1 in s for s in rec.shapes) and any(k2 in s for s in rec.shapes)
    both = [s for s in rec.shapes if k1 in s and k2 in s]
    assert not both, f"tensors over both facets' clusters: {both[:5]}"
    assert max(int(np.prod(s)) for s in rec.shapes if k1 in s or k2 in s) < k1 * k2 * 4


@pytest.mark.parametrize("covariance", [["diag", "diag"], ["full", "diag"]])
def test_facet_posterior_matches_pyro_enumeration(covariance):
    f = make(facet_covariance=covariance)
    x = torch.rand(6, *SHAPE)
    for j in (1, 2):
        fast = f.variant.facet_logits(f.model, f.guide, x, j)
        pyro_logits = enumerated_cluster_logits(f.model, f.guide, x, site=f"c_{j}")
        torch.testing.assert_close(fast, pyro_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.variant.cluster_logits(f.model, f.guide, x),
                               f.variant.facet_logits(f.model, f.guide, x, 1))


def test_full_covariance_facet_initialised_with_the_clusterings_covariances():
    from ppl_cluster.init import set_mixture_from

    f = make(facet_covariance=["diag", "full"])
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 3)) @ np.array([[1.0, 0.8, 0.0], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    resp = rng.dirichlet(np.ones(4), size=500)
    full, diag = f.model.facet(2), f.model.facet(1)
    set_mixture_from(full, emb, resp)
    lower = torch.diag_embed(full.sigma) + full.tril.tril(-1)
    for k in range(4):
        want = np.cov(emb.T, aweights=resp[:, k], bias=True) + 1e-5 * np.eye(3)
        torch.testing.assert_close((lower[k] @ lower[k].T).double(), torch.as_tensor(want),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full.mu[k].double(), torch.as_tensor(
            np.average(emb, axis=0, weights=resp[:, k])), rtol=1e-5, atol=1e-5)
    set_mixture_from(diag, emb[:, :2], resp[:, :3])  # a diagonal facet keeps the variances
    assert diag.sigma.shape == (3, 2) and not hasattr(diag, "tril")
    want = np.stack([np.cov(emb[:, :2].T, aweights=resp[:, k], bias=True).diagonal()
                     for k in range(3)]) + 1e-5
    torch.testing.assert_close(diag.sigma.double() ** 2, torch.as_tensor(want), rtol=1e-4, atol=1e-6)
    # Sampling one cluster draws from its stated covariance.
    torch.manual_seed(0)
    z = full.sample(20000, cluster=1).double()
    torch.testing.assert_close(torch.cov(z.T), (lower[1] @ lower[1].T).double(), rtol=0.05, atol=0.02)


def test_progressive_schedule_values():
    # Deepest facet (J) on from the start; facet j fades in from (J - j) * step over F epochs.
    assert progressive_alpha(0, 3, 4, 2) == [0.0, 0.0, 1.0]
    assert progressive_alpha(3, 3, 4, 2) == [0.0, 0.0, 1.0]
    assert progressive_alpha(4, 3, 4, 2) == [0.0, 0.5, 1.0]
    assert progressive_alpha(5, 3, 4, 2) == [0.0, 1.0, 1.0]
    assert progressive_alpha(8, 3, 4, 2) == [0.5, 1.0, 1.0]
    assert progressive_alpha(100, 3, 4, 2) == [1.0, 1.0, 1.0]
    assert progressive_alpha(2, 2, 2, 0) == [1.0, 1.0]  # no fade: switched on at once
    assert progressive_alpha(0, 2, 5, 3, enabled=False) == [1.0, 1.0]
    # The hooks: positions count pretraining epochs, then SVI epochs.
    f = make(progressive_epochs=3, fade_in_epochs=2)
    f.model.schedule_offset = 4  # as built with pretrain_epochs=4
    v = f.variant
    for hook, epoch, want in [(v.on_pretrain_epoch, 0, [0.0, 1.0]), (v.on_pretrain_epoch, 3, [0.5, 1.0]),
                              (v.on_epoch, 0, [1.0, 1.0]), (v.on_pretrain_epoch, 2, [0.0, 1.0])]:
        hook(f.model, f.guide, epoch, 10)
        assert f.model.decoder.alpha.tolist() == want
    off = make(progressive=False)
    off.variant.on_pretrain_epoch(off.model, off.guide, 0, 10)
    assert off.model.decoder.alpha.tolist() == [1.0, 1.0]


def _digits_cfg(**extra):
    return get_variant("mfcvae").resolve(FitConfig(model="mfcvae", dataset="digits", n_clusters=4, hidden=[32, 32], latent_dim=3,
                     epochs=4, pretrain_epochs=3, batch_size=128, init="gmm", gmm_inits=1,
                     extra=dict(clusters_per_facet=[4, 3], progressive_epochs=2,
                                fade_in_epochs=2, **extra)
                     ))


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(digits, tmp_path):
    x = digits.x[:400]
    cfg = _digits_cfg()
    # Stopped after pretraining, mid-schedule of the SVI phase.
    full, resumed = interrupted_and_uninterrupted(cfg, x, 3, 3, tmp_path)
    for a, b in ((full.model, resumed.model), (full.guide, resumed.guide)):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(ta, tb), name
    assert full.model.decoder.alpha.tolist() == [1.0, 1.0]


def test_clusterer_per_facet_api(digits, tmp_path):
    x = digits.x[:300]
    clu = Clusterer("mfcvae", 4, hidden=[32], latent_dims=[3, 3], epochs=2, pretrain_epochs=1,
                    batch_size=128, init="gmm", gmm_inits=1, clusters_per_facet=[4, 3]).fit(x)
    assert clu.n_facets == 2 and clu.clusters_per_facet == [4, 3]
    p1, p2 = clu.predict_proba(x[:20]), clu.predict_proba(x[:20], facet=2)
    assert p1.shape == (20, 4) and p2.shape == (20, 3)
    np.testing.assert_allclose(p2.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(clu.predict(x[:20]), clu.predict(x[:20], facet=1))
    assert clu.predict(x[:20], facet=2).max() < 3
    frame = clu.predict_frame(x[:20], proba=True, embed=True)
    assert list(frame.columns) == (["cluster_1", "probability_1"] + [f"p1_{k}" for k in range(4)]
                                   + ["cluster_2", "probability_2"] + [f"p2_{k}" for k in range(3)]
                                   + ["elbo"] + [f"z_{d}" for d in range(6)])
    np.testing.assert_array_equal(frame["cluster_2"], clu.predict(x[:20], facet=2))
    np.testing.assert_allclose(frame["probability_2"], p2.max(1), rtol=1e-5)
    np.testing.assert_allclose(frame[[f"p1_{k}" for k in range(4)]].to_numpy(), p1, rtol=1e-5)
    assert clu.embed(x[:5]).shape == (5, 6) and clu.embed(x[:5], facet=2).shape == (5, 3)
    assert clu.sample(2, cluster=2, facet=2).shape == (2, 1, 8, 8)
    assert clu.sample_facet(3, facet=2).shape == (3, 3, 1, 8, 8)
    # Cell (r, c) is the decoding of image r's posterior means with facet j's taken from X_facet[c].
    changed = False
    with torch.no_grad():
        rows, cols = clu.fitted.guide.facet_means(x[:2]), clu.fitted.guide.facet_means(x[2:5])
    for j in (1, 2):
        cells = clu.compose(x[:2], x[2:5], facet=j)
        assert cells.shape == (2, 3, 1, 8, 8)
        for r in range(2):
            for c in range(3):
                z = [(cols if i == j else rows)[i - 1][[c if i == j else r]] for i in (1, 2)]
                with torch.no_grad():
                    expected = clu.fitted.model.decode_mean(z)[0].numpy()
                np.testing.assert_allclose(cells[r, c], expected, rtol=1e-5, atol=1e-6)
        changed |= not np.allclose(cells[:, 0], cells[:, 1])
    assert changed, "swapping either facet's latent changed no image"
    for bad in (0, 3, 1.5):
        with pytest.raises(ConfigError, match="facet must be in 1..2"):
            clu.predict(x[:3], facet=bad)
    with pytest.raises(ConfigError, match="cluster must be in"):
        clu.sample(1, cluster=3, facet=2)
    clu.save(str(tmp_path / "m.pt"))
    again = Clusterer.load(str(tmp_path / "m.pt"))
    np.testing.assert_array_equal(again.predict_proba(x[:20], facet=2), p2)
    with pytest.raises(ConfigError, match="clusters_per_facet gives 2 values for 3 facets"):
        Clusterer("mfcvae", 4, facets=3, clusters_per_facet=[4, 3])
    with pytest.raises(ConfigError, match="must equal the default facet"):
        Clusterer("mfcvae", 5, clusters_per_facet=[4, 3])
    vade = Clusterer("vade", 3, hidden=[16], latent_dim=2, epochs=1, pretrain_epochs=1,
                     gmm_inits=1).fit(x[:100])
    assert vade.predict(x[:5], facet=1).shape == (5,)
    with pytest.raises(ConfigError, match="facet must be in 1..1"):
        vade.predict(x[:5], facet=2)
    with pytest.raises(ConfigError, match="single facet"):
        vade.sample_facet(2, facet=1)


def test_short_fit_on_colored_mnist_improves_the_elbo(mnist_root):
    ds = load_dataset("colored-mnist", mnist_root, "test")
    x = ds.x[:600]
    clu = Clusterer("mfcvae", 10, dataset="colored-mnist", arch="conv", hidden=[8, 16],
                    latent_dim=4, pretrain_epochs=4, epochs=3, batch_size=100, init="gmm",
                    gmm_inits=1, clusters_per_facet=[10, 8], facet_init=["gmm", "gmm"],
                    progressive_epochs=2, fade_in_epochs=1, seed=0)
    clu.fit(x)
    hist = clu.fitted.history
    assert hist["pretrain"][-1] < hist["pretrain"][0]
    assert hist["train"][-1] < hist["train"][0] and all(np.isfinite(hist["train"]))
    assert clu.predict(x, facet=2).shape == (600,)


# --- the command line ----------------------------------------------------------------------

TINY = ["--model", "mfcvae", "--hidden", "32", "--latent-dim", "3", "--pretrain-epochs", "1",
        "--epochs", "2", "--batch-size", "512", "--init", "gmm", "--gmm-inits", "1", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mf"
    assert main(["fit", *TINY, "--clusters-per-facet", "5,3", "--out", str(out)]) == 0
    return out


def test_cli_fit_writes_facets(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["n_clusters"] == 5 and len(m["facets"]) == 2
    assert [f["facet"] for f in m["facets"]] == [1, 2] and [f["k"] for f in m["facets"]] == [5, 3]
    assert set(m["facets"][0]["scores"]) == {"label"} and "acc" in m["facets"][1]["scores"]["label"]
    assert m["facet_match"]["label"]["facet"] in (1, 2)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["extra"]["clusters_per_facet"] == [5, 3] and cfg["extra"]["progressive"] is True
    for name in ("samples.png", "samples-facet1.png", "samples-facet2.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_sample_facet_and_compose(run_dir, capsys):
    out = run_dir / "f2.png"
    assert main(["sample", str(run_dir), "--facet", "2", "--per-cluster", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["compose", str(run_dir), "--facet", "2", "--n", "4"]) == 0
    assert (run_dir / "compose-facet2.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(run_dir)]) == 0
    assert len(json.loads((run_dir / "eval-digits-all.json").read_text())["facets"]) == 2


def test_cli_fit_colored_mnist_scores_every_facet_against_every_factor(mnist_root, tmp_path):
    out = tmp_path / "cm"
    assert main(["fit", *TINY, "--dataset", "colored-mnist", "--data-root", mnist_root,
                 "--split", "test", "--epochs", "1", "--clusters-per-facet", "10,8",
                 "--facet-init", "gmm,gmm", "--no-progressive", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [f["k"] for f in m["facets"]] == [10, 8]
    assert all(set(f["scores"]) == {"digit", "color"} for f in m["facets"])
    assert set(m["facet_match"]) == {"digit", "color"}


@pytest.fixture(scope="module")
def vade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vade"
    assert main(["fit", "--hidden", "16", "--latent-dim", "2", "--pretrain-epochs", "1",
                 "--epochs", "1", "--gmm-inits", "1", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["sample", "{run}", "--facet", "3"], "facet must be in 1..2"),
    (["compose", "{run}", "--facet", "0"], "facet must be in 1..2"),
    (["compose", "{vade}"], "single facet"),
    (["sample", "{vade}", "--facet", "1"], "single facet"),
    (["fit", "--model", "mfcvae", "--facets", "3", "--clusters-per-facet", "10,8"],
     "2 values for 3 facets"),
    (["fit", "--model", "mfcvae", "--n-clusters", "5", "--clusters-per-facet", "10,8"],
     "must equal the default facet"),
    (["fit", "--model", "mfcvae", "--progressive-epochs", "-1"], "progressive-epochs"),
    (["fit", "--model", "mfcvae", "--clusters-per-facet", "10,x"], "comma-separated"),
    (["fit", "--facets", "2"], "--facets is a setting of model mfcvae, not vade"),
    (["fit", "--model", "mfcvae", "--facet-covariance", "diag,low"], "--facet-covariance must be a list of diag or full"),
    (["fit", "--model", "mfcvae", "--facet-covariance", "full"], "--facet-covariance gives 1 values for 2 facets"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, run_dir, vade_run, tmp_path):
    args = [a.format(run=run_dir, vade=vade_run) for a in args]
    out = ["--out", str(tmp_path / "new")] if args[0] == "fit" else []
    r = subprocess.run([sys.executable, "-m", "ppl_cluster", *args, *out], capture_output=True,
                       text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
                       timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]
    assert not (tmp_path / "new").exists()


def test_a_facets_emptied_cluster_is_split_from_its_largest_on_schedule():
    from sklearn.cluster import KMeans

    from ppl_cluster.init import set_mixture_from

    f = make(split_every=2, split_until=4)
    x = torch.rand(300, *SHAPE)
    for j, zj in enumerate(f.guide.facet_means(x), 1):  # every cluster used
        emb = zj.detach().double().numpy()
        hard = KMeans(f.model.clusters_per_facet[j - 1], n_init=3, random_state=0).fit_predict(emb)
        set_mixture_from(f.model.facet(j), emb, np.eye(f.model.clusters_per_facet[j - 1])[hard])
    facet = f.model.facet(2)
    z = f.guide.facet_means(x)[1].detach()
    with torch.no_grad():  # facet 2: cluster 3 far from every point, so it holds none of them
        facet.mu[3] = z.mean(0) + 50.0
    q_before = facet.cluster_logits(z).exp()
    assert q_before[:, 3].mean() < 1e-6
    largest = int(q_before.mean(0).argmax())
    facet1 = {k: v.clone() for k, v in f.model.facet(1).state_dict().items()}
    assert f.variant.maintain(f.model, f.guide, x, 1, 10) is None  # off schedule
    with torch.no_grad():
        move = f.variant.maintain(f.model, f.guide, x, 2, 10)
    assert move == {"split": {"2": [[3, largest]]}}
    q = facet.cluster_logits(z).exp()
    # The largest cluster's points are shared by the two halves, now on either side of it.
    share = float((q[:, 3] + q[:, largest]).mean())
    assert abs(share - float(q_before[:, largest].mean())) < 0.15, share
    assert min(q[:, 3].mean(), q[:, largest].mean()) > 0.1 * q_before[:, largest].mean()
    # Facet 1 lost nothing and is left alone; past split_until nothing moves.
    for k, v in f.model.facet(1).state_dict().items():
        assert torch.equal(v, facet1[k])
    with torch.no_grad():
        facet.mu[3] = z.mean(0) + 50.0
    assert f.variant.maintain(f.model, f.guide, x, 6, 10) is None


def test_facets_share_one_latent_budget_by_default():
    from ppl_cluster.models.mfcvae import shared_latent

    assert shared_latent(10, 1) == [10] and shared_latent(10, 2) == [5, 5]
    assert shared_latent(10, 3) == [4, 3, 3] and shared_latent(10, 4) == [3, 3, 2, 2]
    assert shared_latent(3, 4) == [2, 2, 2, 2]  # at least 2 each
    variant = get_variant("mfcvae")
    cfg = variant.resolve(FitConfig(model="mfcvae", n_clusters=4, latent_dim=10,
                                    extra={"facets": 3}))
    assert cfg.extra["latent_dims"] == [4, 3, 3]  # recorded explicitly in the run
    own = variant.resolve(FitConfig(model="mfcvae", n_clusters=4,
                                    extra={"facets": 2, "latent_dims": [6, 1]}))
    assert own.extra["latent_dims"] == [6, 1]  # the user's own, untouched
    # A run saved before the rule (latent_dims None) is rebuilt as it was: latent_dim each.
    old = FitConfig.from_dict({**cfg.to_dict(), "extra": {**cfg.extra, "latent_dims": None}})
    assert variant.facet_lists(old)[1] == [10, 10, 10]
