"""The ``crispedit`` command line: one subcommand per stage, options from ``options.py``.

Precedence: built-in defaults < ``--config FILE`` (TOML or YAML, keys as the option names with
``_`` or ``-``) < options given on the command line. Bad input exits with status 2 and a one-line
reason, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from . import __version__
from .options import CurvatureOptions, DemoOptions, InspectOptions, MergeOptions

COMMANDS = {
    "curvature": (CurvatureOptions, "collect K-FAC statistics (A, G) of a capability corpus"),
    "inspect": (InspectOptions, "report, per layer and gamma, what the projector removes"),
    "merge-curvature": (MergeOptions, "merge statistics of disjoint corpora into one file"),
    "demo": (DemoOptions, "run the offline demo on a model built here"),
}


class UsageError(ValueError):
    pass


def _base_type(tp):
    """``int | None`` -> int, ``list[float]`` -> float."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return args[0]
    if args:
        return args[0]
    return tp


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = meta["help"] + ("" if meta.get("required") else f" (default: {default})")
        kw = dict(help=help_, default=argparse.SUPPRESS, dest=f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if "nargs" in meta:
            kw["nargs"] = meta["nargs"]
        parser.add_argument(flag, type=kind, metavar=None if "choices" in kw else f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crispedit",
        description="Edit facts in Hugging Face causal LMs with CrispEdit: gradient steps projected onto the "
        "low-curvature subspace (K-FAC of the capability loss's Gauss-Newton matrix).",
    )
    parser.add_argument("--version", action="version", version=f"crispedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, help="TOML or YAML file of options; command-line options override it")
        _add_options(p, cls)
    return parser


def _read_config(path: Path, cls) -> dict:
    if not path.exists():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # tomllib / yaml raise their own error types
        raise UsageError(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of options")
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out


def options_from_args(cls, args: argparse.Namespace):
    """Defaults < config file < command line; check required options."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values = {**(_read_config(args.config, cls) if args.config else {}), **given}
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and not values.get(f.name):
            raise UsageError(f"--{f.name.replace('_', '-')} is required (on the command line or in --config)")
    return cls(**values)


def _setup_runtime(options) -> None:
    import torch

    if getattr(options, "threads", None):
        torch.set_num_threads(options.threads)


def run_curvature(o: CurvatureOptions) -> int:
    import torch

    from .corpus import read_documents
    from .curvature import check_matches, collect, save
    from .layers import find_modules, parse_layers
    from .model import load_model

    out_file = Path(o.out) / "curvature.safetensors"
    if out_file.exists() and not o.overwrite:
        raise UsageError(f"--out {out_file}: exists; pass --overwrite to replace it")
    for c in o.corpus:
        if not Path(c).exists():
            raise UsageError(f"--corpus {c}: no such file or directory")
    model, tokenizer = load_model(o.model, o.device, o.dtype)
    modules = find_modules(model, parse_layers(o.layers), o.module)
    print(f"layers: {', '.join(modules)}" + (" (auto)" if o.layers == "auto" else ""), file=sys.stderr)
    docs = read_documents(o.corpus, tokenizer, o.max_length, o.unit, o.max_documents, o.max_tokens)
    stats = collect(
        model,
        modules,
        docs,
        labels=o.labels,
        mc_samples=o.mc_samples,
        seed=o.seed,
        batch_size=o.batch_size,
        dtype=torch.float64 if o.accumulate == "float64" else torch.float32,
        exact_limit=o.exact_limit,
        progress=o.progress,
    )
    check_matches(stats, modules)
    stats.meta["options"] = dataclasses.asdict(o)
    stats.meta["threads"] = torch.get_num_threads()
    path = save(stats, o.out, overwrite=o.overwrite)
    print(f"{stats.meta['tokens']:,} labelled tokens from {len(docs):,} documents in {stats.meta['time_s']:.1f} s "
          f"({o.labels} labels) -> {path}")
    print(f"{'module':<40} {'d_out x d_in':>14} {'tr A':>12} {'tr G':>12}")
    for n, s in stats.summary().items():
        d_out, d_in = stats.shapes()[n]
        print(f"{n:<40} {f'{d_out} x {d_in}':>14} {s['trace_A']:>12.4g} {s['trace_G']:>12.4g}")
    return 0


def run_inspect(o: InspectOptions) -> int:
    from .curvature import load
    from .projector import KroneckerProjector, eigh_factor

    stats = load(o.curvature)
    meta = stats.meta
    print(f"{o.curvature}: {meta.get('model')} · {meta.get('labels')} labels · {meta.get('tokens'):,} tokens")
    print(f"{'module':<40} {'gamma':>6} {'removed':>16} {'share':>8} {'tau':>10}")
    for n in stats.names:
        eA, eG = eigh_factor(stats.A[n], f"{n}.A"), eigh_factor(stats.G[n], f"{n}.G")
        for g in o.gamma:
            t = KroneckerProjector.from_eigen(eA, eG, g, identity_G=o.identity_g).threshold
            print(f"{n:<40} {g:>6.3f} {f'{t.removed:,}/{t.total:,}':>16} {t.removed_share:>8.4f} {t.tau:>10.3g}")
    return 0


def run_merge(o: MergeOptions) -> int:
    from .curvature import load, merge, save

    stats = load(o.inputs[0])
    for p in o.inputs[1:]:
        stats = merge(stats, load(p), o.allow_mixed_labels)
    path = save(stats, o.out, overwrite=o.overwrite)
    print(f"merged {len(o.inputs)} files ({stats.meta['tokens']:,} tokens) -> {path}")
    return 0


def run_demo(o: DemoOptions) -> int:
    from .demo import run

    return run(o)


RUNNERS = {"curvature": run_curvature, "inspect": run_inspect, "merge-curvature": run_merge, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    from .corpus import CorpusError
    from .curvature import StatisticsError
    from .layers import LayerError
    from .model import ModelError
    from .projector import CurvatureError

    args = build_parser().parse_args(argv)
    cls = COMMANDS[args.command][0]
    start = time.perf_counter()
    try:
        options = options_from_args(cls, args)
        _setup_runtime(options)
        code = RUNNERS[args.command](options)
    except (UsageError, CorpusError, StatisticsError, LayerError, ModelError, CurvatureError) as e:
        print(f"crispedit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crispedit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code



if __name__ == "__main__":
    sys.exit(main())
