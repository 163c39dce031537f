"""Label modes, invariances, dtypes and storage of the K-FAC statistics."""

from __future__ import annotations

import json

import pytest
import torch

from crispedit import curvature
from crispedit.curvature import StatisticsError, collect, load, merge, save
from crispedit.layers import find_modules
from dense import rel_err
from models import tiny_hf

MODES = ["sampled", "empirical", "exact"]
DOCS = [[3, 9, 4, 17, 5, 11], [8, 2, 30, 6], [1, 14, 14, 20, 7, 7, 25], [5, 6]]
# Invariances through an HF float64 model: padding and batch shape change float32 internals only.
INVARIANCE_TOL = 1e-6
# Monte-Carlo: the relative error of G falls like ~1.2/sqrt(k) here (measured 0.35 at k=16, 0.017 at
# k=4096); at k=MC_SAMPLES we allow twice the expected error. A biased estimator (empirical labels,
# wrong temperature, shifted positions) stays far above it (empirical: 1.3).
MC_SAMPLES = 1024
MC_TOL = 0.08
# bf16 model accumulating in float32 vs the float32 model: bf16 has ~3 significant digits.
BF16_TOL = 0.05


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf("llama", layers=2)
    return model, find_modules(model, [0, 1])


def _close(s1, s2, tol):
    for n in s1.A:
        assert rel_err(s1.A[n], s2.A[n]) < tol, f"{n}.A"
        assert rel_err(s1.G[n], s2.G[n]) < tol, f"{n}.G"
        assert s1.tokens[n] == s2.tokens[n]


def test_sampled_converges_to_exact_on_a_block_that_is_not_the_last(llama):
    model, modules = llama
    mods = {k: v for k, v in modules.items() if ".0." in k}
    (n,) = mods
    exact = collect(model, mods, DOCS[:2], labels="exact", dtype=torch.float64)
    few = collect(model, mods, DOCS[:2], labels="sampled", mc_samples=16, dtype=torch.float64)
    many = collect(model, mods, DOCS[:2], labels="sampled", mc_samples=MC_SAMPLES, dtype=torch.float64)
    empirical = collect(model, mods, DOCS[:2], labels="empirical", dtype=torch.float64)
    err_many = rel_err(many.G[n], exact.G[n])
    assert err_many < MC_TOL
    assert err_many < rel_err(few.G[n], exact.G[n]) / 2.5  # √(1024/16) = 8 expected
    assert rel_err(empirical.G[n], exact.G[n]) > 5 * MC_TOL  # the empirical Fisher is another matrix
    assert rel_err(empirical.G[n], many.G[n]) > 5 * MC_TOL
    torch.testing.assert_close(exact.A[n], many.A[n], rtol=0, atol=0)  # A does not depend on labels


@pytest.mark.parametrize("labels", MODES)
def test_padding_and_batch_size_do_not_change_statistics(llama, labels):
    model, modules = llama
    one_by_one = collect(model, modules, DOCS, labels=labels, batch_size=1, dtype=torch.float64, mc_samples=2)
    padded = collect(model, modules, DOCS, labels=labels, batch_size=4, dtype=torch.float64, mc_samples=2)
    reordered = collect(model, modules, DOCS[::-1], labels=labels, batch_size=3, dtype=torch.float64, mc_samples=2)
    _close(padded, one_by_one, INVARIANCE_TOL)
    _close(reordered, one_by_one, INVARIANCE_TOL)
    assert padded.tokens[next(iter(modules))] == sum(len(d) - 1 for d in DOCS)


@pytest.mark.parametrize("labels", MODES)
def test_two_shards_merge_into_one_run(llama, labels):
    model, modules = llama
    whole = collect(model, modules, DOCS, labels=labels, dtype=torch.float64)
    a = collect(model, modules, DOCS[:1], labels=labels, dtype=torch.float64)
    b = collect(model, modules, DOCS[1:], labels=labels, dtype=torch.float64)
    _close(merge(a, b), whole, INVARIANCE_TOL)
    _close(merge(b, a), whole, INVARIANCE_TOL)


