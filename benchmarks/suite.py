"""The development suite: every model with its default settings on data sets of different kinds.

Each member is a data set with a fixed recipe; every default is judged on all of them, never on
one. For each member and factor the same run scores k-means and a Gaussian mixture on the
pixels/features (that factor's K, same seeds). Models run on the generic defaults (no preset),
single-facet models with K of the member's first factor, ``mfcvae`` with
one facet per factor (K_j of factor j).

    python benchmarks/suite.py --out results/suite                     # everything
    python benchmarks/suite.py --members digits,shapes --models vade --seeds 0,1,2
    python benchmarks/suite.py --out results/suite --table-only        # rebuild the table

Every run writes ``OUT/runs/<member>-<model>-seed<s>.json`` (an existing one is kept, so an
interrupted suite continues); ``OUT/table.md`` and ``OUT/summary.json`` are rebuilt from all of
them. ``--tiny`` shrinks nets, epochs and data for a smoke test (CI), not for figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_cluster import Clusterer, usage
from ppl_cluster.data import Dataset, load_dataset, unit
from ppl_cluster.errors import DataError
from ppl_cluster.metrics import facet_table, scores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SINGLE_FACET = ("vade", "vc", "cgm")
MODELS = (*SINGLE_FACET, "mfcvae")


@dataclass(frozen=True)
class Member:
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)
    needs_root: bool = False
    vectors: bool = False  # flatten the images to (N, D) feature vectors
    note: str = ""


MEMBERS: dict[str, Member] = {
    "digits": Member("digits", note="scikit-learn 8x8 digits, 1,797 images"),
    "mnist": Member("mnist", needs_root=True, note="the shared 10,000 MNIST digits"),
    "colored-mnist": Member("colored-mnist", needs_root=True,
                            note="the MNIST digits x 8 foreground colours"),
    "colored-digits": Member("colored-digits", dict(background=True, n_colors=4, n_backgrounds=3),
                             note="8x8 digits x 4 foreground x 3 background colours"),
    "shapes": Member("shapes", note="generated 16x16: shape x colour x position x scale, 5,000"),
    "digits-64": Member("digits", vectors=True, note="the 8x8 digits as 1,797 64-D vectors"),
    "iris": Member("iris", note="150 x 4 features"),
    "wine": Member("wine", note="178 x 13 features"),
    "breast-cancer": Member("breast-cancer", note="569 x 30 features"),
}
TINY = dict(hidden=[32, 32], latent_dim=4, epochs=2, pretrain_epochs=2, init="gmm", gmm_inits=1)
TINY_POINTS = 300


def load_member(name: str, root: str | None, tiny: bool) -> Dataset:
    m = MEMBERS[name]
    ds = load_dataset(m.dataset, root if m.needs_root else None, **m.options)
    if m.vectors:
        ds = Dataset(ds.name, ds.split, ds.x.reshape(len(ds), 1, 1, -1), ds.y, ds.factors)
    if tiny and len(ds) > TINY_POINTS:
        keep = np.random.default_rng(0).permutation(len(ds))[:TINY_POINTS]
        factors = {k: v[keep] for k, v in ds.factors.items()} if ds.factors else None
        ds = Dataset(ds.name, ds.split, ds.x[torch.as_tensor(keep)],
                     None if ds.y is None else ds.y[keep], factors)
    return ds


def factor_ks(ds: Dataset) -> dict[str, int]:
    return {k: int(v.max()) + 1 for k, v in ds.label_factors.items()}


def settings_for(model: str, ds: Dataset, member: Member, tiny: bool) -> tuple[int, dict[str, Any]]:
    ks = list(factor_ks(ds).values())
    kw: dict[str, Any] = dict(TINY if tiny else {})  # likelihood etc. follow the data
    if model == "mfcvae":
        kw.update(facets=len(ks), clusters_per_facet=ks)
        if tiny:
            kw.update(latent_dims=[2] * len(ks), progressive_epochs=1, fade_in_epochs=1)
    if model in ("vc", "cgm", "cgm-pixel"):
        kw.pop("pretrain_epochs", None)
    if model in ("vc",):
        for key in ("init", "gmm_inits"):
            kw.pop(key, None)
    return ks[0], kw


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: full, tsne, ...


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` (a candidate default to judge on the suite): JSON values, or
    comma-separated JSON values as a list (``latent_dims=10,5,2``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, text = item.partition("=")
        parts = [_value(v) for v in text.split(",")]
        out[key.replace("-", "_")] = parts if len(parts) > 1 else parts[0]
    return out


def run_one(member: str, model: str, seed: int, ds: Dataset, tiny: bool,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    m = MEMBERS[member]
    k, kw = settings_for(model, ds, m, tiny)
    kw.update(overrides or {})
    t0 = time.perf_counter()
    clu = Clusterer(model, k, dataset="suite", seed=seed, progress=False, **kw).fit(ds.x)
    seconds = time.perf_counter() - t0
    preds = [clu.predict(ds.x, facet=j if clu.n_facets > 1 else None)
             for j in range(1, clu.n_facets + 1)]
    table = facet_table(preds, ds.label_factors, clu.clusters_per_facet)
    records = clu.usage(ds.x)
    return {
        "member": member, "model": model, "seed": seed, "n": len(ds), "tiny": tiny,
        "config": clu.fitted.cfg.to_dict(), "seconds": seconds, "elbo": clu.elbo(ds.x),
        "usage": records, "collapsed": usage.any_collapsed(records),
        "facets": [{"facet": r["facet"] + 1, "scores": r["scores"]} for r in table],
        "threads": torch.get_num_threads(),
    }


def baselines(member: str, ds: Dataset, seeds: list[int]) -> dict[str, Any]:
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    x = unit(ds.x).reshape(len(ds), -1).cpu().numpy().astype(np.float64)
    vectors = tuple(ds.x.shape[1:3]) == (1, 1)
    if vectors:  # what the models see by default: standardised features
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    # scikit-learn's own regularisation on features; pixels need more (constant borders)
    reg = 1e-6 if vectors else 1e-3
    out: dict[str, Any] = {}
    for name, labels in ds.label_factors.items():
        k = int(labels.max()) + 1
        rows: dict[str, list[dict[str, float]]] = {"kmeans": [], "gmm": [], "gmm_full": []}
        for seed in seeds:
            km = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
            rows["kmeans"].append(scores(labels, km))
            for key, cov in (("gmm", "diag"), ("gmm_full", "full")):
                if cov == "full" and not vectors:
                    continue  # a full covariance per cluster on pixels: ill-posed and slow
                gm = GaussianMixture(k, covariance_type=cov, random_state=seed,
                                     reg_covar=reg).fit(x).predict(x)
                rows[key].append(scores(labels, gm))
        out[name] = rows
    return {"member": member, "n": len(ds), "factors": out}


# --- the table ------------------------------------------------------------------------------

def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} (min {min(values):.3f})"


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def aggregate(out: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    base = {json.loads(p.read_text())["member"]: json.loads(p.read_text())
            for p in sorted((out / "baselines").glob("*.json"))}
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        r["collapsed"] = usage.any_collapsed(r["usage"])  # by the current rule
        cells.setdefault((r["member"], r["model"]), []).append(r)
    summary: dict[str, Any] = {"cells": [], "selection": {"cells": 0, "picked_best": 0,
                                                          "picked_collapsed": 0}}
    for (member, model), rs in sorted(cells.items()):
        rs.sort(key=lambda r: r["seed"])
        factors = list(rs[0]["facets"][0]["scores"])
        n_facets = len(rs[0]["facets"])
        cell: dict[str, Any] = {"member": member, "model": model, "seeds": [r["seed"] for r in rs],
                                "collapsed": sum(r["collapsed"] for r in rs),
                                "seconds": [r["seconds"] for r in rs], "factors": {}}
        for f in factors:
            # per facet, ACC over seeds; the factor's facet is the one with the best median
            acc = [[r["facets"][j]["scores"][f]["acc"] for r in rs] for j in range(n_facets)]
            nmi = [[r["facets"][j]["scores"][f]["nmi"] for r in rs] for j in range(n_facets)]
            j = max(range(n_facets), key=lambda i: _median(acc[i]))
            b = base.get(member, {}).get("factors", {}).get(f)
            km = _median([s["acc"] for s in b["kmeans"]]) if b else float("nan")
            # GMM: the better of the diagonal and the full covariance (medians over seeds)
            gms = [_median([s["acc"] for s in b.get(key, [])]) for key in ("gmm", "gmm_full")
                   ] if b else []
            gm = max((g for g in gms if g == g), default=float("nan"))
            cell["factors"][f] = {"facet": j + 1, "acc": acc[j], "nmi": nmi[j],
                                  "median_acc": _median(acc[j]), "kmeans": km, "gmm": gm}
        # label-free selection over the seeds: does it pick the best-ACC run, a collapsed one?
        main = factors[0]
        j = cell["factors"][main]["facet"] - 1
        chosen = usage.choose([r["elbo"] for r in rs], [r["usage"] for r in rs])
        accs = [r["facets"][j]["scores"][main]["acc"] for r in rs]
        cell["selection"] = {"seed": rs[chosen]["seed"], "acc": accs[chosen],
                             "best": accs[chosen] >= max(accs) - 1e-9,
                             "collapsed": rs[chosen]["collapsed"]}
        if len(rs) > 1:
            sel = summary["selection"]
            sel["cells"] += 1
            sel["picked_best"] += cell["selection"]["best"]
            sel["picked_collapsed"] += cell["selection"]["collapsed"]
        summary["cells"].append(cell)
    summary["baselines"] = base
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = ["| member | model | factor | facet | ACC mean ± sd (min) | median | NMI median | "
             "k-means | GMM | ≥ baseline | collapsed | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in summary["cells"]:
        multi = len(cell["factors"]) > 1
        for i, (f, c) in enumerate(cell["factors"].items()):
            bar = c["kmeans"] if multi and cell["model"] == "mfcvae" else max(c["kmeans"], c["gmm"])
            ok = "yes" if c["median_acc"] >= bar - 1e-9 else "no"
            first = i == 0
            lines.append(
                f"| {cell['member'] if first else ''} | {cell['model'] if first else ''} | {f} | "
                f"{c['facet']} | {_spread(c['acc'])} | {c['median_acc']:.3f} | "
                f"{_median(c['nmi']):.3f} | {c['kmeans']:.3f} | {c['gmm']:.3f} | {ok} | "
                f"{str(cell['collapsed']) + '/' + str(len(cell['seeds'])) if first else ''} | "
                f"{statistics.mean(cell['seconds']):.0f} |" if first else
                f"| | | {f} | {c['facet']} | {_spread(c['acc'])} | {c['median_acc']:.3f} | "
                f"{_median(c['nmi']):.3f} | {c['kmeans']:.3f} | {c['gmm']:.3f} | {ok} | | |")
    sel = summary["selection"]
    lines += ["", f"Selection by ELBO among the runs that did not collapse "
                  f"(`ppl_cluster.usage.choose`), over each cell's seeds: picked the best-ACC run in "
                  f"{sel['picked_best']} of {sel['cells']} cells, a collapsed run in "
                  f"{sel['picked_collapsed']}."]
    return "\n".join(lines) + "\n"


def compact(summary: dict[str, Any]) -> str:
    """One row per member and factor: the baselines' and every model's median ACC (its facet
    for ``mfcvae``), with collapsed runs / runs."""
    models = [m for m in MODELS if any(c["model"] == m for c in summary["cells"])]
    cells = {(c["member"], c["model"]): c for c in summary["cells"]}
    lines = ["| member | factor | k-means | GMM | " + " | ".join(models) + " |",
             "|---|---|---|---|" + "---|" * len(models)]
    for member in dict.fromkeys(c["member"] for c in summary["cells"]):
        some = next(c for c in summary["cells"] if c["member"] == member)
        for i, f in enumerate(some["factors"]):
            km, gm = some["factors"][f]["kmeans"], some["factors"][f]["gmm"]
            row = [member if i == 0 else "", f, f"{km:.3f}", f"{gm:.3f}"]
            for m in models:
                c = cells.get((member, m))
                if c is None:
                    row.append("")
                    continue
                x = c["factors"][f]
                facet = f" (f{x['facet']})" if m == "mfcvae" else ""
                collapsed = f", {c['collapsed']}/{len(c['seeds'])} coll." if i == 0 else ""
                row.append(f"{x['median_acc']:.3f}{facet}{collapsed}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", default=",".join(MEMBERS), help="comma-separated members")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", default=str(SHARED))
    p.add_argument("--out", default="results/suite")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny nets, data and epochs")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every run (a candidate default); use a separate --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    members = [m for m in args.members.split(",") if m]
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        print(f"unknown member(s) {', '.join(unknown)}; choose from {', '.join(MEMBERS)}",
              file=sys.stderr)
        return 2
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "baselines").mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for member in members:
            try:
                ds = load_member(member, args.data_root, args.tiny)
            except DataError as exc:
                print(f"skip {member}: {exc}", file=sys.stderr)
                continue
            bpath = out / "baselines" / f"{member}.json"
            if not bpath.exists():
                bpath.write_text(json.dumps(baselines(member, ds, seeds), indent=1))
            multi = len(ds.label_factors) > 1
            for model in models:
                if model == "mfcvae" and not multi:
                    continue  # the multi-facet model runs on the multi-factor members
                for seed in seeds:
                    path = out / "runs" / f"{member}-{model}-seed{seed}.json"
                    if path.exists():
                        continue
                    record = run_one(member, model, seed, ds, args.tiny, parse_sets(args.set))
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(record, indent=1))
                    os.replace(tmp, path)
                    accs = {f: round(s["acc"], 3) for f, s in record["facets"][0]["scores"].items()}
                    print(f"{member} {model} seed {seed}: {record['seconds']:.0f} s, facet 1 ACC "
                          f"{accs}, used {usage.line(record['usage'])}"
                          + (" COLLAPSED" if record["collapsed"] else ""), flush=True)
    summary = aggregate(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(compact(summary) + "\n" + table(summary))
    print(compact(summary) + "\n" + table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
