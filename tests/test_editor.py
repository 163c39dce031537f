"""The editing loop: subspace guarantees, determinism, the skip/stop rule, and the drift report."""

from __future__ import annotations

import math

import pytest
import torch

from crispedit.curvature import collect
from crispedit.editor import (EditError, EditOptimizer, EditResult, build_projectors, drift_report, edit, edit_loss, eigenbases,
                              run_epochs, tokenize_requests, _batch)
from crispedit.layers import find_modules
from crispedit.requests import EditRequest
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()
REQUESTS = [EditRequest("the cat sat on the", "mat"), EditRequest("a dog ran to the", "park"),
            EditRequest("birds fly over the", "sea"), EditRequest("we ate some", "bread")]
CORPUS = [TOK(t)["input_ids"] for t in ["the cat sat on the mat.", "a quick brown fox jumps.", "some words, here and there.",
                                        "it was a lovely day at the sea.", "the dog ran to the old park."]]
# float64 model: a step that must stay in the subspace leaves a residue at float64 rounding only
IN_SUBSPACE_TOL = 1e-10


def _setup(model_type="llama", method="crispedit", gamma=0.8):
    model = tiny_hf(model_type, layers=3, std=0.1)
    modules = find_modules(model, [1, 2])
    stats = collect(model, modules, CORPUS, labels="sampled", mc_samples=4, dtype=torch.float64)
    eig = eigenbases(stats)
    return model, modules, eig, build_projectors(eig, method, gamma, dtype=torch.float64)


def _residue(result, modules, projectors):
    """Largest ‖ΔW − P ΔW‖ / ‖ΔW‖ over the edited matrices (linear orientation)."""
    worst = 0.0
    for n, m in modules.items():
        D = (result.deltas[n].T if type(m).__name__ == "Conv1D" else result.deltas[n]).detach()
        worst = max(worst, float((D - projectors[n].project(D)).detach().norm() / D.norm()))
    return worst


