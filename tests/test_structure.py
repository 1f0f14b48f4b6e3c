"""The structure the variant redesign promised (issue 17), checked so that it stays."""

import re
import subprocess
import sys
from pathlib import Path

from helpers import SUBPROCESS_TIMEOUT

from ppl_cluster.config import FitConfig
from ppl_cluster.registry import all_variants
from ppl_cluster.settings import declared

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for d in ("ppl_cluster", "models", "guides") for p in (ROOT / d).glob("*.py")]


def _lines(path: str) -> int:
    return len((ROOT / path).read_text().splitlines())


def test_every_setting_is_declared_once_in_the_library():
    names = set(declared(FitConfig))
    for variant in all_variants().values():
        names |= set(declared(variant.Settings))
    source = "\n".join(p.read_text() for p in LIBRARY)
    for name in sorted(names):
        found = re.findall(rf"^\s+{name}: [^=\n]+= setting\(", source, flags=re.M)
        assert len(found) == 1, f"{name} is declared {len(found)} times"


def test_the_engine_and_the_faces_name_no_variant():
    names = [v for v in all_variants() if v]
    for path in ("ppl_cluster/train.py", "ppl_cluster/cli.py", "ppl_cluster/api.py",
                 "ppl_cluster/diagnostics.py"):
        text = (ROOT / path).read_text()
        for name in names:
            assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (path, name)


def test_registry_and_cli_stay_small():
    assert _lines("ppl_cluster/registry.py") <= 200
    assert _lines("ppl_cluster/cli.py") <= 400
    assert _lines("README.md") <= 350


def test_fit_help_lists_at_most_30_flags(subprocess_env):
    out = subprocess.run([sys.executable, "-m", "ppl_cluster", "fit", "--help"], env=subprocess_env,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT).stdout
    flags = set(re.findall(r"^\s+(--[\w-]+|-h)", out, flags=re.M))
    assert 10 < len(flags) <= 30, sorted(flags)


def test_import_and_use_change_no_global_pyro_setting(subprocess_env):
    """ppl-cluster leaves Pyro's module_local_params as it found it, and two models in one
    process still keep their own parameters when user code runs them directly."""
    code = """
import numpy as np, pyro
from pyro.infer import TraceEnum_ELBO
before = pyro.settings.get("module_local_params")
from ppl_cluster import Clusterer
x = np.random.default_rng(0).random((40, 4, 4)).round()
small = dict(epochs=2, pretrain_epochs=1, hidden=[8], latent_dim=2, init="gmm", gmm_inits=1)
a = Clusterer("vade", 3, seed=0, **small).fit(x)
xa = a._input(x)
pyro.set_rng_seed(1)
loss_a = TraceEnum_ELBO(max_plate_nesting=1).loss(a.fitted.model, a.fitted.guide, xa)
b = Clusterer("vade", 3, seed=1, **small).fit(x)
pyro.set_rng_seed(1)
loss_b = TraceEnum_ELBO(max_plate_nesting=1).loss(b.fitted.model, b.fitted.guide, xa)
pyro.set_rng_seed(1)
again = TraceEnum_ELBO(max_plate_nesting=1).loss(a.fitted.model, a.fitted.guide, xa)
from ppl_cluster.variant import local_params
pyro.set_rng_seed(1)
loss_b_local = local_params(TraceEnum_ELBO(max_plate_nesting=1).loss)(b.fitted.model, b.fitted.guide, xa)
print(before, pyro.settings.get("module_local_params"), loss_a == again, loss_b == loss_b_local,
      loss_a != loss_b)
"""
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True", "True", "True"]
