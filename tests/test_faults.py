"""A bad day: two writers on one run, an --overwrite that fails, divergence, kills, OS
errors, out-of-range seeds, a config.json from another run. Nothing lost, nothing mixed,
one line on stderr."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import SUBPROCESS_TIMEOUT

from ppl_cluster import Clusterer, rundir
from ppl_cluster import checkpoint as ckpt
from ppl_cluster.cli import main
from ppl_cluster.config import FitConfig
from ppl_cluster.errors import ConfigError, DataError, DivergedError
from ppl_cluster.registry import get_variant
from ppl_cluster.train import Trainer

TINY = ["--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "256", "--init", "gmm",
        "--hidden", "32", "--latent-dim", "3", "--quiet"]
# Long enough to be caught in the act (a few seconds on 1 thread).
SLOW = ["--pretrain-epochs", "2", "--epochs", "40", "--batch-size", "64", "--init", "gmm",
        "--hidden", "32", "--latent-dim", "3", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _snapshot(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished tiny run with an evaluation beside it."""
    out = tmp_path_factory.mktemp("faults") / "old"
    assert main(["fit", "--out", str(out), *TINY]) == 0
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ppl_cluster", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc: subprocess.Popen, epoch: int = 0) -> None:
    """Until ``path`` exists (a checkpoint: holding at least ``epoch`` epochs)."""
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            if epoch == 0 or ckpt.load(str(path))["epoch"] >= epoch:
                return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


# -- one writer per run directory -------------------------------------------------------

