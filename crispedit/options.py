"""Options of each stage, declared once: the CLI, config files and saved metadata all use these.

Every field carries its default and a one-line help text (``field(metadata={"help": ...})``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .corpus import UNITS
from .curvature import LABEL_MODES
from .editor import METHODS, OPTIMIZERS
from .evaluate import TEMPLATES
from .model import DTYPES
from .requests import FORMATS


def opt(default, help: str, **extra):
    """A field with a default and a help text (``choices``, ``nargs``, ``required`` in ``extra``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RuntimeOptions:
    device: str = opt("auto", "where the model runs: cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = opt("float32", "model weights dtype", choices=tuple(DTYPES))
    threads: int | None = opt(None, "CPU threads for torch (None: torch's own choice)")


@dataclass
class CurvatureOptions(RuntimeOptions):
    model: str = opt("", "Hugging Face model: local directory or hub id", required=True)
    corpus: list[str] = opt([], "capability corpus: text files, JSON Lines with 'text', or saved datasets directories", required=True, nargs="+")
    out: str = opt("", "output directory for curvature.safetensors", required=True)
    layers: str = opt("auto", "block indices to edit (19,20,21 or 19-23) or auto (SPEC §2.1)")
    module: str | None = opt(None, "module to edit instead of the architecture default: relative to a block (mlp.up_proj) or a full name")
    labels: str = opt("sampled", "labels for g: sampled (true Fisher = GNH), empirical (observed tokens) or exact (closed-form expectation)", choices=LABEL_MODES)
    mc_samples: int = opt(1, "sampled labels drawn per position")
    seed: int = opt(0, "seed of the sampled labels (per document: independent of batching and order)")
    max_length: int = opt(512, "truncate documents to this many tokens")
    max_documents: int | None = opt(None, "use at most this many documents")
    max_tokens: int | None = opt(None, "use at most this many labelled tokens")
    unit: str = opt("line", "document unit of plain text files: line, paragraph (blank-line separated) or chunk (max-length pieces)", choices=UNITS)
    batch_size: int = opt(8, "documents per forward pass")
    accumulate: str = opt("float32", "accumulation dtype of A and G", choices=("float32", "float64"))
    exact_limit: int = opt(2_000_000, "exact labels: refuse more than this many backward vectors (V x N)")
    overwrite: bool = opt(False, "replace an existing curvature file in --out")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class InspectOptions:
    curvature: str = opt("", "directory or file written by `crispedit curvature`", required=True)
    gamma: list[float] = opt([0.5, 0.8, 0.9, 0.95, 0.99], "energy fractions to report", nargs="+")
    identity_g: bool = opt(False, "G = I: the input-covariance null space of AlphaEdit / Adam-NSCL")


@dataclass
class MergeOptions:
    inputs: list[str] = opt([], "curvature directories or files to merge", required=True, nargs="+")
    out: str = opt("", "output directory", required=True)
    allow_mixed_labels: bool = opt(False, "merge statistics of different label modes")
    overwrite: bool = opt(False, "replace an existing curvature file in --out")


@dataclass
class EvaluationInputs:
    """What an edit is scored on (shared by `edit` and `evaluate`)."""

    requests: str = opt("", "request file: CounterFact (flat or nested), ZsRE, WikiBigEdit or JSON Lines", required=True)
    format: str = opt("auto", "request file format", choices=FORMATS)
    heldout: list[str] = opt([], "held-out capability text (never used for the statistics): perplexity and KL", nargs="+")
    known_facts: str | None = opt(None, "request file of true facts not edited (target_new = the true answer): accuracy on those the base model knows")
    template: str = opt("raw", "prompt template for evaluation", choices=TEMPLATES)


@dataclass
class EditOptions(RuntimeOptions, EvaluationInputs):
    model: str = opt("", "Hugging Face model to edit: local directory or hub id", required=True)
    out: str = opt("", "output directory: edited model, delta.safetensors, manifest.json, report.json", required=True)
    curvature: str | None = opt(None, "statistics from `crispedit curvature` (directory or file)")
    corpus: list[str] = opt([], "capability corpus: used for the statistics when --curvature is not given, and for the measured KL", nargs="+")
    layers: str = opt("auto", "block indices to edit (19,20,21 or 19-23) or auto")
    module: str | None = opt(None, "module to edit instead of the architecture default")
    method: str = opt("crispedit", "crispedit (A x G projector), ft (gamma 0) or nullspace (G = I, Adam-NSCL style)", choices=METHODS)
    gamma: float = opt(0.8, "energy fraction of the curvature to protect, in [0, 1)")
    labels: str = opt("sampled", "label mode when the statistics are computed here", choices=LABEL_MODES)
    optimizer: str = opt("adam", "adam (project the gradient), sgd, or adam-projected-step (project Adam's step too)", choices=OPTIMIZERS)
    lr: float = opt(5e-4, "learning rate")
    batch_size: int = opt(32, "requests per mini-batch")
    epochs: int = opt(25, "maximum epochs over all requests")
    loss_threshold: float = opt(1e-2, "skip batches below this loss; stop when an epoch's mean is below it")
    seed: int = opt(0, "seed of the request order (and of sampled labels)")
    max_length: int = opt(512, "capability documents: truncate to this many tokens")
    max_documents: int | None = opt(100, "capability documents for the statistics (the paper: ~100)")
    unit: str = opt("line", "document unit of plain text corpora", choices=UNITS)
    evaluate: bool = opt(True, "evaluate before and after editing")
    overwrite: bool = opt(False, "replace an existing --out directory")
    progress: bool = opt(True, "show progress bars")


@dataclass
class EvaluateOptions(RuntimeOptions, EvaluationInputs):
    model: str = opt("", "edited model (directory or hub id)", required=True)
    base: str = opt("", "base model, for locality agreement, perplexity change and KL", required=True)
    max_length: int = opt(512, "held-out documents: truncate to this many tokens")
    max_documents: int | None = opt(200, "held-out documents to use")
    unit: str = opt("line", "document unit of plain text", choices=UNITS)
    out: str | None = opt(None, "write the JSON report here")
    overwrite: bool = opt(False, "replace an existing report")
    progress: bool = opt(True, "show progress bars")


@dataclass
class DeltaOptions(RuntimeOptions):
    model: str = opt("", "model to apply the delta to (apply-delta: the base; revert: the edited model)", required=True)
    delta: str = opt("", "directory written by `crispedit edit` (delta.safetensors + manifest.json)", required=True)
    out: str = opt("", "output directory for the resulting model", required=True)
    overwrite: bool = opt(False, "replace an existing --out directory")


@dataclass
class DemoOptions(RuntimeOptions):
    seed: int = opt(0, "seed of the request choice and the edits")
    edits: int = opt(300, "facts to edit")
    gamma: float = opt(0.8, "energy fraction for crispedit and nullspace")
    lr: float = opt(2e-3, "Adam learning rate of every method (SPEC's 5e-4 is for 8B models; on this 1.8M model it does not converge in 25 epochs)")
    epochs: int = opt(25, "maximum epochs of every method")
    sweep: bool = opt(False, "also sweep gamma in {0.5, 0.8, 0.9, 0.95, 0.99} for crispedit and nullspace")
    out: str = opt("crispedit-demo", "directory for the report and the plot")
    model_dir: str | None = opt(None, "demo model directory (default: the one shipped in the package)")
    progress: bool = opt(False, "show progress bars")


def as_dict(options) -> dict:
    return dataclasses.asdict(options)
