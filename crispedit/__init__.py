"""crispedit: low-curvature projections for non-destructive LLM editing (arXiv 2602.15823)."""

__version__ = "0.1.0"
