"""Options of each stage, declared once: the CLI, config files, saved manifests and ledgers use these.

Every field carries its default, a one-line help text and, where a value can be wrong, a check
(``field(metadata={"help": ..., "check": ...})``); ``validate`` runs the checks and ``coerce`` turns
config-file values into the declared types, so every message names the option at fault. This module
imports nothing but the standard library: ``crispedit --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

# choices, declared here once (the modules that implement them import them from here)
DTYPES = ("float32", "bfloat16", "float16", "float64")
LABEL_MODES = ("sampled", "empirical", "exact")
UNITS = ("line", "paragraph", "chunk")
FORMATS = ("auto", "counterfact", "counterfact-nested", "zsre", "wikibigedit", "jsonl")
TEMPLATES = ("raw", "qa", "chat")
GRADIENT_METHODS = ("crispedit", "ft", "nullspace")
CLOSED_FORM_METHODS = ("memit", "alphaedit")
METHODS = GRADIENT_METHODS + CLOSED_FORM_METHODS
OPTIMIZERS = ("adam", "sgd", "adam-projected-step")
PROTECT_EDITS = ("merge", "mix", "none")
REHEARSE_ORDERS = ("most-forgotten", "oldest")
# What chunked editing (--chunk-size, several request files, a new ledger) uses where an option is not
# given, for the gradient methods (the share floor and the projected step: not for ft, which projects
# nothing), chosen on the CounterFact testbed at 3,000 edits in chunks of 100 (docs/benchmarks.md):
# rehearsal and the floor kept 0.942 of the edits, held-out KL 0.121, against 0.750 and 0.162 without;
# a chunk stopping once an epoch's mean edit loss is below 0.2 (0.01 in a batch; rehearsal re-edits what
# falls short) and Adam's step projected too then keep 0.955, known facts 0.549 (batch 0.530), KL 0.071
# (batch 0.063), in 1,961 steps against 3,449. A batch edit keeps MethodOptions' own defaults.
CHUNKED_DEFAULTS: dict = {"rehearse": "all", "capability_share": 0.5, "loss_threshold": 0.2,
                          "optimizer": "adam-projected-step"}
# ... and CrispEdit's gamma there: with rehearsal, 0.95 kept more than 0.8 of the edits, the known facts and
# held-out text (3,000 edits in chunks of 100: reliability 0.951 against 0.942, known facts 0.509 against 0.357,
# KL 0.112 against 0.121), for fewer rephrases (0.254 against 0.331).
CHUNKED_GAMMA = 0.95


def chunked_defaults(method: str) -> dict:
    """What chunked editing gives ``method`` where an option is not given: ``CHUNKED_DEFAULTS``, less
    the share floor and the projected step for ft (it projects nothing), and crispedit's ``CHUNKED_GAMMA``."""
    skip = ("capability_share", "optimizer") if method == "ft" else ()
    out = {k: v for k, v in CHUNKED_DEFAULTS.items() if k not in skip}
    return {**out, "gamma": CHUNKED_GAMMA} if method == "crispedit" else out


def projections_per_step(optimizer: str) -> int:
    """Projections an optimiser step makes: the gradient's, and with ``adam-projected-step`` Adam's step's too."""
    return 2 if optimizer == "adam-projected-step" else 1


PROJECTION_DTYPES = ("auto", "float32", "tf32", "bfloat16")


class OptionError(ValueError):
    """An option with a value it cannot take, naming the option."""


# checks: value -> None when fine, else what is wrong ("must be ...")
def at_least(k: float) -> Callable:
    return lambda v: None if v >= k else f"must be at least {k}"


def positive(v) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must not be negative"


def within(lo: float, hi: float) -> Callable:
    """``lo ≤ v < hi``."""
    return lambda v: None if lo <= v < hi else f"must lie in [{lo:g}, {hi:g})"