def test_sampled_labels_depend_on_seed(llama):
    model, modules = llama
    n = next(iter(modules))
    s0 = collect(model, modules, DOCS, seed=0)
    s0b = collect(model, modules, DOCS, seed=0)
    s1 = collect(model, modules, DOCS, seed=1)
    torch.testing.assert_close(s0.G[n], s0b.G[n], rtol=0, atol=0)
    assert rel_err(s1.G[n], s0.G[n]) > 1e-3


def test_bf16_model_with_float32_accumulation_is_close_to_float32_model():
    m32 = tiny_hf("llama", dtype=torch.float32)
    m16 = tiny_hf("llama", dtype=torch.bfloat16)
    mods32, mods16 = find_modules(m32, [0, 1]), find_modules(m16, [0, 1])
    s32 = collect(m32, mods32, DOCS, labels="empirical")
    s16 = collect(m16, mods16, DOCS, labels="empirical")
    for n in s16.A:
        assert s16.A[n].dtype == torch.float32 and s16.G[n].dtype == torch.float32
    _close(s16, s32, BF16_TOL)
    assert s16.meta["model_dtype"] == "bfloat16" and s16.meta["dtype"] == "float32"


def test_only_labelled_positions_count(llama):
    """A document's last position has no label; declaring fewer labelled positions changes A."""
    model, modules = llama
    n = next(iter(modules))
    full = collect(model, modules, DOCS[:1], labels="empirical", dtype=torch.float64)
    assert full.tokens[n] == len(DOCS[0]) - 1
    part = collect(model, modules, DOCS[:1], labels="empirical", dtype=torch.float64, label_positions=[[0, 1]])
    assert part.tokens[n] == 2
    assert rel_err(part.A[n], full.A[n]) > 1e-3
    with pytest.raises(StatisticsError, match="no next token"):
        collect(model, modules, DOCS[:1], label_positions=[[len(DOCS[0]) - 1]])


def test_exact_mode_refuses_too_many_backward_passes(llama):
    model, modules = llama
    with pytest.raises(StatisticsError, match="over the limit"):
        collect(model, modules, DOCS, labels="exact", exact_limit=100)


def test_bad_options_are_refused(llama):
    model, modules = llama
    with pytest.raises(StatisticsError, match="--labels"):
        collect(model, modules, DOCS, labels="fisher")
    with pytest.raises(StatisticsError, match="--mc-samples"):
        collect(model, modules, DOCS, mc_samples=0)
    with pytest.raises(StatisticsError, match="no labelled position"):
        collect(model, modules, [[4]])


def test_collection_leaves_model_untouched(llama):
    model, modules = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    stats = collect(model, modules, DOCS)
    assert not any(t.requires_grad for t in [*stats.A.values(), *stats.G.values()])  # no graph kept
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_save_load_roundtrip_and_refusals(tmp_path, llama):
    model, modules = llama
    stats = collect(model, modules, DOCS)
    path = save(stats, tmp_path / "curv")
    assert path.name == "curvature.safetensors"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    back = load(tmp_path / "curv", modules)
    for n in stats.A:
        assert torch.equal(back.A[n], stats.A[n]) and torch.equal(back.G[n], stats.G[n])
        assert back.tokens[n] == stats.tokens[n]
    assert back.meta["labels"] == "sampled" and back.meta["corpus_fingerprint"] == stats.meta["corpus_fingerprint"]
    with pytest.raises(StatisticsError, match="exists"):
        save(stats, tmp_path / "curv")
    save(stats, tmp_path / "curv", overwrite=True)
    # statistics of other layers, or another model's shapes, are refused
    other = tiny_hf("llama", layers=3)
    with pytest.raises(StatisticsError, match="other layers or another model"):
        load(tmp_path / "curv", find_modules(other, [2]))
    wider = tiny_hf("llama", layers=2, intermediate_size=40)
    with pytest.raises(StatisticsError, match="another model"):
        load(tmp_path / "curv", find_modules(wider, [0, 1]))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsError, match="junk.safetensors"):
        load(tmp_path / "junk.safetensors")
    with pytest.raises(StatisticsError, match="no such file"):
        load(tmp_path / "nowhere")


