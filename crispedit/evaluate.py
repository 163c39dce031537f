"""Evaluation: the generation and teacher-forced protocols, edit metrics before and
after, and capability drift."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .running import hf_forward, input_device, pad_batch, pad_id, swapped_weights

if TYPE_CHECKING:
    from .prefix import PrefixCache


# text_drift: positions whose float32 log-probabilities exist at once (at most three such arrays:
# the edited model's, the base's and their difference)
DRIFT_POSITIONS = 512


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


@torch.no_grad()
def text_drift(model: nn.Module, documents: Sequence[Sequence[int]], base_weights: dict[str, Tensor] | None = None,
               base_model: nn.Module | None = None, batch_size: int = 8, forward: Callable | None = None,
               max_positions: int = DRIFT_POSITIONS) -> dict:
    """Over every next-token position of ``documents``: perplexity of ``model`` and, when a base is
    given (``model`` with ``base_weights`` swapped in, or ``base_model``), the base's perplexity
    and the mean per-token ``KL(p_base ‖ p_model)`` in nats; ``documents`` and ``tokens`` (the
    next-token positions scored) say what it was measured on.

    Batch by batch, and within a batch ``max_positions`` positions at a time: the logits of a batch
    (``[B, T, V]`` in the model's dtype, the model's and the base's) are the only vocabulary-sized
    arrays that span it; the float32 log-probabilities ``log q``, ``log p`` and ``log p − log q``
    exist for one slice of positions at a time. Nothing of vocabulary size is kept between batches."""
    forward = forward or hf_forward(model)
    device = input_device(model)
    has_base = bool(base_weights) or base_model is not None
    nll = nll_base = kl = 0.0
    count = 0
    for lo in range(0, len(documents), batch_size):
        docs = documents[lo : lo + batch_size]
        ids, attn, rows = pad_batch(docs, [range(len(d) - 1) for d in docs], device)
        q = forward(ids, attn)
        p = None
        if has_base:
            if base_model is not None:
                there = input_device(base_model)  # a base loaded on another device (or map)
                p = hf_forward(base_model)(ids.to(there), attn.to(there))
            else:
                with swapped_weights(model, base_weights):
                    p = forward(ids, attn)
        V = q.shape[-1]
        q = q.reshape(-1, V)  # under a device_map everything below runs where the edited model's logits are
        p = p.reshape(-1, V).to(q.device) if p is not None else None
        nxt = torch.roll(ids, -1, dims=1).reshape(-1, 1).to(q.device)
        keep = rows.reshape(-1).to(q.device)
        for s in (slice(i, i + max_positions) for i in range(0, keep.numel(), max_positions)):
            lq = _log_probs(q[s])
            nll -= float(lq.gather(-1, nxt[s]).squeeze(-1)[keep[s]].double().sum())
            if p is not None:
                lp = _log_probs(p[s])
                nll_base -= float(lp.gather(-1, nxt[s]).squeeze(-1)[keep[s]].double().sum())
                diff = lp - lq
                del lq
                kl += float(lp.exp_().mul_(diff).sum(-1)[keep[s]].double().sum())  # Σ p (log p − log q)
                del lp, diff
        count += int(rows.sum())
    out = {"perplexity": math.exp(nll / count), "documents": len(documents), "tokens": count}
    if has_base:
        out.update(perplexity_base=math.exp(nll_base / count), kl=kl / count)
    return out


# ---------------------------------------------------------------------------------------------
# generation protocol (WILD): greedy, left padding, stop at the model's EOS, newline or ".",
# normalised exact match

MAX_NEW_TOKENS = 50
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse spaces."""
    import string

    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def _answer_end(text: str, answer: str | None = None) -> int | None:
    """Where the answer in ``text`` ends (see ``cut_answer``), or None while it has not ended."""
    head = text.split("\n", 1)[0]
    start = len(head) - len(head.lstrip())
    skip = len(answer.strip()) if answer and "." in answer else 0
    dot = head.find(".", start + skip)
    if dot >= 0:
        return dot
    return len(head) if len(head) < len(text) else None


def cut_answer(text: str, answer: str | None = None) -> str:
    """The generated answer: ``text`` up to the first newline or '.'.

    When the gold ``answer`` itself contains a '.' ("St. Louis", "J. R. R. Tolkien"), a '.' within
    the first ``len(answer)`` characters of the generated text does not end it; the first '.' from
    there on does (a newline always does). Why this is honest: the rule depends only on the gold
    answer and the generated text, so the base and the edited model are cut alike; without it such
    an answer could never be matched by anyone. It never shortens a generation to fit the gold:
    for gold "U.S." the text "U.S. Army." is cut to "U.S. Army" (the '.' at the gold's own length
    is skipped, not used), which does not match. A text matches only if it spells the gold out and
    then stops, exactly as for golds without a '.'."""
    end = _answer_end(text, answer)
    return (text if end is None else text[:end]).strip()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens, unless ``text`` already starts
    with the BOS token (a chat template's output): then none are added, so there is one BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def end_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the model's EOS (``generation_config``
    and ``config``; an instruct model's ``<|eot_id|>`` / ``<|im_end|>`` is usually only there) and
    every other special token of the tokenizer (no special token is part of an answer's text)."""
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
    sources = [getattr(tokenizer, "eos_token_id", None)]
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        sources.append(getattr(cfg, "eos_token_id", None))
    for eos in sources:
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def _decode(tokenizer, ids: Sequence[int], ends: set[int]) -> tuple[str, bool]:
    """The text of ``ids`` up to the first end token, and whether there was one."""
    ids = list(ids)
    cut = next((k for k, i in enumerate(ids) if i in ends), None)
    return tokenizer.decode(ids if cut is None else ids[:cut], skip_special_tokens=True), cut is not None


def _answer_stop(tokenizer, start: int, answers: Sequence[str | None], ends: set[int]):
    """A per-row stopping criterion: the row's answer has ended (end token, newline or '.')."""
    from transformers import StoppingCriteria

    class AnswerStop(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
            done = []
            for row, answer in zip(input_ids[:, start:].tolist(), answers):
                text, ended = _decode(tokenizer, row, ends)
                done.append(ended or _answer_end(text, answer) is not None)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return AnswerStop()


@contextlib.contextmanager
def _plain_generation_config(model: nn.Module, config):
    """``model.generation_config`` replaced by ``config`` for the duration. transformers fills every
    unset field of a passed config from ``model.generation_config`` (5.x: ``_prepare_generation_config``),
    so a checkpoint's repetition_penalty, no_repeat_ngram_size, suppress_tokens, bad_words_ids, ...
    would still apply to an explicit greedy config; with this swap nothing of the checkpoint's does."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = config
    try:
        yield config
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 64, progress: bool = False, answers: Sequence[str | None] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding), each cut at the answer's end: an EOS of
    the model or tokenizer (or any special token; nothing after it is kept), a newline, or '.'
    (see ``cut_answer`` for gold ``answers`` that contain a '.').

    Greedy means plain argmax decoding whatever the checkpoint's ``generation_config`` says
    (repetition penalties, banned n-grams, minimum lengths, suppressed tokens and sampling
    settings are all ignored). Prompts starting with BOS (chat templates) get no second BOS.
    Prompts are batched by length; a batched answer is the one-by-one answer."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, StoppingCriteriaList

    answers = list(answers) if answers is not None else [None] * len(prompts)
    if len(answers) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(answers)} answers")
    device = input_device(model)
    pad = pad_id(tokenizer)
    ends = end_ids(model, tokenizer)
    stops = set(ends)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=ends or None,
                              pad_token_id=pad, bos_token_id=getattr(tokenizer, "bos_token_id", None))
    enc = [encode_prompt(tokenizer, p) for p in prompts]
    out: list[str] = [""] * len(prompts)
    for batch in tqdm(_batches(enc, batch_size, _padding_is_safe(model)), desc="generate", unit="batch",
                      disable=not progress, leave=False):
        T = max(len(enc[k]) for k in batch)
        ids = torch.tensor([[pad] * (T - len(enc[k])) + enc[k] for k in batch], device=device)
        attn = torch.tensor([[0] * (T - len(enc[k])) + [1] * len(enc[k]) for k in batch], device=device)
        gold = [answers[k] for k in batch]
        stop = StoppingCriteriaList([_answer_stop(tokenizer, T, gold, stops)])
        with _plain_generation_config(model, config):
            gen = model.generate(input_ids=ids, attention_mask=attn, generation_config=config, stopping_criteria=stop)
        for k, row, answer in zip(batch, gen[:, T:].tolist(), gold):
            out[k] = cut_answer(_decode(tokenizer, row, stops)[0], answer)
    return out


def _batches(enc: Sequence[Sequence[int]], batch_size: int, pad: bool) -> list[list[int]]:
    """Indices of ``enc`` in batches of similar length (less padding); of equal length only
    where padding is unsafe (``pad`` False)."""
    order = sorted(range(len(enc)), key=lambda k: len(enc[k]))
    batches: list[list[int]] = []
    for k in order:
        if batches and len(batches[-1]) < batch_size and (pad or len(enc[batches[-1][0]]) == len(enc[k])):
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches


def _padding_is_safe(model: nn.Module) -> bool:
    """False for float64 weights under eager attention: transformers' eager attention (5.x) takes
    its softmax in float32, where a float64 mask's minimum becomes -inf, so a left-padded (fully
    masked) row turns to NaN, and 0·NaN reaches the real rows at the next layer."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return not (impl == "eager" and next(model.parameters()).dtype == torch.float64)


def exact_match(generated: str, answer: str) -> bool:
    return normalize_answer(generated) == normalize_answer(answer)


# ---------------------------------------------------------------------------------------------
# teacher-forced protocol (EasyEdit / AlphaEdit tables)

TEMPLATES = ("raw", "qa", "chat")


class EvaluationError(ValueError):
    """An evaluation option that cannot be honoured (e.g. a chat template the tokenizer lacks)."""


QA_TEMPLATE = "Please answer the question:\n\nQ: {q}\nA:"


def apply_template(tokenizer, prompt: str, template: str = "raw") -> str:
    """``raw``: the prompt; ``qa``: the paper's QA wrapper; ``chat``: the tokenizer's chat template."""
    if template == "raw":
        return prompt
    if template == "qa":
        return QA_TEMPLATE.format(q=prompt)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise EvaluationError("--template chat: this tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    raise EvaluationError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")


@torch.no_grad()
def teacher_forced(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 64, prefix: PrefixCache | None = None) -> list[tuple[list[int], list[int]]]:
    """Per pair, (argmax predictions, answer tokens) at the answer's positions under teacher forcing
    (right padding; a prompt that starts with BOS gets no second one, see ``encode_prompt``).
    ``prefix``: a ``PrefixCache`` of ``model``, to run only the blocks from its first on."""
    from .requests import edit_text

    device, pad = input_device(model), pad_id(tokenizer)
    out = []
    for lo in range(0, len(prompts), batch_size):
        items = []
        for p, a in zip(prompts[lo : lo + batch_size], answers[lo : lo + batch_size]):
            items.append((encode_prompt(tokenizer, edit_text(p, a)), len(encode_prompt(tokenizer, p))))
        T = max(len(x) for x, _ in items)
        ids = torch.tensor([x + [pad] * (T - len(x)) for x, _ in items], device=device)
        attn = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in items], device=device)
        logits = prefix.logits([x for x, _ in items], ids, attn) if prefix is not None else \
            model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        pred = logits.argmax(-1).cpu()
        for b, (x, n) in enumerate(items):
            out.append((pred[b, n - 1 : len(x) - 1].tolist(), x[n:]))
    return out


def token_accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


# ---------------------------------------------------------------------------------------------
# the edit metrics, before and after


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclass
class Snapshot:
    """What a model answers to every prompt of a request set (the base's answers define agreement)."""

    template: str
    generated: dict[str, list[str]]  # kind -> flat list of answers
    argmax: dict[str, list[list[int]]]  # teacher-forced predictions at the answer's positions
    gold: dict[str, list[list[int]]]  # the answer's tokens


def _prompt_sets(requests) -> dict[str, tuple[list[str], list[str], list[int]]]:
    """kind -> (prompts, answers, request index); answers of locality are the dataset's."""
    sets: dict[str, tuple[list[str], list[str], list[int]]] = {"reliability": ([], [], []), "generalization": ([], [], []), "locality": ([], [], [])}
    for i, r in enumerate(requests):
        sets["reliability"][0].append(r.prompt)
        sets["reliability"][1].append(r.target_new)
        sets["reliability"][2].append(i)
        for p in r.rephrase_prompts:
            sets["generalization"][0].append(p)
            sets["generalization"][1].append(r.target_new)
            sets["generalization"][2].append(i)
        for p, a in r.locality:
            sets["locality"][0].append(p)
            sets["locality"][1].append(a)
            sets["locality"][2].append(i)
    return sets


def snapshot(model: nn.Module, tokenizer, requests, template: str = "raw", batch_size: int = 64,
             progress: bool = False) -> Snapshot:
    gen, arg, gold = {}, {}, {}
    for kind, (prompts, answers, _) in _prompt_sets(requests).items():
        wrapped = [apply_template(tokenizer, p, template) for p in prompts]
        gen[kind] = generate(model, tokenizer, wrapped, batch_size=batch_size, progress=progress,
                             answers=answers) if wrapped else []
        tf = teacher_forced(model, tokenizer, wrapped, answers, batch_size) if wrapped else []
        arg[kind], gold[kind] = [p for p, _ in tf], [g for _, g in tf]
    return Snapshot(template, gen, arg, gold)


def score_requests(model: nn.Module, tokenizer, requests, base: Snapshot, batch_size: int = 64,
                   progress: bool = False, now: Snapshot | None = None) -> dict:
    """Per request and averaged: reliability, generalisation, locality (agreement with ``base`` and
    accuracy against the dataset answer), each under the generation and teacher-forced protocols.
    ``now``: the model's snapshot when already taken (the base scoring itself reuses ``base``)."""
    template = base.template
    if now is None:
        now = snapshot(model, tokenizer, requests, template, batch_size, progress)
    elif now.template != template:
        raise EvaluationError(f"score_requests: a snapshot under template {now.template!r} cannot be scored "
                              f"against one under {template!r}")
    sets = _prompt_sets(requests)
    rows = [{"case_id": r.case_id} for r in requests]
    per: dict[tuple[str, str], list[list[float]]] = {}

    def add(metric: str, protocol: str, i: int, value: float) -> None:
        per.setdefault((metric, protocol), [[] for _ in requests])[i].append(value)

    for kind, (_, answers, owner) in sets.items():
        for k, i in enumerate(owner):  # the generated text itself, per request and prompt kind
            rows[i].setdefault(f"{kind}/generated", []).append(now.generated[kind][k])
            gen_ok = float(exact_match(now.generated[kind][k], answers[k]))
            tf_acc = token_accuracy(now.argmax[kind][k], now.gold[kind][k])
            if kind == "locality":
                add("locality_accuracy", "generation", i, gen_ok)
                add("locality_accuracy", "teacher_forced", i, tf_acc)
                add("locality_agreement", "generation", i, float(normalize_answer(now.generated[kind][k]) == normalize_answer(base.generated[kind][k])))
                add("locality_agreement", "teacher_forced", i, token_accuracy(now.argmax[kind][k], base.argmax[kind][k]))
            else:
                add(kind, "generation", i, gen_ok)
                add(kind, "teacher_forced", i, tf_acc)
    metrics = []
    for (metric, protocol), values in per.items():
        per_request = [_mean(v) for v in values]
        for row, v in zip(rows, per_request):
            row[f"{metric}/{protocol}"] = v
        present = [v for v in per_request if v is not None]
        metrics.append({"metric": metric, "protocol": protocol, "template": template,
                        "value": _mean(present), "n": len(present)})
    return {"metrics": metrics, "per_request": rows, "generations": now.generated}


def metric(report: dict, name: str, protocol: str = "generation") -> float | None:
    """One averaged number out of ``score_requests``' report."""
    for m in report["metrics"]:
        if m["metric"] == name and m["protocol"] == protocol:
            return m["value"]
    return None


# ---------------------------------------------------------------------------------------------
# capability


def known_fact_pairs(facts) -> tuple[list[tuple[str, str]], str | None]:
    """Request records as known facts ``(prompt, true answer)``, and the field the answer comes from:
    ``ground_truth`` when the records have one (CounterFact, ZsRE: the true answer, not the
    counterfactual ``target_new``), else ``target_new`` (files of true facts, where it holds the
    truth). Records with and without a ``ground_truth`` are not mixed: that is an error. ``None``
    for no facts."""
    facts = list(facts)
    has = [bool(getattr(f, "ground_truth", None)) for f in facts]
    if not facts:
        return [], None
    if any(has) and not all(has):
        raise EvaluationError(f"--known-facts: {sum(has)} of {len(facts)} records have a ground_truth and "
                              f"{len(facts) - sum(has)} do not; give records of one kind")
    field_ = "ground_truth" if all(has) else "target_new"
    return [(f.prompt, getattr(f, field_)) for f in facts], field_


def known_facts_filter(model: nn.Module, tokenizer, facts, batch_size: int = 64, progress: bool = False) -> list:
    """The facts (request records, answered as ``known_fact_pairs`` says) that the model answers
    correctly by greedy generation."""
    facts = list(facts)
    pairs, _ = known_fact_pairs(facts)
    if not pairs:
        return []
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    generated = generate(model, tokenizer, prompts, batch_size=batch_size, progress=progress, answers=answers)
    return [f for f, g, a in zip(facts, generated, answers) if exact_match(g, a)]


def known_facts_accuracy(model: nn.Module, tokenizer, facts, batch_size: int = 64, progress: bool = False) -> float | None:
    if not facts:
        return None
    return len(known_facts_filter(model, tokenizer, facts, batch_size, progress)) / len(facts)


@dataclass
class BaseReference:
    """Everything measured once on the base model, against which an edited model is scored."""

    requests: list
    snapshot: Snapshot | None
    heldout: list[list[int]]
    corpus: list[list[int]]
    known_facts: list  # filtered to those the base model answers correctly
    known_facts_total: int
    base_weights: dict[str, Tensor]  # the edited matrices as they were (to compute KL by swapping)
    before: dict = field(default_factory=dict)  # the base model's own scores
    known_facts_answer_field: str | None = None  # which record field the known facts are scored on


def _known_facts_report(ref: BaseReference, accuracy: float | None) -> dict:
    field_ = ref.known_facts_answer_field or known_fact_pairs(ref.known_facts)[1]
    return {"known_facts_accuracy": accuracy, "known_facts_count": len(ref.known_facts),
            "known_facts_offered": ref.known_facts_total, "known_facts_protocol": "generation",
            "known_facts_answer_field": field_}


def prepare_reference(model: nn.Module, tokenizer, requests, template: str = "raw", heldout=(), corpus=(),
                      known_facts=(), modules: dict[str, nn.Module] | None = None, batch_size: int = 64,
                      progress: bool = False) -> BaseReference:
    """The base model's answers, and a copy of the matrices in ``modules`` (those about to be
    edited), so that drift can later be measured on the same model with its base weights swapped in.

    ``ref.before`` holds the base's own scores, each computed once: its edit metrics from the one
    snapshot (agreement with itself is 1 by definition), its held-out perplexity and the counts; no
    KL of the base against itself. Its known-facts accuracy is 1 by construction (the known facts
    are those it answers correctly; ``known_facts_count`` of ``known_facts_offered``)."""
    known_facts = list(known_facts)
    _, answer_field = known_fact_pairs(known_facts)
    snap = snapshot(model, tokenizer, requests, template, batch_size, progress) if requests else None
    known = known_facts_filter(model, tokenizer, known_facts, batch_size, progress) if known_facts else []
    base_weights = {n: m.weight.detach().clone() for n, m in (modules or {}).items()}
    ref = BaseReference(list(requests), snap, list(heldout), list(corpus), known, len(known_facts), base_weights,
                        known_facts_answer_field=answer_field)
    before: dict = {"metrics": [], "per_request": []}
    if snap is not None:
        scored = score_requests(model, tokenizer, ref.requests, snap, batch_size, progress, now=snap)
        before.update(metrics=scored["metrics"], per_request=scored["per_request"])
    cap = before["capability"] = {}
    if ref.heldout:
        d = text_drift(model, ref.heldout)
        cap.update(heldout_perplexity=d["perplexity"], heldout_documents=d["documents"], heldout_tokens=d["tokens"])
    if ref.known_facts_total:
        cap.update(_known_facts_report(ref, 1.0 if known else None))
    ref.before = before
    return ref


def measure(model: nn.Module, tokenizer, ref: BaseReference, base_model: nn.Module | None = None,
            batch_size: int = 64, progress: bool = False) -> dict:
    """Edit metrics (both protocols) and capability: perplexity change and KL on held-out text,
    KL on the curvature corpus, accuracy on known unedited facts. Every number is tagged, with the
    documents and next-token positions it was measured on. The base for KL is ``model`` with
    ``ref.base_weights`` swapped in, or ``base_model``."""
    out: dict = {"metrics": [], "per_request": []}
    if ref.snapshot is not None:
        scored = score_requests(model, tokenizer, ref.requests, ref.snapshot, batch_size, progress)
        out.update(metrics=scored["metrics"], per_request=scored["per_request"])
    cap = out["capability"] = {}
    base = dict(base_weights=ref.base_weights, base_model=base_model)
    if ref.heldout:
        d = text_drift(model, ref.heldout, **base)
        cap.update(heldout_perplexity=d["perplexity"], heldout_documents=d["documents"], heldout_tokens=d["tokens"])
        if "kl" in d:
            cap["heldout_perplexity_base"] = d["perplexity_base"]
            cap["heldout_perplexity_change"] = d["perplexity"] / d["perplexity_base"] - 1
            cap["heldout_kl"] = d["kl"]
    if ref.corpus and (ref.base_weights or base_model is not None):
        d = text_drift(model, ref.corpus, **base)
        cap.update(corpus_kl=d["kl"], corpus_documents=d["documents"], corpus_tokens=d["tokens"])
    if ref.known_facts_total:
        cap.update(_known_facts_report(ref, known_facts_accuracy(model, tokenizer, ref.known_facts, batch_size, progress)))
    return out