def opt(default, help: str, **extra):
    """A field with a default, a help text and optional ``choices``, ``nargs``, ``required``, ``check``."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RuntimeOptions:
    device: str = opt("auto", "where the model runs: cpu, cuda, cuda:N or auto (cuda when available)")
    device_map: str | None = opt(None, "spread a model too big for one GPU over several with accelerate: auto, balanced, "
                                 "or {module: device} as JSON (inline or a .json file; devices: GPU index, cuda:N, cpu); "
                                 "edited layers must sit on a GPU, not be offloaded; not with torchrun; the demo ignores it")
    dtype: str = opt("float32", "model weights dtype (statistics and optimiser state stay float32 or wider)", choices=DTYPES)
    threads: int | None = opt(None, "CPU threads for torch (default: torch's own choice)", check=at_least(1))
    progress: bool = opt(True, "progress bars (--no-progress silences all of them, transformers' loading bars too)")


@dataclass
class CurvatureOptions(RuntimeOptions):
    model: str = opt("", "Hugging Face model: local directory or hub id", required=True)
    corpus: list[str] = opt([], "capability corpus: text files, JSON Lines with 'text', or saved datasets directories", required=True, nargs="+")
    out: str = opt("", "output directory for curvature.safetensors", required=True)
    layers: str = opt("auto", "block indices to edit (19,20,21 or 19-23) or auto (the paper's layers for LLaMA-3-8B and Qwen2.5-7B, else five blocks ending at 0.72 of the depth)")
    module: str | None = opt(None, "module to edit instead of the architecture default: relative to a block (mlp.up_proj) or a full name")
    labels: str = opt("sampled", "labels for g: sampled (true Fisher = Gauss-Newton), empirical (observed tokens) or exact (closed-form expectation)", choices=LABEL_MODES)
    mc_samples: int = opt(1, "sampled labels drawn per position", check=at_least(1))
    seed: int = opt(0, "seed of the sampled labels (per document: independent of batching and order)")
    max_length: int = opt(512, "truncate documents to this many tokens", check=at_least(2))
    max_documents: int | None = opt(None, "use at most this many documents", check=at_least(1))
    max_tokens: int | None = opt(None, "use at most this many labelled tokens", check=at_least(1))
    unit: str = opt("line", "document unit of plain text files: line, paragraph (blank-line separated) or chunk (max-length pieces)", choices=UNITS)
    batch_size: int = opt(8, "documents per forward pass", check=at_least(1))
    accumulate: str = opt("float32", "accumulation dtype of A and G", choices=("float32", "float64"))
    exact_limit: int = opt(2_000_000, "exact labels: refuse more than this many backward vectors (vocabulary size x labelled tokens)", check=at_least(1))
    overwrite: bool = opt(False, "replace an existing curvature file in --out")


@dataclass
class InspectOptions:
    curvature: str = opt("", "directory or file written by `crispedit curvature`", required=True)
    gamma: list[float] = opt([0.5, 0.8, 0.9, 0.95, 0.99], "energy fractions to report", nargs="+", check=within(0, 1))
    identity_g: bool = opt(False, "G = I: the input-covariance null space of AlphaEdit / Adam-NSCL")
    json: bool = opt(False, "print JSON instead of a table")


@dataclass
class MergeOptions:
    inputs: list[str] = opt([], "curvature directories or files to merge (statistics of disjoint corpora of one model)", required=True, nargs="+")
    out: str = opt("", "output directory", required=True)
    allow_mixed_labels: bool = opt(False, "merge statistics of different label modes")
    overwrite: bool = opt(False, "replace an existing curvature file in --out")


@dataclass
class EvaluationInputs:
    """What an edit is scored on (shared by `edit` and `evaluate`)."""

    requests: list[str] = opt([], "request files: CounterFact (flat or nested), ZsRE, WikiBigEdit or JSON Lines; edit: several files are edited in order, chunk by chunk", required=True, nargs="+")
    format: str = opt("auto", "request file format", choices=FORMATS)
    max_requests: int | None = opt(None, "use only the first N requests (after --case-ids)", check=at_least(1))
    case_ids: list[str] | None = opt(None, "use only the requests with these case ids", nargs="+")
    heldout: list[str] = opt([], "held-out capability text (never used for the statistics): perplexity and KL", nargs="+")
    heldout_documents: int = opt(200, "held-out documents to use (the same cap in edit and evaluate)", check=at_least(1))
    known_facts: str | None = opt(None, "request file of facts the model should keep: scored against each record's ground_truth (CounterFact: the true answer), else its target_new, on those the base model answers correctly")
    template: str = opt("raw", "prompt template for evaluation: raw, qa (the paper's QA wrapper) or chat (the tokenizer's chat template)", choices=TEMPLATES)


@dataclass
class MethodOptions:
    """How edits are made: recorded in every manifest and ledger; a resumed ledger keeps them."""

    method: str = opt("crispedit", "crispedit (A x G projector), ft (gamma 0), nullspace (G = I, Adam-NSCL style), memit or alphaedit (closed form)", choices=METHODS)
    gamma: float | None = opt(None, "energy fraction of the curvature to protect, in [0, 1) (crispedit and nullspace; default 0.8, and 0.95 for crispedit editing in chunks or into a new ledger)", check=within(0, 1))
    labels: str = opt("sampled", "label mode of the statistics computed here (capability corpus, edits, --protect)", choices=LABEL_MODES)
    optimizer: str = opt("adam", "adam (project the gradient), sgd, or adam-projected-step (project Adam's step too)", choices=OPTIMIZERS)
    lr: float = opt(5e-4, "learning rate", check=positive)
    batch_size: int = opt(32, "requests per mini-batch", check=at_least(1))
    epochs: int = opt(25, "maximum epochs over the requests of a chunk", check=at_least(1))
    loss_threshold: float = opt(1e-2, "skip batches below this loss; stop when an epoch's mean is below it (0.2 when editing in chunks or into a new ledger, unless given)", check=non_negative)
    seed: int = opt(0, "seed of the request order, the sampled labels and --protect-edits mix sampling")
    chunk_size: int | None = opt(None, "edit the requests in chunks of this many (default: each request file in one chunk); after every chunk the edits join the protected statistics; chunked editing defaults to --rehearse all --capability-share 0.5 --loss-threshold 0.2 --optimizer adam-projected-step and, for crispedit, --gamma 0.95", check=at_least(1))
    shuffle: int | None = opt(None, "shuffle the requests of each file with this seed before chunking (default: file order)")
    edit_weight: float = opt(10.0, "weight of a labelled token of an edit text (or a --protect text) in the protected statistics, counted against one capability-corpus token: A = (A_sum_capability + w * A_sum_edits) / (N_capability + w * N_edits), G likewise (10: chosen on the CounterFact testbed, where it kept more earlier edits than 1 or 100)", check=positive)
    protect_edits: str = opt("merge", "how earlier edits are protected: merge (each chunk's K-FAC sums, taken at the weights after the chunk, are added to the protected sums), mix (the authors' variant: the protected statistics are recomputed before every chunk at the current weights from the capability documents and a random sample of all edits so far), none", choices=PROTECT_EDITS)
    mix_sample: int = opt(1000, "--protect-edits mix: edits sampled from the history for each recomputation", check=at_least(1))
    refresh_drift: float | None = opt(None, "recompute all statistics at the current weights when an edited matrix has moved more than this (relative Frobenius norm) since they were taken, e.g. 0.25", check=positive)
    budget: float | None = opt(None, "capability budget: the K-FAC predicted KL on the capability corpus (nats per token, cumulative since the base) never exceeds this; typical: 0.02 (on the 8.4M-parameter CounterFact testbed, 0.02 stopped CrispEdit in chunks of 100 after 600 of 3,000 edits, whose drift without a budget reached 0.14)", check=positive)
    rehearse: str | None = opt(None, "all, N or none: before each chunk, check every earlier edit (teacher-forced: every target token the argmax) and edit the ones no longer in force again with the chunk: all, or at most N per chunk; their statistics are not counted twice (gradient methods; default: all when editing in chunks or into a new ledger, none for one batch; none: no check; 0: check and record the forgotten, rehearse none)", check=lambda v: None if v in ("all", "none") or (v.isdigit() and int(v) >= 0) else "must be 'all', 'none' or a whole number >= 0")
    rehearse_order: str = opt("most-forgotten", "--rehearse N: which forgotten edits first: most-forgotten (lowest share of target tokens still the argmax, then oldest) or oldest", choices=REHEARSE_ORDERS)
    capability_share: float | None = opt(None, "floor of the capability corpus's share of the protected statistics, N_cap / (N_cap + w * N_edits), in [0, 1): its sums are weighted up when edits would outweigh it (default: 0.5 when editing in chunks or into a new ledger, none for one batch; 0: no floor)", check=lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    warn_change: float = opt(0.5, "warn when a chunk leaves an edited matrix moved by more than this since the base (relative Frobenius norm |dW|/|W|)", check=positive)
    rebuild_every: int = opt(1, "rebuild the eigenbases every K chunks (the statistics are still accumulated every chunk)", check=at_least(1))
    projection_dtype: str = opt("auto", "precision of the projection's rotations: auto (tf32 on a GPU, float32 on a CPU), float32 (exact), tf32 or bfloat16", choices=PROJECTION_DTYPES)
    # closed-form editors (memit, alphaedit); defaults: the LLaMA-3-8B settings of the AlphaEdit authors
    v_num_grad_steps: int = opt(25, "memit/alphaedit: forward passes of the target optimisation", check=at_least(1))
    v_lr: float = opt(0.1, "memit/alphaedit: Adam learning rate of the target residual", check=positive)
    v_weight_decay: float = opt(0.5, "memit/alphaedit: weight of |delta| / |h|^2 in the target loss", check=non_negative)
    kl_factor: float = opt(0.0625, "memit/alphaedit: weight of KL(P_delta || P_0) on '{subject} is a' in the target loss", check=non_negative)
    clamp_norm_factor: float = opt(0.75, "memit/alphaedit: |delta| is clamped to this multiple of |h|", check=positive)
    prefix_count: int = opt(5, "memit/alphaedit: context prefixes the model writes itself, beside the empty one, over which the target is optimised and the keys averaged (0: the plain prompt only)", check=non_negative)
    mom2_update_weight: float = opt(15000.0, "memit: lambda in (lambda C + K K^T); matched to the width (~d_in) of the edited matrix", check=non_negative)
    nullspace_threshold: float = opt(2e-2, "alphaedit: eigenvectors of C with eigenvalue below this span the null space", check=positive)
    nullspace_relative: bool = opt(False, "alphaedit: read --nullspace-threshold as a fraction of C's largest eigenvalue")
    l2: float = opt(10.0, "alphaedit: weight of |dW|^2 in its objective", check=non_negative)

    def effective_gamma(self) -> float:
        """The γ actually used: 0 for ft, the given (or default 0.8) for crispedit and nullspace."""
        if self.method == "ft":
            return 0.0
        return 0.8 if self.gamma is None else self.gamma

    def rehearses(self) -> bool:
        """Whether earlier edits are checked before each chunk (``--rehearse`` all, N or 0; not none)."""
        return self.rehearse not in (None, "none")


@dataclass
class EditOptions(RuntimeOptions, EvaluationInputs, MethodOptions):
    model: str = opt("", "Hugging Face model to edit: local directory or hub id (with --resume: the ledger's)")
    out: str | None = opt(None, "output directory: edited model, delta.safetensors, manifest.json, report.json (optional with --ledger or --resume)")
    curvature: str | None = opt(None, "statistics from `crispedit curvature` (directory or file); else computed from --corpus")
    corpus: list[str] = opt([], "capability corpus: used for the statistics when --curvature is not given, and for the measured KL", nargs="+")
    layers: str | None = opt(None, "block indices to edit (19,20,21 or 19-23) or auto (default: the layers of --curvature, else auto)")
    module: str | None = opt(None, "module to edit instead of the architecture default")
    allow_other_checkpoint: bool = opt(False, "use --curvature computed on another checkpoint of the same shapes")
    max_length: int = opt(512, "capability documents: truncate to this many tokens", check=at_least(2))
    max_documents: int | None = opt(100, "capability documents for the statistics (the paper: ~100)", check=at_least(1))
    unit: str = opt("line", "document unit of plain text corpora", choices=UNITS)
    protect: list[str] = opt([], "texts (one document per line) or request files whose behaviour must not change: added to the protected statistics like an edited chunk", nargs="+")
    ledger: str | None = opt(None, "write the editing history to this ledger directory (updated after every chunk; continue it with --resume)")
    resume: str | None = opt(None, "continue the history in this ledger with --requests; requests it holds already are skipped. May change on resume: --lr, --epochs, --batch-size, --loss-threshold, --chunk-size, --shuffle, the evaluation files, --budget (raised, with --raise-budget), an added --protect; all else is the ledger's (model, layers, method, gamma, labels, ...)")
    raise_budget: bool = opt(False, "with --resume: allow --budget above the ledger's (a spent budget lets editing go on)")
    snapshot_every: int | None = opt(None, "keep the ledger state after every K-th chunk for `crispedit revert --to` (0: none, revert replays; default: every chunk when a snapshot is under 256 MiB, else none)", check=at_least(0))
    evaluate: bool = opt(True, "evaluate before and after editing")
    eval_every: int = opt(1, "chunked edits: score the history after every K chunks (and after the last)", check=at_least(1))
    eval_sample: int = opt(500, "chunked edits: score at most this many earlier requests (a fixed seeded sample) after each chunk", check=at_least(1))
    delta_only: bool = opt(False, "write delta.safetensors and the manifest, not a full copy of the model")
    overwrite: bool = opt(False, "replace the files crispedit wrote in an existing --out")


@dataclass
class EvaluateOptions(RuntimeOptions, EvaluationInputs):
    model: str = opt("", "edited model (directory or hub id), or a ledger (its current model: --base plus the ledger's delta)", required=True)
    base: str = opt("", "base model, for locality agreement, perplexity change and KL; refused when --model records another base (an edit, apply-delta output or ledger)", required=True)
    max_length: int = opt(512, "held-out documents: truncate to this many tokens", check=at_least(2))
    unit: str = opt("line", "document unit of plain text", choices=UNITS)
    lm_eval: list[str] | None = opt(None, "lm-evaluation-harness tasks to run on the edited model and the base (pip install 'crispedit[lm-eval]')", nargs="+")
    lm_eval_limit: int | None = opt(None, "lm-evaluation-harness: examples per task", check=at_least(1))
    out: str | None = opt(None, "write the JSON report here")
    overwrite: bool = opt(False, "replace an existing report")


@dataclass
class DeltaOptions(RuntimeOptions):
    model: str = opt("", "model to apply the delta to (apply-delta: the base; revert: the edited model)", required=True)
    delta: str = opt("", "directory written by `crispedit edit` or a ledger (delta.safetensors + manifest.json)", required=True)
    out: str = opt("", "output directory for the resulting model", required=True)
    overwrite: bool = opt(False, "replace the files crispedit wrote in an existing --out")


@dataclass
class RevertOptions(DeltaOptions):
    model: str | None = opt(None, "the edited model (with --delta); not needed with a ledger")
    delta: str | None = opt(None, "directory written by `crispedit edit` (delta.safetensors + manifest.json)")
    out: str | None = opt(None, "output directory for the resulting model (required with --delta)")
    ledger: str | None = opt(None, "a ledger: restore the state after chunk --to (in place)")
    to: int | None = opt(None, "with a ledger: the chunk whose state to restore (0: before any edit; a later, reverted chunk whose state was kept: back to it)", check=at_least(0))
    discard: bool = opt(False, "with a ledger: remove the reverted chunks' states (their records stay in ledger.json); without it they are kept, restorable by --to")


@dataclass
class LogOptions:
    ledger: str = opt("", "ledger directory written by `crispedit edit --ledger`", required=True)
    json: bool = opt(False, "print the history as JSON")


@dataclass
class PlanOptions:
    model: str = opt("", "Hugging Face model id, local directory or config.json (only the configuration is read)", required=True)
    layers: str = opt("auto", "block indices to edit or auto")
    module: str | None = opt(None, "module to edit instead of the architecture default")
    dtype: str = opt("float32", "model weights dtype, as `edit --dtype` (whose default is float32 too; bfloat16 halves the weights)", choices=DTYPES)
    requests: int = opt(3000, "requests to edit", check=at_least(1))
    chunk_size: int | None = opt(None, "edit the requests in chunks of this many, as `edit --chunk-size` (default: one batch): steps per chunk, the ledger after every chunk", check=at_least(1))
    gamma: float = opt(0.8, "energy fraction (the removed ranks are estimated from it)", check=within(0, 1))
    budget: float | None = opt(None, "count the capability budget of `edit --budget` too (nats per token): its flops per step and memory", check=positive)
    json: bool = opt(False, "print JSON instead of a table")


@dataclass
class DemoOptions(RuntimeOptions):
    seed: int = opt(0, "seed of the request choice and the edits")
    edits: int = opt(300, "facts to edit", check=at_least(1))
    gamma: float = opt(0.8, "energy fraction for crispedit and nullspace", check=within(0, 1))
    lr: float = opt(2e-3, "Adam learning rate of every gradient method (the 5e-4 of 8B models does not converge in 25 epochs on this 1.8M model)", check=positive)
    epochs: int = opt(25, "maximum epochs of every gradient method", check=at_least(1))
    sweep: bool = opt(False, "also sweep gamma in {0.5, 0.8, 0.9, 0.95, 0.99} for crispedit and nullspace")
    all_methods: bool = opt(False, "also run the closed-form editors (memit, alphaedit) on early blocks, sharing their target values (a few more minutes)")
    out: str = opt("crispedit-demo", "directory for the report and the plot")
    model_dir: str | None = opt(None, "demo model directory (default: the one shipped in the package)")
    progress: bool = opt(False, "show progress bars")


def as_dict(options) -> dict:
    return dataclasses.asdict(options)


def method_options(options) -> MethodOptions:
    """The ``MethodOptions`` part of a larger options object."""
    names = {f.name for f in dataclasses.fields(MethodOptions)}
    return MethodOptions(**{k: v for k, v in dataclasses.asdict(options).items() if k in names})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(options) -> None:
    """Run every field's check (lists element by element); ``None`` means 'not given'. A float must be
    finite for every option (``inf`` and ``nan`` would reach manifests and ledgers as bare ``Infinity``)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        check = f.metadata.get("check")
        choices = f.metadata.get("choices")
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):  # argparse's float() takes inf and nan
                raise OptionError(f"{flag(f.name)} must be a finite number, got {v}")
            if choices is not None and v not in choices:
                raise OptionError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {v!r}")
            if check is not None:
                problem = check(v)
                if problem:
                    raise OptionError(f"{flag(f.name)} {problem}, got {v}")


