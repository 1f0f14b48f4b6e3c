import os
from pathlib import Path

import pytest
import torch

# Keep total threads <= cores: one per xdist worker, else the machine's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PPL_CLUSTER_DATA", ROOT.parent / "shared" / "data"))
# CI sets this so that a run without the shared data fails instead of going green on skips.
REQUIRE_DATA = os.environ.get("PPL_CLUSTER_REQUIRE_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def mnist_root() -> str:
    if not (DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        message = f"MNIST subset not found under {DATA} (set PPL_CLUSTER_DATA to its folder)"
        if REQUIRE_DATA:
            pytest.fail(message + "; PPL_CLUSTER_REQUIRE_DATA is set", pytrace=False)
        pytest.skip(message)
    return str(DATA)


@pytest.fixture(scope="session")
def digits():
    from ppl_cluster.data import load_dataset

    return load_dataset("digits")


@pytest.fixture()
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env