def test_a_second_writer_is_refused_and_the_first_run_stays_whole(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(["fit", "--out", str(out), "--seed", "1", *SLOW])
    try:
        _wait_for(out / "checkpoint.pt", first)
        for args in (["--seed", "2", *TINY, "--overwrite"], ["--resume"]):
            assert main(["fit", "--out", str(out), *args]) == 2
            err = _lines(capsys)
            assert len(err) == 1 and f"PID {first.pid}" in err[0], err
        assert main(["fit", "--out", str(out), "--seed", "2", *TINY]) == 2  # "not empty"
    finally:
        _, stderr = first.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert ckpt.load(str(out / "checkpoint.pt"))["seed"] == 1
    assert not (out / rundir.LOCK).exists()  # released, and removed, at the end
    listed = rundir.read_manifest(str(out))
    assert {"config.json", "checkpoint.pt", "metrics.json"} <= set(listed)
    assert listed["checkpoint.pt"]["bytes"] == (out / "checkpoint.pt").stat().st_size
    # Readers take no lock; the finished run evaluates.
    assert main(["evaluate", str(out)]) == 0


def test_a_lock_left_by_a_dead_process_is_taken_again(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.run(  # takes the lock and dies without releasing it
        [sys.executable, "-c", "import os; from ppl_cluster import rundir\n"
         f"with rundir.locked({str(out)!r}): os._exit(9)"], env=ENV, timeout=SUBPROCESS_TIMEOUT)
    assert holder.returncode == 9 and (out / rundir.LOCK).exists()
    with rundir.locked(str(out)):
        assert rundir.held(str(out))
        # ... and while this process holds it, another is refused, naming this one.
        other = subprocess.run(
            [sys.executable, "-c", "from ppl_cluster import rundir\n"
             f"with rundir.locked({str(out)!r}): pass"], env=ENV, capture_output=True,
            text=True, timeout=SUBPROCESS_TIMEOUT)
        assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr, other.stderr


# -- --overwrite ------------------------------------------------------------------------

def test_an_overwrite_that_fails_leaves_the_old_run_byte_identical(tmp_path, old_run, capsys,
                                                                   monkeypatch):
    run = _copy(old_run, tmp_path / "run")
    before = _snapshot(run)
    # Fails at the data, after the old run was set aside.
    assert main(["fit", "--out", str(run), "--overwrite", "--dataset", "mnist", "--data-root",
                 str(tmp_path / "nowhere"), *TINY]) == 2
    assert "does not exist" in _lines(capsys)[0]
    assert _snapshot(run) == before
    # Fails at the first checkpoint write (a full disk), after config.json was rewritten.
    real = ckpt.atomic_write_bytes

    def full_disk(path, data):
        if path.endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)
    assert main(["fit", "--out", str(run), "--overwrite", "--seed", "5", *TINY]) == 2
    err = _lines(capsys)
    assert len(err) == 1 and "No space left" in err[-1], err
    assert _snapshot(run) == before


def test_a_successful_overwrite_leaves_nothing_of_the_old_run(tmp_path, old_run):
    run = _copy(old_run, tmp_path / "run")
    assert (run / "eval-digits-test.json").exists()
    assert main(["fit", "--out", str(run), "--overwrite", "--seed", "3", *TINY]) == 0
    names = {p.name for p in run.iterdir()}
    assert "eval-digits-test.json" not in names and rundir.PREVIOUS not in names
    assert json.loads((run / "config.json").read_text())["seed"] == 3


def test_an_overwrite_killed_midway_is_settled_by_the_next_writer(tmp_path, old_run):
    run = _copy(old_run, tmp_path / "run")
    before = _snapshot(run)
    # As if killed after the old run was set aside and config.json rewritten, before the new
    # run's first checkpoint: the next writer restores the old run.
    rundir.set_aside(str(run))
    (run / "config.json").write_text("{}")
    with rundir.locked(str(run)):
        pass
    assert _snapshot(run) == before
    # Killed after the new run's first checkpoint: the new run is kept, the old one dropped.
    rundir.set_aside(str(run))
    (run / "checkpoint.pt").write_bytes(b"new")
    with rundir.locked(str(run)):
        pass
    assert _snapshot(run) == {"checkpoint.pt": b"new"}


# -- checks before anything is trained -------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["fit", "--lr", "inf"], "lr"),
    (["fit", "--lr", "1e308"], "lr"),
    (["fit", "--lr", "nan"], "lr"),
    (["fit", "--pretrain-lr", "inf"], "pretrain-lr"),
    (["fit", "--lr-decay", "inf"], "lr-decay"),
    (["fit", "--seed", "-1"], "seed"),
    (["fit", "--seed", str(2**32)], "seed"),
    (["fit", "--restarts", "2", "--seed", str(2**32 - 1)], "seed"),
    (["fit", "--out", ""], "--out"),
    (["sample", "RUN", "--seed", "-1"], "seed"),
    (["sample", "RUN", "--out", ""], "--out"),
    (["sample", "RUN", "--out", "RUN"], "is a directory"),
    (["evaluate", "RUN", "--device", "foo"], "device"),
    (["diagnose", "RUN", "--seed", str(2**33)], "seed"),
])
def test_bad_values_are_refused_in_one_line_before_any_work(tmp_path, old_run, capsys, args,
                                                            expected):
    run = _copy(old_run, tmp_path / "run")
    before = _snapshot(run)
    args = [str(run) if a == "RUN" else a for a in args]
    if args[0] == "fit":
        args += ["--out", str(tmp_path / "new")] if "--out" not in args else []
    assert main(args) == 2
    err = _lines(capsys)
    assert len(err) == 1 and expected in err[0], err
    assert _snapshot(run) == before and not (tmp_path / "new").exists()


def test_api_type_errors_are_library_errors():
    for kwargs in (dict(n_clusters="10"), dict(n_clusters=2.5), dict(epochs=1.5),
                   dict(seed=2**32), dict(lr=float("inf")), dict(no_such_setting=1)):
        with pytest.raises(ConfigError):
            Clusterer("vade", **kwargs)
    for bad in ([[0.1, 0.2], [0.3]], [[]], [["a", "b"]]):
        with pytest.raises(DataError):
            Clusterer("vade", 2).fit(bad)


def test_an_edited_config_is_refused_on_resume(tmp_path, old_run, capsys):
    run = _copy(old_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "n_clusters": "ten"}))
    for args in (["fit", "--out", str(run), "--resume"], ["evaluate", str(run)]):
        assert main(args) == 2
        err = _lines(capsys)
        assert len(err) == 1 and "n-clusters" in err[0] and "'ten'" in err[0], err


