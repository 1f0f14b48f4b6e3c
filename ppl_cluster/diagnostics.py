r"""Posterior diagnostics of a fitted run: importance-weighted likelihood, PSIS k̂, cluster
health, ArviZ ``InferenceData`` and plots. Generic over registered variants.

For every data point :math:`x_i` the guide draws :math:`S` latents
:math:`z_{is} \sim q(z \mid x_i)` (a guide-side cluster ``c`` is drawn too), and the model is
replayed on them with its enumerated sites (e.g. the cluster ``c``) summed out exactly, giving the
log importance weights

.. math:: \log w_{is} = \log p(x_i, z_{is}) - \log q(z_{is} \mid x_i),
          \qquad \log p(x, z) = \log \textstyle\sum_c p(c)\, p(z \mid c)\, p(x \mid z).

From them:

* **IWAE** (Burda et al. 2016): :math:`\log \frac1S \sum_s w_{is} \le \log p(x_i)`, a lower
  bound that tightens as :math:`S` grows; with :math:`S = 1` it is the ELBO.
* **ELBO**: :math:`\frac1S \sum_s \log w_{is}` (the training objective, averaged over S draws).
* **PSIS k̂** (Vehtari et al. 2024) per data point, from ArviZ's ``psislw``: the estimated
  Pareto tail shape of the weights. k̂ > 0.7 means q(z|x) misses mass of p(z|x) for that image
  and its IWAE term is unreliable.

Nothing here reads labels except the optional confusion matrix.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from . import plots, usage
from .checkpoint import atomic_write_bytes
from .data import chunks, unit
from .errors import ConfigError, RunDirError
from .train import Fitted, cluster_probs, facet_usage, from_state, resolve_device
from .variant import local_params

KHAT_BAD = 0.7
KHAT_OK = 0.5
MIN_SAMPLES_FOR_KHAT = 25  # below this PSIS cannot fit the Pareto tail (ArviZ returns inf)
DATA_PLATE = "data"


def _arviz() -> Any:
    with warnings.catch_warnings():  # arviz 0.23 announces its refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# --- importance weights ------------------------------------------------------------------

@dataclass
class ImportanceSamples:
    """S guide draws for each of N points.

    ``log_weights`` (S, N); ``latents`` maps each guide site to its values (S, N, ...);
    ``cluster_probs`` (S, N, K) is p(c | x, z_s) for a cluster enumerated in the model, or the
    guide's q(c | x) for a cluster drawn by the guide (None when there is no site ``c``).
    """

    log_weights: np.ndarray
    latents: dict[str, np.ndarray]
    cluster_probs: np.ndarray | None

    @property
    def num_samples(self) -> int:
        return self.log_weights.shape[0]

    def iwae(self) -> np.ndarray:
        """Per-point IWAE bound log (1/S) sum_s w_s, in nats, shape (N,)."""
        lw = torch.as_tensor(self.log_weights, dtype=torch.float64)
        return (torch.logsumexp(lw, 0) - math.log(lw.shape[0])).numpy()

    def elbo(self) -> np.ndarray:
        """Per-point ELBO estimate (1/S) sum_s log w_s, shape (N,)."""
        return self.log_weights.astype(np.float64).mean(0)

    def khat(self) -> np.ndarray | None:
        """PSIS Pareto k̂ per point, or None when S is too small for a tail fit."""
        if self.num_samples < MIN_SAMPLES_FOR_KHAT:
            return None
        az = _arviz()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, k = az.psislw(np.ascontiguousarray(self.log_weights.T.astype(np.float64)), reff=1.0)
        return np.asarray(k, dtype=np.float64)

    def normalized_weights(self) -> np.ndarray:
        """Self-normalised importance weights over draws, (S, N)."""
        return torch.softmax(torch.as_tensor(self.log_weights, dtype=torch.float64), 0).numpy()


def _in_data_plate(site: dict[str, Any]) -> bool:
    return any(f.name == DATA_PLATE for f in site["cond_indep_stack"])


def _log_weights_batch(fitted: Fitted, x: torch.Tensor, cluster_site: str = "c"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One guide draw per row of ``x``: log w (rows,), guide values, cluster probs (rows, K)."""
    rows = x.shape[0]
    guide_tr = poutine.trace(fitted.guide).get_trace(x)
    enum_dim = -(fitted.variant.max_plate_nesting + 1)
    model = poutine.enum(poutine.replay(fitted.model, trace=guide_tr), first_available_dim=enum_dim)
    model_tr = poutine.trace(model).get_trace(x)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()

    log_q = torch.zeros(rows, device=x.device)
    latents: dict[str, torch.Tensor] = {}
    probs = None
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not _in_data_plate(site):
            raise ConfigError(f"diagnostics need every guide site inside plate {DATA_PLATE!r}; "
                              f"{name!r} is not")
        if isinstance(site["fn"], pyro.distributions.Delta):  # e.g. persistent Langevin chains
            raise ConfigError(f"diagnostics need a guide with a density; guide site {name!r} of "
                              f"model {fitted.cfg.model} is a point mass")
        log_q = log_q + site["log_prob"]
        latents[name] = site["value"]
        if name == cluster_site and hasattr(site["fn"], "logits"):
            probs = torch.softmax(site["fn"].logits, -1)

    log_p = torch.zeros(rows, device=x.device)
    enumerated = []
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not _in_data_plate(site):
            raise ConfigError(f"diagnostics need every model site inside plate {DATA_PLATE!r}; "
                              f"{name!r} is not")
        is_enum = site["infer"].get("_enumerate_dim") is not None
        if not (site["is_observed"] or is_enum or name in guide_tr.nodes):
            raise ConfigError(f"model site {name!r} is neither observed, enumerated nor in the guide")
        if is_enum:
            enumerated.append(name)
        log_p = log_p + site["log_prob"]
    # Leading dimensions are the enumerated sites (each per data point): sum them out.
    joint = log_p.reshape(-1, rows)
    log_w = torch.logsumexp(joint, 0) - log_q
    if enumerated == [cluster_site] and joint.shape[0] > 1:
        probs = torch.softmax(joint, 0).T
    return log_w, latents, probs


