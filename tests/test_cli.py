"""The command line: a smoke run, and every bad input ending in one line + exit status 2."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import SUBPROCESS_TIMEOUT
from sklearn.metrics import normalized_mutual_info_score

from ppl_cluster import checkpoint as ckpt
from ppl_cluster.cli import main
from ppl_cluster.data import load_dataset
from ppl_cluster.diagnostics import load_run
from ppl_cluster.metrics import cluster_accuracy

TINY = ["--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "256", "--init", "gmm", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["fit", "--out", str(out), *TINY]) == 0
    return out


def test_fit_writes_a_complete_run_directory(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.json",
                                                    "samples.png"}
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("model", "dataset", "split", "n_samples", "n_clusters", "acc", "nmi", "ari",
                "elbo", "epochs", "seconds", "seed", "device"):
        assert key in m, key
    assert m["n_samples"] == 1797 and m["dataset"] == "digits"
    # The reported scores are those of the saved model's own predictions.
    fitted, ds = load_run(str(run_dir)), load_dataset("digits")
    with torch.no_grad():
        pred = fitted.variant.cluster_logits(fitted.model, fitted.guide, ds.x).argmax(-1).numpy()
    assert m["acc"] == pytest.approx(cluster_accuracy(ds.y, pred), abs=1e-6)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(ds.y, pred), abs=1e-6)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["format"] == ckpt.FORMAT


def test_evaluate_sample_and_models(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    assert "ACC" in capsys.readouterr().out
    assert (run_dir / "eval-digits-test.json").exists()
    out = run_dir / "grid.png"
    assert main(["sample", str(run_dir), "--per-cluster", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["models"]) == 0
    assert "vade" in capsys.readouterr().out


def test_module_entry_point_smoke():
    r = subprocess.run([sys.executable, "-m", "ppl_cluster", "models"], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0 and "vade" in r.stdout


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (["fit", "--model", "nope"], "unknown model"),
    (["fit", "--dataset", "nope"], "unknown dataset"),
    (["fit", "--dataset", "mnist", "--data-root", "/no/such/folder"], "does not exist"),
    (["fit", "--dataset", "mnist"], "data-root"),
    (["fit", "--n-clusters", "1"], "n-clusters"),
    (["fit", "--n-clusters", "5000"], "exceeds the number of samples"),
    (["fit", "--epochs", "0"], "epochs"),
    (["fit", "--epochs", "-3"], "epochs"),
    (["fit", "--batch-size", "0"], "batch-size"),
    (["fit", "--lr", "-1"], "lr"),
    (["fit", "--restarts", "0"], "restarts"),
    (["fit", "--epochs", "many"], "invalid int"),
    (["fit", "--device", "tpu"], "device"),
    (["evaluate", "/no/such/run"], "config.json"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    out = ["--out", str(tmp_path / "new")] if args[0] == "fit" else []
    r = subprocess.run([sys.executable, "-m", "ppl_cluster", *args, *out], capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0]
    assert not (tmp_path / "new").exists(), "a refused fit wrote into its --out"


def test_non_empty_run_dir_is_refused_and_left_untouched(run_dir, capsys):
    before = _snapshot(run_dir)
    assert main(["fit", "--out", str(run_dir), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", "--out", str(run_dir), "--resume", "--overwrite", *TINY]) == 2
    assert main(["fit", "--out", str(run_dir), "--resume", "--seed", "9"]) == 2
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("content", [b"garbage bytes", b""])
def test_corrupt_checkpoint(tmp_path, run_dir, content, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    (bad / "checkpoint.pt").write_bytes(content)
    before = _snapshot(bad)
    for args in (["evaluate", str(bad)], ["sample", str(bad)], ["fit", "--out", str(bad), "--resume"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "checkpoint" in err[0], err
    assert _snapshot(bad) == before


def test_foreign_checkpoint(tmp_path, run_dir, capsys):
    bad = tmp_path / "foreign"
    bad.mkdir()
    (bad / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    torch.save({"state_dict": {"w": torch.zeros(3)}}, bad / "checkpoint.pt")  # someone else's
    assert main(["evaluate", str(bad)]) == 2
    assert "not a ppl-cluster checkpoint" in capsys.readouterr().err
    # Right format, wrong shapes: a checkpoint of another configuration.
    state = ckpt.load(str(run_dir / "checkpoint.pt"))
    state["model"]["mu"] = torch.zeros(3, 3)
    ckpt.save(str(bad / "checkpoint.pt"), {k: v for k, v in state.items() if k != "format"})
    assert main(["evaluate", str(bad)]) == 2
    assert "does not match" in capsys.readouterr().err


def test_out_of_range_data_through_the_api_is_refused():
    from ppl_cluster import Clusterer
    from ppl_cluster.errors import DataError

    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Clusterer("vade", 3).fit(torch.full((30, 4, 4), 7.0))  # images: Bernoulli
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Clusterer("vade", 3, likelihood="bernoulli").fit(torch.full((30, 4), 7.0))
    with pytest.raises(DataError, match="identical"):
        Clusterer("vade", 3).fit(torch.full((30, 4), 7.0))


def test_resume_on_another_device_setting_is_allowed(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = json.loads((copy / "metrics.json").read_text())
    assert main(["fit", "--out", str(copy), "--resume", "--device", "cpu", "--quiet"]) == 0
    after = json.loads((copy / "metrics.json").read_text())
    assert after["acc"] == before["acc"] and after["elbo"] == before["elbo"]
