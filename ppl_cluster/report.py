"""What a run writes besides its checkpoint: run-directory files, scores and image grids."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from . import usage
from .checkpoint import atomic_write_bytes
from .config import EXECUTION, FitConfig
from .data import unit
from .errors import CheckpointError, ConfigError, DataError, RunDirError
from .plots import save_grid

SOURCE = "data.json"  # in a run directory: the data file's path, size and hash (files.source)


def check_source(run_dir: str, ds: Any, resuming: bool = False) -> None:
    """Compare the data file a run was fitted on with ``ds`` read from the same path: when it
    changed, resuming is refused (DataError) and anything else warns on stderr."""
    path = os.path.join(run_dir, SOURCE)
    if ds.source is None or not os.path.isfile(path):
        return
    try:
        with open(path) as fh:
            saved = json.load(fh)
        same_path, same = saved["path"] == ds.source["path"], saved["sha256"] == ds.source["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RunDirError(f"{path} is not valid") from None
    if not same_path or same:
        return
    what = (f"{ds.source['path']} changed since the run in {run_dir} was fitted "
            f"({saved['bytes']} bytes then, {ds.source['bytes']} now; SHA-256 differs)")
    if resuming:
        raise DataError(f"{what}: --resume needs the same data")
    print(f"ppl-cluster: warning: {what}", file=sys.stderr)


def picture_path(out: str | None, run_dir: str, name: str) -> str:
    """Where a picture goes: ``out`` (a file, not a folder), else ``name`` in ``run_dir``."""
    if out is None:
        return os.path.join(run_dir, name)
    if not out.strip():
        raise ConfigError("--out must name a file, got an empty string")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory: name a .png file")
    return out


def check_table_path(path: str, overwrite: bool = False) -> None:
    """``path`` can take a table of predictions: .csv or .npz, not a folder, not an existing
    file unless ``overwrite``."""
    if os.path.splitext(path)[1].lower() not in (".csv", ".npz"):
        raise ConfigError(f"--out must end in .csv or .npz, got {path!r}")
    if os.path.isdir(path):
        raise ConfigError(f"--out {path} is a directory")
    if os.path.exists(path) and not overwrite:
        raise RunDirError(f"{path} exists: pass --overwrite to replace it")


def write_table(frame: Any, path: str) -> None:
    """A DataFrame as .csv (a ``row`` index column) or .npz (one array per column, and
    ``row``), written atomically."""
    import io

    if path.lower().endswith(".csv"):
        data = frame.to_csv(index_label="row").encode()
    else:
        buf = io.BytesIO()
        np.savez(buf, row=np.arange(len(frame)), **{c: frame[c].to_numpy() for c in frame.columns})
        data = buf.getvalue()
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise RunDirError(f"cannot write {path} ({exc.strerror or exc})") from None


def _json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity (Python or numpy float, at any depth) as None,
    numpy scalars as Python ones and tuples as lists."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented, strictly valid JSON at ``path``, written atomically: NaN and
    infinities, which JSON lacks, become null."""
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_config(run_dir: str) -> FitConfig:
    """The configuration saved in run directory ``run_dir`` (RunDirError if there is none)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} holds no config.json: not a ppl-cluster run directory")
    try:
        with open(path) as fh:
            cfg = FitConfig.from_dict(json.load(fh))
        cfg.validate()
    except ConfigError as exc:  # the setting stays named (the CLI names its flag)
        raise ConfigError(f"{path}: {exc}", setting=exc.setting) from None
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not an object
        raise RunDirError(f"{path} is not valid ({str(exc)[:160]})") from None
    return cfg


def check_matches(run_dir: str, cfg: FitConfig) -> None:
    """CheckpointError unless ``run_dir``'s config.json (if any) describes the run its
    checkpoint holds (configuration ``cfg``): the checkpoint names the variant, and a
    config.json from another run is refused rather than trusted."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        return
    from .registry import get_variant

    saved = read_config(run_dir)
    if saved.model != cfg.model:
        raise CheckpointError(f"{run_dir}: config.json is a {saved.model} run but checkpoint.pt "
                              f"holds {cfg.model}: the directory mixes two runs")
    variant = get_variant(cfg.model)
    mine, theirs = variant.resolve(cfg).to_dict(), variant.resolve(saved).to_dict()
    differ = [k for k in mine if k not in EXECUTION and mine[k] != theirs[k]]
    if differ:
        k = differ[0]
        raise CheckpointError(f"{run_dir}: config.json says {k}={theirs[k]!r} but checkpoint.pt "
                              f"was trained with {mine[k]!r}: the directory mixes two runs")


def write_run(out: str, clu: Any, ds: Any, cfg: FitConfig, wall: float,
              **extra: Any) -> dict[str, Any]:
    """A finished fit's ``metrics.json`` and sample grids in run directory ``out``."""
    metrics = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split,
               "n_clusters": cfg.n_clusters, **evaluate(clu, ds),
               "epochs": cfg.epochs, "pretrain_epochs": cfg.pretrain_epochs,
               "seconds": clu.fitted.info.get("seconds", wall), "wall_seconds": wall,
               "seed": cfg.seed, "restarts": clu.restarts_, "history": clu.fitted.history,
               **extra}
    write_json(os.path.join(out, "metrics.json"), metrics)
    save_samples(clu, os.path.join(out, "samples.png"), 10, cfg.seed)
    for j in range(1, clu.n_facets + 1) if clu.n_facets > 1 else ():
        save_facet_samples(clu, os.path.join(out, f"samples-facet{j}.png"), j, 8, cfg.seed)
    return metrics


