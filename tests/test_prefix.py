"""The rehearsal check's shortcut: from the first edited block on, the same logits as the full model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crispedit.evaluate import teacher_forced
from crispedit.layers import find_modules
from crispedit.prefix import PrefixCache, first_block
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()
PROMPTS = ["the cat sat on the", "a dog", "birds fly over the old", "we ate"]
ANSWERS = ["mat", "park", "sea", "bread and cake"]


def _batch(texts):
    seqs = [TOK(t)["input_ids"] for t in texts]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    return seqs, ids, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gptj", "gpt_neox", "opt"])
@pytest.mark.parametrize("k", [1, 2])
def test_the_upper_blocks_from_cached_states_give_the_full_models_logits(arch, k):
    """Against each sequence run alone through the whole model. To float32 rounding, not float64's:
    the eager attention of transformers takes its softmax in float32, so a padded batch and a sequence
    alone differ by ~1e-7 in the logits even in a float64 model (the full model does the same)."""
    model = tiny_hf(arch, layers=3)
    seqs, ids, mask = _batch([p + " " + a for p, a in zip(PROMPTS, ANSWERS)])
    with torch.no_grad():
        cache = PrefixCache(model, k)
        short = cache.logits(seqs, ids, mask)
        again = cache.logits(seqs, ids, mask)  # verified: the shortcut alone now
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            torch.testing.assert_close(short[i, : len(s)], alone, rtol=1e-5, atol=1e-6)
    assert cache.verified is True and cache.last_difference < 1e-5
    assert torch.equal(again, short)
    assert len(cache.states) == len(seqs) and all(len(cache.states[tuple(s)]) == len(s) for s in seqs)
    assert len(model.get_submodule(cache.parent_name)) == 3  # the model whole again


def test_a_state_does_not_depend_on_the_batch_it_was_asked_with():
    model = tiny_hf("llama", layers=3)
    cache = PrefixCache(model, 2)
    seqs, _, _ = _batch(PROMPTS)
    with torch.no_grad():
        alone = cache.padded(seqs[:1], len(seqs[0]))[0]
        other = PrefixCache(model, 2)
        together = other.padded(seqs[::-1], max(map(len, seqs)))[-1][: len(seqs[0])]
    assert torch.equal(alone, together)


def test_teacher_forced_with_the_shortcut_equals_the_full_forward():
    model = tiny_hf("llama", layers=4)
    cache = PrefixCache(model, first_block(model, list(find_modules(model, [2, 3]))))
    assert cache.k == 2
    with torch.no_grad():
        assert teacher_forced(model, TOK, PROMPTS, ANSWERS, batch_size=3, prefix=cache) == teacher_forced(model, TOK, PROMPTS, ANSWERS)
    assert cache.verified is True


class _CountsItsBlocks(nn.Module):
    """A model whose output depends on how many blocks its list holds: the cut changes it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8, dtype=torch.float64)
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
        self.head = nn.Linear(8, 100, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return type("Out", (), {"logits": self.head(h) * len(self.layers)})()


def test_an_architecture_the_cut_changes_falls_back_to_the_full_model():
    torch.manual_seed(0)
    model = _CountsItsBlocks()
    seqs, ids, mask = _batch(PROMPTS)
    cache = PrefixCache(model, 1)
    with torch.no_grad():
        out = cache.logits(seqs, ids, mask)
        full = model(ids, mask).logits
    assert cache.verified is False and cache.last_difference > 0.1
    assert torch.equal(out, full)
    with torch.no_grad():
        assert torch.equal(cache.logits(seqs, ids, mask), full)  # and stays with it


def test_first_block_is_the_lowest_edited_block():
    model = tiny_hf("llama", layers=4)
    assert first_block(model, list(find_modules(model, [3, 1]))) == 1
    assert first_block(model, ["lm_head"]) == 0  # outside every block: nothing skipped
