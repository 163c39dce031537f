"""Capability measurements (SPEC §2.3). The full evaluation suite arrives with the editor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .curvature import _hf_forward, _pad


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module, documents: Sequence[Sequence[int]], batch_size: int = 8, forward: Callable | None = None
) -> list[Tensor]:
    """Per document, float64 log-probabilities ``[len - 1, V]`` of the next token at each position."""
    forward = forward or _hf_forward(model)
    device = next(model.parameters()).device
    out: list[Tensor] = []
    for lo in range(0, len(documents), batch_size):
        docs = documents[lo : lo + batch_size]
        ids, attn, _ = _pad(docs, [[] for _ in docs], device)
        logp = torch.log_softmax(forward(ids, attn).to(torch.float64), -1)
        out.extend(logp[b, : len(d) - 1].cpu() for b, d in enumerate(docs))
    return out


def mean_kl(base: Sequence[Tensor], edited: Sequence[Tensor]) -> float:
    """Mean per-token ``KL(p_base ‖ p_edited)`` in nats over all positions of all documents."""
    total, count = 0.0, 0
    for lp, lq in zip(base, edited):
        total += float((lp.exp() * (lp - lq)).sum())
        count += lp.shape[0]
    return total / count


def perplexity(logprobs: Sequence[Tensor], documents: Sequence[Sequence[int]]) -> float:
    """``exp`` of the mean negative log-likelihood of the observed next tokens."""
    nll, count = 0.0, 0
    for lp, d in zip(logprobs, documents):
        nxt = torch.tensor(d[1:])
        nll -= float(lp[torch.arange(len(nxt)), nxt].sum())
        count += len(nxt)
    return float(torch.exp(torch.tensor(nll / count)))
