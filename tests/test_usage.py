"""Cluster usage, collapse detection, collapse-safe selection, the suite's data and defaults."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_cluster import Clusterer, usage
from ppl_cluster.config import FitConfig
from ppl_cluster.data import COLOR_PALETTE, SHAPES_FACTORS, TABLES, load_dataset
from ppl_cluster.errors import ConfigError
from ppl_cluster.registry import get_variant
from ppl_cluster.variant import REFERENCE

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- usage statistics

def test_usage_of_hand_made_responsibilities():
    k = 4
    spread = torch.eye(k).repeat(25, 1)  # 100 points, 25 confidently in each cluster
    u = usage.usage(spread)
    assert (u["used"], u["k"], u["collapsed"]) == (4, 4, False)
    assert u["effective"] == pytest.approx(4.0) and u["confident"] == 1.0
    one = torch.zeros(100, k)
    one[:, 2] = 1.0
    u = usage.usage(one)
    assert (u["used"], u["collapsed"], u["largest_share"]) == (1, True, 1.0)
    assert u["effective"] == pytest.approx(1.0)
    flat = torch.full((100, k), 1 / k)  # no information: argmax is cluster 0 everywhere
    u = usage.usage(flat)
    assert u["collapsed"] and u["confident"] == 0.0 and u["effective"] == pytest.approx(4.0)


def test_collapse_threshold_is_half_of_the_clusters_at_one_percent():
    k = 4
    two = torch.zeros(200, k)
    two[:100, 0] = 1
    two[100:, 1] = 1
    assert not usage.usage(two)["collapsed"]  # 2 of 4 used: half
    tiny = two.clone()
    tiny[:1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # 1 point of 200 = 0.5 % < 1 %: not used
    assert usage.usage(tiny)["used"] == 2
    edge = torch.zeros(200, 6)
    edge[:100, 0] = 1
    edge[100:198, 1] = 1
    edge[198:, 2] = 1  # cluster 2 holds exactly 1 %: used, so 3 of 6 and not collapsed
    assert usage.usage(edge)["used"] == 3 and not usage.usage(edge)["collapsed"]
    edge[198] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # now 0.5 %: 2 of 6 used, collapsed
    assert usage.usage(edge)["used"] == 2 and usage.usage(edge)["collapsed"]


def test_one_cluster_with_nearly_all_the_points_is_collapsed_whatever_the_count():
    p = torch.zeros(200, 4)
    p[:190, 0] = 1  # 95 %
    p[190:195, 1] = 1
    p[195:, 2] = 1  # 3 of 4 used (2.5 % each), but one cluster takes 95 %
    u = usage.usage(p)
    assert u["used"] == 3 and u["largest_share"] == pytest.approx(0.95) and u["collapsed"]
    p[189, 0], p[189, 3] = 0, 1  # 94.5 %: a strongly unbalanced, healthy mixture
    assert not usage.usage(p)["collapsed"]


def test_a_clustering_that_carries_no_information_is_collapsed_whatever_its_argmax():
    k, n = 4, 400
    tilt = torch.eye(k).repeat(n // k, 1)
    dead = torch.full((n, k), 1 / k) + 1e-3 * (tilt - 1 / k)  # argmax spread evenly, p ~ 1/K
    u = usage.usage(dead)
    assert (u["used"], u["largest_share"]) == (4, 0.25) and u["confident"] == 0.0
    assert u["information"] == pytest.approx(0.0, abs=1e-4) and u["collapsed"]
    soft = 0.1 + 0.6 * tilt  # 0.7 on its own cluster: uncertain, but informative
    u = usage.usage(soft)
    assert u["information"] == pytest.approx(1 - (0.7 * np.log(1 / 0.7) + 0.3 * np.log(10))
                                             / np.log(4))
    assert u["confident"] == 0.0 and not u["collapsed"]
    assert usage.usage(tilt)["information"] == pytest.approx(1.0)
    # A record saved before the field existed is judged without it.
    old = {k_: v for k_, v in usage.usage(dead).items() if k_ != "information"}
    assert not usage.rule(old)


def test_choose_never_prefers_a_collapsed_run():
    healthy = [{"used": 4, "k": 4, "collapsed": False}]
    collapsed = [{"used": 1, "k": 4, "collapsed": True}]
    assert usage.choose([-100.0, -90.0], [healthy, collapsed]) == 0
    assert usage.choose([-90.0, -100.0, -95.0], [collapsed, healthy, healthy]) == 2
    # a multi-facet run is collapsed if any facet is
    mixed = healthy + collapsed
    assert usage.choose([0.0, -1.0], [mixed, healthy + healthy]) == 1
    # all collapsed: the one using the largest share of its clusters, then the score
    two = [{"used": 2, "k": 5, "collapsed": True}]
    assert usage.choose([0.0, -5.0, -1.0], [collapsed, two, two]) == 2
    with pytest.raises(ValueError):
        usage.choose([1.0], [])


def test_subset_index_is_fixed_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = usage.subset_index(5000), usage.subset_index(5000)
    assert torch.equal(a, b) and len(a) == usage.SUBSET and len(set(a.tolist())) == usage.SUBSET
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(usage.subset_index(10), torch.arange(10))


# --------------------------------------------------------------------------- in training

TINY = dict(dataset="digits", hidden=[32, 32], latent_dim=3, pretrain_epochs=2, epochs=2,
            batch_size=60, init="gmm", gmm_inits=1, progress=False)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:300] / 16.0, dtype=torch.float32)


def test_trainer_records_usage_each_epoch_and_the_detector_fires_on_a_collapsed_model(digits):
    clu = Clusterer("vade", 4, **TINY).fit(digits)
    records = clu.fitted.info["usage"]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[-1]["facets"][0]["k"] == 4
    healthy = clu.usage(digits)
    assert not usage.any_collapsed(healthy), healthy
    assert clu.fitted.info["collapsed"] is False
    # Collapse it by hand: every component the same, one weight dominating.
    model = clu.fitted.model
    with torch.no_grad():
        for name in ("mu", "log_sigma", "tril"):
            if isinstance(getattr(model, name, None), torch.Tensor):
                p = getattr(model, name)
                p.copy_(p[:1].expand_as(p))
        model.pi_logits.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    collapsed = clu.usage(digits)
    assert collapsed[0]["collapsed"] and collapsed[0]["used"] == 1


def test_multi_facet_usage_has_one_record_per_facet(digits):
    clu = Clusterer("mfcvae", 4, clusters_per_facet=[4, 3], latent_dims=[2, 2],
                    progressive_epochs=1, fade_in_epochs=1, **TINY).fit(digits)
    records = clu.usage(digits)
    assert [r["k"] for r in records] == [4, 3]
    assert [r["k"] for r in clu.fitted.info["usage"][-1]["facets"]] == [4, 3]


def test_restarts_keep_the_best_elbo_among_healthy_runs(digits, monkeypatch):
    import ppl_cluster.api as api

    real = api.facet_usage
    calls = []

    def flagged(fitted, x):  # the first seed is reported collapsed, whatever its ELBO
        records = real(fitted, x)
        calls.append(fitted.info["seed"])
        if fitted.info["seed"] == 0:
            records = [{**r, "collapsed": True} for r in records]
        return records

    monkeypatch.setattr(api, "facet_usage", flagged)
    clu = Clusterer("vade", 4, restarts=2, **TINY).fit(digits)
    assert calls == [0, 1]
    chosen = [r for r in clu.restarts_ if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["seed"] == 1 and not chosen[0]["collapsed"]
    assert clu.restarts_[0]["collapsed"] is True


def test_select_run_never_picks_a_collapsed_run(digits, tmp_path, monkeypatch):
    import ppl_cluster.diagnostics as diagnostics

    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"run{seed}"
        d.mkdir()
        clu = Clusterer("vade", 4, seed=seed, **TINY).fit(digits, run_dir=str(d))
        (d / "config.json").write_text(json.dumps(clu.fitted.cfg.to_dict()))
        dirs.append(str(d))
    real = diagnostics.facet_usage
    first = diagnostics.select_run(dirs, max_points=200, num_samples=5)
    best_by_iwae = max(first.table, key=lambda r: r["iwae"])["run_dir"]
    assert first.best == best_by_iwae  # nothing collapsed: the IWAE decides

    def flag_best(fitted, x):
        records = real(fitted, x)
        if fitted.cfg.seed == int(best_by_iwae[-1]):
            records = [{**r, "collapsed": True} for r in records]
        return records

    monkeypatch.setattr(diagnostics, "facet_usage", flag_best)
    sel = diagnostics.select_run(dirs, max_points=200, num_samples=5)
    assert sel.best != best_by_iwae
    assert "COLLAPSED" in str(sel)


def test_metrics_json_reports_usage(tmp_path):
    from ppl_cluster.cli import main

    out = tmp_path / "run"
    rc = main(["fit", "--model", "vade", "--n-clusters", "4", "--hidden", "32,32",
               "--latent-dim", "3", "--pretrain-epochs", "1", "--epochs", "1", "--init", "gmm",
               "--gmm-inits", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["usage"][0]["k"] == 4 and m["collapsed"] in (True, False)
    assert m["collapsed"] == m["usage"][0]["collapsed"]


# --------------------------------------------------------------------------- suite data

def test_shapes_are_deterministic_and_their_factors_are_what_they_claim():
    a = load_dataset("shapes", split="train", n_images=400)
    b = load_dataset("shapes", split="train", n_images=400)
    c = load_dataset("shapes", split="train", n_images=400, shapes_seed=1)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.x.shape == (400, 3, 16, 16) and list(a.factors) == list(SHAPES_FACTORS)
    every = load_dataset("shapes", split="all", n_images=400)
    assert len(every) == 500 and torch.equal(every.x[:400], a.x)
    x, f = a.x.numpy(), a.factors
    on = x.max(1) > 0  # (N, H, W) the shape's pixels
    for i in range(len(x)):
        colours = x[i][:, on[i]].T  # every lit pixel has exactly the factor's colour
        assert np.allclose(colours, COLOR_PALETTE[f["color"][i]])
        ys, xs = np.nonzero(on[i])
        quadrant = 2 * int(ys.mean() >= 8) + int(xs.mean() >= 8)
        assert quadrant == f["position"][i]
    area = on.sum((1, 2))
    for shape in range(4):  # large shapes cover more pixels than small ones
        small = area[(f["shape"] == shape) & (f["scale"] == 0)]
        large = area[(f["shape"] == shape) & (f["scale"] == 1)]
        assert small.max() < large.min()
    # at the same scale the shapes differ in area: circle (pi r^2) > square (2.56 r^2) > cross
    big = f["scale"] == 1
    mean = [area[big & (f["shape"] == s)].mean() for s in range(4)]
    assert mean[1] > mean[0] > mean[3] and mean[1] > mean[2]


def test_colored_digits_and_tables():
    from sklearn.datasets import load_digits

    d = load_dataset("colored-digits", background=True, n_colors=4, n_backgrounds=3)
    assert d.x.shape == (1797, 3, 8, 8) and set(d.factors) == {"digit", "color", "background"}
    assert sorted(np.bincount(d.factors["digit"])) == sorted(np.bincount(load_digits().target))
    assert d.factors["color"].max() == 3 and d.factors["background"].max() == 2
    for name in TABLES:
        t = load_dataset(name)
        assert t.x.shape[1:3] == (1, 1)
        flat = t.x.reshape(len(t), -1)
        assert torch.allclose(flat.mean(0), torch.zeros(flat.shape[1]), atol=1e-4)
        assert t.x.min() < 0  # standardised, not in [0, 1]


# --------------------------------------------------------------------------- data-derived defaults

@pytest.mark.parametrize("model", ["vade", "vc", "mfcvae", "cgm", "cgm-pixel", "vade-t"])
def test_defaults_at_the_reference_scale_are_the_declared_ones(model):
    v = get_variant(model)
    plain = v.resolve(FitConfig(model=model, dataset="x"))
    at_ref = v.resolve(FitConfig(model=model, dataset="x"), data=(REFERENCE[0], (1, 28, 28)))
    assert plain.to_dict() == at_ref.to_dict()


def _clusters(n, d, scale, seed=0):
    """Three clusters of ``n`` points in ``d`` dims with within-cluster noise ``scale`` (d, d)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return (rng.normal(0, 6, (3, d))[y] + rng.normal(size=(n, d)) @ scale).astype(np.float32)


