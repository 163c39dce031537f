"""crispedit: low-curvature projections for non-destructive LLM editing (arXiv 2602.15823).

The public API, in the order a user meets it::

    model, tokenizer = load_model("path/or/hub-id")
    modules = find_modules(model, "auto")                      # {name: down_proj, ...}
    docs = read_documents(["wiki.txt"], tokenizer, max_length=512, max_documents=100)
    stats = collect(model, modules, docs, labels="sampled")    # K-FAC factors A, G
    eig = eigenbases(stats)
    projectors = build_projectors(eig, "crispedit", gamma=0.8)
    requests = read_requests("counterfact.json", tokenizer=tokenizer)
    ref = prepare_reference(model, tokenizer, requests)        # the base model's answers
    result = edit(model, tokenizer, requests, modules, projectors)
    scores = measure(model, tokenizer, ref)
"""

__version__ = "0.1.0"

from .corpus import read_documents
from .curvature import KFACStatistics, collect, load, merge, save
from .editor import build_projectors, drift_report, edit, eigenbases
from .evaluate import measure, prepare_reference
from .layers import auto_layers, find_modules
from .model import load_model
from .projector import KroneckerProjector, eigh_factor, energy_threshold
from .requests import EditRequest, read_requests
from .saving import apply_delta, read_delta, save_edit

__all__ = [
    "EditRequest",
    "KFACStatistics",
    "KroneckerProjector",
    "apply_delta",
    "auto_layers",
    "build_projectors",
    "collect",
    "drift_report",
    "edit",
    "eigenbases",
    "eigh_factor",
    "energy_threshold",
    "find_modules",
    "load",
    "load_model",
    "measure",
    "merge",
    "prepare_reference",
    "read_delta",
    "read_documents",
    "read_requests",
    "save",
    "save_edit",
]
