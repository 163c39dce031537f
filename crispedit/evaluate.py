"""Capability measurements (SPEC §2.3). The full evaluation suite arrives with the editor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .running import hf_forward, input_device, pad_batch, pad_id, swapped_weights


@torch.no_grad()
def text_drift(model: nn.Module, documents: Sequence[Sequence[int]], base_weights: dict[str, Tensor] | None = None,
               base_model: nn.Module | None = None, batch_size: int = 8, forward: Callable | None = None) -> dict:
    """Over every next-token position of ``documents``: perplexity of ``model`` and, when a base is
    given (``model`` with ``base_weights`` swapped in, or ``base_model``), the base's perplexity
    and the mean per-token ``KL(p_base ‖ p_model)`` in nats. Batch by batch: nothing of
    vocabulary size is kept between batches."""
    forward = forward or hf_forward(model)
    device = input_device(model)
    has_base = bool(base_weights) or base_model is not None
    nll = nll_base = kl = 0.0
    count = 0
    for lo in range(0, len(documents), batch_size):
        docs = documents[lo : lo + batch_size]
        ids, attn, rows = pad_batch(docs, [range(len(d) - 1) for d in docs], device)
        nxt = torch.roll(ids, -1, dims=1).unsqueeze(-1)

        def logprobs(fw):
            logits = fw(ids, attn)
            return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)

        lq = logprobs(forward)
        nll -= float(lq.gather(-1, nxt).squeeze(-1)[rows].double().sum())
        count += int(rows.sum())
        if has_base:
            if base_model is not None:
                lp = logprobs(hf_forward(base_model))
            else:
                with swapped_weights(model, base_weights):
                    lp = logprobs(forward)
            nll_base -= float(lp.gather(-1, nxt).squeeze(-1)[rows].double().sum())
            kl += float((lp.exp() * (lp - lq)).sum(-1)[rows].double().sum())
    out = {"perplexity": math.exp(nll / count), "tokens": count}
    if has_base:
        out.update(perplexity_base=math.exp(nll_base / count), kl=kl / count)
    return out


# ---------------------------------------------------------------------------------------------
# generation protocol (WILD): greedy, left padding, stop at newline or ".", normalised exact match

MAX_NEW_TOKENS = 50
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse spaces."""
    import string

    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def cut_answer(text: str) -> str:
    """The generated answer up to the first newline or '.'."""
    for stop in ("\n", "."):
        text = text.split(stop, 1)[0]
    return text.strip()


def _stop_ids(tokenizer) -> list[int]:
    """Token ids whose text contains '.' or a newline (generation can stop there)."""
    cached = getattr(tokenizer, "_crispedit_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = [i for i, t in enumerate(texts) if "." in t or "\n" in t]
        tokenizer._crispedit_stop_ids = cached
    return cached


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding), cut at the first newline or '.'."""
    from tqdm.auto import tqdm

    device = input_device(model)
    pad = pad_id(tokenizer)
    stops = _stop_ids(tokenizer)
    out: list[str] = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress, leave=False):
        enc = [tokenizer(p)["input_ids"] for p in prompts[lo : lo + batch_size]]
        T = max(len(e) for e in enc)
        ids = torch.tensor([[pad] * (T - len(e)) + e for e in enc], device=device)
        attn = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc], device=device)
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=stops or None)
        texts = tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True)
        out.extend(cut_answer(t) for t in texts)
    return out


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
                   batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """Per pair, (argmax predictions, answer tokens) at the answer's positions under teacher forcing."""
    from .requests import edit_text

    device, pad = input_device(model), pad_id(tokenizer)
    out = []
    for lo in range(0, len(prompts), batch_size):
        items = []
        for p, a in zip(prompts[lo : lo + batch_size], answers[lo : lo + batch_size]):
            n_prompt = len(tokenizer(p)["input_ids"])
            items.append((tokenizer(edit_text(p, a))["input_ids"], n_prompt))
        T = max(len(x) for x, _ in items)
        ids = torch.tensor([x + [pad] * (T - len(x)) for x, _ in items], device=device)
        attn = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in items], device=device)
        pred = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.argmax(-1).cpu()
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
        gen[kind] = generate(model, tokenizer, wrapped, batch_size=batch_size, progress=progress) if wrapped else []
        tf = teacher_forced(model, tokenizer, wrapped, answers, batch_size) if wrapped else []
        arg[kind], gold[kind] = [p for p, _ in tf], [g for _, g in tf]
    return Snapshot(template, gen, arg, gold)


