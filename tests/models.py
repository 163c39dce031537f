"""Tiny models built from configs, for tests (no download)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoConfig

VOCAB = 32


def tiny_hf(model_type: str = "llama", layers: int = 2, dtype=torch.float64, seed: int = 0, vocab: int = VOCAB, std: float = 0.3, **overrides):
    """A random tiny causal LM of any listed architecture, eager attention, dropout off."""
    common = dict(vocab_size=vocab, initializer_range=std, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    per_type = {
        "llama": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        "mistral": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        "qwen2": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        "qwen3": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
        "gemma": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
        "phi3": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0),
        "gpt2": dict(n_embd=16, n_layer=layers, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gptj": dict(n_embd=16, n_layer=layers, n_head=2, n_positions=64, rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64),
        "opt": dict(hidden_size=16, ffn_dim=24, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.0, pad_token_id=0),
    }
    cfg = AutoConfig.for_model(model_type, **{**common, **per_type[model_type], **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class Toy(nn.Module):
    """embedding → Linear → tanh → Linear: only per-position operations after ``fc1``."""

    def __init__(self, vocab: int = VOCAB, d: int = 6, h: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d, dtype=torch.float64)
        self.fc1 = nn.Linear(d, h, dtype=torch.float64)
        self.fc2 = nn.Linear(h, vocab, dtype=torch.float64)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def char_tokenizer():
    """A character-level fast tokenizer that adds BOS, built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .,'")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(path, model_type: str = "llama", layers: int = 3, dtype=torch.float32):
    """A tiny model and its tokenizer saved with ``save_pretrained`` (what users point --model at)."""
    model = tiny_hf(model_type, layers=layers, dtype=dtype, std=0.1)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
