"""benchmarks/trace.py: checkpoints scored by epoch, the fit command line's checks kept."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ppl_cluster.data import load_dataset
from ppl_cluster.diagnostics import load_run
from ppl_cluster.metrics import cluster_accuracy

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("trace_bench", ROOT / "benchmarks" / "trace.py")
trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace)

TINY = ["--model", "vade", "--dataset", "digits", "--hidden", "16", "--latent-dim", "2",
        "--pretrain-epochs", "2", "--epochs", "3", "--init", "gmm", "--gmm-inits", "1", "--quiet"]


def test_trace_scores_each_phase(tmp_path, capsys):
    out = tmp_path / "t"
    assert trace.main(["--every", "2", "--", *TINY, "--out", str(out)]) == 0
    records = json.loads((out / "trace.json").read_text())
    # every 2nd epoch of each phase plus each phase's last: pretrain 2; svi 2, 3
    assert [(r["phase"], r["epoch"]) for r in records] == [("pretrain", 2), ("svi", 2), ("svi", 3)]
    for r in records:
        (facet,) = r["facets"]
        assert facet["facet"] == 1 and facet["k"] == 10 and "tsne" not in facet
    # The last record scores the final checkpoint: its ACC is that of the saved model's predictions.
    fitted, ds = load_run(str(out)), load_dataset("digits")
    with torch.no_grad():
        pred = fitted.variant.cluster_logits(fitted.model, fitted.guide, ds.x).argmax(-1).numpy()
    acc = records[-1]["facets"][0]["scores"]["label"]["acc"]
    assert acc == pytest.approx(cluster_accuracy(ds.y, pred), abs=1e-6)
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    assert "svi epoch 3" in capsys.readouterr().out


def test_trace_keeps_fit_checks(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("result")
    assert trace.main(["--", *TINY, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "result"
    assert trace.main(["--", *TINY, "--out", str(tmp_path / "x"), "--n-clusters", "0"]) == 2
    with pytest.raises(SystemExit):
        trace.main(["--every", "0", "--", *TINY])


def test_tsne_ceiling_is_the_projects_tsne_clustering_scored(digits):
    from ppl_cluster import Clusterer
    from ppl_cluster.init import cluster_embeddings
    from ppl_cluster.metrics import cluster_accuracy

    x, y = digits.x[:300], digits.y[:300]
    clu = Clusterer("vade", 10, hidden=[16], latent_dim=2, pretrain_epochs=1, epochs=1,
                    init="gmm", gmm_inits=1, seed=0, progress=False).fit(x)
    (row,) = trace.score(clu, x, {"label": y}, tsne=True)
    emb = clu.embed(x).astype("float64")
    expected = cluster_embeddings(emb, 10, trace.TSNE_CEILING, 0)[0].argmax(1)
    assert row["tsne"]["label"]["acc"] == pytest.approx(cluster_accuracy(y, expected))
    assert row["tsne"]["label"]["acc"] > 0.3  # t-SNE separates some digits even here


def test_trace_on_a_table_resolves_and_standardises_as_fit(tmp_path):
    from ppl_cluster import Clusterer

    out = tmp_path / "iris"
    argv = ["--model", "vade", "--dataset", "iris", "--n-clusters", "3", "--hidden", "16",
            "--latent-dim", "2", "--pretrain-epochs", "2", "--epochs", "2", "--init", "gmm",
            "--gmm-inits", "1", "--quiet", "--out", str(out)]
    assert trace.main(["--every", "1", "--", *argv]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["likelihood"] == "gaussian" and cfg["standardize"] is True  # the vector defaults
    ds = load_dataset("iris")
    clu = Clusterer.load(str(out / "checkpoint.pt"))
    assert clu.fitted.info["standardize"]  # trained on the standardised features
    acc = json.loads((out / "trace.json").read_text())[-1]["facets"][0]["scores"]["label"]["acc"]
    assert acc == pytest.approx(cluster_accuracy(ds.y, clu.predict(ds.x)), abs=1e-6)
