"""The generation protocol on chat / instruct checkpoints: the model's own EOS ends an answer,
greedy is plain argmax whatever the checkpoint's generation_config says, one BOS per prompt, gold
answers containing '.', batching that changes nothing, and the base measured once."""

from __future__ import annotations

import pytest
import torch

import crispedit.evaluate as ev
from crispedit.evaluate import (EvaluationError, apply_template, cut_answer, encode_prompt, exact_match, generate,
                                known_fact_pairs, known_facts_filter, measure, metric, prepare_reference, score_requests,
                                snapshot, teacher_forced)
from crispedit.requests import EditRequest
from models import tiny_hf

CHARS = "abcdefghijklmnopqrstuvwxyz .,'"
EOT, IM_END = 33, 34  # "<|eot|>" (special), "<|im_end|>" (an ordinary added token, as in some instruct vocabularies)
VOCAB = 35
CHAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} a:{% endif %}"


def tokenizer(eos: str = "</s>", chat_template: str | None = None):
    """Characters, BOS added, decoding that concatenates (so answers read as text)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)},
             "<|eot|>": EOT, "<|im_end|>": IM_END}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                                  additional_special_tokens=["<|eot|>"] if eos != "<|eot|>" else None)
    out.add_tokens([AddedToken("<|im_end|>", special=False)])
    out.chat_template = chat_template
    return out


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def bigram_llama(tok, table: dict[str, str]):
    """A one-layer LLaMA that is a bigram model: attention and MLP write nothing, the embedding is
    one-hot and ``lm_head`` puts the next token of ``table`` on top (ties, for tokens not in the
    table, go to id 0 = <unk>). Its greedy continuation is known exactly."""
    model = tiny_hf("llama", layers=1, vocab=VOCAB, hidden_size=40, intermediate_size=8, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=128)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :VOCAB] = torch.eye(VOCAB, dtype=torch.float64)
        for a, b in table.items():
            (i,), (j,) = ids(tok, a), ids(tok, b)
            model.lm_head.weight[j, i] = 1.0
    return model


def chain(text: str) -> dict[str, str]:
    return {a: b for a, b in zip(text, text[1:])}


def argmax_answers(model, tok, prompts, answers=None, steps: int = ev.MAX_NEW_TOKENS) -> list[str]:
    """The reference: one prompt at a time, no padding, no cache, plain argmax for ``steps`` tokens,
    cut at the first end token and then by ``cut_answer``."""
    ends = set(ev.end_ids(model, tok))
    out = []
    for k, p in enumerate(prompts):
        x = encode_prompt(tok, p)
        n = len(x)
        with torch.no_grad():
            for _ in range(steps):
                x.append(int(model(input_ids=torch.tensor([x])).logits[0, -1].argmax()))
        new = x[n:]
        new = new[: next((i for i, t in enumerate(new) if t in ends), len(new))]
        out.append(cut_answer(tok.decode(new), None if answers is None else answers[k]))
    return out


# --- 1. the model's own EOS ------------------------------------------------------------------

def test_generation_stops_at_the_tokenizers_eos_and_keeps_nothing_after_it():
    tok = tokenizer(eos="<|eot|>")
    model = bigram_llama(tok, {"b": "c", "c": "<|eot|>", "<|eot|>": "x", **chain("xyzx")})
    assert model.generation_config.eos_token_id == 2  # the checkpoint's config knows nothing of <|eot|>
    assert generate(model, tok, ["ab"]) == ["c"]
    # without it, decoding runs past <|eot|> and glues what follows onto the answer
    raw = model.generate(input_ids=torch.tensor([encode_prompt(tok, "ab")]), max_new_tokens=5, do_sample=False)
    assert tok.decode(raw[0, 3:], skip_special_tokens=True) == "cxyz"


def test_generation_stops_at_every_eos_of_the_models_generation_config():
    tok = tokenizer()  # EOS </s>; <|im_end|> is an ordinary token to this tokenizer
    model = bigram_llama(tok, {"b": "c", "c": "<|im_end|>", "<|im_end|>": "x", **chain("xyzx"), "q": "d", "d": "."})
    assert tok.eos_token_id == 2 and IM_END not in tok.all_special_ids
    model.generation_config.eos_token_id = [2, IM_END]  # as an instruct checkpoint lists them
    assert IM_END in ev.end_ids(model, tok)
    assert generate(model, tok, ["ab", "q"]) == ["c", "d"]  # and '.' still ends an answer
    model.generation_config.eos_token_id = 2
    assert generate(model, tok, ["ab"]) == ["c<|im_end|>" + "xyz" * 16]  # without it: glued, 50 tokens long


# --- 2. greedy means greedy --------------------------------------------------------------------

def test_greedy_ignores_the_checkpoints_generation_config(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    model = tiny_hf("llama", layers=2, vocab=VOCAB, std=0.3, seed=3)
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 3.0, 2, 8
    gc.suppress_tokens, gc.bad_words_ids = [ids(tok, ".")[0]], [ids(tok, "e")]
    gc.do_sample, gc.temperature, gc.top_k = True, 0.7, 5
    model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert model.generation_config.repetition_penalty == 3.0 and model.generation_config.no_repeat_ngram_size == 2
    prompts = ["the cat sat on", "we ate some", "it was a", "q"]
    expected = argmax_answers(model, tok, prompts)
    assert generate(model, tok, prompts, batch_size=2) == expected
    assert model.generation_config.repetition_penalty == 3.0  # the checkpoint's settings are left as they were
    # the checkpoint's settings do change what transformers generates when they are honoured
    torch.manual_seed(0)
    honoured = [tok.decode(model.generate(input_ids=torch.tensor([encode_prompt(tok, p)]), max_new_tokens=20)[0],
                           skip_special_tokens=True) for p in prompts]
    assert [cut_answer(h[len(p):]) for h, p in zip(honoured, prompts)] != expected


# --- 3. one BOS --------------------------------------------------------------------------------

def _first_inputs(model):
    """The input ids of the first forward call of each generate / teacher-forced batch."""
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    return seen


@pytest.mark.parametrize("template", ["raw", "qa", "chat"])
def test_each_prompt_carries_one_bos(template):
    tok = tokenizer(chat_template=CHAT)
    assert apply_template(tok, "who", "chat") == "<s>who a:"
    assert encode_prompt(tok, "<s>who a:").count(1) == 1 and encode_prompt(tok, "who").count(1) == 1
    model = tiny_hf("llama", layers=1, vocab=VOCAB, std=0.3)
    model.set_attn_implementation("sdpa")  # prompts of different lengths in one batch
    seen = _first_inputs(model)
    prompts = [apply_template(tok, p, template) for p in ("who is ab", "we ate")]
    generate(model, tok, prompts, max_new_tokens=2)
    teacher_forced(model, tok, prompts, ["cd", "bread"])
    prefill, forced = seen[0], seen[-1]
    assert prefill.shape[0] == forced.shape[0] == 2 and prefill.shape[1] > 1
    assert (prefill == 1).sum(1).tolist() == [1, 1] and (forced == 1).sum(1).tolist() == [1, 1]
    rows = [row[row.index(1):] for row in prefill.tolist()]  # left padding: pad ids, then the prompt from its BOS
    assert sorted(rows) == sorted(encode_prompt(tok, p) for p in prompts)
    assert all(set(row[: row.index(1)]) <= {tok.eos_token_id} for row in prefill.tolist())


# --- 4. gold answers that contain '.' ----------------------------------------------------------

def test_cut_answer_lets_a_dotted_gold_through_without_flattering():
    assert cut_answer(" St. Louis. It is big", "St. Louis") == "St. Louis"
    assert cut_answer(" St. Louis. It is big") == "St"  # no gold: the first '.' as before
    assert cut_answer(" St. Petersburg. It is big", "St. Louis") == "St. Petersburg"
    assert cut_answer(" St.", "St. Louis") == "St."
    assert cut_answer(" J. R. R. Tolkien.\nNext", "J. R. R. Tolkien") == "J. R. R. Tolkien"
    assert cut_answer(" U.S. Army.", "U.S.") == "U.S. Army"  # never cut short to fit the gold
    assert cut_answer(" St. Lo\nuis.", "St. Louis") == "St. Lo"  # a newline always ends it
    assert cut_answer(" Paris. Lyon.", "Paris") == "Paris"  # golds without '.': the WILD rule
    assert not exact_match(cut_answer(" U.S. Army.", "U.S."), "U.S.")


def test_generation_matches_a_dotted_gold_only_when_spelled_out():
    tok = tokenizer()
    model = bigram_llama(tok, chain("qmt. kenya."))  # continues "mt. kenya. kenya. kenya…"
    out = generate(model, tok, ["q"] * 4, answers=["mt. kenya", "mt", "mt.", None])
    assert out == ["mt. kenya", "mt", "mt. kenya", "mt"]
    assert [exact_match(o, a) for o, a in zip(out, ["mt. kenya", "mt", "mt."])] == [True, True, False]
    reqs = [EditRequest("q", "mt. kenya", locality=[("q", "mt.")])]
    report = score_requests(model, tok, reqs, snapshot(model, tok, reqs))
    assert metric(report, "reliability") == 1.0 and metric(report, "locality_accuracy") == 0.0


# --- 5. batching changes nothing ---------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_generation_equals_one_by_one(attention):
    """Left padding, its attention mask and position ids change no answer. Under eager attention
    float64 rows are batched by equal length (see ``_padding_is_safe``); left padding would give NaN."""
    tok = tokenizer()
    model = tiny_hf("llama", layers=2, vocab=VOCAB, std=0.3, seed=1)
    model.set_attn_implementation(attention)
    prompts = ["we", "the cat sat on the", "a dog ran to the big old", "it was a", "xyz q", "it is a"]
    one = [generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=8) == one
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=2) == one
    assert one == argmax_answers(model, tok, prompts, steps=12)
    assert sum(len(a) >= 2 for a in one) >= 3  # answers long enough for padding to matter
    answers = ["mat", "park", "home", "day", "x", "cat"]
    single = [teacher_forced(model, tok, [p], [a])[0] for p, a in zip(prompts, answers)]
    assert teacher_forced(model, tok, prompts, answers) == single


def test_batches_pad_only_where_padding_is_safe():
    enc = [[1] * n for n in (3, 1, 3, 2, 1)]
    assert ev._batches(enc, 2, pad=True) == [[1, 4], [3, 0], [2]]
    assert ev._batches(enc, 8, pad=False) == [[1, 4], [3], [0, 2]]
    model = tiny_hf("llama", layers=1)
    assert not ev._padding_is_safe(model)
    model.set_attn_implementation("sdpa")
    assert ev._padding_is_safe(model)


# --- 6. known facts say which answer they score ------------------------------------------------

def test_known_facts_score_the_true_answer():
    counterfact = [EditRequest("q", "zebra", ground_truth="mt", case_id=0)]
    assert known_fact_pairs(counterfact) == ([("q", "mt")], "ground_truth")
    assert known_fact_pairs([EditRequest("q", "mt")]) == ([("q", "mt")], "target_new")
    assert known_fact_pairs([]) == ([], None)
    with pytest.raises(EvaluationError, match="1 of 2 records have a ground_truth"):
        known_fact_pairs(counterfact + [EditRequest("q", "mt")])
    tok = tokenizer()
    model = bigram_llama(tok, chain("qmt. kenya."))
    assert known_facts_filter(model, tok, counterfact) == counterfact  # "mt", not the counterfactual "zebra"
    ref = prepare_reference(model, tok, [], known_facts=counterfact)
    cap = ref.before["capability"]
    summary = ("known_facts_answer_field", "known_facts_count", "known_facts_accuracy")
    assert tuple(cap[k] for k in summary) == ("ground_truth", 1, 1.0)
    assert measure(model, tok, ref)["capability"]["known_facts_answer_field"] == "ground_truth"
    ref = prepare_reference(model, tok, [], known_facts=[EditRequest("q", "zebra")])
    cap = ref.before["capability"]
    assert tuple(cap[k] for k in summary) == ("target_new", 0, None)  # the base knows no zebra


# --- 7. the base is measured once --------------------------------------------------------------

def test_the_base_is_measured_once(monkeypatch):
    tok = tokenizer()
    model = tiny_hf("llama", layers=2, vocab=VOCAB, std=0.3)
    reqs = [EditRequest("the cat sat on the", "mat", rephrase_prompts=["a cat sat on the"],
                        locality=[("we ate some", "bread")]),
            EditRequest("a dog ran to the", "park", locality=[("it was a", "day")])]
    heldout = [encode_prompt(tok, "the cat sat on the mat."), encode_prompt(tok, "a dog ran.")]
    calls = {"generate": [], "text_drift": []}
    real_generate, real_drift = ev.generate, ev.text_drift

    def recording_generate(m, t, prompts, *a, **k):
        calls["generate"].append(len(prompts))
        return real_generate(m, t, prompts, *a, **k)

    def recording_drift(m, docs, *a, **k):
        calls["text_drift"].append(bool(k.get("base_weights")) or k.get("base_model") is not None)
        return real_drift(m, docs, *a, **k)

    monkeypatch.setattr(ev, "generate", recording_generate)
    monkeypatch.setattr(ev, "text_drift", recording_drift)
    modules = {"model.layers.1.mlp.down_proj": model.model.layers[1].mlp.down_proj}
    ref = prepare_reference(model, tok, reqs, "qa", heldout=heldout, corpus=heldout, known_facts=reqs, modules=modules)
    # each prompt answered once: reliability (2), generalisation (1), locality (2), then the known facts (2)
    assert calls["generate"] == [2, 1, 2, 2]
    assert calls["text_drift"] == [False]  # the base's perplexity, once, and no KL against itself
    again = score_requests(model, tok, reqs, ref.snapshot)  # what scoring the base from scratch gives
    assert ref.before["metrics"] == again["metrics"] and ref.before["per_request"] == again["per_request"]
    assert metric(ref.before, "locality_agreement") == 1.0
    cap = ref.before["capability"]
    assert (cap["heldout_documents"], cap["heldout_tokens"]) == (2, sum(len(d) - 1 for d in heldout))
    assert "heldout_kl" not in cap and "corpus_kl" not in cap
