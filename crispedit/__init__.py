"""crispedit: low-curvature projections for non-destructive LLM editing (arXiv 2602.15823).

The public API, in the order a user meets it::

    model, tokenizer = load_model("path/or/hub-id")
    modules = find_modules(model, "auto")                      # {name: down_proj, ...}
    docs = read_documents(["wiki.txt"], tokenizer, max_length=512, max_documents=100)
    stats = collect(model, modules, docs, labels="sampled")    # K-FAC factors A, G
    session = EditSession.start(model, tokenizer, modules, MethodOptions(gamma=0.8), stats, docs)
    session.edit(read_requests("counterfact.json", tokenizer=tokenizer))   # one chunk; again for the next
    session.drift()                                            # ‖ΔW‖/‖W‖, K-FAC predicted KL per matrix

Names are imported on first use (PEP 562), so ``import crispedit`` and ``crispedit --help`` do not
import torch.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "read_documents": "corpus",
    "KFACStatistics": "curvature", "collect": "curvature", "load": "curvature", "merge": "curvature", "save": "curvature",
    "build_projectors": "editor", "drift_report": "editor", "edit": "editor", "eigenbases": "editor",
    "EditOptimizer": "editor",
    "measure": "evaluate", "prepare_reference": "evaluate",
    "auto_layers": "layers", "find_modules": "layers",
    "load_model": "model",
    "KroneckerProjector": "projector", "eigh_factor": "projector", "energy_threshold": "projector",
    "EditRequest": "requests", "read_requests": "requests",
    "apply_delta": "saving", "read_delta": "saving", "save_edit": "saving",
    "EditSession": "session",
    "MethodOptions": "options",
    "CapabilityBudget": "budget",
    "apply_closed_form": "memit", "MemitConfig": "memit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'crispedit' has no attribute {name!r}")
