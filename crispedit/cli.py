"""The ``crispedit`` command line: one subcommand per stage, options from ``options.py``.

Precedence: built-in defaults < ``--config FILE`` (TOML or YAML, keys as the option names with
``_`` or ``-``) < options given on the command line. Everything that can be checked without the
weights (options, ranges, config types, request files, corpora, output paths, layer indices against
the model's configuration) is checked before the model loads. Bad input exits with status 2 and a
one-line reason naming the file, record or option; nothing is written.

Importing this module imports nothing heavy: ``crispedit --help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .options import (CLOSED_FORM_METHODS, GRADIENT_METHODS, CurvatureOptions, DeltaOptions,
                      DemoOptions, EditOptions, EvaluateOptions, InspectOptions, LogOptions, MergeOptions, MethodOptions,
                      OptionError, PlanOptions, RevertOptions, chunked_defaults, coerce, field_type, flag, method_options, validate)

COMMANDS = {
    "curvature": (CurvatureOptions, "collect K-FAC statistics (A, G) of a capability corpus"),
    "edit": (EditOptions, "edit a model (CrispEdit, ft, nullspace, MEMIT or AlphaEdit), in one batch or chunk by chunk; evaluate and save it"),
    "evaluate": (EvaluateOptions, "score an edited model against its base on a request file"),
    "apply-delta": (DeltaOptions, "apply a saved delta (an edit or a ledger) to the base model, bit-exactly"),
    "revert": (RevertOptions, "remove a saved delta from the edited model, or take a ledger back to chunk --to"),
    "log": (LogOptions, "print the history of a ledger as a table"),
    "inspect": (InspectOptions, "report, per layer and gamma, what the projector removes"),
    "merge-curvature": (MergeOptions, "merge statistics of disjoint corpora of one model into one file"),
    "plan": (PlanOptions, "print the memory, flops and ledger size of an edit before loading anything"),
    "demo": (DemoOptions, "run the offline demo on a model shipped with the package"),
}
POSITIONAL = {"log": "ledger", "revert": "ledger"}  # `crispedit log LEDGER`, `crispedit revert LEDGER --to K`


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are a short usage line and one line of error, not the whole usage."""

    def error(self, message: str):
        usage = f"{self.prog} [options]" if " " in self.prog else f"{self.prog} SUBCOMMAND [options]"
        self.exit(2, f"usage: {usage}\n{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _add_options(parser: argparse.ArgumentParser, cls, positional: str | None) -> None:
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        kind, is_list = field_type(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = meta["help"] + ("" if meta.get("required") or default is None else f" (default: {default})")
        if f.name == positional:
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())
            continue
        kw = dict(help=help_, default=argparse.SUPPRESS, dest=f.name)
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if is_list:
            kw["nargs"] = meta.get("nargs", "+")
        parser.add_argument(flag(f.name), type=kind, metavar=None if "choices" in kw else f.name.upper(), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crispedit",
        description="Edit facts in Hugging Face causal LMs with CrispEdit: gradient steps projected onto the "
        "low-curvature subspace of the capability loss (K-FAC of the Gauss-Newton matrix of the KL to the base model).",
    )
    parser.add_argument("--version", action="version", version=f"crispedit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, help="TOML or YAML file of options; command-line options override it")
        _add_options(p, cls, POSITIONAL.get(name))
    return parser


def _read_config(path: Path, cls) -> dict:
    if not path.exists() or path.is_dir():
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
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown option {key!r}")
        out[name] = coerce(cls, name, value, f"--config {path}")
    return out


def options_from_args(cls, args: argparse.Namespace):
    """Defaults < config file < command line; check required options and every value. Returns the
    options and the names of those given (on the command line or in the config file)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values = {**(_read_config(args.config, cls) if args.config else {}), **given}
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and not values.get(f.name):
            if f.name == POSITIONAL.get(args.command):  # `crispedit log LEDGER`: no --ledger to give
                raise UsageError(f"{f.name.upper()} is required: crispedit {args.command} {f.name.upper()}")
            raise UsageError(f"{flag(f.name)} is required (on the command line or in --config)")
    options = cls(**values)
    validate(options)
    return options, set(values)


def _setup_runtime(options) -> None:
    if getattr(options, "device", None):  # an unknown or absent device is named before any file is read
        from .model import resolve_device

        resolve_device(options.device)
    if getattr(options, "threads", None):
        import torch

        torch.set_num_threads(options.threads)
    if hasattr(options, "progress"):
        from .model import set_progress

        set_progress(options.progress)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_inputs(**paths) -> None:
    """Every local input exists (files where a file is read)."""
    for option, value in paths.items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not Path(v).expanduser().exists():
                raise UsageError(f"{flag(option)} {v}: no such file or directory")


def _fit_max_length(o, given: set, ctx_len: int | None):
    """``--max-length`` above the model's context is an error when given, and the context when defaulted."""
    if ctx_len and o.max_length > ctx_len:
        if "max_length" in given:
            raise UsageError(f"--max-length {o.max_length} is above the model's context of {ctx_len} tokens")
        return dataclasses.replace(o, max_length=ctx_len)
    return o


def _check_layers(layers: str | None, config, option: str = "--layers") -> None:
    """Layer indices against the model's configuration, before the weights load."""
    from .layers import parse_layers

    spec = parse_layers(layers)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if spec == "auto" or n is None:
        return
    bad = [i for i in spec if not 0 <= i < n]
    if bad:
        raise UsageError(f"{option}: block {bad[0]} does not exist; the model has blocks 0..{n - 1}")


def _check_modules(config, layers, module: str | None, stats=None, source: str | None = None) -> None:
    """The modules to edit, found on a weightless (meta-device) copy of the model built from its
    configuration: an unknown architecture or module, and statistics of other layers or shapes, are
    named before the weights load. ``layers`` None: the modules of ``stats``."""
    import torch
    from transformers import AutoModelForCausalLM

    from .curvature import check_matches
    from .layers import find_modules, modules_by_name, parse_layers

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build from its configuration alone: checked after loading
        return
    if layers is None:
        modules = modules_by_name(skeleton, stats.names, source)
    else:
        modules = find_modules(skeleton, parse_layers(layers), module)
    if stats is not None:
        check_matches(stats, modules, source)


# ---------------------------------------------------------------------------------------------
# curvature, inspect, merge


def run_curvature(o: CurvatureOptions, given: set) -> int:
    import torch

    from .corpus import read_documents
    from .curvature import check_matches, collect, save
    from .distributed import barrier, init_from_env, is_main, shutdown
    from .layers import find_modules, parse_layers
    from .model import context_length, load_config, load_model, load_tokenizer

    out_file = Path(o.out) / "curvature.safetensors"
    if out_file.exists() and not o.overwrite:
        raise UsageError(f"--out {out_file}: exists; pass --overwrite to replace it")
    _check_inputs(corpus=o.corpus)
    from .saving import check_out

    check_out(o.out, True, {"--model": o.model, "--corpus": o.corpus})
    config = load_config(o.model)
    ctx_len = context_length(config)
    o = _fit_max_length(o, given, ctx_len)
    _check_layers(o.layers, config)
    _check_modules(config, o.layers, o.module)
    tokenizer = load_tokenizer(o.model)
    docs = read_documents(o.corpus, tokenizer, o.max_length, o.unit, o.max_documents, o.max_tokens)
    if o.labels == "exact":  # V backward passes per labelled token: refused before the model loads
        n, vocab = sum(len(d) - 1 for d in docs), getattr(config, "vocab_size", None) or 0
        if vocab * n > o.exact_limit:
            raise UsageError(f"--labels exact needs V × N = {vocab} × {n} = {vocab * n:,} backward passes, over the "
                             f"--exact-limit of {o.exact_limit:,}; use --labels sampled or fewer tokens")
    ctx = init_from_env(o.device)  # None unless torchrun started more than one process
    try:
        model, tokenizer = load_model(o.model, ctx.device if ctx else o.device, o.dtype, tokenizer=tokenizer, device_map=o.device_map)
        modules = find_modules(model, parse_layers(o.layers), o.module)
        if is_main(ctx):
            _log(f"layers: {', '.join(modules)}" + (" (auto)" if o.layers == "auto" else ""))
        stats = collect(model, modules, docs, labels=o.labels, mc_samples=o.mc_samples, seed=o.seed,
                        batch_size=o.batch_size, dtype=torch.float64 if o.accumulate == "float64" else torch.float32,
                        exact_limit=o.exact_limit, progress=o.progress, parallel=ctx)
        if is_main(ctx):
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
        barrier(ctx)
    finally:
        shutdown(ctx)
    return 0


def run_inspect(o: InspectOptions, given: set) -> int:
    from .curvature import load
    from .projector import KroneckerProjector, eigh_factor

    stats = load(o.curvature)
    meta = stats.meta
    rows = []
    for n in stats.names:
        eA, eG = eigh_factor(stats.A[n], f"{n}.A"), eigh_factor(stats.G[n], f"{n}.G")
        for g in o.gamma:
            P = KroneckerProjector.from_eigen(eA, eG, g, identity_G=o.identity_g)
            t = P.threshold
            rows.append({"module": n, "gamma": g, "removed": t.removed, "total": t.total, "removed_share": t.removed_share,
                         "tau": t.tau, **{k: v for k, v in P.summary().items() if k in ("r_A", "r_G")}})
    if o.json:
        print(json.dumps({"curvature": o.curvature, "meta": meta, "rows": rows}, indent=1, default=str))
        return 0
    print(f"{o.curvature}: {meta.get('model')} · {meta.get('labels')} labels · {meta.get('tokens'):,} tokens")
    print(f"{'module':<40} {'gamma':>6} {'removed':>16} {'share':>8} {'tau':>10}")
    for r in rows:
        removed = f"{r['removed']:,}/{r['total']:,}"
        print(f"{r['module']:<40} {r['gamma']:>6.3f} {removed:>16} {r['removed_share']:>8.4f} {r['tau']:>10.3g}")
    return 0


def _load_statistics(path: str, option: str):
    """``curvature.load`` with the option the file came from named in its errors."""
    from .curvature import StatisticsError, load

    try:
        return load(path)
    except StatisticsError as e:
        message = str(e)
        if message.startswith("--curvature"):
            raise StatisticsError(option + message.removeprefix("--curvature")) from None
        raise StatisticsError(f"{option} {path}: {message}") from None


def run_merge(o: MergeOptions, given: set) -> int:
    from .curvature import StatisticsError, merge, save
    from .saving import check_out

    _check_inputs(inputs=o.inputs)
    resolved = [Path(p).expanduser().resolve() for p in o.inputs]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p, r in zip(o.inputs, resolved) if resolved.count(r) > 1)
        raise UsageError(f"--inputs {twice}: the same file is given twice")
    check_out(o.out, True, {"--inputs": o.inputs})
    stats = _load_statistics(o.inputs[0], "--inputs")
    for p in o.inputs[1:]:
        try:
            stats = merge(stats, _load_statistics(p, "--inputs"), o.allow_mixed_labels)
        except StatisticsError as e:
            raise UsageError(f"--inputs {p}: {e}" if not str(e).startswith("--inputs") else str(e)) from None
    path = save(stats, o.out, overwrite=o.overwrite)
    print(f"merged {len(o.inputs)} files ({stats.meta['tokens']:,} tokens) -> {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# edit


def print_report(before: dict, after: dict, drift: dict | None = None) -> None:
    """The terminal summary: edit metrics before/after per protocol, capability, per-matrix drift."""
    metrics = after.get("metrics", [])
    if metrics:
        print(f"\n{'metric':<22} {'protocol':<15} {'template':<8} {'before':>8} {'after':>8} {'n':>6}")
    b = {(m["metric"], m["protocol"]): m["value"] for m in before.get("metrics", [])}
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for m in metrics:
        v0 = b.get((m["metric"], m["protocol"]))
        print(f"{m['metric']:<22} {m['protocol']:<15} {m['template']:<8} {f(v0):>8} {f(m['value']):>8} {m['n']:>6}")
    cap = after.get("capability", {})
    if "heldout_kl" in cap:
        print(f"held-out perplexity {cap['heldout_perplexity_base']:.3f} -> {cap['heldout_perplexity']:.3f} "
              f"({cap['heldout_perplexity_change']:+.2%}); KL(base||edited) {cap['heldout_kl']:.4g} nats/token "
              f"({cap['heldout_documents']} documents, {cap['heldout_tokens']:,} tokens)")
    if "corpus_kl" in cap:
        predicted = f" (K-FAC predicted {drift['total']['predicted_kl']:.4g})" if drift else ""
        print(f"curvature corpus KL(base||edited) {cap['corpus_kl']:.4g} nats/token{predicted} "
              f"({cap['corpus_documents']} documents, {cap['corpus_tokens']:,} tokens)")
    if "known_facts_accuracy" in cap:
        if cap["known_facts_count"] == 0:
            print(f"known unedited facts: the base model answers none of the {cap['known_facts_offered']} offered "
                  f"(generation, scored on each record's {cap['known_facts_answer_field']})")
        else:
            print(f"known unedited facts: {before['capability']['known_facts_accuracy']:.3f} -> "
                  f"{cap['known_facts_accuracy']:.3f} (generation, scored on each record's {cap['known_facts_answer_field']}; "
                  f"{cap['known_facts_count']} of {cap['known_facts_offered']} known by the base model)")
    if drift:
        print(f"\n{'matrix':<40} {'|dW|/|W|':>9} {'pred. KL':>10} {'outside':>10}")
        for n, r in drift.items():
            print(f"{n:<40} {r['relative_change']:>9.4f} {r['predicted_kl']:>10.4g} {r['predicted_kl_outside']:>10.4g}")
        print(DRIFT_LEGEND)


DRIFT_LEGEND = ("|dW|/|W|: relative change of the matrix since the base (Frobenius); pred. KL: K-FAC predicted "
                "KL from the base on the capability corpus, nats/token;\noutside: the part of pred. KL from the "
                "change outside what the projector lets through now (dW - P dW; 0 for ft, which projects nothing)")


def _check_method_options(o: EditOptions, given: set) -> None:
    if o.method in ("ft", *CLOSED_FORM_METHODS) and "gamma" in given:
        raise UsageError(f"--gamma does not apply to --method {o.method} (it uses no projector)")
    if o.method in CLOSED_FORM_METHODS:
        for name in ("optimizer", "lr", "epochs", "batch_size", "budget", "refresh_drift", "edit_weight", "protect_edits",
                     "rehearse", "rehearse_order", "capability_share"):
            if name in given:
                raise UsageError(f"{flag(name)} does not apply to --method {o.method} (a closed-form editor)")
    for name in ("edit_weight", "capability_share"):
        if o.method == "ft" and name in given:
            raise UsageError(f"{flag(name)} does not apply to --method ft (it uses no projector)")
    if "rehearse_order" in given and not o.rehearses():
        raise UsageError("--rehearse-order applies with --rehearse")
    if o.protect_edits != "mix" and "mix_sample" in given:
        raise UsageError("--mix-sample applies to --protect-edits mix only")


def _read_ledger(path: str) -> dict:
    """``ledger.read``, and the files its current state needs are there (a copy in part, a deleted
    state file: refused before anything loads or changes)."""
    from . import ledger

    info = ledger.read(path)
    ledger.check_files(path, info)
    return info


# Options a resumed ledger may take anew (they change how later chunks are edited, not what the
# history means; each chunk records the values it was edited with): the rest must be the ledger's.
CHANGEABLE_ON_RESUME = ("lr", "epochs", "batch_size", "loss_threshold", "chunk_size", "shuffle")
EVALUATION_OPTIONS = ("heldout", "known_facts", "heldout_documents", "eval_every", "eval_sample", "template")


def _resume_options(o: EditOptions, given: set, info: dict, continuing: bool = False):
    """The options of a resumed ledger: the ledger's method options, except those of
    ``CHANGEABLE_ON_RESUME`` given anew, and a budget raised with ``--raise-budget``; any other
    contradiction is an error. The evaluation files are the ledger's unless given. ``continuing``:
    the command that made the ledger run again (its statistics options are checked later, not refused)."""
    from . import ledger

    recorded = ledger.options_of(info)
    changes = dataclasses.asdict(recorded)
    for f in dataclasses.fields(MethodOptions):
        new, old = getattr(o, f.name), getattr(recorded, f.name)
        if f.name not in given or new == old:
            continue
        if f.name in CHANGEABLE_ON_RESUME:
            changes[f.name] = new
            _log(f"{flag(f.name)} {new} for the chunks edited now (the ledger's: {old})")
        elif f.name == "budget" and o.raise_budget and old is not None and new > old:
            changes[f.name] = new
            _log(f"--budget raised from {old:g} to {new:g} nats/token")
        else:
            hint = " (pass --raise-budget to raise it)" if f.name == "budget" and old is not None and new > old else ""
            raise UsageError(f"{flag(f.name)} {new} contradicts the ledger's {old} ({o.resume}){hint}; leave it out to "
                             f"continue as the ledger was made (may change on resume: "
                             f"{', '.join(flag(n) for n in CHANGEABLE_ON_RESUME)}, evaluation files, --budget with "
                             "--raise-budget, an added --protect)")
    if o.raise_budget and changes["budget"] == recorded.budget:
        raise UsageError("--raise-budget needs --budget above the ledger's budget")
    if not continuing:
        for name in ("curvature", "corpus", "layers", "module"):
            if name in given:
                raise UsageError(f"{flag(name)}: the ledger {o.resume} already holds the statistics and layers; leave it out")
    if "dtype" in given and o.dtype != info["model_dtype"]:
        raise UsageError(f"--dtype {o.dtype} contradicts the ledger's {info['model_dtype']} ({o.resume})")
    changes.update(dtype=info["model_dtype"], model=o.model or info["model"])
    for name, value in (info.get("evaluation") or {}).items():  # remembered, so the log's columns stay filled
        if name in EVALUATION_OPTIONS and name not in given:
            changes[name] = value
    return dataclasses.replace(o, **changes)


def _ledger_state(path: str | None) -> str:
    """What ``--ledger PATH`` finds: "new" (absent or empty), "unfinished" (a start interrupted
    before its first commit: only ledger files, no ledger.json), "ledger" (a committed one), or
    "other" (a directory holding other files)."""
    from .ledger import LEDGER, _is_own

    d = Path(path).expanduser()
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return "new"
    if not d.is_dir():
        return "other"
    if (d / LEDGER).exists():
        return "ledger"
    return "unfinished" if all(_is_own(p.name) for p in d.iterdir()) else "other"


def _protect_sets(paths: list[str], tok, max_length: int, unit: str) -> dict[str, list[list[int]]]:
    """``--protect`` files: request files become their facts (prompt + true answer), anything else a corpus."""
    from .corpus import read_documents
    from .evaluate import known_fact_pairs
    from .requests import RequestError, edit_text, read_requests

    from .corpus import CorpusError

    out = {}
    for p in paths:
        try:
            records, why = read_requests(p, "auto", tok, None, option="--protect"), None
        except RequestError as e:
            records, why = None, e
        if records:
            pairs, _ = known_fact_pairs(records)
            out[Path(p).name] = [tok(edit_text(q, a))["input_ids"][:max_length] for q, a in pairs]
            continue
        try:
            out[Path(p).name] = read_documents([p], tok, max_length, unit, option="--protect")
        except CorpusError as e:
            if Path(p).suffix not in (".json", ".jsonl"):
                raise
            raise UsageError(f"--protect {p}: neither a request file ({str(why).split(': ', 1)[-1]}) nor a corpus "
                             f"({str(e).split(': ', 1)[-1]}); a protect file holds requests (prompt with ground_truth "
                             "or target_new) or text (one document per line, or JSON Lines with 'text')") from None
    return out


CHUNK_LEGEND = ("per chunk: requests and optimiser steps; loss: the chunk's final edit loss; predicted KL: K-FAC "
                "predicted KL from the base on the capability corpus, nats/token; budget: share of "
                "--budget used; refresh(es): statistics recomputed (--refresh-drift); reliability: edits so far "
                "answered (a sample of n); first chunk: the first chunk's edits still answered (forgetting); known "
                "facts: unedited facts the base knew, still answered; KL held-out: measured on --heldout; capability "
                "share: the corpus's share of the protected statistics; rehearsed: earlier edits found forgotten "
                "(teacher-forced) and edited again with the chunk (--rehearse); -: not measured")


def _chunk_logger():
    """A callback for ``session.run``: the legend once, then one line per chunk (stderr)."""
    told = []

    def log(record: dict, total: int | None) -> None:
        if not told:
            _log(CHUNK_LEGEND)
            told.append(True)
        _log(_chunk_line(record, total))
    return log


def _chunk_line(record: dict, total: int | None) -> str:
    m = record.get("metrics", {})
    f = lambda k, d=3: "-" if m.get(k) is None else f"{m[k]:.{d}f}"  # noqa: E731
    budget = f", budget {record['budget']['used']:.0%} used" if "budget" in record else ""
    refresh = f", {len(record['refreshes'])} refresh(es)" if record.get("refreshes") else ""
    share = f", capability share {record['capability_share']:.3f}" if record.get("capability_share") is not None else ""
    if record.get("capability_share_floored", record.get("capability_share")) != record.get("capability_share"):
        share += f" (floor: {record['capability_share_floored']:.3f})"
    r = record.get("rehearsal")
    rehearsal = f", rehearsed {r['rehearsed']} of {r['forgotten']} forgotten ({r['checked']} checked)" if r else ""
    warn = "".join(f"\n  warning: {w}" for w in record.get("warnings", []))
    loss = f"loss {record['final_loss']:.4f}, " if "final_loss" in record else ""
    scores = (f"; reliability {f('reliability')} ({m.get('reliability_n')}), first chunk {f('first_chunk_reliability')}, "
              f"known facts {f('known_facts_accuracy')}, KL held-out {f('heldout_kl', 4)}") if m else ""
    return (f"chunk {record['chunk']}{'/' + str(total) if total else ''}: {record['requests']} requests, "
            f"{record.get('steps')} steps, {loss}predicted KL {record['drift']['total']['predicted_kl']:.4g}"
            f"{budget}{refresh}{share}{rehearsal}{scores} [{sum(record['seconds'].values()):.1f} s]{warn}") \
        if record.get("drift") else \
        f"chunk {record['chunk']}: {record['requests']} requests"


EXIT_NOT_ALL_EDITED = 3  # edit: some requests were not edited (a spent budget); everything else was committed


def run_edit(o: EditOptions, given: set) -> int:
    """``crispedit edit``: the options and the ledger's lock here, the work in ``_edit``."""
    from contextlib import ExitStack

    from . import ledger

    # 1. the options alone (and the ledger, read again under its lock)
    if o.resume and o.ledger:
        raise UsageError("--ledger and --resume: give one (--resume continues its ledger and updates it in place)")
    if o.raise_budget and not o.resume and not o.ledger:
        raise UsageError("--raise-budget applies to a resumed ledger (--resume)")
    continuing = bool(o.ledger) and _ledger_state(o.ledger) == "ledger"  # the command that made it, run again
    if continuing:
        _log(f"--ledger {o.ledger} holds a ledger already: continuing it (the requests it holds are skipped)")
        o = dataclasses.replace(o, resume=o.ledger, ledger=None)
    info = None
    locks = ExitStack()
    if o.resume:
        _read_ledger(o.resume)  # a missing or broken ledger is named before anything is written (the lock file)
        lock = locks.enter_context(ledger.writer_lock(o.resume))
        if lock.took_over:
            _log(f"ledger {o.resume}: taking over the lock left by {lock.took_over} (no longer running)")
        info = _read_ledger(o.resume)
        o = _resume_options(o, given, info, continuing)
    with locks:
        return _edit(o, given, info, continuing, locks)


def _edit(o: EditOptions, given: set, info: dict | None, continuing: bool, locks) -> int:
    import random

    import torch

    from . import ledger
    from .corpus import read_documents
    from .curvature import check_fingerprint, collect, load
    from .history import HistoryProbe
    from .layers import find_modules, modules_by_name, parse_layers
    from .model import context_length, load_config, load_model, load_tokenizer, model_reference
    from .requests import check_subjects, read_request_files, read_requests, select
    from .saving import check_out, file_hash, save_edit
    from .session import EditSession

    chunked = o.chunk_size is not None or len(o.requests) > 1 or info is not None
    lifelong = chunked or bool(o.ledger)  # a new ledger is a history to be continued: chunked from its start
    if lifelong and info is None and o.method in GRADIENT_METHODS:  # a resumed ledger keeps its own options
        o = dataclasses.replace(o, **{k: v for k, v in chunked_defaults(o.method).items() if k not in given})
    _check_method_options(o, given)
    if not o.model:
        raise UsageError("--model is required (on the command line or in --config)")
    if not o.out and not (o.ledger or o.resume):
        raise UsageError("--out is required (or --ledger, which keeps the edit)")
    if not o.resume and o.curvature is None and not o.corpus and o.method != "ft":
        raise UsageError("give --curvature (statistics from `crispedit curvature`) or --corpus to compute them")
    if not o.resume and (o.refresh_drift or o.protect_edits == "mix") and not o.corpus and o.method not in CLOSED_FORM_METHODS:
        raise UsageError(f"{'--refresh-drift' if o.refresh_drift else '--protect-edits mix'} recomputes the statistics: give --corpus")
    # 2. files and outputs
    _check_inputs(requests=o.requests, curvature=o.curvature, corpus=o.corpus, heldout=o.heldout,
                  known_facts=o.known_facts, protect=o.protect)
    inputs = {"--model": o.model, "--requests": o.requests, "--curvature": o.curvature, "--corpus": o.corpus,
              "--heldout": o.heldout, "--known-facts": o.known_facts, "--protect": o.protect, "--resume": o.resume}
    out = check_out(o.out, o.overwrite, inputs) if o.out else None
    if o.ledger:
        state = _ledger_state(o.ledger)
        if state == "other":
            raise UsageError(f"--ledger {o.ledger}: exists and is not empty; give a new or empty directory (it holds files that are not a ledger's)")
        check_out(o.ledger, True, {**inputs, "--out": o.out}, option="--ledger")
        if state == "unfinished":
            _log(f"--ledger {o.ledger}: a start interrupted before its first commit; starting it again")
    if o.resume:
        check_out(o.resume, True, {k: v for k, v in inputs.items() if k != "--resume"}, option="--resume")
    # 3. the model's configuration and tokenizer, and everything read with them
    model_id = model_reference(o.model)  # recorded in a ledger: an absolute path, or the hub id
    config = load_config(o.model)
    if info is not None and getattr(config, "model_type", None) != info.get("model_type"):
        raise UsageError(f"ledger {o.resume}: made on a {info.get('model_type')} model; --model {o.model} is a "
                         f"{getattr(config, 'model_type', None)} model")
    ctx_len = context_length(config)
    o = _fit_max_length(o, given, ctx_len)
    if o.layers is not None:
        _check_layers(o.layers, config)
    tok = load_tokenizer(o.model)
    files = read_request_files(o.requests, o.format, tok, ctx_len)
    flat = select([r for f in files for r in f], o.case_ids, o.max_requests)
    keep = {id(r) for r in flat}
    if o.method in CLOSED_FORM_METHODS:
        check_subjects(o.requests, files, o.method, keep)
    files = [[r for r in f if id(r) in keep] for f in files]
    if o.shuffle is not None:
        files = [random.Random(f"{o.shuffle}-{i}").sample(f, len(f)) for i, f in enumerate(files)]
    names = [Path(p).name for p, f in zip(o.requests, files) if f]
    files = [f for f in files if f]
    requests = [r for f in files for r in f]
    known = read_requests(o.known_facts, "auto", tok, ctx_len, option="--known-facts") if o.known_facts else []
    corpus = read_documents(o.corpus, tok, o.max_length, o.unit, o.max_documents) if o.corpus else []
    heldout = read_documents(o.heldout, tok, o.max_length, o.unit, o.heldout_documents, option="--heldout") if o.heldout else []
    protect = _protect_sets(o.protect, tok, o.max_length, o.unit) if o.protect else {}
    stats = load(o.curvature) if o.curvature else None
    layers = o.layers if o.layers is not None else ("auto" if stats is None else None)
    if info is None:
        _check_modules(config, layers, o.module, stats, f"--curvature {o.curvature}")
    elif continuing:
        _check_same_statistics(o, info, stats, config, layers)
    # 4. the weights
    model, tok = load_model(o.model, o.device, o.dtype, tokenizer=tok, device_map=o.device_map)
    if info is not None:
        modules = modules_by_name(model, list(info["modules"]))
    elif layers is None:  # the layers of the curvature file
        modules = modules_by_name(model, stats.names, "--curvature")
    else:
        modules = find_modules(model, parse_layers(layers), o.module)
    _log(f"editing {', '.join(modules)}" + (" (auto)" if layers == "auto" else ""))
    if info is not None:
        session = EditSession.load(o.resume, model, tok, modules, o.progress)
        if continuing and corpus and corpus != session.capability_documents:
            raise UsageError(f"--corpus {' '.join(o.corpus)}: not the capability corpus of the ledger {o.resume}")
        corpus = session.capability_documents
        session.set_options(**{k: getattr(o, k) for k in CHANGEABLE_ON_RESUME + ("budget",)})
        for name, docs in protect.items():
            if name not in session.protect_documents:
                session.add_protect(name, docs)
                _log(f"--protect {name}: added to the ledger's protected statistics ({len(docs)} documents)")
        _log(f"resuming {o.resume}: {len(session.history)} chunks, {len(session.requests)} requests edited so far")
        done = session.committed(requests)
        if done:
            skip = {id(r) for r in done}
            files = [[r for r in f if id(r) not in skip] for f in files]
            names = [n for n, f in zip(names, files) if f]
            files = [f for f in files if f]
            requests = [r for f in files for r in f]
            _log(f"skipping {len(done)} requests already in the ledger; {len(requests)} to edit")
    else:
        if stats is not None:
            from .curvature import check_matches

            check_matches(stats, modules, f"--curvature {o.curvature}")
            if not o.allow_other_checkpoint:  # the fingerprint covers every matrix of the file
                check_fingerprint(stats, modules_by_name(model, stats.names, f"--curvature {o.curvature}"),
                                  f"--curvature {o.curvature}")
        elif corpus:
            stats = collect(model, modules, corpus, labels=o.labels, seed=o.seed, progress=o.progress)
            _log(f"curvature: {stats.meta['tokens']:,} tokens of {len(corpus)} documents in {stats.meta['time_s']:.1f} s")
        cache = o.ledger or (str(Path(o.curvature) if Path(o.curvature).is_dir() else Path(o.curvature).parent)
                             if o.curvature else None)
        session = EditSession.start(model, tok, modules, method_options(o), stats, corpus, protect, o.progress, cache)
        stats = None  # the session keeps what it needs (raw sums, on the CPU)
        if o.ledger:
            lock = locks.enter_context(ledger.writer_lock(o.ledger))
            if lock.took_over:
                _log(f"ledger {o.ledger}: taking over the lock left by {lock.took_over} (no longer running)")
            session.save(o.ledger, model_id, o.snapshot_every, evaluation=_evaluation_files(o))
    updates = session.updates(requests)
    if updates:
        _log(f"{len(updates)} requests update an earlier edit of their prompt with another target "
             f"(e.g. {updates[0].prompt!r} -> {updates[0].target_new!r}); the chunk records count them")
    if info is not None and not requests:
        print(f"all requests are in the ledger {o.resume} already; nothing to edit")
        return 0
    # 5. what the edit is scored against, measured once on the base
    ref = session.reference(requests, o.template, heldout, corpus, known) if o.evaluate else None
    probe = HistoryProbe(tok, ref.known_facts if ref else [], heldout, o.eval_sample, o.seed, o.template) \
        if o.evaluate and chunked else None
    target = o.ledger or o.resume
    # 6. edit
    start = time.perf_counter()
    if info is not None and any(k in given for k in EVALUATION_OPTIONS):
        session.evaluation = _evaluation_files(o)
    session.run(files, o.chunk_size, names, probe, o.eval_every, target, model_id if info is None else None,
                _chunk_logger() if chunked else None)
    edited = len(session.requests) - (0 if info is None else sum(r["requests"] for r in info["chunks"]))
    status = 0
    if edited < len(requests):
        status = EXIT_NOT_ALL_EDITED
        why = (f"the capability budget of {o.budget:g} nats/token is spent after chunk {len(session.history)}: predicted "
               f"drift {session.history[-1]['budget']['predicted']:.4g}; ") if session.budget_spent else ""
        _log(f"{why}{len(requests) - edited} of {len(requests)} requests were not edited (exit status {status}; "
             + ("raise it with --resume --budget X --raise-budget" if session.budget_spent else "see above") + ")")
    drift = session.drift()
    after = session.measure(ref) if ref is not None else None
    new = session.history[len(info["chunks"]) if info else 0 :]
    print(f"edited {edited} requests in {time.perf_counter() - start:.1f} s "
          f"({len(new)} chunks, {sum(r.get('steps') or 0 for r in new)} steps)")
    if after is not None:
        print_report(ref.before, after, drift)
    elif drift:
        print_report({}, {}, drift)
    # 7. save
    if out is not None:
        manifest = {
            "base_model": o.model, "requests": [{"path": p, "sha256": file_hash(p)} for p in o.requests],
            "edited_requests": edited, "options": dataclasses.asdict(o), "threads": torch.get_num_threads(),
            "curvature": session.capability_meta, "ledger": target, "chunks": session.history,
            "steps": sum(r.get("steps") or 0 for r in session.history),
            "projectors": {n: P.summary() for n, P in (session.projectors or {}).items()}, "drift": drift,
            "before": {k: v for k, v in ref.before.items() if k != "per_request"} if ref else None,
            "after": {k: v for k, v in after.items() if k != "per_request"} if after else None,
        }
        report = {"before": ref.before, "after": after} if ref else None
        save_edit(model, tok, modules, session.deltas(), manifest, out, o.overwrite,
                  {"report.json": report} if report else None, o.delta_only)
        what = "delta.safetensors and manifest.json" if o.delta_only else "edited model, delta.safetensors, manifest.json"
        print(f"\n{what}{' and report.json' if report else ''} -> {out}")
    if target:
        print(f"ledger -> {target} ({len(session.history)} chunks; `crispedit log {target}`)")
    return status


def _evaluation_files(o: EditOptions) -> dict:
    """The evaluation options a ledger remembers for its resumes (files as absolute paths)."""
    absolute = lambda v: [str(Path(p).expanduser().resolve()) for p in v] if isinstance(v, list) else (  # noqa: E731
        str(Path(v).expanduser().resolve()) if isinstance(v, str) and v else v)
    return {k: absolute(getattr(o, k)) if k in ("heldout", "known_facts") else getattr(o, k) for k in EVALUATION_OPTIONS}


def _check_same_statistics(o: EditOptions, info: dict, stats, config, layers) -> None:
    """A rerun of the command that made a ledger: its statistics options must be the ledger's."""
    import json as _json

    if stats is not None and _json.loads(_json.dumps(stats.meta, default=str)) != _json.loads(_json.dumps(info.get("capability"), default=str)):
        raise UsageError(f"--curvature {o.curvature}: not the statistics the ledger {o.resume} was made with")
    if layers not in (None, "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from .layers import find_modules, parse_layers

        with torch.device("meta"):
            names = list(find_modules(AutoModelForCausalLM.from_config(config), parse_layers(layers), o.module))
        if names != list(info["modules"]):
            raise UsageError(f"--layers {o.layers}: the ledger {o.resume} edits {', '.join(info['modules'])}")


# ---------------------------------------------------------------------------------------------
# evaluate


def run_evaluate(o: EvaluateOptions, given: set) -> int:
    from .corpus import read_documents
    from .evaluate import measure, prepare_reference
    from .model import context_length, load_config, load_model, load_tokenizer
    from .requests import read_request_files, read_requests, select
    from .ledger import LEDGER
    from .saving import DELTA_FILE, apply_delta, check_out_file, read_delta, shifted, weights_hash, write_json

    _check_inputs(requests=o.requests, heldout=o.heldout, known_facts=o.known_facts)
    if o.out:
        check_out_file(o.out, o.overwrite, {"--model": o.model, "--base": o.base, "--requests": o.requests})
    in_ledger = (Path(o.model).expanduser() / LEDGER).exists()  # a ledger's current model: the base plus its ΔW
    base_config = load_config(o.base, "--base")
    edited_config = base_config if in_ledger else load_config(o.model, "--model")
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    differ = [(k, getattr(base_config, k, None), getattr(edited_config, k, None)) for k in keys]
    differ = [f"{k} {b} vs {e}" for k, b, e in differ if b != e]
    if differ:
        raise UsageError(f"--base {o.base}: another architecture than --model {o.model} ({differ[0]})")
    ctx_len = context_length(base_config)
    o = _fit_max_length(o, given, ctx_len)
    deltas, manifest = read_delta(o.model) if in_ledger or (Path(o.model) / DELTA_FILE).exists() else (None, None)
    made_from = manifest if manifest is not None else _applied_from(o.model)  # what --base must be
    tok = load_tokenizer(o.base, "--base")
    requests = select([r for f in read_request_files(o.requests, o.format, tok, ctx_len) for r in f], o.case_ids, o.max_requests)
    known = read_requests(o.known_facts, "auto", tok, ctx_len, option="--known-facts") if o.known_facts else []
    heldout = read_documents(o.heldout, tok, o.max_length, o.unit, o.heldout_documents, option="--heldout") if o.heldout else []
    dtype = o.dtype if "dtype" in given or made_from is None else made_from.get("model_dtype") or o.dtype
    base, _ = load_model(o.base, o.device, dtype, "--base", tokenizer=tok, device_map=o.device_map)
    if made_from is not None:
        names = made_from["modules"]
        modules = {n: base.get_submodule(n) for n in names if _has(base, n)}
        if len(modules) != len(names) or weights_hash({n: m.weight for n, m in modules.items()}) != made_from["base_weights_sha256"]:
            what = "ledger" if in_ledger else "edit" if manifest is not None else "model"
            raise UsageError(f"--base {o.base}: its matrices are not the base this {what} was made from "
                             f"(hash differs from {o.model}/{LEDGER if in_ledger else 'manifest.json'}; dtype {dtype})")
    ref = prepare_reference(base, tok, requests, o.template, heldout, (), known, progress=o.progress)
    lm_eval = None
    if manifest is not None:
        # an edit of ours: its delta gives the base matrices back bit for bit, no second model needed
        if in_ledger:  # the ledger's current model is the base plus its ΔW, checked bit for bit
            apply_delta(base, deltas, manifest, +1)
            edited = base
        else:
            del base
            edited, _ = load_model(o.model, o.device, dtype, tokenizer=tok, device_map=o.device_map)
        ref.base_weights = {n: shifted(edited.get_submodule(n).weight.detach(), D, -1) for n, D in deltas.items()}
        after = measure(edited, tok, ref, progress=o.progress)
        if o.lm_eval:
            lm_eval = _lm_eval(o, edited, tok, base_weights=ref.base_weights)
    else:  # any other pair of models: both stay in memory for the KL
        edited, _ = load_model(o.model, o.device, dtype, tokenizer=tok, device_map=o.device_map)
        after = measure(edited, tok, ref, base_model=base, progress=o.progress)
        if o.lm_eval:
            lm_eval = _lm_eval(o, edited, tok, base_model=base)
    print_report(ref.before, after)
    report = {"model": o.model, "base": o.base, "options": dataclasses.asdict(o), "before": ref.before, "after": after}
    if lm_eval is not None:
        report["lm_eval"] = lm_eval
    if o.out:
        write_json(report, o.out)
        print(f"report -> {o.out}")
    return 0


def _applied_from(path: str) -> dict | None:
    """What an ``apply-delta`` or ``revert`` output records of the delta it came from (the base's
    hash, the edited matrices, the dtype), or None for any other model."""
    try:
        made = json.loads((Path(path).expanduser() / "manifest.json").read_text()).get("delta_manifest")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(made, dict) or not made.get("base_weights_sha256"):
        return None
    if not made.get("modules"):  # written before outputs named their matrices
        _log(f"--base {path}: cannot be checked against --model's manifest.json (it does not name the edited matrices)")
        return None
    return made


def _has(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _lm_eval(o: EvaluateOptions, model, tok, base_weights=None, base_model=None) -> dict:
    from .lmeval import compare

    result = compare(model, tok, o.lm_eval, limit=o.lm_eval_limit, base_weights=base_weights, base_model=base_model,
                     base_id=o.base)
    print(f"\n{'task':<28} {'metric':<18} {'base':>8} {'edited':>8} {'change':>8}")
    for r in result["rows"]:
        print(f"{r['task']:<28} {r['metric']:<18} {r['base']:>8.4f} {r['edited']:>8.4f} {r['change']:>+8.4f}")
    if result.get("mean_change") is not None:
        print(f"{'mean':<28} {'':<18} {'':>8} {'':>8} {result['mean_change']:>+8.4f}")
    return result


# ---------------------------------------------------------------------------------------------
# apply-delta, revert, log


def _run_delta(o: DeltaOptions, given: set, sign: int) -> int:
    from .model import load_model
    from .saving import SaveError, apply_delta, check_out, read_delta, save_model

    _check_inputs(delta=o.delta)
    deltas, manifest = read_delta(o.delta)
    out = check_out(o.out, o.overwrite, {"--model": o.model, "--delta": o.delta})
    dtype = o.dtype if "dtype" in given else manifest.get("model_dtype", o.dtype)
    model, tok = load_model(o.model, o.device, dtype, device_map=o.device_map)
    try:
        apply_delta(model, deltas, manifest, sign)
    except SaveError as e:
        raise SaveError(f"--model {o.model} (with --delta {o.delta}): {e}") from None
    save_model(model, tok, out, o.overwrite, {"command": "apply-delta" if sign > 0 else "revert", "delta": str(o.delta),
                                                "delta_manifest": {k: manifest.get(k) for k in (
                                                    "base_model", "edited_weights_sha256", "base_weights_sha256", "modules",
                                                    "model_dtype")}})
    what = "edited" if sign > 0 else "base"
    print(f"{len(deltas)} matrices {'applied' if sign > 0 else 'reverted'}; {what} weights reproduced bit for bit -> {out}")
    return 0


def run_revert(o: RevertOptions, given: set) -> int:
    if o.ledger is None:
        for name in ("model", "delta", "out"):
            if getattr(o, name) is None:
                raise UsageError(f"{flag(name)} is required (or give a ledger: crispedit revert LEDGER --to K)")
        if o.to is not None:
            raise UsageError("--to takes a ledger: crispedit revert LEDGER --to K")
        return _run_delta(o, given, -1)
    return _revert_ledger(o, given)


def _revert_ledger(o: RevertOptions, given: set) -> int:
    from . import ledger

    if o.to is None:
        raise UsageError("--to is required with a ledger (the chunk whose state to restore; 0: the base)")
    for name in ("delta", "out"):
        if getattr(o, name) is not None:
            raise UsageError(f"{flag(name)} does not apply to a ledger; `crispedit apply-delta --delta {o.ledger}` makes its model")
    _read_ledger(o.ledger)
    with ledger.writer_lock(o.ledger) as lock:
        if lock.took_over:
            _log(f"ledger {o.ledger}: taking over the lock left by {lock.took_over} (no longer running)")
        info = _read_ledger(o.ledger)
        n = len(info["chunks"])
        kept = ledger.restorable(info)
        if not 0 <= o.to <= n and o.to not in kept:
            more = f", and the reverted chunks {', '.join(map(str, kept))} whose states were kept" if kept else ""
            raise UsageError(f"--to {o.to}: the ledger {o.ledger} has chunks 0..{n}{more}")
        later = "removed (--discard)" if o.discard else "kept: `revert --to` a later chunk brings them back"
        if o.to > n:
            ledger.revert(o.ledger, o.to)
            print(f"{o.ledger}: state after chunk {o.to} restored (reverted chunks {n + 1}..{o.to} are current again)")
            return 0
        if str(o.to) in info["snapshots"] or o.to == n:
            if o.to < n:
                ledger.revert(o.ledger, o.to, o.discard)
            print(f"{o.ledger}: state after chunk {o.to} restored from its snapshot ({n - o.to} later chunk(s) {later})")
            return 0
        # no snapshot: replay from the nearest earlier one, which gives the same bits
        from .model import load_model
        from .session import EditSession

        dtype = o.dtype if "dtype" in given else info["model_dtype"]
        model, tok = load_model(o.model or info["model"], o.device, dtype, device_map=o.device_map)
        j = ledger.nearest_snapshot(info, o.to)
        _log(f"replaying chunks {j + 1}..{o.to} from {'the snapshot after chunk ' + str(j) if j else 'the base'}")
        EditSession.replayed(o.ledger, model, tok, o.to, progress=o.progress, discard=o.discard)
        print(f"{o.ledger}: state after chunk {o.to} restored by replaying chunks {j + 1}..{o.to} "
              f"({n - o.to} later chunk(s) {later})")
        return 0


def run_log(o: LogOptions, given: set) -> int:
    info = _read_ledger(o.ledger)
    if o.json:
        print(json.dumps(info["chunks"], indent=1, default=str))
        return 0
    opts = info["options"]
    print(f"{o.ledger}: {info['model']} · {opts['method']} · {len(info['chunks'])} chunks · "
          f"layers {', '.join(info['modules'])}")
    head = (f"{'chunk':>5} {'requests':>8} {'steps':>6} {'loss':>8} {'|dW|/|W|':>9} {'pred. KL':>9} {'KL held-out':>11} "
            f"{'reliab.':>7} {'first':>6} {'rephr.':>6} {'known':>6} {'cap.':>10} {'rehearsed':>9} {'refr.':>5} "
            f"{'budget':>7} {'time':>7}")
    print(head)
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    g = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    edits = 0
    for r in info["chunks"]:
        m, d = r.get("metrics") or {}, (r.get("drift") or {}).get("total", {})
        edits += r["requests"]
        budget = f"{r['budget']['used']:.0%}" if r.get("budget") else "-"
        h = r.get("rehearsal")
        rehearsed = f"{h['rehearsed']}/{h['forgotten']}" if h else "-"
        share, floored = r.get("capability_share"), r.get("capability_share_floored")
        cap = f"{f(share, 2)}->{floored:.2f}" if floored is not None and share is not None and floored > share else f(share, 2)
        print(f"{r['chunk']:>5} {edits:>8} {r.get('steps') if r.get('steps') is not None else '-':>6} "
              f"{f(r.get('final_loss'), 4):>8} {f(d.get('relative_change'), 4):>9} {g(d.get('predicted_kl')):>9} "
              f"{g(m.get('heldout_kl')):>11} {f(m.get('reliability')):>7} {f(m.get('first_chunk_reliability')):>6} "
              f"{f(m.get('rephrase')):>6} {f(m.get('known_facts_accuracy')):>6} {cap:>10} "
              f"{rehearsed:>9} {len(r.get('refreshes', [])):>5} {budget:>7} {sum(r.get('seconds', {}).values()):>6.1f}s")
    for r in info["chunks"]:
        if r.get("updates"):
            print(f"chunk {r['chunk']}: {r['updates']} request(s) update an earlier edit of their prompt with another target")
        h = r.get("rehearsal")
        if h and h.get("recovered") is not None and h["rehearsed"]:
            print(f"chunk {r['chunk']}: {h['recovered']} of the {h['rehearsed']} rehearsed edits held after it")
        for w in r.get("warnings", []):
            print(f"chunk {r['chunk']}: warning: {w}")
    if info.get("reverted"):
        print(f"reverted: {sum(len(x['chunks']) for x in info['reverted'])} chunks (kept in ledger.json under 'reverted')")
    print(LOG_LEGEND)
    return 0


LOG_LEGEND = ("\nrequests: edited so far; loss: the chunk's final edit loss; |dW|/|W|: relative change of the edited "
              "matrices since the base; pred. KL: K-FAC predicted KL from the base\non the capability corpus, "
              "nats/token; KL held-out: measured on --heldout; reliab.: edits so far answered (a sample); first: the "
              "first chunk's edits still answered;\nrephr.: rephrases of the edits so far answered; known: unedited facts "
              "the base knew, still answered; cap.: the capability corpus's share of the protected statistics (a->b: raised from a to b by --capability-share);\n"
              "rehearsed: earlier edits edited again / found forgotten (--rehearse); refr.: statistics refreshes "
              "(--refresh-drift); budget: share of --budget used;\ntime: seconds of the chunk; -: not measured (no "
              "--heldout, --known-facts, or evaluation that chunk)")


def run_plan(o: PlanOptions, given: set) -> int:
    from .plan import plan, print_plan

    result = plan(o.model, o.layers, o.module, o.dtype, o.requests, o.gamma, chunk_size=o.chunk_size, budget=o.budget)
    if o.json:
        print(json.dumps(result, indent=1))
    else:
        print_plan(result)
    return 0


def run_demo(o: DemoOptions, given: set) -> int:
    from .demo import run

    return run(o)


RUNNERS = {"curvature": run_curvature, "edit": run_edit, "evaluate": run_evaluate,
           "apply-delta": lambda o, g: _run_delta(o, g, +1), "revert": run_revert, "log": run_log,
           "inspect": run_inspect, "merge-curvature": run_merge, "plan": run_plan, "demo": run_demo}


def _user_errors() -> tuple[type[Exception], ...]:
    """Every error a user's input can cause: each ends as one line and exit status 2."""
    from .budget import BudgetError
    from .corpus import CorpusError
    from .curvature import StatisticsError
    from .distributed import DistributedError
    from .editor import EditError
    from .evaluate import EvaluationError
    from .layers import LayerError
    from .ledger import LedgerError
    from .memit import MemitError
    from .model import ModelError
    from .projector import CurvatureError
    from .requests import RequestError
    from .saving import SaveError
    from .session import SessionError

    return (UsageError, OptionError, CorpusError, StatisticsError, LayerError, ModelError, CurvatureError, RequestError,
            EditError, SaveError, EvaluationError, SessionError, LedgerError, BudgetError, MemitError, DistributedError)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an unknown option is named by its subcommand's parser (with the positional
    ledger of ``log``/``revert`` shown where ``--ledger`` was given)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        hint = ""
        if args.command in POSITIONAL and any(x.split("=")[0] == flag(POSITIONAL[args.command]) for x in extra):
            hint = f"; the ledger is positional: crispedit {args.command} {POSITIONAL[args.command].upper()}"
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cls = COMMANDS[args.command][0]
    start = time.perf_counter()
    try:
        options, given = options_from_args(cls, args)
        _setup_runtime(options)
        code = RUNNERS[args.command](options, given)
        sys.stdout.flush()  # a reader that stopped early (`| head`) is found here, not at exit
    except BrokenPipeError:  # the reader of stdout went away: stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, OptionError) as e:
        print(f"crispedit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crispedit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"crispedit {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    _log(f"done in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
