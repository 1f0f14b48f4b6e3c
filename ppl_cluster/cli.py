"""``ppl-cluster``: fit, evaluate, sample, compose, segment, diagnose, models.

Bad input ends with one line on stderr and exit status 2; nothing already on disk is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .checkpoint import atomic_write_bytes
from .config import FitConfig
from .errors import ConfigError, PPLClusterError, RunDirError

if TYPE_CHECKING:
    from .distributed import Launch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like our own errors
        self.exit(2, f"ppl-cluster: error: {message}\n")


# Options of `fit` that define the training; on --resume they must agree with config.json.
_FIT_FIELDS = ("model", "dataset", "data_root", "split", "n_clusters", "latent_dim", "arch",
               "hidden", "likelihood", "epochs", "pretrain_epochs", "batch_size", "lr",
               "pretrain_lr", "lr_decay", "lr_step", "pretrain_augment", "init", "init_neighbors",
               "gmm_inits", "gmm_covariance", "restarts", "seed")

# Variant-specific options of `fit`, passed through FitConfig.extra; a variant accepts those
# named in its registry defaults.
_EXTRA_FIELDS = ("discrete", "split_every", "split_until", "kl_warmup", "views", "pose")
# Multi-facet options (mfcvae).
_EXTRA_FIELDS += ("facets", "clusters_per_facet", "latent_dims", "progressive",
                  "progressive_epochs", "fade_in_epochs", "pretrain_objective", "facet_init",
                  "facet_covariance")
# Clustered generator model options (cgm, cgm-pixel).
_EXTRA_FIELDS += ("langevin_steps", "langevin_step_size", "langevin_noise", "infer_steps",
                  "obs_scale", "pixel_labels", "appearance", "prior_covariance",
                  "reinit_epoch")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as an integer, a number, true/false, or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any = raw.strip()
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return key.strip(), value


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ppl-cluster", description="Deep generative clustering with Pyro.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="train a variant and write a run directory")
    f.add_argument("--model", default=None, help="registered variant (default vade)")
    f.add_argument("--dataset", default=None, help="digits, mnist, fashion-mnist, svhn, colored-mnist, "
                   "colored-fashion-mnist, 3dshapes (default digits)")
    f.add_argument("--data-root", default=None, help="folder holding the torchvision data")
    f.add_argument("--download", action="store_true", help="allow torchvision to download data")
    f.add_argument("--split", default=None, choices=["train", "test", "all"])
    f.add_argument("--data-option", action="append", type=_key_value, default=None,
                   metavar="KEY=VALUE", dest="data_options",
                   help="a dataset option, e.g. n_colors=6 for colored-mnist (repeatable)")
    f.add_argument("--n-clusters", type=int, default=None)
    f.add_argument("--latent-dim", type=int, default=None)
    f.add_argument("--arch", default=None, choices=["mlp", "conv"])
    f.add_argument("--hidden", type=_int_list, default=None,
                   help="encoder widths (MLP) or channels (conv), e.g. 500,500,2000")
    f.add_argument("--likelihood", default=None, choices=["bernoulli", "gaussian"])
    f.add_argument("--epochs", type=int, default=None)
    f.add_argument("--pretrain-epochs", type=int, default=None)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--pretrain-lr", type=float, default=None)
    f.add_argument("--lr-decay", type=float, default=None,
                   help="multiply the SVI learning rate by this every --lr-step epochs")
    f.add_argument("--lr-step", type=int, default=None)
    f.add_argument("--pretrain-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="pretrain the autoencoder on randomly rotated/shifted/zoomed images")
    f.add_argument("--init", default=None, choices=["gmm", "spectral", "tsne"],
                   help="mixture initialisation: a GMM fitted on the embeddings (published), on "
                        "their k-NN graph's spectral embedding, or on their 2-D t-SNE map")
    f.add_argument("--init-neighbors", type=int, default=None,
                   help="k-NN graph size (--init spectral) or perplexity (--init tsne)")
    f.add_argument("--gmm-inits", type=int, default=None, help="GMM fits at initialisation (best kept)")
    f.add_argument("--gmm-covariance", default=None, choices=["diag", "full"])
    f.add_argument("--restarts", type=int, default=None, help="seeds to train; best ELBO kept")
    f.add_argument("--facets", type=int, default=None,
                   help="mfcvae: number of facets J (clusterings), default 2")
    f.add_argument("--clusters-per-facet", type=_int_list, default=None,
                   help="mfcvae: K of each facet, facet 1 (the default facet) first, e.g. 10,8 "
                        "(default: --n-clusters for every facet; sets --n-clusters to the first)")
    f.add_argument("--latent-dims", type=_int_list, default=None,
                   help="mfcvae: latent size of each facet (default: --latent-dim each)")
    f.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=None,
                   help="mfcvae: progressive training, the deepest facet first and the others "
                        "faded in one at a time (default on; --no-progressive for comparison)")
    f.add_argument("--progressive-epochs", type=int, default=None,
                   help="mfcvae: epochs (pretraining first, then SVI) before the next shallower "
                        "facet starts fading in")
    f.add_argument("--fade-in-epochs", type=int, default=None,
                   help="mfcvae: epochs over which a facet's decoder input rises from 0 to 1")
    f.add_argument("--pretrain-objective", default=None, choices=["elbo", "ae"],
                   help="mfcvae: warm-up loss before the mixture initialisation: the ELBO "
                        "itself (default) or a deterministic ladder autoencoder")
    f.add_argument("--facet-init", type=_name_list, default=None,
                   help="mfcvae: each facet's mixture initialisation (gmm, spectral or tsne), "
                        "e.g. tsne,gmm (default: --init for every facet)")
    f.add_argument("--facet-covariance", type=_name_list, default=None,
                   help="mfcvae: each facet's component covariance (diag or full), e.g. diag,full")
    f.add_argument("--discrete", default=None, choices=["enumerate", "relaxed"],
                   help="how a variant with a guide-side cluster (vc) treats c: exact "
                        "enumeration (default) or a straight-through Gumbel-softmax")
    f.add_argument("--split-every", type=int, default=None,
                   help="vc: every N epochs, re-seed emptied clusters by splitting the largest "
                        "(0: never; default 5)")
    f.add_argument("--kl-warmup", type=int, default=None,
                   help="vc: epochs over which the weight of the z terms of the ELBO rises "
                        "linearly to 1 (0: none)")
    f.add_argument("--views", type=int, default=None,
                   help="vc: views of each training image that share its cluster (the image "
                        "and V-1 randomly rotated, shifted and zoomed copies; 1: the plain ELBO)")
    f.add_argument("--pose", default=None, choices=["none", "affine"],
                   help="vc: none, or affine: each image's own affine pose (a ~ N(0, I), 6-D) "
                        "through which the decoder draws it; the guide undoes it first")
    f.add_argument("--split-until", type=int, default=None,
                   help="vc: last epoch at which clusters may be split (default 60)")
    f.add_argument("--langevin-steps", type=int, default=None,
                   help="cgm: Langevin steps on an image's chain each time its batch comes up")
    f.add_argument("--langevin-step-size", type=float, default=None,
                   help="cgm: Langevin step size eps (z -= eps grad U + noise sqrt(2 eps) xi)")
    f.add_argument("--langevin-noise", type=float, default=None,
                   help="cgm: Langevin noise scale (1 samples the posterior, 0 finds a mode)")
    f.add_argument("--infer-steps", type=int, default=None,
                   help="cgm: Langevin steps of a fresh chain for an image not seen in training")
    f.add_argument("--obs-scale", type=float, default=None,
                   help="cgm: the fixed noise scale s of the Gaussian likelihood")
    f.add_argument("--pixel-labels", type=int, default=None,
                   help="cgm-pixel: number of pixel labels (appearance layers), default 2")
    f.add_argument("--appearance", default=None, choices=["constant", "full"],
                   help="cgm-pixel: one colour per layer and image (default) or full maps")
    f.add_argument("--reinit-epoch", type=int, default=None,
                   help="cgm: re-initialise the mixture from a clustering of the chains before "
                        "this epoch (0: never; default 50)")
    f.add_argument("--prior-covariance", default=None, choices=["diag", "full"],
                   help="cgm, cgm-pixel, vc: diagonal (default) or full covariance of each mixture "
                        "component of p(z | c)")
    f.add_argument("--device", default=None, help="auto, cpu or cuda")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATASET-seedS)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--distributed", action="store_true",
                   help="data-parallel training over the processes of a torchrun launch (implied "
                        "when torchrun starts several); see README")

    e = sub.add_parser("evaluate", help="score a run on (possibly other) data")
    e.add_argument("run_dir")
    e.add_argument("--dataset", default=None)
    e.add_argument("--data-root", default=None)
    e.add_argument("--split", default=None, choices=["train", "test", "all"])
    e.add_argument("--device", default="cpu")

    s = sub.add_parser("sample", help="draw a grid of samples, one row per cluster")
    s.add_argument("run_dir")
    s.add_argument("--per-cluster", type=int, default=10)
    s.add_argument("--out", default=None, help="PNG file (default RUN_DIR/samples.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--facet", type=int, default=None,
                   help="multi-facet runs: one column per cluster of facet J instead, each row "
                        "sharing the other facets' latents (--per-cluster rows)")

    c = sub.add_parser("compose", help="multi-facet runs: swap one facet's latent between images")
    c.add_argument("run_dir")
    c.add_argument("--facet", type=int, default=None,
                   help="the facet whose latent is taken from another image (default 1)")
    c.add_argument("--n", type=int, default=8, help="images on each side of the grid")
    c.add_argument("--out", default=None, help="PNG file (default RUN_DIR/compose-facetJ.png)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random choice of images")
    c.add_argument("--dataset", default=None, help="default: the run's")
    c.add_argument("--data-root", default=None)
    c.add_argument("--split", default=None, choices=["train", "test", "all"])
    c.add_argument("--device", default="cpu")

    d = sub.add_parser("diagnose", help="posterior diagnostics (IWAE, PSIS k-hat, clusters) "
                                        "or, with --select, pick the best of several runs")
    d.add_argument("run_dir", nargs="+", help="run directory (several with --select)")
    d.add_argument("--select", action="store_true",
                   help="score every RUN_DIR on the same images and name the best (no labels)")
    d.add_argument("--criterion", default="iwae", choices=["iwae", "elbo"],
                   help="what --select maximises (default iwae)")
    d.add_argument("--dataset", default=None)
    d.add_argument("--data-root", default=None)
    d.add_argument("--split", default=None, choices=["train", "test", "all"])
    d.add_argument("--num-samples", type=int, default=None,
                   help="importance samples per image (default 100; 50 with --select)")
    d.add_argument("--max-points", type=int, default=None,
                   help="per-image diagnostics on a seeded random subset of this many images "
                        "(default 2000; 1000 with --select)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    d.add_argument("--device", default="cpu")

    g = sub.add_parser("segment", help="per-pixel runs (cgm-pixel): images beside their "
                                       "segmentation maps")
    g.add_argument("run_dir")
    g.add_argument("--out", default=None, help="PNG file (default RUN_DIR/segment.png)")
    g.add_argument("--n", type=int, default=16, help="images to segment")
    g.add_argument("--seed", type=int, default=0, help="seed of the random choice of images")
    g.add_argument("--dataset", default=None, help="default: the run's")
    g.add_argument("--data-root", default=None)
    g.add_argument("--split", default=None, choices=["train", "test", "all"])
    g.add_argument("--device", default="cpu")

    sub.add_parser("models", help="list registered variants")
    return p


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_config(run_dir: str) -> FitConfig:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} holds no config.json: not a ppl-cluster run directory")
    try:
        with open(path) as fh:
            return FitConfig.from_dict(json.load(fh))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RunDirError(f"{path} is not valid ({exc})") from None


def _fit_config(args: argparse.Namespace) -> tuple[FitConfig, str, bool]:
    explicit = {k: getattr(args, k) for k in (*_FIT_FIELDS, "device") if getattr(args, k) is not None}
    if args.download:
        explicit["download"] = True
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if args.data_options:
        explicit["data_options"] = dict(args.data_options)
    extra = {k: getattr(args, k) for k in _EXTRA_FIELDS if getattr(args, k) is not None}
    if extra.get("clusters_per_facet") and "n_clusters" not in explicit:
        explicit["n_clusters"] = extra["clusters_per_facet"][0]  # K of the default facet
    cfg = FitConfig(**explicit, extra=dict(extra))
    out = args.out or os.path.join("runs", f"{cfg.model}-{cfg.dataset}-seed{cfg.seed}")
    exists = os.path.isdir(out) and bool(os.listdir(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirError(f"--out {out} exists and is not a directory")
    if args.resume:
        if not exists:
            raise RunDirError(f"nothing to resume in {out}")
        saved = _read_config(out)
        for key, value in explicit.items():
            if key != "device" and getattr(saved, key) != value:
                raise ConfigError(f"--{key.replace('_', '-')} {value} differs from the run in {out} "
                                  f"({getattr(saved, key)})")
        for key, value in extra.items():
            if saved.extra.get(key) != value:
                raise ConfigError(f"--{key.replace('_', '-')} {value} differs from the run in {out} "
                                  f"({saved.extra.get(key)})")
        if "device" in explicit:
            saved.device = explicit["device"]
        return saved, out, True
    if exists and not args.overwrite:
        raise RunDirError(f"{out} is not empty: pass --resume to continue it or --overwrite to replace it")
    return cfg, out, False


def resolve_config(cfg: FitConfig) -> FitConfig:
    """``cfg`` completed with its variant's defaults for the data set and validated: a flag
    the model does not take, or settings the variant rejects, raise ConfigError."""
    from .registry import get_variant

    variant = get_variant(cfg.model)
    options = variant.defaults_for(cfg.dataset)
    for key in _EXTRA_FIELDS:
        if key in cfg.extra and key not in options:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to model {cfg.model}")
    cfg = cfg.resolved(options)
    if variant.check_config is not None:
        variant.check_config(cfg)
    return cfg


def fit_config(argv: list[str]) -> tuple[FitConfig, str, bool]:
    """What ``ppl-cluster fit ARGV`` would train, without training: the resolved configuration,
    the run directory and whether it resumes one (ConfigError/RunDirError as ``fit`` raises)."""
    cfg, out, resume = _fit_config(_parser().parse_args(["fit", *argv]))
    return resolve_config(cfg), out, resume


def _evaluate(clu: Any, ds: Any) -> dict[str, Any]:
    from .metrics import scores

    probs = clu.predict_proba(ds.x)
    pred = probs.argmax(1)
    out: dict[str, Any] = {"n_samples": len(ds), "elbo": clu.elbo(ds.x),
                           "cluster_sizes": np.bincount(pred, minlength=probs.shape[1]).tolist()}
    if ds.y is not None:
        out.update(scores(ds.y, pred))
    else:
        out.update(acc=None, nmi=None, ari=None)
    out.update(_facet_scores(clu, ds, pred))
    return out


def _facet_scores(clu: Any, ds: Any, pred: np.ndarray) -> dict[str, Any]:
    """``facets``: K, cluster sizes and scores against every known factor for each learned
    facet (numbered 1..J), and ``facet_match``: the best facet for each factor. Only for
    data with several factors or models with several facets."""
    from .metrics import best_match, facet_table

    n = clu.n_facets
    if not ds.factors and n == 1:
        return {}
    factors = ds.label_factors
    preds = [pred] + [clu.predict(ds.x, facet=j) for j in range(2, n + 1)]
    ks = clu.clusters_per_facet
    table = facet_table(preds, factors or {"none": np.zeros(len(ds), np.int64)}, ks)
    for row, p, k in zip(table, preds, ks, strict=True):
        row["facet"] += 1
        row["cluster_sizes"] = np.bincount(p, minlength=k).tolist()
        if not factors:
            row["scores"] = {}
    out: dict[str, Any] = {"facets": table}
    if factors:
        out["facet_match"] = best_match(table)
    return out


def _summary(m: dict[str, Any]) -> str:
    parts = [f"{k.upper()} {m[k]:.4f}" for k in ("acc", "nmi", "ari") if m.get(k) is not None]
    parts.append(f"ELBO {m['elbo']:.2f} nats/image")
    return "  ".join(parts)


def _save_samples(clu: Any, path: str, per_cluster: int, seed: int) -> None:
    import pyro

    from .plots import save_grid

    pyro.set_rng_seed(seed)
    k = clu.n_clusters
    images = np.stack([clu.sample(per_cluster, cluster=c) for c in range(k)])
    pi = clu.fitted.model.pi_logits.softmax(-1).tolist() if hasattr(clu.fitted.model, "pi_logits") else None
    labels = [f"c={c}" + (f" π={pi[c]:.2f}" if pi else "") for c in range(k)]
    save_grid(images, path, labels, title=f"{clu.fitted.cfg.model}: samples per cluster")


def _save_facet_samples(clu: Any, path: str, facet: int | None, per_cluster: int,
                        seed: int) -> None:
    """One column per cluster of ``facet``; each row shares the other facets' latents."""
    import pyro

    from .plots import save_grid

    j = clu._require_facets(facet)
    if per_cluster < 1:
        raise ConfigError(f"--per-cluster must be >= 1, got {per_cluster}")
    pyro.set_rng_seed(seed)
    images = clu.sample_facet(per_cluster, j)
    pi = clu.fitted.model.facet(j).pi_logits.softmax(-1).tolist()
    cols = [f"c{j}={k} π={p:.2f}" for k, p in enumerate(pi)]
    save_grid(images, path, [f"draw {i}" for i in range(per_cluster)],
              title=f"{clu.fitted.cfg.model}: facet {j}'s clusters (columns); each row keeps "
                    "the other facets' latents", col_labels=cols)


