"""Kill a ``fit`` in each phase with SIGTERM, SIGINT and SIGKILL, resume it, and compare every
tensor with an uninterrupted run of the same command.

    python benchmarks/kill_resume.py --models vade cgm --out runs/kill-resume

Phases, told from the outside: ``start`` (3 s after launch, before the first checkpoint: the
first epoch, or CGM's initialisation), and by the checkpoint's epoch ``pretrain`` (after the
first pretraining epoch), ``init`` (right after the last one, while the mixture is
initialised) and ``svi`` (after the first SVI epoch). Each line: model, signal, phase, the epoch the killed run
had checkpointed, its exit status, and whether the resumed run is bit-identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from ppl_cluster import checkpoint

FIT = ["--dataset", "digits", "--epochs", "6", "--batch-size", "128", "--hidden", "64",
       "--latent-dim", "5", "--quiet"]
PRETRAIN = {"vade": ["--pretrain-epochs", "3"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}


def _epoch(path: str) -> int:
    try:
        return int(checkpoint.load(path)["epoch"])
    except Exception:  # not written yet
        return -1


def _fit(out: str, model: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ppl_cluster", "fit", "--model", model,
                             "--out", out, *FIT, *PRETRAIN.get(model, []), *extra], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _same(a: str, b: str) -> bool:
    x, y = checkpoint.load(a), checkpoint.load(b)
    for part in ("model", "guide"):
        if x[part].keys() != y[part].keys():
            return False
        if not all(torch.equal(x[part][k], y[part][k]) for k in x[part]):
            return False
    return x["history"] == y["history"] and x["epoch"] == y["epoch"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vade", "cgm"])
    p.add_argument("--out", default="runs/kill-resume")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    rows, ok = [], True
    for model in args.models:
        ref = os.path.join(args.out, model, "reference")
        r = _fit(ref, model)
        if r.wait() != 0:
            print(r.stderr.read() if r.stderr else "", file=sys.stderr)
            return 1
        n_pre = len(checkpoint.load(os.path.join(ref, "checkpoint.pt"))["history"]["pretrain"])
        phases = {"start": 0, "svi": n_pre + 1}
        if n_pre:
            phases = {"start": 0, "pretrain": 1, "init": n_pre, "svi": n_pre + 1}
        for sig_name, sig in SIGNALS.items():
            for phase, at in phases.items():
                out = os.path.join(args.out, model, f"{sig_name}-{phase}")
                proc = _fit(out, model)
                path = os.path.join(out, "checkpoint.pt")
                t0 = time.time()
                while proc.poll() is None and (_epoch(path) < at if at else time.time() < t0 + 3):
                    time.sleep(0.02)
                killed_at = _epoch(path)
                proc.send_signal(sig)
                code = proc.wait()
                resumed = subprocess.run([sys.executable, "-m", "ppl_cluster", "fit", "--out", out,
                                          "--resume", "--quiet"], env=ENV, capture_output=True,
                                         text=True)
                same = resumed.returncode == 0 and _same(os.path.join(ref, "checkpoint.pt"), path)
                ok &= same and killed_at < n_pre + 6
                rows.append((model, sig_name, phase, killed_at, code, same))
                print(f"{model:6s} SIG{sig_name:4s} {phase:8s} checkpointed epoch {killed_at:2d}  "
                      f"exit {code:4d}  resumed {'bit-identical' if same else 'DIFFERENT'}",
                      flush=True)
    print(f"{sum(r[-1] for r in rows)} of {len(rows)} resumed runs bit-identical")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
