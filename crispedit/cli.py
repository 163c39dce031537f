"""The ``crispedit`` command line: one subcommand per stage, options from ``options.py``.

Precedence: built-in defaults < ``--config FILE`` (TOML or YAML, keys as the option names with
``_`` or ``-``) < options given on the command line. Bad input exits with status 2 and a one-line
reason, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path

from . import __version__
from .options import (CurvatureOptions, DeltaOptions, DemoOptions, EditOptions, EvaluateOptions, InspectOptions,
                      MergeOptions)

COMMANDS = {
    "curvature": (CurvatureOptions, "collect K-FAC statistics (A, G) of a capability corpus"),
    "edit": (EditOptions, "edit a model with CrispEdit (or the ft / nullspace baselines), evaluate it and save it"),
    "evaluate": (EvaluateOptions, "score an edited model against its base on a request file"),
    "apply-delta": (DeltaOptions, "apply a saved delta to the base model, bit-exactly"),
    "revert": (DeltaOptions, "remove a saved delta from the edited model, restoring the base bit-exactly"),
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
    _check_paths(corpus=o.corpus)
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


def _check_paths(**paths) -> None:
    for option, value in paths.items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not Path(v).exists():
                raise UsageError(f"--{option.replace('_', '-')} {v}: no such file or directory")


def print_report(before: dict, after: dict, drift: dict | None = None) -> None:
    """The terminal summary: edit metrics before/after per protocol, capability, per-matrix drift."""
    print(f"\n{'metric':<22} {'protocol':<15} {'template':<8} {'before':>8} {'after':>8} {'n':>6}")
    b = {(m["metric"], m["protocol"]): m["value"] for m in before.get("metrics", [])}
    for m in after.get("metrics", []):
        v0 = b.get((m["metric"], m["protocol"]))
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"{m['metric']:<22} {m['protocol']:<15} {m['template']:<8} {f(v0):>8} {f(m['value']):>8} {m['n']:>6}")
    cap = after.get("capability", {})
    if "heldout_perplexity" in cap:
        print(f"held-out perplexity {cap['heldout_perplexity_base']:.3f} -> {cap['heldout_perplexity']:.3f} "
              f"({cap['heldout_perplexity_change']:+.2%}); KL(base||edited) {cap['heldout_kl']:.4g} nats/token")
    if "corpus_kl" in cap:
        predicted = f" (K-FAC predicted {drift['total']['predicted_kl']:.4g})" if drift else ""
        print(f"curvature corpus KL(base||edited) {cap['corpus_kl']:.4g} nats/token{predicted}")
    if "known_facts_accuracy" in cap:
        if cap["known_facts_count"] == 0:
            print(f"known unedited facts: the base model answers none of the {cap['known_facts_offered']} offered")
        else:
            print(f"known unedited facts: {before['capability']['known_facts_accuracy']:.3f} -> "
                  f"{cap['known_facts_accuracy']:.3f} (generation, {cap['known_facts_count']} of "
                  f"{cap['known_facts_offered']} known by the base model)")
    if drift:
        print(f"\n{'matrix':<40} {'|dW|/|W|':>9} {'pred. KL':>10} {'outside':>10}")
        for n, r in drift.items():
            print(f"{n:<40} {r['relative_change']:>9.4f} {r['predicted_kl']:>10.4g} {r['predicted_kl_outside']:>10.4g}")


def run_edit(o: EditOptions) -> int:
    import torch

    from .corpus import read_documents
    from .curvature import collect, load
    from .editor import build_projectors, drift_report, edit, eigenbases
    from .evaluate import measure, prepare_reference
    from .layers import find_modules, parse_layers
    from .model import load_model
    from .requests import read_requests
    from .saving import check_out, deltas_from, file_hash, save_edit

    check_out(o.out, o.overwrite, {"--model": o.model, "--requests": o.requests, "--curvature": o.curvature, "--corpus": o.corpus})
    _check_paths(requests=o.requests, curvature=o.curvature, corpus=o.corpus, heldout=o.heldout, known_facts=o.known_facts)
    if o.curvature is None and not o.corpus:
        raise UsageError("give --curvature (statistics from `crispedit curvature`) or --corpus to compute them")
    model, tok = load_model(o.model, o.device, o.dtype)
    ctx = getattr(model.config, "max_position_embeddings", None)
    requests = read_requests(o.requests, o.format, tok, ctx)
    known = read_requests(o.known_facts, "auto", tok, ctx) if o.known_facts else []
    modules = find_modules(model, parse_layers(o.layers), o.module)
    corpus = read_documents(o.corpus, tok, o.max_length, o.unit, o.max_documents) if o.corpus else []
    heldout = read_documents(o.heldout, tok, o.max_length, o.unit, o.max_documents) if o.heldout else []
    if o.curvature:
        stats = load(o.curvature, modules)
    else:
        stats = collect(model, modules, corpus, labels=o.labels, seed=o.seed, progress=o.progress)
    eig = eigenbases(stats, {n: m.weight.device for n, m in modules.items()})
    projectors = build_projectors(eig, o.method, o.gamma)
    for n, P in projectors.items():
        t = P.threshold
        print(f"{n}: removes {t.removed:,}/{t.total:,} directions, {t.removed_share:.1%} of the curvature energy")
    ref = prepare_reference(model, tok, requests if o.evaluate else [], o.template, heldout, corpus, known,
                            modules=modules, progress=o.progress)
    base_weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    result = edit(model, tok, requests, modules, projectors, o.optimizer, o.lr, o.batch_size, o.epochs,
                  o.loss_threshold, o.seed, o.progress)
    drift = drift_report(result.deltas, modules, eig, projectors)
    after = measure(model, tok, ref, progress=o.progress) if o.evaluate else {"capability": {}}
    print(f"edited {len(requests)} requests in {result.seconds:.1f} s: {result.steps} steps, {result.epochs} epochs, "
          f"final epoch loss {result.epoch_losses[-1]:.4g}")
    print_report(ref.before, after, drift)
    manifest = {
        "base_model": o.model,
        "requests": {"path": o.requests, "sha256": file_hash(o.requests), "count": len(requests)},
        "curvature": stats.meta, "options": dataclasses.asdict(o), "threads": torch.get_num_threads(),
        "projectors": {n: P.summary() for n, P in projectors.items()},
        "steps": result.steps, "epochs": result.epochs, "epoch_losses": result.epoch_losses, "edit_seconds": result.seconds,
        "drift": drift, "before": {k: v for k, v in ref.before.items() if k != "per_request"},
        "after": {k: v for k, v in after.items() if k != "per_request"},
    }
    report = {"before": ref.before, "after": after}
    out = save_edit(model, tok, modules, deltas_from(modules, base_weights), manifest, o.out, o.overwrite, {"report.json": report})
    print(f"\nedited model, delta.safetensors, manifest.json and report.json -> {out}")
    return 0


def run_evaluate(o: EvaluateOptions) -> int:
    from .corpus import read_documents
    from .evaluate import measure, prepare_reference
    from .model import load_model
    from .requests import read_requests
    from .saving import DELTA_FILE, read_delta, shifted, write_json

    _check_paths(requests=o.requests, heldout=o.heldout, known_facts=o.known_facts)
    if o.out and Path(o.out).exists() and not o.overwrite:
        raise UsageError(f"--out {o.out}: exists; pass --overwrite to replace it")
    base, tok = load_model(o.base, o.device, o.dtype)
    ctx = getattr(base.config, "max_position_embeddings", None)
    requests = read_requests(o.requests, o.format, tok, ctx)
    known = read_requests(o.known_facts, "auto", tok, ctx) if o.known_facts else []
    heldout = read_documents(o.heldout, tok, o.max_length, o.unit, o.max_documents) if o.heldout else []
    ref = prepare_reference(base, tok, requests, o.template, heldout, (), known, progress=o.progress)
    if (Path(o.model) / DELTA_FILE).exists():
        # an edit of ours: its delta gives the base matrices back bit for bit, no second model needed
        deltas, _ = read_delta(o.model)
        del base
        edited, _ = load_model(o.model, o.device, o.dtype)
        ref.base_weights = {n: shifted(edited.get_submodule(n).weight.detach(), D, -1) for n, D in deltas.items()}
        after = measure(edited, tok, ref, progress=o.progress)
    else:  # any other pair of models: both stay in memory for the KL
        edited, _ = load_model(o.model, o.device, o.dtype)
        after = measure(edited, tok, ref, base_model=base, progress=o.progress)
    print_report(ref.before, after)
    if o.out:
        write_json({"model": o.model, "base": o.base, "options": dataclasses.asdict(o), "before": ref.before, "after": after}, o.out)
        print(f"report -> {o.out}")
    return 0


def _run_delta(o: DeltaOptions, sign: int) -> int:
    from .model import load_model
    from .saving import apply_delta, check_out, read_delta, save_model

    check_out(o.out, o.overwrite, {"--model": o.model, "--delta": o.delta})
    deltas, manifest = read_delta(o.delta)
    model, tok = load_model(o.model, o.device, o.dtype)
    apply_delta(model, deltas, manifest, sign)
    save_model(model, tok, o.out, o.overwrite, {"command": "apply-delta" if sign > 0 else "revert", "delta": str(o.delta)})
    what = "edited" if sign > 0 else "base"
    print(f"{len(deltas)} matrices {'applied' if sign > 0 else 'reverted'}; {what} weights reproduced bit for bit -> {o.out}")
    return 0


def run_demo(o: DemoOptions) -> int:
    from .demo import run

    return run(o)


RUNNERS = {"curvature": run_curvature, "edit": run_edit, "evaluate": run_evaluate,
           "apply-delta": lambda o: _run_delta(o, +1), "revert": lambda o: _run_delta(o, -1),
           "inspect": run_inspect, "merge-curvature": run_merge, "demo": run_demo}


def main(argv: list[str] | None = None) -> int:
    from .corpus import CorpusError
    from .curvature import StatisticsError
    from .editor import EditError
    from .evaluate import EvaluationError
    from .layers import LayerError
    from .model import ModelError
    from .projector import CurvatureError
    from .requests import RequestError
    from .saving import SaveError

    args = build_parser().parse_args(argv)
    cls = COMMANDS[args.command][0]
    start = time.perf_counter()
    try:
        options = options_from_args(cls, args)
        _setup_runtime(options)
        code = RUNNERS[args.command](options)
    except (UsageError, CorpusError, StatisticsError, LayerError, ModelError, CurvatureError, RequestError,
            EditError, SaveError, EvaluationError) as e:
        print(f"crispedit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crispedit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code



if __name__ == "__main__":
    sys.exit(main())
