"""``ppl-cluster``: fit, evaluate, predict, sample, compose, segment, diagnose, models, check.

Bad input ends with one line on stderr and exit status 2; nothing already on disk is lost.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from . import report, rundir
from .config import FitConfig, check_seed
from .errors import ConfigError, DivergedError, PPLClusterError, Terminated
from .registry import DEFAULT, owners
from .runs import Checked, check_run, fit_run
from .settings import add_flags, declared, flag, key_value

if TYPE_CHECKING:
    from .variant import Variant


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like our own errors
        self.exit(2, f"ppl-cluster: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ppl-cluster", description="Deep generative clustering with Pyro.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    data = argparse.ArgumentParser(add_help=False)  # the data a run is used on (default its own)
    _data_flags(data, run=True)
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run_dir")
    picture = argparse.ArgumentParser(add_help=False, parents=[run])  # a grid of random images
    picture.add_argument("--out", default=None, help="PNG file (default in RUN_DIR)")
    picture.add_argument("--seed", type=int, default=0, help="seed of the random choices")

    # Listed here for the overview; `fit` is parsed by _fit_parser, which knows the model.
    sub.add_parser("fit", help="train a variant and write a run directory", add_help=False)
    sub.add_parser("evaluate", help="score a run on (possibly other) data", parents=[run, data])
    s = sub.add_parser("sample", help="draw a grid of samples, one row per cluster",
                       parents=[picture])
    s.add_argument("--per-cluster", type=int, default=10)
    s.add_argument("--facet", type=int, default=None,
                   help="multi-facet runs: one column per cluster of facet J instead, each row "
                        "sharing the other facets' latents (--per-cluster rows)")
    c = sub.add_parser("compose", help="multi-facet runs: swap one facet's latent between images",
                       parents=[data, picture])
    c.add_argument("--facet", type=int, default=None,
                   help="the facet whose latent is taken from another image (default 1)")
    c.add_argument("--n", type=int, default=8, help="images on each side of the grid")
    r = sub.add_parser("predict", help="write each data point's cluster, its probability and "
                       "ELBO to a .csv or .npz file", parents=[run, data])
    r.add_argument("--out", required=True, help="FILE.csv or FILE.npz")
    r.add_argument("--proba", action="store_true", help="also every cluster's probability")
    r.add_argument("--embed", action="store_true", help="also the posterior mean of z")
    r.add_argument("--no-elbo", action="store_true", help="skip the ELBO per point")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d = sub.add_parser("diagnose", help="posterior diagnostics (IWAE, PSIS k-hat, clusters) "
                       "or, with --select, pick the best of several runs", parents=[data])
    d.add_argument("run_dir", nargs="+", help="run directory (several with --select)")
    d.add_argument("--select", action="store_true",
                   help="score every RUN_DIR on the same images and name the best (no labels)")
    d.add_argument("--criterion", default="iwae", choices=["iwae", "elbo"],
                   help="what --select maximises (default iwae)")
    d.add_argument("--num-samples", type=int, default=None,
                   help="importance samples per image (default 100; 50 with --select)")
    d.add_argument("--max-points", type=int, default=None,
                   help="per-image diagnostics on a seeded random subset of this many "
                   "(default 2000; 1000 with --select)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    sub.add_parser("segment", help="per-pixel runs: images beside their segmentation maps",
                   parents=[data, picture]).add_argument("--n", type=int, default=16,
                                                         help="images to segment")
    sub.add_parser("models", help="list registered variants (built-in and installed plugins)")
    sub.add_parser("check", help="run the conformance contract on a registered variant"
                   ).add_argument("name")
    return p


def _data_flags(p: argparse.ArgumentParser, run: bool) -> None:
    """The flags naming data and device; ``run``: of a command on a saved run."""
    from .data import DATASETS
    from .files import OPTIONS

    default = FitConfig()
    p.add_argument("--dataset", default=None, help=", ".join(n for n in DATASETS if n != "file")
                   + (" (default: the run's)" if run else f" (default {default.dataset})"))
    p.add_argument("--data-root", default=None, help="folder holding the torchvision data")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your own data: .npy, .npz, .csv, .tsv or a folder of images")
    for name, (kind, text) in OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.add_argument("--split", default=None, choices=["train", "test", "all"],
                   help="default: the run's" if run else f"default {default.split}")
    p.add_argument("--device", default="cpu" if run else None,
                   help=f"auto, cpu or cuda (default {'cpu' if run else default.device})")


def _data_source(args: argparse.Namespace) -> tuple[str | None, str | None, dict[str, Any]]:
    """(dataset, root, options) named by --dataset/--data-root or by --data PATH and the file
    options."""
    from .files import OPTIONS

    options = {n: getattr(args, n) for n in OPTIONS if getattr(args, n) is not None}
    if args.data is None:
        if options:
            raise ConfigError(f"{flag(next(iter(options)))} applies only to --data PATH")
        return args.dataset, args.data_root, {}
    if args.dataset is not None or args.data_root is not None:
        raise ConfigError("--data PATH replaces --dataset and --data-root: pass one or the other")
    return "file", args.data, options


def _fit_parser(variant: Variant, show_own: bool) -> argparse.ArgumentParser:
    """``fit``'s flags: the common settings, those of the groups ``variant`` uses and its own
    (listed in --help only with ``show_own``, i.e. when --model is given)."""
    from .registry import all_variants

    f = _Parser(prog="ppl-cluster fit", description="Train a variant and write a run directory.",
                epilog=None if show_own else "ppl-cluster fit --model NAME --help also lists "
                "NAME's own settings; models: " + ", ".join(all_variants()))
    f.add_argument("--model", default=None, help=f"default {DEFAULT}; see ppl-cluster models")
    _data_flags(f, run=False)
    f.add_argument("--download", action="store_const", const=True, default=None,
                   help="allow torchvision to download data")
    f.add_argument("--data-option", action="append", type=key_value, default=None,
                   metavar="KEY=VALUE", dest="data_options",
                   help="a dataset option, e.g. n_colors=6 for colored-mnist (repeatable)")
    shown = variant.defaults_for()
    common = [n for n, fl in declared(FitConfig).items() if not fl.metadata["group"]]
    grouped = [n for n, fl in declared(FitConfig).items() if fl.metadata["group"] and variant.takes(n)]
    add_flags(f, FitConfig, common, shown if show_own else None)
    g = f.add_argument_group(f"{variant.name} settings") if show_own else f
    add_flags(g, FitConfig, grouped, shown, hidden=not show_own)
    add_flags(g, variant.Settings, None, shown, hidden=not show_own)
    f.add_argument("--out", default=None, help="run directory (default runs/MODEL-DATASET-seedS)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    f.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    return f


def _owner(option: str, model: str) -> str:
    """The error for flag ``option`` if other variants take it ("" if none does)."""
    name = option.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
    found = owners(name, besides=model) if option.startswith("--") else []
    return f"{option} is a setting of model {', '.join(found)}, not {model}" if found else ""


def _parse_fit(argv: list[str]) -> argparse.Namespace:
    """``fit ARGV`` parsed with the flags of the model it names (the saved run's on
    --resume without --model; else the default model)."""
    from .registry import get_variant

    pre = argparse.ArgumentParser(add_help=False)
    for name, action in (("--model", "store"), ("--out", "store"), ("--resume", "store_true")):
        pre.add_argument(name, action=action)
    known, _ = pre.parse_known_args(argv)
    model = known.model
    if model is None and known.resume and known.out and os.path.isfile(
            os.path.join(known.out, "config.json")):
        model = report.read_config(known.out).model
    variant = get_variant(model or DEFAULT)
    parser = _fit_parser(variant, show_own=known.model is not None)
    args, rest = parser.parse_known_args(argv)
    if rest:
        raise ConfigError(_owner(rest[0], variant.name) or f"unrecognized arguments: {' '.join(rest)}")
    args.command, args.variant = "fit", variant
    return args


def _fit_config(args: argparse.Namespace) -> Checked:
    variant = args.variant
    names = [*declared(FitConfig), "split", "device", "download"]
    explicit = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    explicit["model"] = variant.name
    dataset, root, file_options = _data_source(args)
    explicit.update({k: v for k, v in (("dataset", dataset), ("data_root", root)) if v is not None})
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if args.data_options or file_options:
        explicit["data_options"] = {**dict(args.data_options or []), **file_options}
    own = {k: getattr(args, k) for k in declared(variant.Settings) if getattr(args, k) is not None}
    for key, value in variant.implied(own).items():
        explicit.setdefault(key, value)
    cfg = FitConfig(**explicit, extra=dict(own))
    return check_run(cfg, own, list(explicit), args.out, resume=args.resume, overwrite=args.overwrite)


def fit_config(argv: list[str], data: tuple[int, tuple[int, ...]] | None = None) -> Checked:
    """What ``ppl-cluster fit ARGV`` would train on ``data`` (N, (C, H, W)): the resolved
    configuration, the run directory and whether it resumes one (errors as ``fit`` raises)."""
    from .registry import get_variant

    cfg, out, resume = _fit_config(_parse_fit(argv))
    return get_variant(cfg.model).resolve(cfg, data=data), out, resume


def cmd_fit(args: argparse.Namespace) -> int:
    from . import distributed

    # Under torchrun every process makes every check; rank 0 alone writes files.
    launch = distributed.launch_from_env()
    try:
        summary = fit_run(lambda: _fit_config(args), overwrite=args.overwrite, launch=launch,
                          progress=not args.quiet)
    finally:
        if launch is not None:
            distributed.stop()
    if summary:
        print(summary)
    return 0


def _written(run_dir: str, *paths: str) -> int:
    rundir.record(run_dir, *paths)
    print(f"written {', '.join(paths)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg, clu = _loaded(args)
    ds = _run_data(args, cfg)
    m = {"model": cfg.model, "dataset": ds.name, "split": ds.split, **report.evaluate(clu, ds)}
    # A new file per evaluated data set: the run's own metrics.json is never overwritten.
    path = os.path.join(args.run_dir, f"eval-{ds.name}-{ds.split}.json")
    report.write_json(path, m)
    print(f"{cfg.model} on {ds.name}/{ds.split} ({len(ds)} images): {report.summary(m)}")
    return _written(args.run_dir, path)


def cmd_sample(args: argparse.Namespace) -> int:
    _picture(args, "samples.png")  # checked before the run is read
    clu = _loaded(args)[1]
    if args.facet is None:
        out = _picture(args, "samples.png")
        report.save_samples(clu, out, args.per_cluster, args.seed)
    else:
        j = clu._require_facets(args.facet)
        out = _picture(args, f"samples-facet{j}.png")
        report.save_facet_samples(clu, out, j, args.per_cluster, args.seed)
    return _written(args.run_dir, out)


def cmd_predict(args: argparse.Namespace) -> int:
    report.check_table_path(args.out, args.overwrite)  # before anything is computed
    cfg, clu = _loaded(args)
    ds = _run_data(args, cfg)
    frame = clu.predict_frame(ds.x, proba=args.proba, embed=args.embed, elbo=not args.no_elbo)
    report.write_table(frame, args.out)
    print(f"{cfg.model}: {len(frame)} rows ({', '.join(frame.columns)}) written to {args.out}")
    return 0


def _loaded(args: argparse.Namespace) -> tuple[FitConfig, Any]:
    """The run's configuration and its fitted Clusterer, on ``--device``."""
    from .api import Clusterer

    report.read_config(args.run_dir)  # "not a run directory" before the checkpoint is read
    clu = Clusterer.load(os.path.join(args.run_dir, "checkpoint.pt"),
                         device=getattr(args, "device", "cpu"))
    report.check_matches(args.run_dir, clu.config)
    return clu.config, clu


