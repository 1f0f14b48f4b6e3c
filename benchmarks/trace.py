"""Trace a training run: every N epochs, score the saved checkpoint against the data's labels.

    python benchmarks/trace.py --every 5 --tsne -- --model mfcvae --dataset colored-mnist \\
        --data-root ../shared/data --seed 10 --out runs/trace-mfcvae-s10

Everything after ``--`` is a `ppl-cluster fit` command line (same defaults, same checks, same
run directory, so the run can also be evaluated afterwards). Training never sees the labels:
they only score the checkpoint written after each epoch. A record is kept every ``--every``
epochs of each phase (pretraining, then SVI) and at the end of each phase, with the epoch's
loss and, for each learned facet, ACC/NMI/ARI against every factor of the data (the labels as
factor ``label`` when there is only one). ``--tsne`` adds each facet's clustering ceiling: a
t-SNE map of its posterior means clustered by a full-covariance Gaussian mixture with the
facet's K. Records go to OUT/trace.json, rewritten after each one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch

from ppl_cluster.api import Clusterer
from ppl_cluster.cli import fit_config
from ppl_cluster.config import FitConfig
from ppl_cluster.data import load_run_dataset
from ppl_cluster.errors import PPLClusterError
from ppl_cluster.init import cluster_embeddings
from ppl_cluster.metrics import facet_table
from ppl_cluster.report import write_json
from ppl_cluster.train import Trainer, resolve_device, standardized, standardizer

# t-SNE map (perplexity 30), full-covariance Gaussian mixture with the facet's K, best of 3 fits.
TSNE_CEILING = FitConfig(init="tsne", init_neighbors=30, gmm_covariance="full", gmm_inits=3)


def score(clu: Clusterer, x: torch.Tensor, factors: dict[str, np.ndarray], tsne: bool,
          seed: int = 0) -> list[dict[str, Any]]:
    """Each facet's ACC/NMI/ARI against every factor (``metrics.facet_table`` rows, facets
    numbered from 1); with ``tsne`` each row gains ``tsne``: the same scores for a t-SNE +
    Gaussian-mixture clustering of the facet's posterior means."""
    ks = clu.clusters_per_facet
    facets = range(1, clu.n_facets + 1)
    preds = [clu.predict(x, facet=j) for j in facets]
    table = facet_table(preds, factors, ks)
    for row, j, k in zip(table, facets, ks, strict=True):
        row["facet"] = j
        if tsne:  # the project's t-SNE initialisation, applied to the facet's posterior means
            z = clu.embed(x, facet=j).astype(np.float64)
            p = cluster_embeddings(z, k, TSNE_CEILING, seed)[0].argmax(1)
            row["tsne"] = facet_table([p], factors, [k])[0]["scores"]
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=5, help="score every N epochs of each phase")
    p.add_argument("--tsne", action="store_true", help="also each facet's t-SNE ceiling")
    args, fit_argv = p.parse_known_args(argv)
    fit_argv = [a for a in fit_argv if a != "--"]
    if args.every < 1:
        p.error("--every must be at least 1")
    try:
        cfg, out, resume = fit_config(fit_argv)
        device = resolve_device(cfg.device)
        ds = load_run_dataset(cfg, download=cfg.download, device=device)
        cfg = fit_config(fit_argv, data=(len(ds), ds.image_shape))[0]  # as fit resolves it
    except PPLClusterError as e:
        print(f"trace: {e}", file=sys.stderr)
        return 2
    problem = ("--resume is not supported (the trace would miss epochs)" if resume else
               None if ds.label_factors else f"{ds.name} has no labels to score against")
    if problem:  # before any training
        print(f"trace: {problem}", file=sys.stderr)
        return 2
    factors = ds.label_factors
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "config.json"), cfg.to_dict())
    ckpt = os.path.join(out, "checkpoint.pt")
    n_pre, total = cfg.pretrain_epochs or 0, (cfg.pretrain_epochs or 0) + (cfg.epochs or 0)
    records: list[dict[str, Any]] = []

    def on_epoch(epoch: int, loss: float) -> None:
        phase, n, end = (("pretrain", epoch + 1, epoch == n_pre - 1) if epoch < n_pre
                         else ("svi", epoch - n_pre + 1, epoch == total - 1))
        if n % args.every and not end:
            return
        facets = score(Clusterer.load(ckpt, str(device)), ds.x, factors, args.tsne)
        records.append({"phase": phase, "epoch": n, "loss": loss, "facets": facets})
        accs = ", ".join(f"facet {f['facet']}: " + " ".join(
            f"{name} {s['acc']:.3f}" for name, s in f["scores"].items()) for f in facets)
        print(f"{phase} epoch {n}: loss {loss:.2f}; ACC {accs}", flush=True)
        write_json(os.path.join(out, "trace.json"), records)

    # Trained as Clusterer.fit trains (standardised if configured); scored on the raw data,
    # which the loaded checkpoint standardises the same way.
    info = {"standardize": standardizer(ds.x)} if cfg.standardize else {}
    x = standardized(ds.x, info["standardize"]) if info else ds.x
    Trainer(cfg, x, seed=cfg.seed, checkpoint_path=ckpt, progress=False, info=info,
            on_epoch=on_epoch).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
