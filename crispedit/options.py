"""Options of each stage, declared once: the CLI, config files and saved metadata all use these.

Every field carries its default and a one-line help text (``field(metadata={"help": ...})``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def opt(default, help: str, **extra):
    """A field with a default and a help text (``choices``, ``nargs``, ``required`` in ``extra``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RuntimeOptions:
    device: str = opt("auto", "where the model runs: cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = opt("float32", "model weights dtype", choices=("float32", "bfloat16", "float16", "float64"))
    threads: int | None = opt(None, "CPU threads for torch (None: torch's own choice)")


@dataclass
class CurvatureOptions(RuntimeOptions):
    model: str = opt("", "Hugging Face model: local directory or hub id", required=True)
    corpus: list[str] = opt([], "capability corpus: text files, JSON Lines with 'text', or saved datasets directories", required=True, nargs="+")
    out: str = opt("", "output directory for curvature.safetensors", required=True)
    layers: str = opt("auto", "block indices to edit (19,20,21 or 19-23) or auto (SPEC §2.1)")
    module: str | None = opt(None, "module to edit instead of the architecture default: relative to a block (mlp.up_proj) or a full name")
    labels: str = opt("sampled", "labels for g: sampled (true Fisher = GNH), empirical (observed tokens) or exact (closed-form expectation)", choices=("sampled", "empirical", "exact"))
    mc_samples: int = opt(1, "sampled labels drawn per position")
    seed: int = opt(0, "seed of the sampled labels (per document: independent of batching and order)")
    max_length: int = opt(512, "truncate documents to this many tokens")
    max_documents: int | None = opt(None, "use at most this many documents")
    max_tokens: int | None = opt(None, "use at most this many labelled tokens")
    unit: str = opt("line", "document unit of plain text files: line, paragraph (blank-line separated) or chunk (max-length pieces)", choices=("line", "paragraph", "chunk"))
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
class DemoOptions(RuntimeOptions):
    seed: int = opt(0, "seed of the demo model and corpus")


def as_dict(options) -> dict:
    return dataclasses.asdict(options)
