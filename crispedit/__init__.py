"""crispedit: low-curvature projections for non-destructive LLM editing (arXiv 2602.15823).

The public API, in the order a user meets it::

    model, tokenizer = load_model("path/or/hub-id")
    modules = find_modules(model, "auto")                      # {name: down_proj, ...}
    docs = read_documents(["wiki.txt"], tokenizer, max_length=512, max_documents=100)
    stats = collect(model, modules, docs, labels="sampled")    # K-FAC factors A, G
    save(stats, "curvature/")
    P = KroneckerProjector.from_factors(stats.A[name], stats.G[name], gamma=0.8)
    step = P.project(gradient)                                 # low-curvature part of a gradient
"""

__version__ = "0.1.0"

from .corpus import read_documents
from .curvature import KFACStatistics, collect, load, merge, save
from .layers import auto_layers, find_modules
from .model import load_model
from .projector import KroneckerProjector, eigh_factor, energy_threshold

__all__ = [
    "KFACStatistics",
    "KroneckerProjector",
    "auto_layers",
    "collect",
    "eigh_factor",
    "energy_threshold",
    "find_modules",
    "load",
    "load_model",
    "merge",
    "read_documents",
    "save",
]