def _picture(args: argparse.Namespace, name: str) -> str:
    """The PNG a picture command writes, checked with its --seed and counts before any work."""
    check_seed(args.seed)
    for count in ("n", "per_cluster"):
        if getattr(args, count, 1) < 1:
            raise ConfigError(f"{flag(count)} must be >= 1, got {getattr(args, count)}")
    return report.picture_path(args.out, args.run_dir, name)


def _run_data(args: argparse.Namespace, cfg: FitConfig) -> Any:
    """The run's data set, or the one named by ``--dataset/--data-root/--split`` or ``--data``;
    a warning if the run's own data file has changed since the fit."""
    from .data import load_run_dataset

    dataset, root, options = _data_source(args)
    ds = load_run_dataset(cfg, dataset, root, args.split, device=args.device, options=options)
    report.check_source(args.run_dir, ds)
    return ds


def cmd_compose(args: argparse.Namespace) -> int:
    _picture(args, "")  # checked before the run is read
    cfg, clu = _loaded(args)
    j = clu._require_facets(args.facet)  # checked before any data is read
    out = _picture(args, f"compose-facet{j}.png")
    report.save_composition(clu, _run_data(args, cfg).x, out, j, args.n, args.seed)
    return _written(args.run_dir, out)


def cmd_segment(args: argparse.Namespace) -> int:
    _picture(args, "")
    cfg, clu = _loaded(args)
    clu._require_segments()  # checked before any data is read
    out = _picture(args, "segment.png")
    report.save_segmentation(clu, _run_data(args, cfg).x, out, args.n, args.seed)
    return _written(args.run_dir, out)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from . import diagnostics

    dataset, root, options = _data_source(args)
    given = {"num_samples": args.num_samples, "max_points": args.max_points}  # None: the default
    common = dict(dataset=dataset, data_root=root, data_options=options, split=args.split,
                  seed=check_seed(args.seed), device=args.device,
                  **{k: v for k, v in given.items() if v is not None})
    if args.select:
        sel = diagnostics.select_run(args.run_dir, criterion=args.criterion, **common)
        print(f"{sel}\nselected by {sel.criterion.upper()}: {sel.best}")
        return 0
    if len(args.run_dir) != 1:
        raise ConfigError("diagnose takes one RUN_DIR (pass --select to compare several)")
    found = diagnostics.diagnose(args.run_dir[0], plots=not args.no_plots, **common)
    print(found)
    return _written(args.run_dir[0], *found.files)


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import all_variants, discover

    for problem in discover():
        print(f"ppl-cluster: warning: {problem}", file=sys.stderr)
    for name, v in all_variants().items():
        where = "" if v.distribution == "ppl-cluster" else f" [{v.distribution}]"
        print(f"{name:12s} {v.summary}{where}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .conformance import RULES, ConformanceError, check_variant
    from .registry import get_variant

    variant = get_variant(args.name)
    try:
        check_variant(variant)
    except ConformanceError as exc:
        print(f"ppl-cluster: {exc}", file=sys.stderr)
        return 1
    print(f"{variant.name} ({variant.distribution}) keeps all {len(RULES)} rules of the contract")
    return 0


def _message(exc: PPLClusterError) -> str:
    """The library's message, with the setting at fault named by its flag."""
    text = str(exc)
    name = getattr(exc, "setting", None)
    return re.sub(rf"\b{re.escape(name)}\b", flag(name), text) if name else text


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals to the host program
        previous = None
    try:
        args = _parse_fit(argv[1:]) if argv[:1] == ["fit"] else _parser().parse_args(argv)
        return globals()["cmd_" + args.command](args)
    except PPLClusterError as exc:
        print(f"ppl-cluster: error: {_message(exc)}", file=sys.stderr)
        return 3 if isinstance(exc, DivergedError) else 2
    except BrokenPipeError:  # e.g. `ppl-cluster models | head -1`: the reader left
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except OSError as exc:  # a read-only folder, a full disk: nothing was half-written
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"ppl-cluster: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"ppl-cluster: {name} (the last finished epoch is in the checkpoint; use --resume)",
              file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
