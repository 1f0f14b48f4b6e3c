"""Data-parallel training: 2 CPU processes (gloo) against each other and against 1 process.

The workers run at module level so that ``torch.multiprocessing.spawn`` can import them; each
process uses one thread.
"""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SUBPROCESS_TIMEOUT

from ppl_cluster import checkpoint as ckpt
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.data import load_dataset
from ppl_cluster.errors import ConfigError
from ppl_cluster.registry import get_variant
from ppl_cluster.train import Trainer

# VaDE covers every phase: autoencoder pretraining, mixture initialisation (rank 0, then
# broadcast), SVI. 384 images, global batch 64 (2 shards of 32), 6 steps per epoch.
SETTINGS = dict(model="vade", dataset="custom", n_clusters=5, hidden=[32, 32], latent_dim=4,
                pretrain_epochs=2, epochs=3, batch_size=64, lr=2e-3, pretrain_lr=2e-3,
                init="gmm", gmm_inits=1, gmm_covariance="diag", seed=7)
N = 384
SEED = 7


class _Stop(Exception):
    pass


def _config(**changes) -> FitConfig:
    cfg = FitConfig(**{**SETTINGS, **changes})
    return get_variant(cfg.model).resolve(cfg)


def _result(fitted) -> dict[str, torch.Tensor]:
    """Final parameters, and the per-epoch losses under the key "loss"."""
    out = {f"{part}.{k}": v.detach().clone() for part in ("model", "guide")
           for k, v in getattr(fitted, part).state_dict().items()}
    losses = fitted.history["pretrain"] + fitted.history["train"]
    out["loss"] = torch.tensor(losses, dtype=torch.float64)
    return out


class _SGDTrainer(Trainer):
    """Plain SGD: unlike Adam, its steps scale with the gradient, so a mis-scaled shard shows."""

    def _optimizer(self, params, lr):
        return torch.optim.SGD(params, lr=lr)


def _no_noise(shape, dtype=None, device=None):
    return torch.zeros(shape, dtype=dtype, device=device)