@torch.no_grad()
@local_params
def importance_samples(fitted: Fitted, x: torch.Tensor, num_samples: int = 100, *,
                       seed: int = 0, max_rows: int = 4096) -> ImportanceSamples:
    """Draw ``num_samples`` guide samples per image of ``x`` and weigh them (see module doc).

    Work is done in chunks of at most ``max_rows`` (image, draw) pairs; the global RNG state
    is left untouched.
    """
    if num_samples < 1:
        raise ConfigError(f"num-samples must be >= 1, got {num_samples}")
    fitted.model.eval()
    fitted.guide.eval()
    n = x.shape[0]
    points = max(1, min(n, max_rows))
    devices = [x.device] if x.device.type == "cuda" else []
    lw_chunks, lat_chunks, prob_chunks = [], [], []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        torch.manual_seed(seed)
        for xb in chunks(x, points):
            b = xb.shape[0]
            reps = max(1, max_rows // b)
            lw_s, lat_s, prob_s = [], [], []
            done = 0
            while done < num_samples:
                r = min(reps, num_samples - done)
                lw, lat, pr = _log_weights_batch(fitted, xb.repeat(r, *([1] * (xb.dim() - 1))))
                lw_s.append(lw.reshape(r, b))
                lat_s.append({k: v.reshape(r, b, *v.shape[1:]) for k, v in lat.items()})
                if pr is not None:
                    prob_s.append(pr.reshape(r, b, -1))
                done += r
            lw_chunks.append(torch.cat(lw_s, 0))
            lat_chunks.append({k: torch.cat([d[k] for d in lat_s], 0) for k in lat_s[0]})
            if prob_s:
                prob_chunks.append(torch.cat(prob_s, 0))
    log_w = torch.cat(lw_chunks, 1).double().cpu().numpy()
    latents = {k: torch.cat([d[k] for d in lat_chunks], 1).cpu().numpy() for k in lat_chunks[0]}
    probs = torch.cat(prob_chunks, 1).cpu().numpy() if len(prob_chunks) == len(lw_chunks) else None
    if not np.isfinite(log_w).all():
        raise ConfigError("non-finite importance weights: the run's parameters are degenerate")
    return ImportanceSamples(log_w, latents, probs)


# --- summaries -----------------------------------------------------------------------------

def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error across points."""
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def khat_summary(khat: np.ndarray | None, index: np.ndarray, worst: int = 16) -> dict[str, Any]:
    if khat is None:
        return {"available": False,
                "reason": f"needs --num-samples >= {MIN_SAMPLES_FOR_KHAT} for the Pareto tail fit"}
    order = np.argsort(-khat, kind="stable")[:worst]
    finite = khat[np.isfinite(khat)]
    return {
        "available": True,
        # k-hat is inf where fewer than 5 weights lie within e^-708 of the largest one: the
        # estimate rests on a single draw (worse than any finite k-hat).
        "max": float(khat.max()),
        "mean_finite": float(finite.mean()) if finite.size else None,
        "fraction_infinite": float(np.isinf(khat).mean()),
        "fraction_gt_0.7": float((khat > KHAT_BAD).mean()),
        "fraction_0.5_to_0.7": float(((khat > KHAT_OK) & (khat <= KHAT_BAD)).mean()),
        "fraction_gt_1": float((khat > 1).mean()),
        "worst": [{"index": int(index[i]), "khat": float(khat[i])} for i in order],
    }


def mixture_parameters(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The prior's mixture parameters that a variant exposes (weights, means, scales, dof)."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if hasattr(model, "pi_logits"):
            out["pi"] = torch.softmax(model.pi_logits, -1)
        for name in ("mu", "sigma", "nu"):
            value = getattr(model, name, None)
            if isinstance(value, torch.Tensor):
                out[name] = value
    return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def cluster_health(probs: np.ndarray, weights: np.ndarray | None = None,
                   small: float = 0.1) -> dict[str, Any]:
    """Sizes (argmax counts), mixture weights, mean entropy of p(c|x) and flags.

    A cluster is *empty* when no point is assigned to it and *collapsed* when it holds (or its
    mixture weight is) less than ``small`` times the uniform share 1/K.
    """
    n, k = probs.shape
    sizes = np.bincount(probs.argmax(1), minlength=k)
    p = np.clip(probs, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(1)
    flags = []
    for c in range(k):
        share = sizes[c] / n
        if sizes[c] == 0:
            flags.append({"cluster": c, "flag": "empty"})
        elif share < small / k or (weights is not None and weights[c] < small / k):
            flags.append({"cluster": c, "flag": "collapsed",
                          "share": float(share),
                          "weight": None if weights is None else float(weights[c])})
    return {
        "n_points": int(n),
        "sizes": sizes.tolist(),
        "weights": None if weights is None else [float(w) for w in weights],
        "mean_entropy": float(entropy.mean()),
        "mean_entropy_fraction_of_log_k": float(entropy.mean() / math.log(k)),
        "mean_max_prob": float(probs.max(1).mean()),
        "n_used": int((sizes > 0).sum()),
        "flags": flags,
    }


# --- InferenceData -------------------------------------------------------------------------

def inference_data(samples: ImportanceSamples, x: np.ndarray, index: np.ndarray,
                   mixture: dict[str, np.ndarray], khat: np.ndarray | None,
                   labels: np.ndarray | None = None, attrs: dict[str, Any] | None = None) -> Any:
    """ArviZ InferenceData: ``posterior`` (chain=1, draw=S), ``log_likelihood``,
    ``observed_data`` and ``constant_data`` (per-point summaries)."""
    az = _arviz()
    s = samples.num_samples
    posterior: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name, value in samples.latents.items():
        posterior[name] = value[None]
        extra = ["latent"] if name == "z" and value.ndim == 3 else \
            [f"{name}_dim_{j}" for j in range(value.ndim - 2)]
        dims[name] = ["point", *extra]
    if samples.cluster_probs is not None:
        posterior["cluster_probs"] = samples.cluster_probs[None]
        dims["cluster_probs"] = ["point", "cluster"]
    mixture_dims = {"pi": ["cluster"], "mu": ["cluster", "latent"], "sigma": ["cluster", "latent"],
                    "nu": ["cluster", "nu_dim"]}
    for name, value in mixture.items():  # point estimates, constant over draws
        posterior[name] = np.broadcast_to(value, (1, s, *value.shape)).copy()
        dims[name] = mixture_dims.get(name, [f"{name}_dim_{j}" for j in range(value.ndim)])
    log_lik = {"x": samples.log_weights[None]}
    dims["x"] = ["point"]
    observed = {"x": x}
    dims_obs = {"x": ["point", "channel", "height", "width"]}
    const: dict[str, np.ndarray] = {"iwae": samples.iwae(), "elbo": samples.elbo()}
    if khat is not None:
        const["khat"] = khat
    if samples.cluster_probs is not None:  # importance-weighted p(c | x)
        const["cluster_probs_iw"] = np.einsum("sn,snk->nk", samples.normalized_weights(),
                                              samples.cluster_probs.astype(np.float64))
    if labels is not None:
        const["label"] = labels
    const_dims = {k: ["point"] for k in const}
    const_dims["cluster_probs_iw"] = ["point", "cluster"]
    coords = {"point": index}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_dict(posterior=posterior, log_likelihood=log_lik, coords=coords,
                             dims={**dims, **dims_obs}, attrs=attrs or {})
        idata.add_groups(
            observed_data=az.dict_to_dataset(observed, coords=coords, dims=dims_obs, default_dims=[]),
            constant_data=az.dict_to_dataset(const, coords=coords, dims=const_dims, default_dims=[]),
        )
    for group in ("posterior", "log_likelihood", "observed_data", "constant_data"):
        getattr(idata, group).attrs.update({k: str(v) for k, v in (attrs or {}).items()})
    return idata


def save_netcdf(idata: Any, path: str) -> None:
    """Write atomically (readers see the old file or the new one)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        idata.to_netcdf(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- the whole report ----------------------------------------------------------------------

@dataclass
class Report:
    summary: dict[str, Any]
    idata: Any
    samples: ImportanceSamples
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return format_summary(self.summary)


def _json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats (an infinite k-hat) become the strings "inf"/"nan"."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _subset(n: int, max_points: int | None, seed: int) -> np.ndarray:
    if max_points is not None and max_points < 1:
        raise ConfigError(f"max-points must be >= 1, got {max_points}")
    if max_points is None or max_points >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


@local_params
def diagnose_fitted(fitted: Fitted, x: torch.Tensor, y: np.ndarray | None = None, *,
                    num_samples: int = 100, max_points: int | None = 2000, seed: int = 0,
                    out_dir: str | None = None, plots: bool = True,
                    meta: dict[str, Any] | None = None) -> Report:
    """Diagnose a fitted model on images ``x`` (N, C, H, W), as the model sees them
    (:meth:`~ppl_cluster.train.Fitted.inputs`) (labels ``y`` only for the
    confusion matrix and scores). Per-point quantities (IWAE, k̂, InferenceData) use a seeded
    random subset of ``max_points`` images; cluster health uses all of them.

    With ``out_dir``, writes ``diagnostics.json``, ``diagnostics.nc`` and PNGs in
    ``out_dir/diagnostics/``.
    """
    import time

    t0 = time.perf_counter()
    x = x.to(fitted.device)
    n = x.shape[0]
    if y is not None and len(y) != n:
        raise ConfigError(f"{len(y)} labels for {n} images")
    index = _subset(n, max_points, seed)
    xs = unit(x[torch.as_tensor(index, device=x.device)])
    samples = importance_samples(fitted, xs, num_samples, seed=seed)
    iwae, elbo = samples.iwae(), samples.elbo()
    khat = samples.khat()
    probs = cluster_probs(fitted, x).cpu().numpy()
    pred = probs.argmax(1)
    mixture = mixture_parameters(fitted.model)
    health = cluster_health(probs, mixture.get("pi"))
    facets = facet_usage(fitted, x, size=None, first=torch.as_tensor(probs))
    iw_mean, iw_se = mean_se(iwae)
    el_mean, el_se = mean_se(elbo)
    gap_mean, gap_se = mean_se(iwae - elbo)
    summary: dict[str, Any] = {
        **(meta or {}),
        "model": fitted.cfg.model,
        "n_images": int(n),
        "n_points": int(len(index)),
        "subset": bool(len(index) < n),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "iwae": {"mean": iw_mean, "se": iw_se, "num_samples": int(num_samples)},
        "elbo": {"mean": el_mean, "se": el_se},
        "iwae_minus_elbo": {"mean": gap_mean, "se": gap_se},
        "khat": khat_summary(khat, index),
        "clusters": health,
        "usage": facets,
        "collapsed": usage.any_collapsed(facets),
    }
    if y is not None:
        from .metrics import scores

        summary["scores"] = scores(y, pred)
    attrs = {"model": fitted.cfg.model, "num_samples": num_samples, "n_images": n,
             "log_likelihood_note": "log importance weights log p(x,z) - log q(z|x); "
                                    "IWAE = logsumexp over draws - log S",
             "mixture_note": "mixture parameters are point estimates, repeated over draws"}
    idata = inference_data(samples, xs.cpu().numpy(), index, mixture, khat,
                           None if y is None else np.asarray(y)[index], attrs)
    report = Report(summary, idata, samples)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        nc = os.path.join(out_dir, "diagnostics.nc")
        save_netcdf(idata, nc)
        report.files.append(nc)
        if plots:
            report.files += _plots(fitted, x, y, pred, index, khat, health, mixture,
                                   os.path.join(out_dir, "diagnostics"), seed)
        summary["seconds"] = time.perf_counter() - t0
        summary["files"] = [os.path.relpath(f, out_dir) for f in report.files]
        path = os.path.join(out_dir, "diagnostics.json")
        atomic_write_bytes(path, (json.dumps(_json_safe(summary), indent=2) + "\n").encode())
        report.files.append(path)
    else:
        summary["seconds"] = time.perf_counter() - t0
    return report


def _plots(fitted: Fitted, x: torch.Tensor, y: np.ndarray | None, pred: np.ndarray,
           index: np.ndarray, khat: np.ndarray | None, health: dict[str, Any],
           mixture: dict[str, np.ndarray], folder: str, seed: int) -> list[str]:
    from .plots import save_grid

    os.makedirs(folder, exist_ok=True)
    files = []

    def target(name: str) -> str:
        files.append(os.path.join(folder, name))
        return files[-1]

    if khat is not None:
        plots.plot_khat_hist(khat, target("khat_hist.png"), KHAT_OK, KHAT_BAD)
        worst = np.argsort(-khat)[:16]
        imgs = unit(x[torch.as_tensor(index[worst], device=x.device)]).cpu().numpy()
        plots.plot_images(imgs, [f"#{index[i]} k̂={khat[i]:.2f}" for i in worst],
                    target("khat_worst.png"), "images with the largest PSIS k̂")
    model = fitted.model
    k = len(health["sizes"])
    if hasattr(model, "generate"):
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            gen = np.stack([model.generate(8, cluster=c).cpu().numpy() for c in range(k)])
        pi = health["weights"]
        labels = [f"c={c}" + ("" if pi is None else f" π={pi[c]:.2f}") for c in range(k)]
        save_grid(gen.clip(0, 1), target("samples_per_cluster.png"), labels,
                  title=f"{fitted.cfg.model}: samples per cluster")
    if hasattr(fitted.guide, "embed"):
        from .init import embed_all

        means = embed_all(fitted.guide, x).cpu().numpy()
        plots.plot_latent_pca(means, pred, target("latent_pca.png"), mixture.get("mu"))
    plots.plot_cluster_sizes(health, target("cluster_sizes.png"))
    if y is not None:
        plots.plot_confusion(np.asarray(y), pred, target("confusion.png"))
    return files


# --- run directories -----------------------------------------------------------------------

def load_run(run_dir: str, device: str = "cpu") -> Fitted:
    """The fitted model of a run directory (its ``checkpoint.pt``)."""
    from . import checkpoint

    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} is not a directory")
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} holds no checkpoint.pt: not a ppl-cluster run directory")
    from .report import check_matches

    dev = resolve_device(device)
    fitted = from_state(checkpoint.load(path, map_location=dev), dev)
    check_matches(run_dir, fitted.cfg)
    return fitted


