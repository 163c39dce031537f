"""Evaluation: answer normalisation, the two protocols, templates, and agreement with the base."""

from __future__ import annotations

import pytest
import torch

from crispedit.evaluate import (EvaluationError, QA_TEMPLATE, apply_template, cut_answer, exact_match, mean_kl,
                                normalize_answer, perplexity, prepare_reference, score_requests, snapshot,
                                teacher_forced, metric)
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


def test_capability_measures():
    model = tiny_hf("llama", layers=2, std=0.1)
    docs = [TOK("the cat sat on the mat.")["input_ids"], TOK("a dog ran.")["input_ids"]]
    ref = prepare_reference(model, TOK, [], heldout=docs, corpus=docs)
    cap = ref.before["capability"]
    assert cap["heldout_kl"] == pytest.approx(0.0, abs=1e-12) and cap["heldout_perplexity_change"] == pytest.approx(0.0, abs=1e-12)
    lp = ref.heldout_logprobs
    nll = -sum(float(l[torch.arange(len(d) - 1), torch.tensor(d[1:])].sum()) for l, d in zip(lp, docs))
    assert perplexity(lp, docs) == pytest.approx(float(torch.exp(torch.tensor(nll / sum(len(d) - 1 for d in docs)))), rel=1e-6)
    shifted = [l.roll(1, -1) for l in lp]
    assert mean_kl(lp, shifted) > 0