def evaluate(clu: Any, ds: Any) -> dict[str, Any]:
    import torch

    from .metrics import scores
    from .train import facet_usage

    probs = clu.predict_proba(ds.x)
    pred = probs.argmax(1)
    out: dict[str, Any] = {"n_samples": len(ds), "elbo": clu.elbo(ds.x),
                           "cluster_sizes": np.bincount(pred, minlength=probs.shape[1]).tolist()}
    if ds.y is not None:
        out.update(scores(ds.y, pred))
    else:
        out.update(acc=None, nmi=None, ari=None)
    out.update(facet_scores(clu, ds, pred))
    records = facet_usage(clu.fitted, clu._input(ds.x), size=None, first=torch.as_tensor(probs))
    out.update(usage=records, collapsed=usage.any_collapsed(records))
    return out


def facet_scores(clu: Any, ds: Any, pred: np.ndarray) -> dict[str, Any]:
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


def summary(m: dict[str, Any]) -> str:
    """One line of the scores in ``m``."""
    parts = [f"{k.upper()} {m[k]:.4f}" for k in ("acc", "nmi", "ari") if m.get(k) is not None]
    parts.append(f"ELBO {m['elbo']:.2f} nats/image")
    if m.get("usage"):
        parts.append(f"clusters used {usage.line(m['usage'])}" + (" (COLLAPSED)" if m.get("collapsed") else ""))
    return "  ".join(parts)


def save_samples(clu: Any, path: str, per_cluster: int, seed: int) -> None:
    """One row of samples per cluster, labelled with its weight where the model has one."""
    import pyro

    pyro.set_rng_seed(seed)
    k = clu.n_clusters
    images = np.stack([clu.sample(per_cluster, cluster=c) for c in range(k)])
    pi = clu.fitted.model.pi_logits.softmax(-1).tolist() if hasattr(clu.fitted.model, "pi_logits") else None
    labels = [f"c={c}" + (f" π={pi[c]:.2f}" if pi else "") for c in range(k)]
    save_grid(images, path, labels, title=f"{clu.fitted.cfg.model}: samples per cluster")


def save_facet_samples(clu: Any, path: str, facet: int | None, per_cluster: int,
                        seed: int) -> None:
    """One column per cluster of ``facet``; each row shares the other facets' latents."""
    import pyro

    j = clu._require_facets(facet)
    if per_cluster < 1:
        raise ConfigError(f"per_cluster must be >= 1, got {per_cluster}", setting="per_cluster")
    pyro.set_rng_seed(seed)
    images = clu.sample_facet(per_cluster, j)
    pi = clu.fitted.model.facet(j).pi_logits.softmax(-1).tolist()
    cols = [f"c{j}={k} π={p:.2f}" for k, p in enumerate(pi)]
    save_grid(images, path, [f"draw {i}" for i in range(per_cluster)],
              title=f"{clu.fitted.cfg.model}: facet {j}'s clusters (columns); each row keeps "
                    "the other facets' latents", col_labels=cols)


def save_composition(clu: Any, x: Any, path: str, facet: int, n: int, seed: int) -> None:
    """Facet ``facet``'s latent swapped between images: row 1 gives it, column 1 the rest."""
    pick = np.random.default_rng(seed).permutation(len(x))
    n = min(n, len(x) // 2) if len(x) > 1 else 1
    give, keep = pick[:n], pick[n : 2 * n] if len(x) > 1 else pick[:n]
    grid = clu.compose(x[keep], x[give], facet)  # (rows, cols, C, H, W)
    c, h, w = grid.shape[2:]
    canvas = np.ones((len(keep) + 1, n + 1, c, h, w), dtype=np.float32)
    canvas[0, 1:] = unit(x[give]).cpu().numpy()
    canvas[1:, 0] = unit(x[keep]).cpu().numpy()
    canvas[1:, 1:] = grid
    save_grid(canvas, path, [f"z_{facet} from →"] + [f"#{i}" for i in keep],
              title=f"{clu.config.model}: row 1 gives facet {facet}'s latent, column 1 the "
                    "other facets'", col_labels=[""] + [f"#{i}" for i in give])


def save_segmentation(clu: Any, x: Any, path: str, n: int, seed: int) -> None:
    """``n`` random images beside their most probable pixel labels."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    x = unit(x[pick])
    probs = clu.segment(x)  # (n, L, H, W)
    labels = probs.shape[1]
    # The most probable label as a grey level (0 black .. L-1 white), in the images' channels.
    seg = probs.argmax(1)[:, None].astype(np.float32) / (labels - 1)
    seg = np.repeat(seg, x.shape[1], axis=1)
    save_grid(np.stack([x.cpu().numpy(), seg], 1), path, [f"#{i}" for i in pick],
              title=f"{clu.config.model}: image | most probable pixel label (of {labels})",
              col_labels=["image", "labels"])
