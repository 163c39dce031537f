"""Evaluation: answer normalisation, the two protocols, templates, and agreement with the base."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit.evaluate import (EvaluationError, QA_TEMPLATE, apply_template, cut_answer, exact_match, measure, metric,
                                normalize_answer, prepare_reference, score_requests, snapshot, teacher_forced,
                                text_drift)
from crispedit.layers import find_modules
from crispedit.requests import EditRequest
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()


def test_normalisation_and_cutting():
    assert normalize_answer("  The  Eiffel-Tower, ") == "eiffeltower"
    assert normalize_answer("an apple") == "apple"
    assert cut_answer(" Paris. It is big") == "Paris"
    assert cut_answer(" Rome\nNext") == "Rome"
    assert exact_match(" the Louvre.", "Louvre") and not exact_match("Louvre museum", "Louvre")


def test_templates():
    assert apply_template(TOK, "who is ab", "raw") == "who is ab"
    assert apply_template(TOK, "who is ab", "qa") == QA_TEMPLATE.format(q="who is ab")
    with pytest.raises(EvaluationError, match="no chat template"):
        apply_template(TOK, "who is ab", "chat")
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} a:{% endif %}"
    assert apply_template(tok, "who is ab", "chat") == "<s>who is ab a:"
    with pytest.raises(EvaluationError, match="--template"):
        apply_template(TOK, "x", "markdown")


def test_teacher_forced_predictions_are_at_the_answer_positions():
    model = tiny_hf("llama", layers=2)
    (pred, gold), = teacher_forced(model, TOK, ["the cat sat on the"], ["mat"])
    assert gold == TOK("the cat sat on the mat")["input_ids"][-4:]  # " mat"
    ids = torch.tensor([TOK("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        argmax = model(input_ids=ids).logits.argmax(-1)[0]
    assert pred == argmax[-5:-1].tolist()


def test_an_unchanged_model_agrees_with_itself_and_scores_are_tagged():
    model = tiny_hf("llama", layers=2, std=0.1)
    reqs = [EditRequest("the cat sat on the", "mat", rephrase_prompts=["a cat sat on the"], locality=[("we ate some", "bread")]),
            EditRequest("a dog ran to the", "park", locality=[("it was a", "day")])]
    base = snapshot(model, TOK, reqs, "qa")
    report = score_requests(model, TOK, reqs, base)
    assert metric(report, "locality_agreement", "generation") == 1.0
    assert metric(report, "locality_agreement", "teacher_forced") == 1.0
    assert {m["template"] for m in report["metrics"]} == {"qa"}
    gen = [m for m in report["metrics"] if m["metric"] == "generalization"]
    assert all(m["n"] == 1 for m in gen)  # only the first request has a rephrase
    assert len(report["per_request"]) == 2 and "reliability/generation" in report["per_request"][0]


def test_capability_measures_against_a_direct_computation():
    model = tiny_hf("llama", layers=2, std=0.1)
    docs = [TOK("the cat sat on the mat.")["input_ids"], TOK("a dog ran.")["input_ids"]]
    modules = find_modules(model, [1])
    ref = prepare_reference(model, TOK, [], heldout=docs, corpus=docs, modules=modules)
    cap = ref.before["capability"]
    # the base is measured once: its perplexity and what it was measured on, no KL against itself
    assert not {"heldout_kl", "heldout_perplexity_base", "heldout_perplexity_change", "corpus_kl"} & set(cap)
    n = sum(len(d) - 1 for d in docs)
    assert cap["heldout_documents"] == 2 and cap["heldout_tokens"] == n
    with torch.no_grad():
        base = [torch.log_softmax(model(input_ids=torch.tensor([d])).logits[0, :-1].double(), -1) for d in docs]
    nll_base = -sum(float(p[torch.arange(len(d) - 1), torch.tensor(d[1:])].sum()) for p, d in zip(base, docs)) / n
    assert cap["heldout_perplexity"] == pytest.approx(math.exp(nll_base), rel=1e-9)
    with torch.no_grad():
        modules["model.layers.1.mlp.down_proj"].weight.add_(0.05)
        edited = [torch.log_softmax(model(input_ids=torch.tensor([d])).logits[0, :-1].double(), -1) for d in docs]
    kl = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(base, edited)) / n
    nll = -sum(float(q[torch.arange(len(d) - 1), torch.tensor(d[1:])].sum()) for q, d in zip(edited, docs)) / n
    d = text_drift(model, docs, base_weights=ref.base_weights, batch_size=1)
    assert d["kl"] == pytest.approx(kl, rel=1e-9) and d["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)
    assert text_drift(model, docs, base_weights=ref.base_weights, batch_size=2)["kl"] == pytest.approx(kl, rel=1e-6)  # padding
    after = measure(model, TOK, ref)["capability"]
    assert after["heldout_kl"] == pytest.approx(kl, rel=1e-6) and after["heldout_kl"] > 0
    assert after["heldout_perplexity_base"] == pytest.approx(cap["heldout_perplexity"], rel=1e-12)
    assert (after["heldout_documents"], after["heldout_tokens"], after["corpus_documents"], after["corpus_tokens"]) == (2, n, 2, n)
    base_model = tiny_hf("llama", layers=2, std=0.1)  # the same seed: the base, as a separate model
    assert text_drift(model, docs, base_model=base_model)["kl"] == pytest.approx(kl, rel=1e-6)
