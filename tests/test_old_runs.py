"""Run directories written before the variant redesign (tests/fixtures/old-runs, made by
make_old_runs.py at commit 648adbf) still evaluate, sample and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from ppl_cluster import checkpoint
from ppl_cluster.cli import main

OLD = Path(__file__).parent / "fixtures" / "old-runs"


@pytest.fixture()
def old_run(tmp_path):
    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(OLD / name, dst)
        return dst
    return copy


def test_a_finished_old_run_evaluates_to_its_metrics(old_run, capsys):
    run = old_run("vc-finished")
    saved = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run)]) == 0
    got = json.loads((run / "eval-digits-all.json").read_text())
    assert got["acc"] == pytest.approx(saved["acc"], abs=1e-9)
    assert got["cluster_sizes"] == saved["cluster_sizes"]
    assert got["elbo"] == pytest.approx(saved["elbo"], rel=1e-4)
    assert main(["sample", str(run), "--per-cluster", "2", "--out", str(run / "s.png")]) == 0
    assert (run / "s.png").stat().st_size > 0


def test_an_interrupted_old_run_resumes(old_run, capsys):
    run = old_run("vade-interrupted")
    before = checkpoint.load(str(run / "checkpoint.pt"))
    assert before["epoch"] == 3
    assert main(["fit", "--resume", "--out", str(run), "--quiet"]) == 0
    after = checkpoint.load(str(run / "checkpoint.pt"))
    assert after["epoch"] == 5
    assert after["history"]["pretrain"] == before["history"]["pretrain"]
    assert after["history"]["train"][:1] == before["history"]["train"]
    assert len(after["history"]["train"]) == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "vade" and 0 < metrics["acc"] <= 1
    assert torch.isfinite(torch.tensor(after["history"]["train"])).all()


def test_a_finished_old_run_resumes_as_it_is(old_run, capsys):
    run = old_run("vc-finished")
    before = checkpoint.load(str(run / "checkpoint.pt"))
    assert main(["fit", "--resume", "--out", str(run), "--quiet"]) == 0
    after = checkpoint.load(str(run / "checkpoint.pt"))
    assert after["epoch"] == before["epoch"] and after["history"] == before["history"]


def test_a_run_that_used_a_removed_option_is_refused_by_name(old_run, capsys):
    run = old_run("vc-finished")
    cfg = json.loads((run / "config.json").read_text())
    cfg["extra"]["views"] = 2  # what --views 2 wrote, before the option was removed
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["evaluate", str(run)]) == 2
    assert "used --views=2, an option since removed" in capsys.readouterr().err
