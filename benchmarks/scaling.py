"""Time and peak memory of each phase of a VaDE fit as the number of images N grows.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --sizes 10000 20000 40000 --threads 1 \
        --init-subsample 10000 1000000 --out runs/scaling.json

Phases, each on all N images: ``load`` (read the shared 10,000 MNIST digits and make N images
of them: the originals, then posed and noised copies, ``random_affine`` and pixel noise with a
fixed seed per copy), ``pretrain`` (one autoencoder epoch, the trainer's own step), ``init``
(the variant's ``initialize`` hook: embed every image, the mixture initialisation, the prior's
moments), ``svi`` (one SVI epoch with the trainer's per-epoch usage record) and ``eval``
(``predict_proba`` + ELBO of every image). The settings are the vade variant's defaults at its
reference scale (784-500-500-2000-10 nets, batch 256, t-SNE initialisation, full covariance, 10
GMM fits); ``--init`` and ``--init-subsample`` change the initialisation only. Several
``--init-subsample`` values time the initialisation once each on the same pretrained
embeddings (a value >= N means no subsampling); SVI and evaluation then start from the first
value's mixture. Every N runs in a fresh subprocess; a phase's peak memory is the process's
peak resident set during that phase (VmHWM, reset before each phase through
/proc/self/clear_refs where the kernel allows it, else the peak so far) and, on CUDA,
``torch.cuda.max_memory_allocated``. ``init_acc`` is the ACC of the initial soft assignments'
argmax against the labels, ``prior_acc`` that of the prior's p(c | x) right after the
initialisation (docs/vade.md's "init ACC"). The table gives each phase's growth factor per
doubling of N, (t2 / t1) ** (1 / log2(N2 / N1)): 2.0 is linear. Without ../shared/data it
prints why and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHASES = ("load", "pretrain", "init", "svi", "eval")
BASE = 10_000  # images in the shared MNIST subset


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Wall time and peak memory of a ``with`` block, appended to ``out`` under ``name``."""

    def __init__(self, out: dict[str, Any], name: str, device: Any) -> None:
        self.out, self.name, self.device = out, name, device

    def __enter__(self) -> Phase:
        import torch

        self.rss0 = _status_kib("VmRSS") / 1024
        self.reset = _reset_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        rec = {"seconds": time.perf_counter() - self.t0,
               "peak_rss_mib": _status_kib("VmHWM") / 1024, "rss_start_mib": self.rss0,
               "rss_end_mib": _status_kib("VmRSS") / 1024, "peak_is_phase": self.reset}
        if self.device.type == "cuda":
            rec["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.out[self.name] = rec


def make_images(x: Any, y: Any, n: int, seed: int = 0) -> tuple[Any, Any]:
    """``n`` images from the 10,000 of ``x``: the originals, then for copy c = 1, 2, ... all of
    them posed (``random_affine``) and noised (Gaussian pixel noise, sd 0.05, clipped to
    [0, 1]) with torch seed ``seed + c``; labels repeated. Stored as ``x`` is: uint8 pixels
    stay uint8 (the copies rounded to k / 255), as the library keeps them on the device."""
    import numpy as np
    import torch

    from ppl_cluster.data import random_affine, unit

    parts, labels, c = [x], [y], 0
    while sum(len(p) for p in parts) < n:
        c += 1
        gen = torch.Generator().manual_seed(seed + c)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + c)
            posed = random_affine(unit(x))
        noise = torch.randn(x.shape, generator=gen) * 0.05
        copy = (posed + noise).clamp_(0, 1)
        parts.append(copy.mul_(255).round_().to(torch.uint8) if x.dtype == torch.uint8 else copy)
        labels.append(y)
    return torch.cat(parts)[:n].contiguous(), np.concatenate(labels)[:n]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyro
    import torch

    torch.set_num_threads(args.threads)
    import ppl_cluster.init as init
    from ppl_cluster import train
    from ppl_cluster.config import FitConfig
    from ppl_cluster.data import load_dataset, random_affine
    from ppl_cluster.metrics import cluster_accuracy
    from ppl_cluster.registry import get_variant
    from ppl_cluster.variant import local_params

    device = train.resolve_device(args.device)
    n, phases = args.worker, {}
    cfg = get_variant("vade").resolve(FitConfig(dataset="mnist", init=args.init,
                                                device=args.device))
    subsamples = args.init_subsample or [None]

    @local_params
    def run() -> None:
        with Phase(phases, "load", device):
            ds = load_dataset("mnist", str(args.data_root), "all")
            x, y = make_images(ds.x, ds.y, n)
            x = x.to(device)
        train.seed_everything(args.seed)
        fitted = train.build(cfg, tuple(x.shape[1:]), device)
        variant, model, guide = fitted.variant, fitted.model, fitted.guide
        trainer = train.Trainer(cfg, x, seed=args.seed, progress=False)
        params = [p for m in (model, guide) for p in m.parameters()]
        optim = train.make_adam(params, cfg.pretrain_lr)

        def pretrain_step(xb: torch.Tensor) -> torch.Tensor:
            xb = random_affine(xb) if cfg.pretrain_augment else xb
            return variant.pretrain_loss(model, guide, xb)

        for epoch in range(args.pretrain_epochs):
            with Phase(phases, f"pretrain{epoch}", device):
                trainer._epoch(pretrain_step, optim, epoch)
        phases["pretrain"] = phases.pop(f"pretrain{args.pretrain_epochs - 1}")
        phases["pretrain"]["epochs_before"] = args.pretrain_epochs - 1
        for epoch in range(args.pretrain_epochs - 1):
            phases.pop(f"pretrain{epoch}")

        got: list[Any] = []
        real = init.cluster_embeddings

        def recording(*a: Any, **kw: Any) -> Any:
            got.append(real(*a, **kw))
            return got[-1]

        init.cluster_embeddings = recording  # gmm_initialize looks it up in its module
        try:
            # Last the first value, whose mixture SVI and evaluation then start from.
            for size in reversed(subsamples):
                name = "init" if size == subsamples[0] else f"init@{size}"
                with Phase(phases, name, device):
                    info = variant.initialize(model, guide, x, dataclasses.replace(
                        cfg, init_subsample=size), args.seed)
                resp = got[-1][0]
                prior = train.cluster_probs(fitted, x).argmax(1).cpu().numpy()
                phases[name].update(init_subsample=size or init.INIT_SUBSAMPLE,
                                    init_acc=cluster_accuracy(y, resp.argmax(1)),
                                    prior_acc=cluster_accuracy(y, prior), **info)
        finally:
            init.cluster_embeddings = real
        if "svi" in args.phases:
            module = fitted.elbo_module()
            optim = train.make_adam(list(module.parameters()), cfg.lr)
            with Phase(phases, "svi", device):
                with pyro.validation_enabled(False):
                    trainer._epoch(module, optim, args.pretrain_epochs)
                train.facet_usage(fitted, x)
        if "eval" in args.phases:
            with Phase(phases, "eval", device):
                probs = train.cluster_probs(fitted, x)
                elbo = train.elbo_per_point(fitted, x)
            phases["eval"].update(acc=cluster_accuracy(y, probs.argmax(1).cpu().numpy()),
                                  elbo=elbo)

    run()
    order = ["load", "pretrain", "init", *(f"init@{s}" for s in subsamples[1:]), "svi", "eval"]
    phases = {k: phases[k] for k in order if k in phases}
    return {"n": n, "phases": phases, "settings": {
        k: cfg.to_dict()[k] for k in ("hidden", "latent_dim", "batch_size", "init",
                                      "init_neighbors", "gmm_covariance", "gmm_inits")},
        "device": str(device), "threads": args.threads, "np": np.__version__}