def score_requests(model: nn.Module, tokenizer, requests, base: Snapshot, batch_size: int = 64,
                   progress: bool = False) -> dict:
    """Per request and averaged: reliability, generalisation, locality (agreement with ``base`` and
    accuracy against the dataset answer), each under the generation and teacher-forced protocols."""
    template = base.template
    now = snapshot(model, tokenizer, requests, template, batch_size, progress)
    sets = _prompt_sets(requests)
    rows = [{"case_id": r.case_id} for r in requests]
    per: dict[tuple[str, str], list[list[float]]] = {}

    def add(metric: str, protocol: str, i: int, value: float) -> None:
        per.setdefault((metric, protocol), [[] for _ in requests])[i].append(value)

    for kind, (_, answers, owner) in sets.items():
        for k, i in enumerate(owner):
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


def known_facts_filter(model: nn.Module, tokenizer, facts, batch_size: int = 64, progress: bool = False) -> list:
    """The facts (request records whose ``target_new`` is the true answer) that the model answers
    correctly by greedy generation."""
    answers = generate(model, tokenizer, [f.prompt for f in facts], batch_size=batch_size, progress=progress)
    return [f for f, a in zip(facts, answers) if exact_match(a, f.target_new)]


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


def prepare_reference(model: nn.Module, tokenizer, requests, template: str = "raw", heldout=(), corpus=(),
                      known_facts=(), modules: dict[str, nn.Module] | None = None, batch_size: int = 64,
                      progress: bool = False) -> BaseReference:
    """The base model's answers, and a copy of the matrices in ``modules`` (those about to be
    edited), so that drift can later be measured on the same model with its base weights swapped in."""
    snap = snapshot(model, tokenizer, requests, template, batch_size, progress) if requests else None
    known = known_facts_filter(model, tokenizer, list(known_facts), batch_size, progress) if known_facts else []
    base_weights = {n: m.weight.detach().clone() for n, m in (modules or {}).items()}
    ref = BaseReference(list(requests), snap, list(heldout), list(corpus), known, len(known_facts), base_weights)
    ref.before = measure(model, tokenizer, ref, batch_size=batch_size, progress=progress)
    return ref


def measure(model: nn.Module, tokenizer, ref: BaseReference, base_model: nn.Module | None = None,
            batch_size: int = 64, progress: bool = False) -> dict:
    """Edit metrics (both protocols) and capability: perplexity change and KL on held-out text,
    KL on the curvature corpus, accuracy on known unedited facts. Every number is tagged. The base
    for KL is ``model`` with ``ref.base_weights`` swapped in, or ``base_model``."""
    out: dict = {"metrics": [], "per_request": []}
    if ref.snapshot is not None:
        scored = score_requests(model, tokenizer, ref.requests, ref.snapshot, batch_size, progress)
        out.update(metrics=scored["metrics"], per_request=scored["per_request"])
    cap = out["capability"] = {}
    base = dict(base_weights=ref.base_weights, base_model=base_model)
    if ref.heldout:
        d = text_drift(model, ref.heldout, **base)
        cap["heldout_perplexity"] = d["perplexity"]
        if "kl" in d:
            cap["heldout_perplexity_base"] = d["perplexity_base"]
            cap["heldout_perplexity_change"] = d["perplexity"] / d["perplexity_base"] - 1
            cap["heldout_kl"] = d["kl"]
    if ref.corpus and (ref.base_weights or base_model is not None):
        cap["corpus_kl"] = text_drift(model, ref.corpus, **base)["kl"]
    if ref.known_facts_total:
        cap["known_facts_accuracy"] = known_facts_accuracy(model, tokenizer, ref.known_facts, batch_size, progress)
        cap["known_facts_count"] = len(ref.known_facts)
        cap["known_facts_offered"] = ref.known_facts_total
        cap["known_facts_protocol"] = "generation"
    return out