def _worker(rank: int, world: int, tmp: str, jobs: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{world}", rank=rank,
                            world_size=world)
    try:
        x = load_dataset("digits").x[:N]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for job in jobs:
            path = f"{tmp}/{job}-w{world}-rank{rank}.pt"  # per rank: shows who writes
            if job == "noisy":  # real z noise and pretraining augmentation, per rank
                cfg = _config(pretrain_augment=True)
                out[job] = _result(Trainer(cfg, x, seed=SEED, checkpoint_path=path,
                                           progress=False).run())
            elif job == "resumed":  # the noisy run stopped after epoch 3 (SVI), then resumed
                cfg = _config(pretrain_augment=True)

                def stop(epoch: int, loss: float) -> None:
                    if epoch == 2:
                        raise _Stop

                with pytest.raises(_Stop):
                    Trainer(cfg, x, seed=SEED, checkpoint_path=path, progress=False,
                            on_epoch=stop).run()
                out[job] = _result(Trainer(cfg, x, seed=SEED, checkpoint_path=path,
                                           progress=False).run(resume=True))
            elif job == "odd_batch":  # 63 images per step cannot be split in 2 equal shards
                with pytest.raises(ConfigError, match="not divisible"):
                    Trainer(_config(batch_size=63), x, seed=SEED, progress=False).run()
                continue
            elif job.startswith("noiseless"):  # z = its mean: 1 and 2 processes, same objective
                trainer, cfg = Trainer, _config(pretrain_augment=False)
                if job == "noiseless_sgd":  # a smaller SVI step keeps plain SGD stable
                    trainer, cfg = _SGDTrainer, _config(pretrain_augment=False, lr=2e-4)
                with pytest.MonkeyPatch.context() as mpatch:
                    mpatch.setattr(torch.distributions.normal, "_standard_normal", _no_noise)
                    out[job] = _result(trainer(cfg, x, seed=SEED, checkpoint_path=path,
                                               progress=False).run())
        torch.save(out, f"{tmp}/final-params-{world}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp, jobs: tuple[str, ...]) -> list[dict[str, dict[str, torch.Tensor]]]:
    group = mp.spawn(_worker, args=(world, str(tmp), jobs), nprocs=world, join=False)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not group.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in group.processes:
                proc.kill()
            pytest.fail(f"the {world}-process group did not finish in {SUBPROCESS_TIMEOUT} s")
    return [torch.load(tmp / f"final-params-{world}-{r}.pt", weights_only=True)
            for r in range(world)]


def test_two_processes_agree_with_each_other_with_one_process_and_after_resume(tmp_path):
    two = _spawn(2, tmp_path, ("odd_batch", "noisy", "resumed", "noiseless", "noiseless_sgd"))
    one = _spawn(1, tmp_path, ("noiseless", "noiseless_sgd"))[0]

    # (a) DDP keeps the ranks identical (they draw different noise, average the same gradient)
    # and every rank reports the same all-reduced epoch losses.
    for job in ("noisy", "noiseless", "noiseless_sgd"):
        for name, value in two[0][job].items():
            assert torch.equal(value, two[1][job][name]), f"{job}: {name} differs between ranks"
    # Stopped after an SVI epoch and resumed: exactly the uninterrupted run, on both ranks.
    for rank in (0, 1):
        for name, value in two[0]["noisy"].items():
            assert torch.equal(value, two[rank]["resumed"][name]), f"resume: {name} differs"
    # (b) 2 shards of 32 give the 1-process gradient of the batch of 64, with Adam (the
    # default) and with SGD (whose steps scale with the gradient). Exact equality is not
    # expected: the gradient is summed in another order (per shard, then all-reduced), which
    # changes float32 roundings (~1e-7 relative) that 5 epochs carry to ~1e-6 (measured:
    # 1e-6). Hence atol 1e-4 on parameters, rtol 1e-5 on epoch losses; a shard gradient scaled
    # by 1/batch instead of world_size/batch moves parameters by ~4e-3 and fails. The noise is
    # switched off for this comparison only: with it, each rank draws its own.
    for job in ("noiseless", "noiseless_sgd"):
        torch.testing.assert_close(two[0][job]["loss"], one[job]["loss"], rtol=1e-5, atol=0)
        for name, value in one[job].items():
            torch.testing.assert_close(two[0][job][name], value, atol=1e-4, rtol=0,
                                       msg=lambda m, job=job, name=name: f"{job} {name}: {m}")
    # (c) rank 0 alone wrote checkpoints, and they hold the final epoch.
    assert (tmp_path / "noisy-w2-rank0.pt").exists()
    assert not list(tmp_path.glob("*-w2-rank1.pt"))
    state = ckpt.load(str(tmp_path / "noisy-w2-rank0.pt"))
    assert state["epoch"] == SETTINGS["pretrain_epochs"] + SETTINGS["epochs"]
    assert all(torch.equal(v, two[1]["noisy"][f"model.{k}"]) for k, v in state["model"].items())
    assert state["history"]["train"] == two[1]["noisy"]["loss"][-SETTINGS["epochs"]:].tolist()


def test_torchrun_cli_writes_one_run_directory(tmp_path, subprocess_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ppl_cluster", "fit", "--device", "cpu", "--out", str(out), "--hidden", "32,32",
           "--latent-dim", "4", "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "256",
           "--init", "gmm", "--gmm-inits", "1", "--quiet"]
    r = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("run saved in") == 1  # rank 0 alone reports and writes
    assert {p.name for p in out.iterdir()} == {"config.json", "checkpoint.pt", "metrics.json",
                                               "samples.png", "manifest.json"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["n_samples"] == 1797


def test_a_partial_torchrun_environment_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["fit", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl-cluster: error:") and "torchrun" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