def _base_type(tp):
    """``int | None`` -> (int, False), ``list[float]`` -> (float, True)."""
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return _base_type(args[0])
    return tp, False


def field_type(cls, name: str):
    return _base_type(typing.get_type_hints(cls)[name])


def coerce(cls, name: str, value, source: str):
    """A config-file value as the field's type: a single value for a list option is a one-element
    list; numbers must be numbers, flags true/false; ``source`` names where the value came from."""
    kind, is_list = field_type(cls, name)
    if value is None:
        return None
    if is_list and not isinstance(value, list):
        value = [value]
    if not is_list and isinstance(value, list):
        raise OptionError(f"{source}: {name} takes one value, got a list")

    def one(v):
        if kind is bool:
            if isinstance(v, bool):
                return v
            raise OptionError(f"{source}: {name} must be true or false, got {v!r}")
        if kind in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                if isinstance(v, str):
                    try:
                        v = float(v) if kind is float else int(v)
                    except ValueError:
                        raise OptionError(f"{source}: {name} must be a number, got {v!r}") from None
                else:
                    raise OptionError(f"{source}: {name} must be a number, got {v!r}")
            if kind is int and float(v) != int(v):
                raise OptionError(f"{source}: {name} must be a whole number, got {v!r}")
            return kind(v)
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise OptionError(f"{source}: {name} must be a string, got {v!r}")
        return str(v)

    return [one(v) for v in value] if is_list else one(value)