@pytest.mark.parametrize("optimizer", ["sgd", "adam-projected-step"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_projected_optimisers_keep_the_update_in_the_subspace(optimizer, model_type):
    model, modules, eig, P = _setup(model_type)
    result = edit(model, TOK, REQUESTS, modules, P, optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-3, epochs=3, batch_size=2)
    assert result.steps == 6
    assert _residue(result, modules, P) < IN_SUBSPACE_TOL
    report = drift_report(result.deltas, modules, eig, P)
    assert report["total"]["predicted_kl_outside"] < 1e-12 * report["total"]["predicted_kl"]


def test_adam_leaves_the_subspace_and_the_report_measures_it():
    model, modules, eig, P = _setup()
    result = edit(model, TOK, REQUESTS, modules, P, optimizer="adam", lr=1e-3, epochs=3, batch_size=2)
    assert _residue(result, modules, P) > 1e-3  # Adam's per-coordinate scaling moves the step out
    report = drift_report(result.deltas, modules, eig, P)
    assert report["total"]["predicted_kl_outside"] > 0
    for n, m in modules.items():  # the full form ½ tr(ΔWᵀ G ΔW A), computed directly
        eA, eG = eig[n]
        A = eA.vectors @ torch.diag(eA.values) @ eA.vectors.T
        G = eG.vectors @ torch.diag(eG.values) @ eG.vectors.T
        D = result.deltas[n]
        assert report[n]["predicted_kl"] == pytest.approx(0.5 * float(torch.trace(D.T @ G @ D @ A)), rel=1e-9)
        W0 = m.weight.detach() - D
        assert report[n]["relative_change"] == pytest.approx(float(D.norm() / W0.norm()), rel=1e-12)


def test_same_seed_same_weights_other_seed_other_weights():
    runs = []
    for seed in (0, 0, 1):
        model, modules, _, P = _setup()
        edit(model, TOK, REQUESTS, modules, P, epochs=2, batch_size=2, seed=seed)
        runs.append({n: m.weight.detach().clone() for n, m in modules.items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_only_the_selected_matrices_change_and_state_is_restored():
    model, modules, _, P = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    edit(model, TOK, REQUESTS, modules, P, epochs=2)
    weights = {f"{n}.weight" for n in modules}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) == (k not in weights), k
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_ft_learns_and_stops_when_the_epoch_mean_is_below_the_threshold():
    model, modules, _, P = _setup(method="ft")
    first = edit(model, TOK, REQUESTS, modules, P, lr=1e-2, epochs=1, batch_size=4).epoch_losses[0]
    model, modules, _, P = _setup(method="ft")
    result = edit(model, TOK, REQUESTS, modules, P, lr=1e-2, epochs=100, batch_size=4, loss_threshold=0.8 * first)
    assert result.epochs < 100 and result.epoch_losses[-1] < 0.8 * first  # stopped once below
    assert all(loss >= 0.8 * first for loss in result.epoch_losses[:-1])  # and not before
    assert result.steps == result.epochs - 1  # one batch per epoch; the last, below the threshold, was skipped


def test_batches_below_the_threshold_are_skipped():
    model, modules, _, P = _setup()
    result = edit(model, TOK, REQUESTS, modules, P, loss_threshold=1e9, epochs=5)
    assert result.steps == 0 and result.epochs == 1  # the first epoch's mean is below: stop
    assert all(float(d.abs().max()) == 0 for d in result.deltas.values())


def test_loss_is_on_target_tokens_only():
    model = tiny_hf("llama", layers=2)
    items = tokenize_requests(TOK, REQUESTS[:2])
    assert items[0][1] == len(TOK("the cat sat on the")["input_ids"])
    ids, attn, labels = _batch(items, 2, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
    nll, count = 0.0, 0
    for b, (x, n_prompt) in enumerate(items):
        for t in range(n_prompt, len(x)):  # target token t predicted at position t - 1
            nll -= float(torch.log_softmax(logits[b, t - 1], -1)[x[t]])
            count += 1
    assert count == len(" mat") + len(" park")
    assert float(edit_loss(model, ids, attn, labels).detach()) == pytest.approx(nll / count, rel=1e-10)


def test_nullspace_removes_whole_input_directions_and_ft_nothing():
    _, _, eig, _ = _setup()
    for P in build_projectors(eig, "nullspace", 0.8).values():
        assert ((P.mask.all(0)) | (~P.mask).all(0)).all()
    assert all(P.is_identity for P in build_projectors(eig, "ft", 0.8).values())
    with pytest.raises(EditError, match="--method"):
        build_projectors(eig, "memit", 0.8)


def test_bad_options():
    model, modules, _, P = _setup()
    with pytest.raises(EditError, match="--optimizer"):
        edit(model, TOK, REQUESTS, modules, P, optimizer="lion")
    with pytest.raises(EditError, match="no request"):
        edit(model, TOK, [], modules, P)


def test_a_bf16_model_is_edited_with_float32_statistics_and_projection():
    model = tiny_hf("llama", layers=3, std=0.1, dtype=torch.bfloat16)
    modules = find_modules(model, [1, 2])
    stats = collect(model, modules, CORPUS, labels="sampled")
    assert all(A.dtype == torch.float32 for A in stats.A.values())
    eig = eigenbases(stats)
    P = build_projectors(eig, "crispedit", 0.8)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    result = edit(model, TOK, REQUESTS, modules, P, optimizer="sgd", lr=0.5, epochs=2, batch_size=2)
    assert result.steps == 4
    for n, m in modules.items():
        assert m.weight.dtype == torch.bfloat16 and not torch.equal(m.weight, before[n])
    report = drift_report(result.deltas, modules, eig, P)
    assert report["total"]["predicted_kl"] > 0 and 0.01 < report["total"]["relative_change"] < 0.5
    # bf16 rounding of each step moves the update a little out of the subspace, but not far
    assert report["total"]["predicted_kl_outside"] < 0.05 * report["total"]["predicted_kl"]


# float32 masters: rounding of float32 arithmetic over a few steps on a tiny model
MASTER_FLOAT32_TOL = 1e-5


def _master_residue(state, base, modules, projectors):
    """Largest ‖ΔM − P ΔM‖ / ‖ΔM‖ of the master update ΔM = master − base."""
    worst = 0.0
    for n in modules:
        D = state.masters[n].detach().double() - base[n].double()
        P = projectors[n]
        worst = max(worst, float((D - P.project(D.to(P.dtype)).double()).norm() / D.norm()))
    return worst


def _half_edit(dtype, epochs=20, lr=5e-2):
    model = tiny_hf("llama", layers=3, std=0.1, dtype=dtype)
    modules = find_modules(model, [1, 2])
    eig = eigenbases(collect(model, modules, CORPUS, labels="sampled"))
    P = build_projectors(eig, "crispedit", 0.8)
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    state = EditOptimizer(modules, "adam-projected-step", lr=lr)
    steps, losses = run_epochs(model, TOK, REQUESTS, P, state, batch_size=4, epochs=epochs, loss_threshold=0.0)
    return model, modules, P, base, state, steps, losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_through_float32_masters(dtype):
    model, modules, P, base, state, steps, losses = _half_edit(dtype)
    assert all(w.dtype == torch.float32 and w is not modules[n].weight for n, w in state.masters.items())
    assert steps == 20 and all(math.isfinite(x) for x in losses)
    # the master update stays in the subspace at float32 rounding ...
    assert _master_residue(state, base, modules, P) < MASTER_FLOAT32_TOL
    # ... the written-back weights are the masters rounded to the model's dtype, and that rounding
    # is what moves them out of the subspace (measured separately, larger)
    for n, m in modules.items():
        assert m.weight.dtype == dtype and torch.equal(m.weight, state.masters[n].to(dtype))
    rounded = _residue(EditResult({n: m.weight.double() - base[n].double() for n, m in modules.items()}, 0, 0, [], 0),
                       modules, P)
    assert rounded > _master_residue(state, base, modules, P)
    # the edit lands as it does in float32: the same schedule on the float32 model ends at nearly the same loss
    *_, reference = _half_edit(torch.float32)
    assert losses[-1] < 0.75 * losses[0]
    assert abs(losses[-1] - reference[-1]) < 0.05 * reference[0]


def test_adam_first_moment_lies_in_the_subspace():
    """Fails if the gradient is not projected before Adam (the moments would hold removed directions)."""
    model, modules, _, P = _setup()
    state = EditOptimizer(modules, "adam", lr=1e-3)
    run_epochs(model, TOK, REQUESTS, P, state, batch_size=2, epochs=2, loss_threshold=0.0)
    for n, w in state.masters.items():
        m1 = state.opt.state[w]["exp_avg"]
        assert float((m1 - P[n].project(m1)).norm()) <= IN_SUBSPACE_TOL * float(m1.norm())
        assert float(m1.norm()) > 0


def test_optimizer_state_round_trips_bit_for_bit():
    """Two epochs, save, one more epoch in a fresh optimiser restored from the state == three epochs in one."""
    def run(split):
        model, modules, _, P = _setup()
        model = model.to(torch.bfloat16)
        state = EditOptimizer(modules, "adam", lr=1e-3)
        run_epochs(model, TOK, REQUESTS, P, state, batch_size=2, epochs=2, loss_threshold=0.0, seed=0)
        if split:
            tensors, meta = state.state_tensors()
            state = EditOptimizer(modules, "adam", lr=1e-3)
            state.load_state({k: v.clone() for k, v in tensors.items()}, meta)
        run_epochs(model, TOK, REQUESTS, P, state, batch_size=2, epochs=1, loss_threshold=0.0, seed=1)
        return {n: m.weight.detach().clone() for n, m in modules.items()}, state

    (whole, s1), (split, s2) = run(False), run(True)
    assert all(torch.equal(whole[n], split[n]) for n in whole)
    assert all(torch.equal(s1.masters[n], s2.masters[n]) for n in whole)


def test_a_diverging_edit_is_an_error_not_a_nan_model():
    model, modules, _, P = _setup(method="ft")
    with pytest.raises(EditError, match="loss became nan|loss became inf|NaN or inf"):
        edit(model, TOK, REQUESTS, modules, P, optimizer="sgd", lr=1e300, epochs=3, batch_size=2, loss_threshold=0.0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_gradient_factors_give_the_weight_gradient_and_the_same_projection(model_type):
    """The hooks' ``gᵀ a`` is autograd's weight gradient, and projecting from the factors equals
    projecting the dense gradient (float64: rounding of a few matmuls)."""
    from crispedit.editor import GradientFactors

    model, modules, _, P = _setup(model_type)
    ids, attn, labels = _batch(tokenize_requests(TOK, REQUESTS), 2, "cpu")
    weights = [m.weight for m in modules.values()]
    from crispedit.running import frozen

    with frozen(model, weights), GradientFactors(modules) as factors:
        edit_loss(model, ids, attn, labels).backward()
        for n, m in modules.items():
            g, a = factors.pairs[n]
            X = m.weight.grad.T if type(m).__name__ == "Conv1D" else m.weight.grad
            torch.testing.assert_close(g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1]), X, rtol=0, atol=1e-12)
            for form in ("factors", "corner", "dense"):
                torch.testing.assert_close(P[n].project_factors(g, a, X=X, form=form), P[n].project(X), rtol=0, atol=1e-12)