def _load_data(fitted: Fitted, dataset: str | None, data_root: str | None, split: str | None,
               options: dict[str, Any] | None, run_dir: str) -> Any:
    from .data import load_run_dataset
    from .errors import DataError
    from .report import check_source

    ds = load_run_dataset(fitted.cfg, dataset, data_root, split, device=fitted.device,
                          options=options)
    check_source(run_dir, ds)
    if tuple(ds.x.shape[1:]) != tuple(fitted.image_shape):
        raise DataError(f"{ds.name} images of shape {tuple(ds.x.shape[1:])} given to a model "
                        f"fitted on {tuple(fitted.image_shape)}")
    return ds


def diagnose(run_dir: str, *, dataset: str | None = None, data_root: str | None = None,
             data_options: dict[str, Any] | None = None, split: str | None = None, num_samples: int = 100, max_points: int | None = 2000,
             seed: int = 0, device: str = "cpu", plots: bool = True) -> Report:
    """Diagnose the run in ``run_dir`` on its own data (or ``dataset``/``split``); writes
    ``RUN_DIR/diagnostics.json``, ``RUN_DIR/diagnostics.nc`` and ``RUN_DIR/diagnostics/*.png``."""
    if num_samples < 1:
        raise ConfigError(f"num-samples must be >= 1, got {num_samples}")
    if max_points is not None and max_points < 1:
        raise ConfigError(f"max-points must be >= 1, got {max_points}")
    fitted = load_run(run_dir, device)
    ds = _load_data(fitted, dataset, data_root, split, data_options, run_dir)
    meta = {"run_dir": os.path.abspath(run_dir), "dataset": ds.name, "split": ds.split}
    return diagnose_fitted(fitted, fitted.inputs(ds.x), ds.y, num_samples=num_samples,
                           max_points=max_points,
                           seed=seed, out_dir=run_dir, plots=plots, meta=meta)


