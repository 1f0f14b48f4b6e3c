"""Run N seeds of a variant through `ppl-cluster fit` and print an accuracy table.

    python benchmarks/accuracy.py --model vade --dataset mnist --data-root ../shared/data \
        --seeds 0 1 2 --out runs/bench-vade-mnist

Any further arguments are passed to `ppl-cluster fit` unchanged (e.g. --epochs 300). Each seed
is its own run directory (resumable); the table is also written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np
import torch

from ppl_cluster.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vade")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="folder for the per-seed runs")
    args, passthrough = p.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    out = args.out or os.path.join("runs", f"bench-{args.model}-{args.dataset}")
    rows = []
    for seed in args.seeds:
        run = os.path.join(out, f"seed{seed}")
        metrics_path = os.path.join(run, "metrics.json")
        if not os.path.exists(metrics_path):
            fit = ["fit", "--model", args.model, "--dataset", args.dataset, "--seed", str(seed),
                   "--out", run, *passthrough]
            if args.data_root:
                fit += ["--data-root", args.data_root]
            if os.path.isdir(run) and os.listdir(run):
                fit.append("--resume")
            code = cli_main(fit)
            if code != 0:
                return code
        with open(metrics_path) as fh:
            rows.append(json.load(fh))

    def stat(key: str) -> dict[str, float]:
        v = np.array([r[key] for r in rows], dtype=float)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}

    summary = {"model": args.model, "dataset": args.dataset, "seeds": args.seeds,
               "device": rows[0]["device"], "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "extra_args": passthrough,
               "per_seed": [{k: r[k] for k in ("seed", "acc", "nmi", "ari", "elbo", "seconds")}
                            for r in rows],
               **{k: stat(k) for k in ("acc", "nmi", "ari", "elbo", "seconds")}}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    print(f"\n{args.model} on {args.dataset}: {len(rows)} seeds, {rows[0]['n_samples']} images, "
          f"device {rows[0]['device']}, {torch.get_num_threads()} threads")
    print(f"{'seed':>6} {'ACC':>7} {'NMI':>7} {'ARI':>7} {'ELBO':>9} {'s/run':>7}")
    for r in rows:
        print(f"{r['seed']:>6} {r['acc']:7.4f} {r['nmi']:7.4f} {r['ari']:7.4f} {r['elbo']:9.2f} "
              f"{r['seconds']:7.0f}")
    for name in ("acc", "nmi", "ari"):
        s = summary[name]
        print(f"{name.upper():>4}: {s['mean']:.4f} ± {s['std']:.4f}  (median {s['median']:.4f}, "
              f"min {s['min']:.4f})")
    print(f"seconds per run: {summary['seconds']['mean']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