def test_a_config_of_another_run_is_refused_by_every_reader(tmp_path, old_run, capsys):
    run = _copy(old_run, tmp_path / "run")
    other = tmp_path / "other"
    assert main(["fit", "--out", str(other), "--model", "vade-t", *TINY]) == 0
    (run / "config.json").write_bytes((other / "config.json").read_bytes())
    for args in (["evaluate", str(run)], ["sample", str(run)], ["diagnose", str(run)],
                 ["predict", str(run), "--out", str(tmp_path / "p.csv")]):
        assert main(args) == 2
        err = _lines(capsys)
        assert len(err) == 1 and "mixes two runs" in err[0], (args, err)


# -- divergence -------------------------------------------------------------------------

def test_divergence_stops_in_one_line_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--out", str(out), *TINY[:-1], "--epochs", "3", "--lr", "1", "--quiet"]) == 3
    err = _lines(capsys)
    assert len(err) == 1 and "diverged in epoch" in err[0] and "--lr 1" in err[0], err
    state = ckpt.load(str(out / "checkpoint.pt"))
    for part in ("model", "guide"):
        assert all(torch.isfinite(t).all() for t in state[part].values())


def test_a_parameter_turned_nan_is_caught_in_the_next_epoch(digits, tmp_path, monkeypatch):
    import ppl_cluster.train as train

    cfg = get_variant("vade").resolve(FitConfig(
        n_clusters=4, hidden=[16], latent_dim=3, epochs=4, pretrain_epochs=1, batch_size=256,
        init="gmm", gmm_inits=1))
    built = []
    real_build = train.build
    monkeypatch.setattr(train, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[0])

    def poison(epoch: int, loss: float) -> None:
        if epoch == 2:  # after epoch 3's checkpoint: epoch 4 must not be saved
            with torch.no_grad():
                next(built[0].guide.parameters()).fill_(float("nan"))

    path = tmp_path / "c.pt"
    trainer = Trainer(cfg, digits.x[:512], seed=0, checkpoint_path=str(path), progress=False,
                      on_epoch=poison)
    with pytest.raises(DivergedError, match="epoch 4 of 5"):
        trainer.run()
    assert ckpt.load(str(path))["epoch"] == 3


# -- signals, OS errors, temp files ----------------------------------------------------

def test_sigterm_then_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--pretrain-epochs", "2", "--epochs", "12", "--batch-size", "64", "--init", "gmm",
            "--hidden", "32", "--latent-dim", "3", "--quiet"]
    proc = _start(["fit", "--out", str(part), *args])
    _wait_for(part / "checkpoint.pt", proc, epoch=4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 143 and "terminated" in stderr, stderr
    assert ckpt.load(str(part / "checkpoint.pt"))["epoch"] < 14
    for cmd in (["fit", "--out", str(part), "--resume"], ["fit", "--out", str(full), *args]):
        r = subprocess.run([sys.executable, "-m", "ppl_cluster", *cmd], env=ENV,
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert r.returncode == 0, r.stderr
    a, b = ckpt.load(str(full / "checkpoint.pt")), ckpt.load(str(part / "checkpoint.pt"))
    for key in ("model", "guide"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), name
    assert a["history"] == b["history"]


def test_a_temp_file_from_a_killed_write_is_removed_by_the_next_writer(tmp_path, old_run):
    run = _copy(old_run, tmp_path / "run")
    stale = run / ".tmp-abc123checkpoint.pt"
    stale.write_bytes(b"\0" * 1000)
    assert main(["fit", "--out", str(run), "--resume", "--quiet"]) == 0
    assert not stale.exists()


def test_os_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["fit", "--out", str(blocker / "run"), *TINY]) == 2
    err = _lines(capsys)
    assert len(err) == 1 and "cannot write the run directory" in err[0], err
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["fit", "--out", str(ro / "run"), *TINY]) == 2
        assert len(_lines(capsys)) == 1


def test_a_closed_pipe_is_not_a_traceback():
    r = subprocess.run(f"{sys.executable} -m ppl_cluster models | head -c 0", shell=True,
                       env=ENV, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