@dataclass
class Selection:
    """The outcome of :func:`select_run`: ``best`` run directory and every run's scores."""

    best: str
    criterion: str
    table: list[dict[str, Any]]

    def __str__(self) -> str:
        lines = [f"{'run':40s} {'IWAE':>10s} {'± se':>7s} {'ELBO':>10s}  k̂>0.7  used"]
        for r in self.table:
            frac = r["khat_fraction_gt_0.7"]
            lines.append(f"{r['run_dir'][-40:]:40s} {r['iwae']:10.2f} {r['iwae_se']:7.2f} "
                         f"{r['elbo']:10.2f}  {'n/a' if frac is None else f'{frac:.1%}':>5s}  "
                         f"{r['used']}" + (" COLLAPSED" if r["collapsed"] else "")
                         + ("   <- selected" if r["run_dir"] == self.best else ""))
        return "\n".join(lines)


def select_run(run_dirs: list[str], *, criterion: str = "iwae", dataset: str | None = None,
               data_root: str | None = None, data_options: dict[str, Any] | None = None,
               split: str | None = None, num_samples: int = 50, max_points: int | None = 1000,
               seed: int = 0, device: str = "cpu") -> Selection:
    """Pick the run with the highest held-in IWAE log-likelihood (or ELBO) among the runs with
    no collapsed facet (:func:`ppl_cluster.usage.choose`) — no labels used.

    Every run is scored on the *same* images (the first run's data unless ``dataset`` is
    given, the same seeded subset of ``max_points``) with the same number of importance
    samples, so the numbers are comparable across seeds, variants and architectures fitted
    to the same data. IWAE is the default: it is a tighter bound on log p(x) than the ELBO,
    so it does not favour runs whose guide merely fits their own posterior better.
    """
    if criterion not in ("iwae", "elbo"):
        raise ConfigError(f"criterion must be iwae or elbo, got {criterion!r}")
    if not run_dirs:
        raise ConfigError("select needs at least one run directory")
    fitted = [load_run(d, device) for d in run_dirs]
    ds = _load_data(fitted[0], dataset, data_root, split, data_options, run_dirs[0])
    index = _subset(len(ds), max_points, seed)
    xs = unit(ds.x[torch.as_tensor(index, device=ds.x.device)])
    table = []
    for d, f in zip(run_dirs, fitted, strict=True):
        if tuple(f.image_shape) != tuple(fitted[0].image_shape):
            from .errors import DataError

            raise DataError(f"{d} was fitted on images of shape {f.image_shape}, "
                            f"{run_dirs[0]} on {fitted[0].image_shape}: not comparable")
        xf = f.inputs(xs.to(f.device))
        s = importance_samples(f, xf, num_samples, seed=seed)
        iw, iw_se = mean_se(s.iwae())
        el, el_se = mean_se(s.elbo())
        k = s.khat()
        records = facet_usage(f, xf)
        table.append({"run_dir": d, "model": f.cfg.model, "iwae": iw, "iwae_se": iw_se,
                      "elbo": el, "elbo_se": el_se,
                      "khat_fraction_gt_0.7": None if k is None else float((k > KHAT_BAD).mean()),
                      "used": usage.line(records), "collapsed": usage.any_collapsed(records),
                      "usage": records})
    chosen = usage.choose([r[criterion] for r in table], [r["usage"] for r in table])
    return Selection(table[chosen]["run_dir"], criterion, table)