def cmd_fit(args: argparse.Namespace) -> int:
    from . import distributed

    # Under torchrun every process runs this command; the checks below (run directory, data,
    # settings) are made by each of them, and rank 0 alone writes files.
    launch = distributed.launch_from_env(explicit=args.distributed)
    if launch is None:
        return _fit(args, None)
    try:
        return _fit(args, launch)
    finally:
        distributed.stop()


def _fit(args: argparse.Namespace, launch: Launch | None) -> int:
    from . import distributed
    from .api import Clusterer
    from .data import load_run_dataset
    from .train import resolve_device

    cfg, out, resume = _fit_config(args)
    cfg = resolve_config(cfg)  # before anything is written
    is_main = True
    if launch is None:
        device = resolve_device(cfg.device)
        ds = load_run_dataset(cfg, download=cfg.download, device=device)
    else:
        device = distributed.device_for(cfg.device, launch)
        # Joining the group waits for every rank, so all of them have checked the run directory
        # before rank 0 writes into it.
        is_main = distributed.start(launch, device).is_main
        if cfg.download and not is_main:  # rank 0 alone downloads; the others read what it fetched
            distributed.barrier()
        ds = load_run_dataset(cfg, download=cfg.download, device=device)
        if cfg.download and is_main:
            distributed.barrier()
    if cfg.n_clusters > len(ds):
        raise ConfigError(f"n-clusters ({cfg.n_clusters}) exceeds the number of samples ({len(ds)})")
    if launch is not None:  # checked here too, before anything is written
        assert cfg.batch_size is not None
        distributed.check_batch(cfg.batch_size, len(ds), launch.world_size)
    if is_main:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "config.json"), cfg.to_dict())
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "n_clusters")}
    clu = Clusterer(cfg.model, cfg.n_clusters, progress=not args.quiet, **settings)
    t0 = time.perf_counter()
    # Only rank 0 gets the run directory: it alone reads and writes checkpoints (the Trainer
    # hands the resumed state to the other ranks).
    clu.fit(ds.x, run_dir=out if is_main else None, resume=resume)
    wall = time.perf_counter() - t0
    if not is_main:
        return 0
    metrics = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split,
               "n_clusters": cfg.n_clusters, **_evaluate(clu, ds),
               "epochs": cfg.epochs, "pretrain_epochs": cfg.pretrain_epochs,
               "seconds": clu.fitted.info.get("seconds", wall), "wall_seconds": wall,
               "seed": cfg.seed, "device": str(device), "restarts": clu.restarts_,
               "history": clu.fitted.history}
    where = str(device)
    if launch is not None:
        metrics["world_size"] = launch.world_size
        where += f" x {launch.world_size} processes"
    write_json(os.path.join(out, "metrics.json"), metrics)
    _save_samples(clu, os.path.join(out, "samples.png"), 10, cfg.seed)
    for j in range(1, clu.n_facets + 1) if clu.n_facets > 1 else ():
        _save_facet_samples(clu, os.path.join(out, f"samples-facet{j}.png"), j, 8, cfg.seed)
    print(f"{cfg.model} on {cfg.dataset} ({len(ds)} images, {metrics['seconds']:.0f} s, {where}): "
          f"{_summary(metrics)}")
    print(f"run saved in {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Clusterer

    cfg = _read_config(args.run_dir)
    clu = Clusterer.load(os.path.join(args.run_dir, "checkpoint.pt"), device=args.device)
    ds = _run_data(args, cfg)
    m = {"model": cfg.model, "dataset": ds.name, "split": ds.split, **_evaluate(clu, ds)}
    # A new file per evaluated data set: the run's own metrics.json is never overwritten.
    path = os.path.join(args.run_dir, f"eval-{ds.name}-{ds.split}.json")
    write_json(path, m)
    print(f"{cfg.model} on {ds.name}/{ds.split} ({len(ds)} images): {_summary(m)}")
    print(f"written {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .api import Clusterer

    if args.per_cluster < 1:
        raise ConfigError(f"--per-cluster must be >= 1, got {args.per_cluster}")
    clu = Clusterer.load(os.path.join(args.run_dir, "checkpoint.pt"))
    if args.facet is not None:
        j = clu._require_facets(args.facet)
        out = args.out or os.path.join(args.run_dir, f"samples-facet{j}.png")
        _save_facet_samples(clu, out, j, args.per_cluster, args.seed)
    else:
        out = args.out or os.path.join(args.run_dir, "samples.png")
        _save_samples(clu, out, args.per_cluster, args.seed)
    print(f"written {out}")
    return 0


def _load_run(args: argparse.Namespace) -> tuple[FitConfig, Any]:
    """The run's configuration and fitted Clusterer, for commands drawing ``--n`` images."""
    from .api import Clusterer

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    cfg = _read_config(args.run_dir)
    return cfg, Clusterer.load(os.path.join(args.run_dir, "checkpoint.pt"), device=args.device)


def _run_data(args: argparse.Namespace, cfg: FitConfig) -> Any:
    """The run's data set, or the one named by ``--dataset/--data-root/--split``."""
    from .data import load_run_dataset

    return load_run_dataset(cfg, args.dataset, args.data_root, args.split, device=args.device)


def cmd_compose(args: argparse.Namespace) -> int:
    from .plots import save_grid

    cfg, clu = _load_run(args)
    j = clu._require_facets(args.facet)  # checked before any data is read
    ds = _run_data(args, cfg)
    pick = np.random.default_rng(args.seed).permutation(len(ds))
    n = min(args.n, len(ds) // 2) if len(ds) > 1 else 1
    give, keep = pick[:n], pick[n : 2 * n] if len(ds) > 1 else pick[:n]
    grid = clu.compose(ds.x[keep], ds.x[give], j)  # (rows, cols, C, H, W)
    c, h, w = grid.shape[2:]
    canvas = np.ones((len(keep) + 1, n + 1, c, h, w), dtype=np.float32)
    canvas[0, 1:] = ds.x[give].cpu().numpy()
    canvas[1:, 0] = ds.x[keep].cpu().numpy()
    canvas[1:, 1:] = grid
    out = args.out or os.path.join(args.run_dir, f"compose-facet{j}.png")
    save_grid(canvas, out, [f"z_{j} from →"] + [f"#{i}" for i in keep],
              title=f"{cfg.model}: row 1 gives facet {j}'s latent, column 1 the other facets'",
              col_labels=[""] + [f"#{i}" for i in give])
    print(f"written {out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .plots import save_grid

    cfg, clu = _load_run(args)
    clu._require_segments()  # checked before any data is read
    ds = _run_data(args, cfg)
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(ds))[: args.n])
    x = ds.x[pick]
    probs = clu.segment(x)  # (n, L, H, W)
    labels = probs.shape[1]
    # The most probable label as a grey level (0 black .. L-1 white), in the images' channels.
    seg = probs.argmax(1)[:, None].astype(np.float32) / (labels - 1)
    seg = np.repeat(seg, x.shape[1], axis=1)
    out = args.out or os.path.join(args.run_dir, "segment.png")
    save_grid(np.stack([x.cpu().numpy(), seg], 1), out, [f"#{i}" for i in pick],
              title=f"{cfg.model}: image | most probable pixel label (of {labels})",
              col_labels=["image", "labels"])
    print(f"written {out}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from . import diagnostics

    select = args.select
    num_samples = args.num_samples if args.num_samples is not None else (50 if select else 100)
    max_points = args.max_points if args.max_points is not None else (1000 if select else 2000)
    common = dict(dataset=args.dataset, data_root=args.data_root, split=args.split,
                  num_samples=num_samples, max_points=max_points, seed=args.seed,
                  device=args.device)
    if select:
        sel = diagnostics.select_run(args.run_dir, criterion=args.criterion, **common)
        print(sel)
        print(f"selected by {sel.criterion.upper()}: {sel.best}")
        return 0
    if len(args.run_dir) != 1:
        raise ConfigError("diagnose takes one RUN_DIR (pass --select to compare several)")
    report = diagnostics.diagnose(args.run_dir[0], plots=not args.no_plots, **common)
    print(report)
    print(f"written {', '.join(report.files)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import REGISTRY

    for name, v in sorted(REGISTRY.items()):
        print(f"{name:12s} {v.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"fit": cmd_fit, "evaluate": cmd_evaluate, "sample": cmd_sample, "models": cmd_models,
               "diagnose": cmd_diagnose, "compose": cmd_compose, "segment": cmd_segment}
    try:
        return command[args.command](args)
    except PPLClusterError as exc:
        print(f"ppl-cluster: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppl-cluster: interrupted (the last finished epoch is in the checkpoint; use --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
