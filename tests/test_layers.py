"""Finding the MLP output projection in every listed architecture (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crispedit.layers import LayerError, auto_layers, find_modules, is_conv1d, parse_layers, weight_shape
from models import tiny_hf

EXPECTED = {
    "llama": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
    "qwen3": "model.layers.{}.mlp.down_proj",
    "gemma": "model.layers.{}.mlp.down_proj",
    "phi3": "model.layers.{}.mlp.down_proj",
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{}.fc2",
}


@pytest.mark.parametrize("model_type", EXPECTED)
def test_every_listed_architecture(model_type):
    model = tiny_hf(model_type, layers=3, dtype=torch.float32)
    modules = find_modules(model, [0, 2])
    assert list(modules) == [EXPECTED[model_type].format(i) for i in (0, 2)]
    d_model = model.config.hidden_size
    for m in modules.values():
        d_out, d_in = weight_shape(m)
        assert d_out == d_model and d_in > d_model  # the MLP's wide side goes in, the model width comes out
        # the module maps a (d_in) to z (d_out) whatever the storage
        assert m(torch.zeros(1, 1, d_in)).shape[-1] == d_out
    assert is_conv1d(next(iter(modules.values()))) == (model_type == "gpt2")
    assert list(find_modules(model, "auto")) == [EXPECTED[model_type].format(i) for i in range(3)]


def test_out_of_range_and_missing_module_list_candidates():
    model = tiny_hf("llama", layers=2, dtype=torch.float32)
    with pytest.raises(LayerError, match=r"block 5 does not exist.*blocks 0..1.*model\.layers\.\{0..1\}\.mlp\.down_proj"):
        find_modules(model, [5])
    with pytest.raises(LayerError, match="candidates: self_attn.q_proj.*mlp.down_proj"):
        find_modules(model, [0], module="mlp.act_fn")
    with pytest.raises(LayerError, match="cannot read"):
        find_modules(model, "1,x")


def test_explicit_module_by_relative_or_full_name():
    model = tiny_hf("llama", layers=2, dtype=torch.float32)
    assert list(find_modules(model, [1], module="mlp.up_proj")) == ["model.layers.1.mlp.up_proj"]
    assert list(find_modules(model, None, module="model.layers.0.self_attn.o_proj")) == ["model.layers.0.self_attn.o_proj"]


def test_unknown_architecture_lists_candidates():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff_in, self.ff_out = nn.Linear(4, 8), nn.Linear(8, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "oddformer", "num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(LayerError, match=r"unknown architecture 'oddformer'.*--module.*ff_in, ff_out"):
        find_modules(Odd(), [0])
    assert list(find_modules(Odd(), [1], module="ff_out")) == ["blocks.1.ff_out"]


@pytest.mark.parametrize(
    "L, expected",
    [(2, [0, 1]), (5, [0, 1, 2, 3, 4]), (6, [0, 1, 2, 3, 4]), (12, [5, 6, 7, 8, 9]), (24, [13, 14, 15, 16, 17]), (32, [19, 20, 21, 22, 23])],
)
def test_auto_layers_rule(L, expected):
    cfg = type("Cfg", (), {"model_type": "mistral", "num_hidden_layers": L, "hidden_size": 8, "intermediate_size": 16})()
    assert auto_layers(type("M", (), {"config": cfg})()) == expected


def test_auto_layers_of_the_papers_models():
    def model(mt, L, h, i):
        return type("M", (), {"config": type("C", (), {"model_type": mt, "num_hidden_layers": L, "hidden_size": h, "intermediate_size": i})()})()

    assert auto_layers(model("llama", 32, 4096, 14336)) == [19, 20, 21, 22, 23]
    assert auto_layers(model("qwen2", 28, 3584, 18944)) == [15, 16, 17, 18, 19]
    assert auto_layers(model("qwen2", 28, 1024, 4096)) == [16, 17, 18, 19, 20]  # not Qwen2.5-7B: the rule


def test_parse_layers():
    assert parse_layers("19,20,21") == [19, 20, 21]
    assert parse_layers("19-21, 23") == [19, 20, 21, 23]
    assert parse_layers("auto") == "auto"
    assert parse_layers([3, 4]) == [3, 4]


def test_transformers_lower_bound_is_checked():
    from crispedit.model import ModelError, check_transformers

    check_transformers()  # the installed one
    check_transformers("4.56.0")
    check_transformers("5.0.0.dev0")
    with pytest.raises(ModelError, match="transformers >= 4.56, found 4.46.3"):
        check_transformers("4.46.3")