# --- printing ------------------------------------------------------------------------------

def format_summary(s: dict[str, Any]) -> str:
    where = f" on {s['dataset']}/{s.get('split', 'all')}" if "dataset" in s else ""
    pts = (f"a random subset of {s['n_points']} of {s['n_images']} images (--max-points)"
           if s["subset"] else f"all {s['n_images']} images")
    lines = [f"{s['model']}{where}: per-image diagnostics on {pts}, "
             f"S={s['num_samples']} importance samples each"]
    iw, el, gap = s["iwae"], s["elbo"], s["iwae_minus_elbo"]
    lines.append(f"  IWAE log-likelihood  {iw['mean']:.2f} ± {iw['se']:.2f} nats/image "
                 f"(lower bound on log p(x), S={iw['num_samples']})")
    lines.append(f"  ELBO                 {el['mean']:.2f} ± {el['se']:.2f} nats/image "
                 f"(IWAE − ELBO = {gap['mean']:.2f} ± {gap['se']:.2f})")
    k = s["khat"]
    if k["available"]:
        worst = ", ".join(f"#{w['index']} ({w['khat']:.2f})" for w in k["worst"][:5])
        mean = "n/a" if k["mean_finite"] is None else f"{k['mean_finite']:.2f}"
        inf = f" ({k['fraction_infinite']:.1%} infinite)" if k["fraction_infinite"] else ""
        lines.append(f"  PSIS k̂               max {k['max']:.2f}, mean {mean}; "
                     f"{k['fraction_gt_0.7']:.1%} of images > 0.7{inf}, "
                     f"{k['fraction_0.5_to_0.7']:.1%} in (0.5, 0.7]; worst: {worst}")
    else:
        lines.append(f"  PSIS k̂               not computed: {k['reason']}")
    c = s["clusters"]
    lines.append(f"  clusters             {c['n_used']} of {len(c['sizes'])} used; sizes "
                 f"{c['sizes']}")
    if c["weights"] is not None:
        lines.append(f"                       mixture weights π "
                     f"[{', '.join(f'{w:.3f}' for w in c['weights'])}]")
    lines.append(f"                       mean entropy of p(c|x) {c['mean_entropy']:.3f} nats "
                 f"({c['mean_entropy_fraction_of_log_k']:.1%} of log K), mean max p(c|x) "
                 f"{c['mean_max_prob']:.3f}")
    flags = "; ".join(f"cluster {f['cluster']} {f['flag']}" for f in c["flags"]) or "none"
    lines.append(f"                       flags: {flags}")
    if "usage" in s:
        facets = "; ".join(
            f"facet {j}: {r['used']} of {r['k']} used by >= {usage.USED_SHARE:.0%}, effective "
            f"{r['effective']:.1f}, {r['confident']:.0%} confident, I(c;x) "
            f"{r.get('information', float('nan')):.0%} of log K" + (" COLLAPSED" if r["collapsed"] else "")
            for j, r in enumerate(s["usage"], 1))
        lines.append(f"  usage                {facets}")
    if "scores" in s:
        sc = s["scores"]
        lines.append(f"  labels (not used)    ACC {sc['acc']:.4f}  NMI {sc['nmi']:.4f}  "
                     f"ARI {sc['ari']:.4f}")
    if "seconds" in s:
        lines.append(f"  ({s['seconds']:.1f} s)")
    return "\n".join(lines)
