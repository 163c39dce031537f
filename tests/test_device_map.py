"""--device-map: a model dispatched by accelerate gives the statistics, the edit and the drift of the same
model without one; an offloaded matrix is refused; the map is parsed and checked before loading.

No GPU here: every block is dispatched to the CPU, so accelerate's hooks really run (inputs and outputs
pass through them, the weights stay where they are), but no tensor changes device. Placement over
several GPUs is not tested by this file.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from crispedit.curvature import collect
from crispedit.evaluate import text_drift
from crispedit.layers import find_modules
from crispedit.model import ModelError, load_model, parse_device_map
from crispedit.options import MethodOptions
from crispedit.requests import EditRequest
from crispedit.running import check_resident, offloaded, swapped_weights
from crispedit.session import EditSession
from models import save_tiny_model

accelerate = pytest.importorskip("accelerate")

LAYERS = 3
# every module the tiny LLaMA's forward uses, each on the CPU (the keys a map of accelerate's names)
DEVICE_MAP = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(LAYERS)},
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
EDITED = [1, 2]
# texts of the character tokenizer's alphabet only (no apostrophe: its id 32 is outside the model's vocabulary)
CORPUS = ["the cat sat on the mat.", "a quick brown fox jumps.", "some words, here and there.",
          "it was a lovely day at the sea.", "the dog ran to the old park."]
REQUESTS = [EditRequest("the cat sat on the", "sea", case_id=0), EditRequest("a dog ran to the", "hill", case_id=1),
            EditRequest("birds fly over the", "road", case_id=2)]
# the same float32 operations on the same device, with accelerate's hooks moving tensors to where they
# already are: anything beyond float32 rounding of a reordered sum is a placement bug
FLOAT32_TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=LAYERS)


def _plain(path):
    return load_model(str(path), "cpu")


def _dispatched(path, device_map=DEVICE_MAP, **kw):
    """``load_model`` with the map (transformers dispatches only a map of two or more devices), then
    accelerate's ``dispatch_model`` with hooks forced, as a multi-GPU map would have them."""
    model, tok = load_model(str(path), device_map=json.dumps(DEVICE_MAP))
    accelerate.dispatch_model(model, device_map, force_hooks=True, **kw)
    assert hasattr(model, "_hf_hook") and all(hasattr(model.model.layers[i], "_hf_hook") for i in range(LAYERS))
    return model, tok


def _documents(tok):
    return [tok(t)["input_ids"] for t in CORPUS]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


@pytest.mark.parametrize("labels", ["sampled", "empirical", "exact"])
def test_statistics_are_those_of_the_model_without_a_map(model_dir, labels):
    plain, tok = _plain(model_dir)
    mapped, _ = _dispatched(model_dir)
    docs = _documents(tok)[:2] if labels == "exact" else _documents(tok)
    ref = collect(plain, find_modules(plain, EDITED), docs, labels=labels, mc_samples=2 if labels == "sampled" else 1)
    got = collect(mapped, find_modules(mapped, EDITED), docs, labels=labels, mc_samples=2 if labels == "sampled" else 1)
    assert got.names == ref.names and got.tokens == ref.tokens
    for n in ref.names:
        assert got.A[n].abs().max() > 0 and got.G[n].abs().max() > 0
        _close(got.A[n], ref.A[n])
        _close(got.G[n], ref.G[n])


def test_a_batch_edit_and_its_drift_are_those_without_a_map(model_dir):
    """The session's edit (hooks, projections, Adam) gives the same weights, and the KL of the edited model
    against its swapped-in base weights is the same: accelerate's hooks see the swapped ``.data``."""
    results = []
    for load in (_plain, _dispatched):
        model, tok = load(model_dir)
        modules = find_modules(model, EDITED)
        docs = _documents(tok)
        stats = collect(model, modules, docs)
        session = EditSession.start(model, tok, modules, MethodOptions(lr=1e-2, epochs=3, batch_size=2, gamma=0.8),
                                    stats, docs)
        session.edit(REQUESTS)
        with session.at_base():
            base_drift = text_drift(model, docs)
        drift = text_drift(model, docs, base_weights=session.base)
        results.append(({n: m.weight.detach().clone() for n, m in modules.items()}, drift, base_drift))
    (w_ref, d_ref, b_ref), (w_got, d_got, b_got) = results
    assert any(not torch.equal(w_ref[n], w) for n, w in _plain_base(model_dir).items())  # the edit moved something
    for n in w_ref:
        _close(w_got[n], w_ref[n])
    assert d_ref["kl"] > 0
    assert d_got["kl"] == pytest.approx(d_ref["kl"], rel=FLOAT32_TOL)
    assert d_got["perplexity"] == pytest.approx(d_ref["perplexity"], rel=FLOAT32_TOL)
    # swapping the base weights in under the hooks gives the base model's own perplexity
    assert d_got["perplexity_base"] == pytest.approx(b_got["perplexity"], rel=FLOAT32_TOL)
    assert b_got["perplexity"] == pytest.approx(b_ref["perplexity"], rel=FLOAT32_TOL)
    assert b_got["perplexity"] != pytest.approx(d_got["perplexity"], rel=FLOAT32_TOL)


def _plain_base(path):
    model, _ = _plain(path)
    return {n: m.weight.detach().clone() for n, m in find_modules(model, EDITED).items()}


