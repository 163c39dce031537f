"""Scoring an editing history after each chunk: are the edits still there, and what did they cost?

After chunk K, by greedy generation (exact match after normalisation): reliability on every edit so
far (or a fixed seeded sample of ``sample`` of them), reliability on the first chunk alone (what
forgetting looks like), rephrases of the same sample, accuracy on known facts that were never edited,
and the mean per-token KL(base ‖ edited) on held-out text next to its K-FAC prediction (the capability
factors at the base, cumulative update). Every number says how many prompts or tokens it is over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .evaluate import apply_template, exact_match, generate, known_facts_accuracy, text_drift
from .requests import EditRequest


def _rank(seed: int, r: EditRequest) -> str:
    """A fixed pseudo-random rank per request: the sample of the first K chunks is stable as K grows."""
    return hashlib.sha256(f"{seed}|{r.case_id}|{r.prompt}|{r.target_new}".encode()).hexdigest()


def sample(requests: Sequence[EditRequest], size: int, seed: int = 0) -> list[EditRequest]:
    """At most ``size`` of ``requests``, the same ones whatever came after them."""
    if len(requests) <= size:
        return list(requests)
    return sorted(requests, key=lambda r: _rank(seed, r))[:size]


def reliability(model, tokenizer, requests: Sequence[EditRequest], template: str = "raw", rephrases: bool = False) -> tuple[float | None, int]:
    """Share of prompts (or of their rephrases) answered with ``target_new``, and how many were asked."""
    pairs = [(p, r.target_new) for r in requests for p in (r.rephrase_prompts if rephrases else [r.prompt])]
    if not pairs:
        return None, 0
    prompts = [apply_template(tokenizer, p, template) for p, _ in pairs]
    answers = [a for _, a in pairs]
    got = generate(model, tokenizer, prompts, answers=answers)
    return sum(exact_match(g, a) for g, a in zip(got, answers)) / len(pairs), len(pairs)


class HistoryProbe:
    """What a history is scored on after each chunk; ``known_facts`` are those the base answered
    correctly (``evaluate.known_facts_filter``), ``heldout`` held-out documents (token ids)."""

    def __init__(self, tokenizer, known_facts: Sequence[EditRequest] = (), heldout: Sequence[Sequence[int]] = (),
                 size: int = 500, seed: int = 0, template: str = "raw"):
        self.tokenizer = tokenizer
        self.known_facts = list(known_facts)
        self.heldout = [list(d) for d in heldout]
        self.size, self.seed, self.template = size, seed, template

    def score(self, session) -> dict:
        model, tok = session.model, self.tokenizer
        edited = [r for _, r in session.requests]
        first = [r for c, r in session.requests if c == 0]
        picked = sample(edited, self.size, self.seed)
        out: dict = {"edits": len(edited), "protocol": "generation", "template": self.template}
        out["reliability"], out["reliability_n"] = reliability(model, tok, picked, self.template)
        out["first_chunk_reliability"], out["first_chunk_n"] = reliability(model, tok, sample(first, self.size, self.seed),
                                                                          self.template)
        out["rephrase"], out["rephrase_n"] = reliability(model, tok, picked, self.template, rephrases=True)
        if self.known_facts:
            out["known_facts_accuracy"] = known_facts_accuracy(model, tok, self.known_facts)
            out["known_facts_n"] = len(self.known_facts)
        if self.heldout:
            d = text_drift(model, self.heldout, base_weights=session.base)
            out.update(heldout_kl=d["kl"], heldout_tokens=d["tokens"],
                       heldout_perplexity_change=d["perplexity"] / d["perplexity_base"] - 1)
        drift = session.drift()
        if drift:
            out["predicted_kl"] = drift["total"]["predicted_kl"]
        return out