def test_failed_write_leaves_nothing(tmp_path, llama, monkeypatch):
    model, modules = llama
    stats = collect(model, modules, DOCS[:1])

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(curvature, "save_file", full_disk)
    with pytest.raises(StatisticsError, match="No space left"):
        save(stats, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_nan_statistics_are_refused(llama):
    model, modules = llama
    broken = tiny_hf("llama", layers=2)
    with torch.no_grad():
        broken.model.embed_tokens.weight[3] = float("nan")
    with pytest.raises(StatisticsError, match="NaN"):
        collect(broken, find_modules(broken, [0]), DOCS)


def test_merge_refuses_mismatch(llama):
    model, modules = llama
    a = collect(model, modules, DOCS[:2], labels="sampled")
    b = collect(model, modules, DOCS[2:], labels="empirical")
    with pytest.raises(StatisticsError, match="cannot merge"):
        merge(a, b)
    mixed = merge(a, b, allow_mixed_labels=True)
    assert mixed.meta["labels"] == "mixed"
    c = collect(model, {k: v for k, v in list(modules.items())[:1]}, DOCS[2:])
    with pytest.raises(StatisticsError, match="different modules"):
        merge(a, c)
    assert json.dumps(mixed.meta)


def test_fingerprint_knows_the_same_checkpoint_in_another_dtype():
    """Statistics of a float32 model fit its bf16 or fp16 load (the exact casts of its weights), and
    not another checkpoint of the same shapes; a bf16 file is compared with a float32 model cast down."""
    from crispedit.curvature import check_fingerprint, weights_fingerprint

    model = tiny_hf("llama", layers=2, dtype=torch.float32)
    modules = find_modules(model, [1])
    stats = collect(model, modules, DOCS[:2], labels="empirical")
    assert set(stats.meta["weights_sha256"]) == {"float32", "bfloat16", "float16"}
    for dtype in (torch.bfloat16, torch.float16):
        half = tiny_hf("llama", layers=2, dtype=torch.float32).to(dtype)
        check_fingerprint(stats, find_modules(half, [1]))
    other = tiny_hf("llama", layers=2, dtype=torch.float32, seed=7)
    with pytest.raises(StatisticsError, match="another checkpoint"):
        check_fingerprint(stats, find_modules(other, [1]))
    half = tiny_hf("llama", layers=2, dtype=torch.float32).to(torch.bfloat16)
    from_half = collect(half, find_modules(half, [1]), DOCS[:2], labels="empirical")
    assert set(from_half.meta["weights_sha256"]) == {"bfloat16", "float16"}  # and what a fp16 load of it would be
    check_fingerprint(from_half, modules)  # the float32 model, cast down to bf16, is that checkpoint
    assert weights_fingerprint(modules)["bfloat16"] == from_half.meta["weights_sha256"]["bfloat16"]


def test_statistics_and_projections_run_without_tf32_whatever_the_caller_set(monkeypatch):
    """Under ``allow_tf32 = True`` (a common global setting on GPUs) the statistics pass and the
    projector still run their matmuls in full float32, and the caller's settings come back after."""
    from crispedit import running
    from crispedit.projector import KroneckerProjector

    seen = []
    inner = running.full_precision

    def spy():
        cm = inner()

        class Spy:
            def __enter__(self):
                cm.__enter__()
                seen.append((torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()))

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(curvature, "full_precision", spy)
    import crispedit.projector as projector_module

    monkeypatch.setattr(projector_module, "full_precision", spy)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        model = tiny_hf("llama", layers=2, dtype=torch.float32)
        modules = find_modules(model, [1])
        stats = collect(model, modules, DOCS, labels="empirical")
        n = next(iter(modules))
        P = KroneckerProjector.from_factors(stats.A[n], stats.G[n], 0.8)
        P.project(torch.randn(P.d_out, P.d_in))
        assert seen and all(flags == (False, "highest") for flags in seen)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
