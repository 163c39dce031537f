"""lm-evaluation-harness on an edited model and its base: the change per task, as the paper reports
for MMLU, GSM8K, ARC-C, TruthfulQA and IFEval.

    result = compare(edited, tokenizer, ["mmlu", "arc_challenge:acc_norm", "my_task.yaml"],
                     base_weights={name: W_base, ...})
    result["rows"]         # [{task, metric, base, edited, change = edited − base, ...}, ...]
    result["mean_change"]  # the mean of ``change`` over the rows (accuracies, for the paper's tasks)

A task is a harness task, group or tag name, or a local task YAML file, optionally followed by
``:METRIC`` (``acc_norm``, ``exact_match,flexible-extract``); without it a task's row is the first
metric the harness reports for it. A tag (``truthfulqa``) gives one row per member task.

The base is the same model object with its base matrices swapped in (``base_weights``, no second
copy) or a separate ``base_model``. Its results are cached as JSON under
``$XDG_CACHE_HOME/crispedit/lm-eval`` (``~/.cache/...``), one file per task, keyed by a SHA-256 of
the base's parameters and config, the tokenizer, the device type, the task (and the text of a
local YAML file), ``limit``, ``num_fewshot`` and the harness version: edits of one base run the
harness on the base once. The data files a local YAML reads are not part of the key. Hashing
reads every parameter once (SHA-256 ran at ~1.6 GB/s on the development machine: seconds for a 7B
model, little next to a harness run on it).

The harness seeds ``random``, NumPy and torch on every call; the caller's generator states, the
model's train/eval mode and ``requires_grad`` flags, and the caller's tokenizer are left as found.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import json
import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from .evaluate import EvaluationError
from .running import frozen, swapped_weights
from .saving import weights_hash, write_json

INSTALL = "pip install 'crispedit[lm-eval]'"
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (mean metrics have a closed form); the harness's default is 100000


class LMEvalError(EvaluationError):
    """The harness is missing, a task is unknown, or its data or packages are not available (a
    ``ValueError``; the CLI's exit status 2 as an ``EvaluationError``)."""


@dataclass(frozen=True)
class TaskSpec:
    """One ``--lm-eval`` entry: the harness's name for it, an optional metric, an optional YAML file."""

    spec: str
    name: str
    metric: str | None = None
    path: Path | None = None


def compare(model: nn.Module, tokenizer, tasks: Sequence[str], limit: int | float | None = None,
            base_weights: dict[str, Tensor] | None = None, base_model: nn.Module | None = None,
            base_id: str | None = None, *, num_fewshot: int | None = None, batch_size: int | str | None = None,
            cache_dir: str | Path | None = None) -> dict:
    """Run the harness on ``model`` (edited) and on its base; rows of ``edited − base`` per task.

    ``base_weights`` ({module name: base weight}) are swapped into ``model`` to score the base;
    otherwise ``base_model`` is scored. ``limit`` caps the examples per task (the harness's
    ``limit``). ``batch_size`` defaults to ``"auto"`` on an accelerator and 8 on the CPU.
    ``base_id`` is only recorded. Returns ``{"rows", "mean_change", "base", "edited",
    "base_cached", "harness_version", "limit", "num_fewshot"}``; ``base``/``edited`` hold every
    metric (and stderr) the harness reported for each task.
    """
    if (base_weights is None) == (base_model is None):
        raise ValueError("compare needs exactly one of base_weights and base_model")
    harness = _import_harness()
    specs = [parse_task(t) for t in tasks]
    if not specs:
        raise LMEvalError("--lm-eval: no task given")
    task_manager = _task_manager(specs)
    version = _harness_version()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if batch_size is None:
        batch_size = 8 if _device(model).type == "cpu" else "auto"
    wrapped = {}  # the harness's model, one per model object

    def run(net: nn.Module, s: TaskSpec) -> dict:
        if id(net) not in wrapped:
            wrapped[id(net)] = _wrap(net, tokenizer, batch_size)
        return _run(harness, wrapped[id(net)], s, task_manager, limit, num_fewshot)

    base_net = model if base_model is None else base_model
    with frozen(model), (swapped_weights(model, base_weights) if base_model is None else frozen(base_model)):
        key = _base_key(base_net, tokenizer, version, limit, num_fewshot)
        base, cached = {}, []
        for s in specs:
            path = cache / f"{_task_key(key, s)}.json"
            base[s.spec] = _read_cache(path)
            if base[s.spec] is None:
                base[s.spec] = run(base_net, s)
                write_json({"base_id": base_id, "task": s.spec, "harness_version": version, "limit": limit,
                            "num_fewshot": num_fewshot, "result": base[s.spec]}, path)
            else:
                cached.append(s.spec)
    with frozen(model):
        edited = {s.spec: run(model, s) for s in specs}

    rows = [row for s in specs for row in _rows(s, base[s.spec], edited[s.spec])]
    mean = sum(r["change"] for r in rows) / len(rows) if rows else None
    return {"rows": rows, "mean_change": mean, "base": base, "edited": edited, "base_cached": cached,
            "harness_version": version, "limit": limit, "num_fewshot": num_fewshot, "base_id": base_id}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crispedit" / "lm-eval"


def parse_task(spec: str) -> TaskSpec:
    """``NAME[:METRIC]`` or ``FILE.yaml[:METRIC]`` (the task name is the YAML's ``task`` or ``group``)."""
    name, metric = spec, None
    if ":" in spec:
        name, metric = spec.rsplit(":", 1)
        if not name or not metric:
            raise LMEvalError(f"--lm-eval {spec}: expected TASK or TASK:METRIC")
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise LMEvalError(f"--lm-eval {spec}: no such file")
        config = _read_yaml(path)
        task = config.get("task") or config.get("group")
        if not isinstance(task, str):
            raise LMEvalError(f"--lm-eval {spec}: the YAML file names no task (a 'task:' or 'group:' key)")
        return TaskSpec(spec, task, metric, path.resolve())
    return TaskSpec(spec, name, metric)


# ---------------------------------------------------------------------------------------------
# the harness


def _import_harness():
    try:
        for module in ("lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface"):  # the last needs accelerate
            importlib.import_module(module)
    except ImportError as e:
        raise LMEvalError(f"--lm-eval needs lm-evaluation-harness ({_line(e)}): {INSTALL}") from None
    return sys.modules["lm_eval"]


def _harness_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def _task_manager(specs: list[TaskSpec]):
    """Local YAML files by their folders; the harness's own tasks (an index of ~15k YAML files,
    seconds) only when a name is not a local file."""
    from lm_eval.tasks import TaskManager

    folders = sorted({str(s.path.parent) for s in specs if s.path is not None})
    with _quiet():
        tm = TaskManager(include_path=folders or None, include_defaults=any(s.path is None for s in specs))
    known = set(tm.all_tasks)
    for s in specs:
        if s.name not in known:
            close = difflib.get_close_matches(s.name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LMEvalError(f"--lm-eval {s.spec}: unknown task{hint}")
    return tm


def _wrap(model: nn.Module, tokenizer, batch_size):
    """The harness's HF model around a model already in memory (a copy of the tokenizer: the
    harness sets a pad token on the one it gets)."""
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _run(harness, lm, s: TaskSpec, task_manager, limit, num_fewshot) -> dict:
    """One task: ``{harness task name: {"metrics", "stderr", "higher_is_better", "samples"}}`` for the
    task itself, or for each member of a tag."""
    try:
        with _quiet(), _generators_kept():
            out = harness.simple_evaluate(model=lm, tasks=[s.name], task_manager=task_manager, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    except ImportError as e:
        raise LMEvalError(f"--lm-eval {s.spec}: the task needs a package that is not installed ({_line(e)}); "
                          f"IFEval needs pip install 'lm-eval[ifeval]'") from None
    except OSError as e:  # datasets' ConnectionError / OfflineModeIsEnabled, missing data files
        raise LMEvalError(f"--lm-eval {s.spec}: its data could not be loaded ({_line(e)}); harness tasks "
                          f"download their datasets from the Hugging Face Hub the first time") from None
    results = out["results"]
    names = [s.name] if s.name in results else sorted(results)  # a tag has no entry of its own
    return {n: _entry(results[n], out.get("higher_is_better", {}).get(n, {}), out.get("n-samples", {}).get(n))
            for n in names}


def _entry(result: dict, higher: dict, samples: dict | None) -> dict:
    """Metric values and stderrs (``"acc,none"``) of one harness result entry."""
    metrics, stderr = {}, {}
    for k, v in result.items():
        if "," not in k or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        metric, filt = k.split(",", 1)
        if metric.endswith("_stderr"):
            stderr[f"{metric.removesuffix('_stderr')},{filt}"] = float(v)
        else:
            metrics[k] = float(v)
    return {"metrics": metrics, "stderr": stderr, "higher_is_better": {k: bool(v) for k, v in higher.items()},
            "samples": (samples or {}).get("effective")}


def _rows(s: TaskSpec, base: dict, edited: dict) -> list[dict]:
    rows = []
    for task in edited:
        key = _metric_key(s, task, edited[task]["metrics"])
        b, e = base[task]["metrics"][key], edited[task]["metrics"][key]
        rows.append({"task": task, "metric": key.removesuffix(",none"), "base": b, "edited": e, "change": e - b,
                     "base_stderr": base[task]["stderr"].get(key), "edited_stderr": edited[task]["stderr"].get(key),
                     "higher_is_better": edited[task]["higher_is_better"].get(key.split(",")[0]),
                     "samples": edited[task]["samples"]})
    return rows


def _metric_key(s: TaskSpec, task: str, metrics: dict) -> str:
    if not metrics:
        raise LMEvalError(f"--lm-eval {s.spec}: the harness reported no metric for {task}")
    if s.metric is None:
        return next(iter(metrics))
    for k in metrics:
        if s.metric in (k, k.split(",")[0]):
            return k
    have = ", ".join(k.removesuffix(",none") for k in metrics)
    raise LMEvalError(f"--lm-eval {s.spec}: {task} reports no metric {s.metric!r} (it reports {have})")


# ---------------------------------------------------------------------------------------------
# the cache of base results


def _base_key(model: nn.Module, tokenizer, version: str, limit, num_fewshot) -> dict:
    """What the base's scores depend on: every parameter (bytes, dtype, shape), the config without
    its path, the tokenizer, the device type, the harness version, ``limit`` and ``num_fewshot``."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for k in ("_name_or_path", "transformers_version"):
        config.pop(k, None)
    return {"parameters": weights_hash(dict(model.named_parameters())),
            "config": _sha(json.dumps(config, sort_keys=True, default=str)),
            "tokenizer": _tokenizer_hash(tokenizer), "device": _device(model).type,
            "harness_version": version, "limit": limit, "num_fewshot": num_fewshot}


def _task_key(key_fields: dict, s: TaskSpec) -> str:
    task = {"name": s.name, "yaml": _sha(s.path.read_text()) if s.path is not None else None}
    return _sha(json.dumps({**key_fields, "task": task}, sort_keys=True))


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(text + json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))


def _read_cache(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: run the harness again


# ---------------------------------------------------------------------------------------------
# small helpers


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _device(model: nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def _read_yaml(path: Path) -> dict:
    """A task YAML, tolerating the harness's tags (``!function utils.process``)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(), Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        raise LMEvalError(f"--lm-eval {path}: not a readable YAML file ({_line(e)})") from None
    return config if isinstance(config, dict) else {}


@contextlib.contextmanager
def _quiet():
    """The harness's info and warnings off (it warns that a model object, not a name, was passed)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _generators_kept():
    """``simple_evaluate`` seeds ``random``, NumPy and torch; give the caller's states back."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