def test_the_covariance_is_the_one_the_data_pay_for():
    from ppl_cluster.init import covariance_by_bic

    rng = np.random.default_rng(1)
    correlated = torch.from_numpy(_clusters(600, 5, rng.normal(size=(5, 5))))
    independent = torch.from_numpy(_clusters(120, 30, np.eye(30)))
    assert covariance_by_bic(correlated, 3, seed=0) == "full"
    assert covariance_by_bic(independent, 3, seed=0) == "diag"


def test_vade_on_feature_vectors_chooses_its_covariance_and_a_code_no_wider_than_the_data():
    rng = np.random.default_rng(1)
    narrow = _clusters(300, 4, rng.normal(size=(4, 4)))
    cfg = Clusterer("vade", 3).resolved_config(x=torch.from_numpy(narrow).reshape(300, 1, 1, 4))
    assert (cfg.extra["prior_covariance"], cfg.latent_dim, cfg.init) == ("full", 4, "gmm")
    wide = torch.from_numpy(_clusters(120, 30, np.eye(30))).reshape(120, 1, 1, 30)
    cfg = Clusterer("vade", 3).resolved_config(x=wide)
    assert (cfg.extra["prior_covariance"], cfg.latent_dim, cfg.init) == ("diag", 10, "tsne")
    mine = Clusterer("vade", 3, prior_covariance="diag", latent_dim=6)
    cfg = mine.resolved_config(x=torch.from_numpy(narrow).reshape(300, 1, 1, 4))
    assert (cfg.extra["prior_covariance"], cfg.latent_dim) == ("diag", 6)  # the user's win
    images = torch.rand(200, 1, 2, 2)  # four values, but pixels: nothing chosen
    cfg = Clusterer("vade", 3).resolved_config(x=images)
    assert (cfg.extra["prior_covariance"], cfg.latent_dim) == ("diag", 10)