def growth(a: float, b: float, na: int, nb: int) -> float:
    """Factor per doubling of N from (na, a) to (nb, b)."""
    return (b / a) ** (1 / math.log2(nb / na)) if a > 0 and b > 0 else float("nan")


def table(rows: list[dict[str, Any]], key: str, unit: str) -> str:
    cols = [c for c in rows[0]["phases"] if all(c in r["phases"] for r in rows)]
    head = f"| N | {' | '.join(f'{c} {unit}' for c in cols)} |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for i, r in enumerate(rows):
        vals = [r["phases"][c][key] for c in cols]
        lines.append(f"| {r['n']:,} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
        if i:
            p = rows[i - 1]
            f = [growth(p["phases"][c][key], r["phases"][c][key], p["n"], r["n"]) for c in cols]
            lines.append(f"| ×/doubling {p['n'] // 1000}k→{r['n'] // 1000}k | "
                         + " | ".join(f"×{v:.2f}" for v in f) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000, 70_000,
                                                            140_000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch, OpenMP and BLAS threads")
    p.add_argument("--out", default="runs/scaling.json", help="JSON written here")
    p.add_argument("--init", default="tsne", choices=("gmm", "spectral", "tsne"))
    p.add_argument("--init-subsample", type=int, nargs="+", default=None,
                   help="one or more values, each timed (default: the library's); a value "
                        ">= N disables subsampling")
    p.add_argument("--pretrain-epochs", type=int, default=1,
                   help="pretraining epochs before the initialisation (the last one is timed)")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                   help="load, pretrain and init always run; leave out svi and/or eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, default=SHARED)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pretrain_epochs < 1:
        p.error("--pretrain-epochs must be at least 1")
    if not (args.data_root / "MNIST").is_dir():
        print(f"skipped: the shared MNIST subset is not at {args.data_root} "
              "(pass --data-root)", file=sys.stderr)
        return 0
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args)))
        return 0

    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads}
    rows = []
    for n in sorted(args.sizes):
        cmd = [sys.executable, __file__, "--worker", str(n), *(argv if argv is not None
                                                              else sys.argv[1:])]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return done.returncode
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        rows.append(json.loads(line.removeprefix("RESULT ")))
        ph = rows[-1]["phases"]
        print(f"N={n:,}: {time.perf_counter() - t0:.0f} s; "
              + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in ph.items()), flush=True)
    import torch

    summary = {"command": "python benchmarks/scaling.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "rows": rows}
    print("\nseconds per phase\n" + table(rows, "seconds", "s"))
    print("\npeak resident memory per phase\n" + table(rows, "peak_rss_mib", "MiB"))
    if all("cuda_peak_mib" in r["phases"]["load"] for r in rows):
        print("\npeak CUDA memory per phase\n" + table(rows, "cuda_peak_mib", "MiB"))
    print("\naccuracy")
    for r in rows:
        inits = {k: v for k, v in r["phases"].items() if k.startswith("init")}
        text = ", ".join(f"{k} (subsample {v['init_subsample']:,}) init_acc {v['init_acc']:.3f} "
                         f"prior_acc {v['prior_acc']:.3f}" for k, v in inits.items())
        if "eval" in r["phases"]:
            text += f"; after one SVI epoch {r['phases']['eval']['acc']:.3f}"
        print(f"N={r['n']:,}: {text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
