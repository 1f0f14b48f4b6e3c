"""A variant in another package, with a setting of its own, installed with pip: found through
its entry point by the CLI, trained, evaluated, loaded and checked in fresh processes, without
any file of ppl_cluster/ being edited."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import SUBPROCESS_TIMEOUT

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "it-variant"
version = "0.1"

[project.entry-points."ppl_cluster.variants"]
it = "it_variant:Spread"
it-broken = "it_variant:Broken"
"""

MODULE = '''
"""VaDE with its prior means spread by a factor at construction: a new setting, own files."""

import dataclasses

import torch

from ppl_cluster.models.vade import VaDE
from ppl_cluster.settings import setting


@dataclasses.dataclass
class SpreadSettings(VaDE.Settings):  # VaDE's own settings, and one more
    spread: float = setting(1.0, "factor on the initial prior means", above=0)


class Spread(VaDE):
    name = "it"
    summary = "VaDE whose prior means start spread by a factor"
    Settings = SpreadSettings

    def build(self, cfg, image_shape):
        model, guide = super().build(cfg, image_shape)
        with torch.no_grad():
            model.mu.mul_(self.settings(cfg).spread)
        return model, guide


class Broken(VaDE):
    name = "it-broken"
    summary = "a variant whose cluster_logits have the wrong shape"

    def cluster_logits(self, model, guide, x):
        return super().cluster_logits(model, guide, x)[:, :1]
'''

SMALL = ["--dataset", "digits", "--epochs", "1", "--pretrain-epochs", "1", "--hidden", "16",
         "--latent-dim", "3", "--init", "gmm", "--gmm-inits", "1", "--quiet"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The package installed (pip, no dependencies) into a folder of its own, which the
    subprocesses get on PYTHONPATH: the test environment itself is left as it was."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "it_variant").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "it_variant" / "__init__.py").write_text(MODULE)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                   check=True, timeout=SUBPROCESS_TIMEOUT, capture_output=True)
    return site


def _run(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "ppl_cluster", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def test_an_installed_plugin_trains_evaluates_loads_and_checks(plugin, tmp_path,
                                                                subprocess_env):
    with_plugin = {**subprocess_env, "PYTHONPATH": str(plugin)}
    out = tmp_path / "run"

    r = _run(["models"], with_plugin, tmp_path)
    assert r.returncode == 0 and "it " in r.stdout and "[it-variant]" in r.stdout

    r = _run(["fit", "--model", "it", "--help"], with_plugin, tmp_path)
    assert r.returncode == 0 and "--spread" in r.stdout and "it settings" in r.stdout
    r = _run(["fit", "--model", "vade", *SMALL, "--spread", "2"], with_plugin, tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith("--spread is a setting of model it, "
                                                           "not vade")
    r = _run(["fit", "--model", "it", *SMALL, "--spread", "0", "--out", str(out)], with_plugin,
             tmp_path)
    assert r.returncode == 2 and "--spread must be a number > 0" in r.stderr
    assert not out.exists()

    r = _run(["fit", "--model", "it", *SMALL, "--spread", "3", "--out", str(out)], with_plugin,
             tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["extra"] == {"spread": 3.0,
                                                                      "prior_covariance": "diag"}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["variant"] == "it" and state["distribution"] == "it-variant"

    r = _run(["evaluate", str(out)], with_plugin, tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "eval-digits-all.json").read_text())["acc"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["acc"])
    load = textwrap.dedent(f"""
        from sklearn.datasets import load_digits
        from ppl_cluster import Clusterer
        clu = Clusterer.load({str(out / "checkpoint.pt")!r})
        print(clu.config.model, clu.config.extra["spread"], clu.predict(load_digits().images[:7] / 16).shape)
    """)
    r = subprocess.run([sys.executable, "-c", load], env=with_plugin, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0 and r.stdout.split() == ["it", "3.0", "(7,)"], r.stderr

    # The conformance contract runs on installed plugins and names the rule a broken one breaks.
    r = _run(["check", "it"], with_plugin, tmp_path)
    assert r.returncode == 0 and "keeps all" in r.stdout, r.stderr
    r = _run(["check", "it-broken"], with_plugin, tmp_path)
    assert r.returncode == 1 and "breaks rule [cluster-logits]" in r.stderr

    # Without the plugin installed the run names the package it needs; nothing is imported.
    r = _run(["evaluate", str(out)], {**subprocess_env, "PYTHONPATH": ""}, tmp_path)
    assert r.returncode == 2
    assert "unknown model 'it' (it came from it-variant: is that package installed?)" in r.stderr
    assert os.listdir(out).count("eval-digits-all.json") == 1