def test_vade_on_iris_with_its_defaults_finds_the_species():
    """The table that needs all three rules (covariance by BIC, a 4-D code, a mixture started
    from the features): with the code wider than the data and full components it collapsed."""
    from ppl_cluster.metrics import cluster_accuracy

    t = load_dataset("iris")
    clu = Clusterer("vade", 3, seed=0).fit(t.x)
    assert not clu.fitted.info["collapsed"]
    assert cluster_accuracy(t.y, clu.predict(t.x)) >= 0.93


@pytest.mark.parametrize("model", ["vade", "vc", "mfcvae"])
def test_small_data_keep_the_number_of_steps_not_of_epochs(model):
    v = get_variant(model)
    ref = v.resolve(FitConfig(model=model, dataset="x"))
    small = v.resolve(FitConfig(model=model, dataset="x"), data=(1797, (1, 8, 8)))
    ref_steps = ref.epochs * (REFERENCE[0] // ref.batch_size)
    steps = small.epochs * (1797 // small.batch_size)
    assert small.batch_size < ref.batch_size
    assert 0.8 * ref_steps <= steps <= 1.2 * ref_steps
    assert max(small.hidden) < max(ref.hidden)  # 64 inputs: narrower nets
    if ref.pretrain_augment:
        assert small.pretrain_augment is False  # 8x8: a 10 % shift is under a pixel


def test_user_settings_and_presets_win_over_the_data_rules():
    v = get_variant("vade")
    cfg = v.resolve(FitConfig(model="vade", dataset="x", epochs=7), data=(1797, (1, 8, 8)))
    assert cfg.epochs == 7
    vc = get_variant("vc").resolve(FitConfig(model="vc", dataset="mnist", preset="mnist"),
                                   data=(500, (1, 28, 28)))
    assert vc.extra["pose"] == "affine" and vc.epochs == 120 and vc.preset == "mnist"


def test_a_data_set_name_selects_no_preset():
    """Presets are opt-in recipes: the same data under any name get the generic defaults."""
    vc = get_variant("vc")
    data = (10_000, (1, 28, 28))
    named = vc.resolve(FitConfig(model="vc", dataset="mnist"), data=data)
    other = vc.resolve(FitConfig(model="vc", dataset="custom"), data=data)
    assert named.extra == other.extra and named.epochs == other.epochs
    assert named.extra["pose"] == "none" and named.preset is None
    with pytest.raises(ConfigError, match="preset 'cifar' is not one of model vc's .*mnist"):
        vc.resolve(FitConfig(model="vc", preset="cifar"))
    with pytest.raises(ConfigError, match="preset does not apply to model vade"):
        get_variant("vade").check_applies(FitConfig(preset="mnist"))
    assert get_variant("vc").takes("preset") and not get_variant("vade").takes("preset")


def test_tiny_suite_runs_and_tabulates(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("suite", None)
    import suite

    out = tmp_path / "suite"
    rc = suite.main(["--tiny", "--members", "digits,shapes", "--models", "vade,mfcvae",
                     "--seeds", "0", "--out", str(out)])
    assert rc == 0
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["digits-vade-seed0.json", "shapes-mfcvae-seed0.json",
                    "shapes-vade-seed0.json"]
    summary = json.loads((out / "summary.json").read_text())
    cells = {(c["member"], c["model"]): c for c in summary["cells"]}
    assert set(cells["shapes", "mfcvae"]["factors"]) == set(SHAPES_FACTORS)
    assert 0 < cells["digits", "vade"]["factors"]["label"]["kmeans"] <= 1
    assert "| digits | vade | label |" in (out / "table.md").read_text()
    assert suite.main(["--members", "nope", "--out", str(out)]) == 2
    assert suite.parse_sets(["latent_dims=10,5", "facet-init=gmm", "progressive=false"]) == {
        "latent_dims": [10, 5], "facet_init": "gmm", "progressive": False}