def test_an_offloaded_matrix_is_refused(model_dir, tmp_path):
    offload = dict(DEVICE_MAP, **{f"model.layers.{EDITED[-1]}": "disk"})
    model, tok = _dispatched(model_dir, offload, offload_dir=str(tmp_path / "offload"))
    modules = find_modules(model, EDITED)
    name = next(n for n in modules if n.startswith(f"model.layers.{EDITED[-1]}."))
    assert offloaded(modules[name]) and modules[name].weight.device.type == "meta"
    assert not any(offloaded(m) for n, m in modules.items() if n != name)  # dispatched, not offloaded
    message = f"{name}: offloaded to CPU or disk by the device map"
    with pytest.raises(ModelError, match=message):
        check_resident(modules)
    with pytest.raises(ModelError, match=message):
        collect(model, modules, _documents(tok))
    stats = collect(model, {n: m for n, m in modules.items() if n != name}, _documents(tok))
    with pytest.raises(ModelError, match=message):
        EditSession.start(model, tok, modules, MethodOptions(method="ft"))
    with pytest.raises(ModelError, match=message):
        with swapped_weights(model, {name: torch.zeros(modules[name].weight.shape)}):
            pass
    assert stats.tokens  # the matrices that are not offloaded still work in the same model


def test_inputs_go_to_the_main_device_when_the_embedding_is_offloaded(model_dir, tmp_path):
    from crispedit.running import input_device

    plain, tok = _plain(model_dir)
    model, _ = _dispatched(model_dir, dict(DEVICE_MAP, **{"model.embed_tokens": "disk"}), offload_dir=str(tmp_path))
    assert model.device.type == "meta" and input_device(model) == torch.device("cpu")
    docs = _documents(tok)
    assert text_drift(model, docs)["perplexity"] == pytest.approx(text_drift(plain, docs)["perplexity"], rel=FLOAT32_TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_device_maps_are_parsed_and_checked(tmp_path, monkeypatch):
    assert parse_device_map(None) is None
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DEVICE_MAP))
    assert parse_device_map(str(path)) == DEVICE_MAP
    for strategy in ("auto", "balanced"):
        with pytest.raises(ModelError, match=f"--device-map \\({strategy}\\): this torch build has no CUDA device"):
            parse_device_map(strategy)
    with pytest.raises(ModelError, match="lm_head: 1\\): this torch build has no CUDA device"):
        parse_device_map('{"model": "cpu", "lm_head": 1}')
    with pytest.raises(ModelError, match="no CUDA device"):
        parse_device_map({"model": "cuda:0"})
    with pytest.raises(ModelError, match="disk offload is not supported"):
        parse_device_map('{"model": "cpu", "lm_head": "disk"}')
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        parse_device_map('{"model": "gpu"}')
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_device_map('{"model": cpu}')
    with pytest.raises(ModelError, match="no such file"):
        parse_device_map("auto-map.json")
    with pytest.raises(ModelError, match="non-empty JSON object"):
        parse_device_map("{}")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if it were not installed
    with pytest.raises(ModelError, match="needs the accelerate package"):
        parse_device_map('{"": "cpu"}')


def test_load_model_with_a_map(model_dir, monkeypatch):
    model, _ = load_model(str(model_dir), device_map='{"": "cpu"}')
    assert not model.training and model.device.type == "cpu"
    with pytest.raises(ModelError, match="--device cpu with --device-map"):
        load_model(str(model_dir), "cpu", device_map='{"": "cpu"}')
    with pytest.raises(ModelError, match="no module 'model.layer.0' in this model"):
        load_model(str(model_dir), device_map='{"model.layer.0": "cpu", "": "cpu"}')
    with pytest.raises(ModelError, match="parameters are placed by no key of the map, e.g. model.embed_tokens.weight"):
        load_model(str(model_dir), device_map='{"model.layers": "cpu", "lm_head": "cpu"}')
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ModelError, match="data-parallel torchrun"):
        load_model(str(model_dir), device_map='{"": "cpu"}')


def test_the_commands_pass_the_map_on(model_dir, tmp_path, capsys):
    """``crispedit curvature --device-map FILE`` loads through the map (a map naming no module of the
    model is refused, which only happens once the map reaches ``load_model``) and gives the statistics of
    the run without it; a strategy on a machine without CUDA is a one-line error (exit status 2)."""
    from crispedit.cli import main
    from crispedit.curvature import load

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    good, bad = tmp_path / "map.json", tmp_path / "bad.json"
    good.write_text(json.dumps(DEVICE_MAP))
    bad.write_text(json.dumps({"model.layer.0": "cpu", "": "cpu"}))
    common = ["curvature", "--model", model_dir, "--corpus", corpus, "--layers", "1,2", "--no-progress"]

    def run(*extra):
        code = main([str(a) for a in (*common, *extra)])
        return code, capsys.readouterr().err

    assert run("--out", tmp_path / "plain")[0] == 0
    assert run("--out", tmp_path / "mapped", "--device-map", good)[0] == 0
    code, err = run("--out", tmp_path / "bad", "--device-map", bad)
    assert code == 2 and "--device-map: no module 'model.layer.0'" in err
    ref, got = load(tmp_path / "plain"), load(tmp_path / "mapped")
    assert got.meta["options"]["device_map"] == str(good)
    for n in ref.names:
        _close(got.A[n], ref.A[n])
        _close(got.G[n], ref.G[n])
    if not torch.cuda.is_available():
        code, err = run("--out", tmp_path / "auto", "--device-map", "auto")
        assert code == 2 and "--device-map (auto): this torch build has no CUDA device" in err
