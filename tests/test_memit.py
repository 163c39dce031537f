"""MEMIT and AlphaEdit: the closed forms against direct least squares, the null-space guarantee,
where the key is read, determinism, errors, and real edits of tiny models."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crispedit.curvature import collect
from crispedit.editor import _batch, edit_loss, tokenize_requests
from crispedit.layers import decoder_blocks, find_modules
from crispedit.memit import (MemitConfig, MemitError, alphaedit_delta, alphaedit_solve, apply_closed_form,
                             compute_keys, compute_targets, context_prefixes, key_shares, last_subject_token,
                             memit_delta, memit_solve, nullspace_basis, subject_hidden, subject_tokens)
from crispedit.requests import EditRequest
from models import char_tokenizer, tiny_hf

TOK = char_tokenizer()
CORPUS_TEXT = ["the cat sat on the mat.", "a quick brown fox jumps.", "some words, here and there.",
               "it was a lovely day at the sea.", "the dog ran to the old park.", "we ate some bread and cheese.",
               "birds fly over the sea at dawn.", "the old man walked to town."]
CORPUS = [TOK(t)["input_ids"] for t in CORPUS_TEXT]
# the subject ends each prompt, so δ at its last token reaches the first target token in a 3-block toy
REQUESTS = [EditRequest("the capital is paris", "q", subject="paris", case_id=7),
            EditRequest("a dog ran to the zoo", "x", subject="zoo", case_id=8),
            EditRequest("birds fly over lakes", "j", subject="lakes", case_id=9)]
# settings that can move a 16-wide toy: λ of the order of d_in (E[kᵀ C⁻¹ k] = d_in, so λ = 15,000 barely
# moves a 24-wide key), and EasyEdit's LLaMA-3 target settings (lr 0.5, clamp 4, decay 1e-3)
TOY = MemitConfig(mom2_update_weight=24.0, v_lr=0.5, clamp_norm_factor=4.0, v_weight_decay=1e-3,
                  nullspace_threshold=0.1, nullspace_relative=True, prefix_length=6)
SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
BIBLE = SHARED / "data" / "general" / "world-english-bible.txt"

# float64 closed forms against float64 least-squares solvers: agreement to ~1e-12 relative
SOLVE_TOL = 1e-9
# ‖ΔW k0‖ / (‖ΔW‖ ‖k0‖) for k0 in the protected span: float64 rounding of orthonormal eigenvectors
ANNIHILATE_TOL = 1e-12
# the same forward twice in float64 (or batched vs one at a time): rounding only
FORWARD_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(model_type="llama", layers=3, edit=(0, 1), std=0.3):
    model = tiny_hf(model_type, layers=layers, std=std)
    modules = find_modules(model, list(edit))
    stats = collect(model, modules, CORPUS, labels="empirical", dtype=torch.float64)
    return model, modules, stats.A


def _nll(model, req):
    ids, attn, labels = _batch(tokenize_requests(TOK, [req]), 0, "cpu")
    with torch.no_grad():
        return float(edit_loss(model, ids, attn, labels))


def _rand_psd(d, gen, rank=None, scale=1.0):
    X = torch.randn(d, rank or 3 * d, generator=gen, dtype=torch.float64)
    return scale * X @ X.T / X.shape[1]


# ---------------------------------------------------------------------------------------------
# the closed forms


def test_memit_delta_is_the_least_squares_minimiser():
    """min ‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ), solved as one stacked least-squares problem."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out, lam = 5, 12, 7, 3.0
    K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    C = _rand_psd(d_in, gen)
    D = memit_delta(R, K, C, lam)
    L = torch.linalg.cholesky(C)  # tr(ΔW C ΔWᵀ) = ‖ΔW L‖²
    A = torch.cat([K.T, lam**0.5 * L], 1)  # ΔW A ≈ [Rᵀ, 0]
    B = torch.cat([R.T, torch.zeros(d_out, d_in, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(A.T, B.T).solution.T
    assert torch.allclose(D, ref, rtol=0, atol=SOLVE_TOL * ref.abs().max())
    # MEMIT's own expression: resid @ solve(λC + K Kᵀ, K)ᵀ
    memit_code = R.T @ torch.linalg.solve(lam * C + K.T @ K, K.T).T
    assert torch.allclose(D, memit_code, rtol=0, atol=SOLVE_TOL * ref.abs().max())


def test_alphaedit_delta_is_the_least_squares_minimiser_and_the_papers_form():
    """min over ΔW = ΔW P of ‖ΔW Kᵀ − Rᵀ‖² + L2‖ΔW‖² + ‖ΔW K_pᵀ‖²; equal to the authors' solve
    (P(KKᵀ + K_pK_pᵀ) + L2 I) X = P K Rᵀ and to the paper's R Kᵀ P (K_pK_pᵀP + KKᵀP + L2 I)⁻¹."""
    gen = torch.Generator().manual_seed(1)
    n, n_p, d_in, d_out, L2 = 4, 6, 10, 5, 2.5
    K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    Kp = torch.randn(n_p, d_in, generator=gen, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    C = _rand_psd(d_in, gen, rank=4)  # rank 4: a 6-dimensional null space
    U = nullspace_basis(C, 1e-8)
    assert U.shape == (d_in, d_in - 4)
    D = alphaedit_delta(R, K, U, Kp.T @ Kp, L2)
    r = U.shape[1]
    # ΔW = B Uᵀ with B A ≈ [Rᵀ, 0, 0]
    A = torch.cat([U.T @ K.T, L2**0.5 * torch.eye(r, dtype=torch.float64), U.T @ Kp.T], 1)
    B = torch.cat([R.T, torch.zeros(d_out, r + n_p, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(A.T, B.T).solution.T @ U.T
    scale = ref.abs().max()
    assert torch.allclose(D, ref, rtol=0, atol=SOLVE_TOL * scale)
    P = U @ U.T
    M = K.T @ K + Kp.T @ Kp
    authors = torch.linalg.solve(P @ M + L2 * torch.eye(d_in, dtype=torch.float64), P @ K.T @ R).T
    paper = R.T @ K @ P @ torch.linalg.inv(Kp.T @ Kp @ P + K.T @ K @ P + L2 * torch.eye(d_in, dtype=torch.float64))
    assert torch.allclose(D, authors, rtol=0, atol=SOLVE_TOL * scale)
    assert torch.allclose(D, paper, rtol=0, atol=SOLVE_TOL * scale)
    # without the preserved keys the minimiser differs: the K_p term is live
    assert (alphaedit_delta(R, K, U, None, L2) - D).abs().max() > 1e-3 * scale


def test_alphaedit_annihilates_the_protected_span_and_memit_does_not():
    gen = torch.Generator().manual_seed(2)
    d_in, d_out, n = 16, 6, 5
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)).Q
    vals = torch.cat([torch.logspace(0, 1, 9, dtype=torch.float64), torch.full((7,), 1e-3, dtype=torch.float64)])
    C = Q @ torch.diag(vals) @ Q.T
    K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    U = nullspace_basis(C, 1e-2)
    assert U.shape[1] == 7
    protected = Q[:, :9]  # eigenvalues ≥ 1
    D = alphaedit_delta(R, K, U, None, 1.0)
    ratio = (D @ protected).norm(dim=0) / D.norm()
    assert ratio.max() < ANNIHILATE_TOL
    # any key in the protected span, not only the eigenvectors
    k0 = protected @ torch.randn(9, 20, generator=gen, dtype=torch.float64)
    assert ((D @ k0).norm(dim=0) / (D.norm() * k0.norm(dim=0))).max() < ANNIHILATE_TOL
    # MEMIT only penalises those directions
    Dm = memit_delta(R, K, C, 1.0)
    assert ((Dm @ protected).norm(dim=0) / Dm.norm()).max() > 1e-3


def _realised(R, D, K):
    """``H`` read off the update itself: ``ΔW Kᵀ = Rᵀ H`` solved for ``H`` (``Rᵀ`` has full column rank)."""
    return torch.linalg.lstsq(R.T, D @ K.T).solution


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_key_shares_equal_the_realised_shares_and_s_the_dense_one(method, n):
    """diag H is the share of each request's own residual that ΔW writes at its key; ``s`` is the
    dense ``kᵀ A⁻¹ k`` (MEMIT ``A = λC``; AlphaEdit ``K → KU``, ``A = Uᵀ S_p U + L2·I``); one request
    alone realises ``s/(1+s)``."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out, lam, L2 = 12, 7, 0.7, 2.5
    K = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    C = _rand_psd(d_in, gen)
    if method == "memit":
        D, H = memit_solve(R, K, C, lam)
        S = K @ torch.linalg.inv(lam * C) @ K.T
    else:
        U = nullspace_basis(_rand_psd(d_in, gen, rank=5), 1e-8)
        Sp = _rand_psd(d_in, gen, rank=3)
        D, H = alphaedit_solve(R, K, U, Sp, L2)
        S = K @ U @ torch.linalg.inv(U.T @ Sp @ U + L2 * torch.eye(U.shape[1], dtype=torch.float64)) @ U.T @ K.T
    share, s = key_shares(H)
    assert torch.allclose(share, torch.diagonal(_realised(R, D, K)), rtol=0, atol=SOLVE_TOL)
    assert torch.allclose(s, torch.diagonal(S), rtol=SOLVE_TOL, atol=0)
    assert torch.allclose(H, S @ torch.linalg.inv(torch.eye(n, dtype=torch.float64) + S), rtol=0, atol=SOLVE_TOL)
    if n == 1:
        assert torch.allclose(share, s / (1 + s), rtol=0, atol=SOLVE_TOL)
    else:  # the requests share the update: each realises less of its own residual than it would alone
        assert (share < s / (1 + s)).all()


def test_nullspace_thresholds_absolute_relative_and_empty():
    C = torch.diag(torch.tensor([4.0, 2.0, 0.5, 0.01], dtype=torch.float64))
    assert nullspace_basis(C, 0.6).shape[1] == 2  # 0.5 and 0.01
    assert nullspace_basis(C, 0.6, relative=True).shape[1] == 3  # below 2.4
    assert nullspace_basis(100 * C, 0.6, relative=True).shape[1] == 3  # scale-free
    with pytest.raises(MemitError, match="no eigenvalue below the null-space threshold"):
        nullspace_basis(100 * C, 0.6)


# ---------------------------------------------------------------------------------------------
# keys, subjects, prefixes


def test_key_is_read_at_the_last_subject_token():
    model, modules, _ = _setup(layers=2, edit=(1,))
    module = next(iter(modules.values()))
    req = EditRequest("we met the big bad wolf today", "x", subject="big bad wolf")
    prefix = "the big bad wolf. "  # the subject in a prefix is never the one read
    # char tokenizer: BOS, then one token per character
    expected = 1 + len(prefix) + req.prompt.index(req.subject) + len(req.subject) - 1
    assert last_subject_token(TOK, req.prompt, req.subject, prefix=prefix) == expected
    assert last_subject_token(TOK, req.prompt, req.subject) == expected - len(prefix)
    ids = TOK(prefix + req.prompt)["input_ids"]
    assert TOK.convert_ids_to_tokens(ids[expected]) == "f"

    prefixes = [[""], [prefix, "so. "]]
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()[0]))
    with torch.no_grad():
        for p in ["", prefix, "so. "]:
            model(input_ids=torch.tensor([TOK(p + req.prompt)["input_ids"]]))
    handle.remove()
    at = [last_subject_token(TOK, req.prompt, req.subject, prefix=p) for p in ["", prefix, "so. "]]
    k = [s[i] for s, i in zip(seen, at)]
    expected_key = 0.5 * k[0] + 0.5 * (k[1] + k[2]) / 2  # mean within groups, then over groups
    key = compute_keys(model, TOK, module, [req], prefixes)
    assert torch.allclose(key[0], expected_key, rtol=0, atol=FORWARD_TOL)
    # a neighbouring position gives a different key: the test can tell positions apart
    assert (seen[0][at[0] - 1] - k[0]).abs().max() > 1e-3


def test_subject_tokens_with_and_without_offsets():
    prompt, prefix = "we met the big bad wolf today", "so. "
    first = 1 + len(prefix) + prompt.index("big bad wolf")  # BOS, then one token per character
    ids, span = subject_tokens(TOK, prompt, "big bad wolf", prefix=prefix)
    assert ids == TOK(prefix + prompt)["input_ids"] and span == list(range(first, first + len("big bad wolf")))

    def no_offsets(text, return_offsets_mapping=False):  # a slow tokenizer: no character offsets
        if return_offsets_mapping:
            raise NotImplementedError
        return TOK(text)

    assert subject_tokens(no_offsets, prompt, "big bad wolf", prefix=prefix) == (ids, span)


@pytest.mark.skipif(not STORIES.exists(), reason="shared/models/stories260K is absent")
def test_last_subject_token_with_a_sentencepiece_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    prompt, subject = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
    i = last_subject_token(tok, prompt, subject, prefix="Once upon a time. ", suffix=" French")
    pieces = tok.convert_ids_to_tokens(tok("Once upon a time. " + prompt + " French")["input_ids"])
    assert "".join(pieces[: i + 1]).replace("▁", " ").endswith("Darrieux")
    assert pieces[i + 1] == "▁"  # the space before "is": outside the subject


def test_errors_name_the_request():
    model, modules, C = _setup(layers=2, edit=(1,))
    bad = [EditRequest("the capital is paris", "q", subject=None, case_id="c1")]
    with pytest.raises(MemitError, match=r"request 0 \(case_id c1\): no subject"):
        apply_closed_form(model, TOK, modules, bad, C, TOY)
    missing = [REQUESTS[0], EditRequest("the capital is rome", "q", subject="paris", case_id=42)]
    with pytest.raises(MemitError, match=r"request 1 \(case_id 42\): subject 'paris' is not in the prompt"):
        apply_closed_form(model, TOK, modules, missing, C, TOY)
    with pytest.raises(MemitError, match="--method must be one of memit, alphaedit"):
        apply_closed_form(model, TOK, modules, REQUESTS, C, TOY, method="rome")
    with pytest.raises(MemitError, match="statistics for"):
        apply_closed_form(model, TOK, modules, REQUESTS, {}, TOY)
    with pytest.raises(MemitError, match="--v-lr must be positive"):
        apply_closed_form(model, TOK, modules, REQUESTS, C, MemitConfig(v_lr=0.0))
    with pytest.raises(MemitError, match="no eigenvalue below"):
        apply_closed_form(model, TOK, modules, REQUESTS, C, MemitConfig(nullspace_threshold=1e-30), method="alphaedit")


def test_a_failed_solve_leaves_the_model_as_it_came():
    """The second block's λC + KKᵀ is singular (C = 0, three keys of a wider input): the first block,
    already edited when that solve fails, is put back to the bit."""
    model, modules, C = _setup(layers=3, edit=(0, 1))
    first, second = list(modules)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    with pytest.raises(MemitError, match=f"{second}: λC \\+ KKᵀ is not positive definite"):
        apply_closed_form(model, TOK, modules, REQUESTS, {first: C[first], second: torch.zeros_like(C[second])}, TOY)
    for n, m in modules.items():
        assert torch.equal(m.weight, before[n]), n
    apply_closed_form(model, TOK, modules, REQUESTS, C, TOY)  # the same edit with both solves possible changes both
    assert all(not torch.equal(m.weight, before[n]) for n, m in modules.items())


def test_prefixes_and_edits_are_deterministic_for_a_seed():
    model, modules, C = _setup()
    a = context_prefixes(model, TOK, seed=3, count=5, length=8)
    assert a == context_prefixes(model, TOK, seed=3, count=5, length=8)
    assert a != context_prefixes(model, TOK, seed=4, count=5, length=8)
    assert a[0] == [""] and len(a[1]) == 5 and all(p.endswith(". ") for p in a[1])
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        mods = {n: m.get_submodule(n) for n in modules}
        runs.append(apply_closed_form(m, TOK, mods, REQUESTS, C, TOY, seed=3))
    assert runs[0].prefixes == runs[1].prefixes
    assert all(torch.equal(runs[0].deltas[n], runs[1].deltas[n]) for n in modules)


def test_batched_targets_equal_one_at_a_time():
    model, modules, _ = _setup()
    block = decoder_blocks(model)[1][1]
    prefixes = [[""], ["so. ", "and then. "]]
    cfg = replace(TOY, loss_stop=3.0)  # requests finish at different steps: a finished δ must stay put
    one = compute_targets(model, TOK, block, REQUESTS, prefixes, replace(cfg, z_batch=1))
    all_ = compute_targets(model, TOK, block, REQUESTS, prefixes, replace(cfg, z_batch=3))
    assert one.steps == all_.steps and len(set(one.steps)) > 1, one.steps
    assert torch.allclose(one.z, all_.z, rtol=0, atol=FORWARD_TOL)
    assert (one.z - one.h).norm(dim=1).min() > 0.1  # δ really moved


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_targets_with_the_head_on_the_loss_positions_equal_full_logits(model_type, monkeypatch):
    """The output head runs only on the positions in the loss (a hook on its input); a model without
    ``get_output_embeddings`` takes every position's logits: the same targets, steps and losses."""
    model, _, _ = _setup(model_type)
    block = decoder_blocks(model)[1][1]
    prefixes = [[""], ["so. ", "and then. "]]
    cfg = replace(TOY, loss_stop=3.0, z_batch=2)
    picked = compute_targets(model, TOK, block, REQUESTS, prefixes, cfg)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    full = compute_targets(model, TOK, block, REQUESTS, prefixes, cfg)
    assert picked.steps == full.steps and len(set(picked.steps)) > 1, picked.steps
    assert torch.allclose(picked.z, full.z, rtol=0, atol=FORWARD_TOL)
    for a, b in zip(picked.losses, full.losses):
        assert all(abs(a[k] - b[k]) < FORWARD_TOL for k in a)


def test_target_loss_at_delta_zero_is_the_models_nll_over_the_prefixes():
    """One forward pass, no step (δ = 0): the NLL term is the mean over prefixes of each prefixed
    prompt's mean target NLL, KL and decay are zero; checks the target positions independently."""
    model, _, _ = _setup()
    block = decoder_blocks(model)[1][1]
    prefixes = [[""], ["so. ", "and then. "]]
    t = compute_targets(model, TOK, block, REQUESTS, prefixes, replace(TOY, v_num_grad_steps=1))
    assert t.steps == [0, 0, 0] and torch.equal(t.z, t.h)
    for r, loss in zip(REQUESTS, t.losses):
        expected = sum(_nll(model, EditRequest(p + r.prompt, r.target_new)) for p in ["", "so. ", "and then. "]) / 3
        assert abs(loss["nll"] - expected) < FORWARD_TOL and loss["kl"] == 0 and loss["weight_decay"] == 0


# ---------------------------------------------------------------------------------------------
# the edit on a model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_one_layer_one_request_moves_the_key_by_its_closed_form(model_type):
    """One matrix, one request, the bare prompt as the only prefix: the block output at the subject
    moves by exactly ΔW k = r · s / (1 + s), s = kᵀ (λC)⁻¹ k (Sherman–Morrison), r = z − h; and as
    λ → 0 the key is written to the value z it was solved for."""
    req = [REQUESTS[0]]
    for lam, reach in [(24.0, None), (1e-6, 1e-6)]:
        model, modules, C = _setup(model_type, edit=(1,))
        (name, module), = modules.items()
        block = decoder_blocks(model)[1][1]
        k = compute_keys(model, TOK, module, req)[0]
        h0 = subject_hidden(model, TOK, block, req)[0]
        cfg = replace(TOY, mom2_update_weight=lam)
        res = apply_closed_form(model, TOK, modules, req, C, cfg, prefixes=[[""]])
        h1 = subject_hidden(model, TOK, block, req)[0]
        D = res.deltas[name].T if model_type == "gpt2" else res.deltas[name]
        assert torch.allclose(h1 - h0, D @ k, rtol=0, atol=FORWARD_TOL * h0.norm())
        r = res.targets.z[0] - h0
        s = k @ torch.linalg.solve(lam * C[name], k)
        assert torch.allclose(D @ k, r * s / (1 + s), rtol=0, atol=SOLVE_TOL * r.norm())
        if reach is not None:
            assert (h1 - res.targets.z[0]).norm() < reach * r.norm()
        # the matrix's own edit leaves its input alone
        assert torch.allclose(compute_keys(model, TOK, module, req)[0], k, rtol=0, atol=FORWARD_TOL)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_reported_key_shares_are_what_the_edit_writes(method):
    """Two layers, three requests and then one: per layer, the reported share of each request's own
    residual equals diag H read off ``ΔW_l K_lᵀ = R_lᵀ H`` with ``K_l``, ``R_l`` rebuilt from the model
    (the keys of layer l after the edit, the block output with the layers before l edited), and the
    reported ``s`` equals the dense ``kᵀ A⁻¹ k``; one request realises ``s/(1+s)``."""
    for requests in (REQUESTS, REQUESTS[:1]):
        model, modules, C = _setup()
        base = copy.deepcopy(model)
        res = apply_closed_form(model, TOK, modules, requests, C, TOY, method=method)
        partial = copy.deepcopy(base)  # the base with the layers before l edited
        block = decoder_blocks(partial)[1][1]
        for i, (name, module) in enumerate(modules.items()):
            K = compute_keys(model, TOK, module, requests, res.prefixes)
            R = (res.targets.z - subject_hidden(partial, TOK, block, requests)) / (len(modules) - i)
            D = res.deltas[name]
            share, s = (torch.tensor(x[name], dtype=torch.float64) for x in (res.key_shares, res.s_single))
            assert torch.allclose(share, torch.diagonal(_realised(R, D, K)), rtol=0, atol=1e-8)
            if method == "memit":
                S = K @ torch.linalg.solve(TOY.mom2_update_weight * C[name], K.T)
            else:
                KU = K @ res.null_bases[name]
                S = KU @ KU.T / TOY.L2
            assert torch.allclose(s, torch.diagonal(S), rtol=1e-8, atol=0)
            if len(requests) == 1:
                assert torch.allclose(share, s / (1 + s), rtol=0, atol=1e-12)
            assert res.layers[name]["key_share_mean"] == pytest.approx(float(share.mean()))
            with torch.no_grad():
                partial.get_submodule(name).weight += D


def test_alphaedit_sequential_chunks_protect_the_span_and_carry_the_edited_keys():
    model, modules, C = _setup(layers=4, edit=(1, 2))
    first, second = REQUESTS[:2], [REQUESTS[2]]
    res1 = apply_closed_form(model, TOK, modules, first, C, TOY, method="alphaedit")
    prefixes = res1.prefixes
    for n, m in modules.items():  # the carried moment is Σ k kᵀ of the first chunk's keys after the edit
        K1 = compute_keys(model, TOK, m, first, prefixes)
        assert torch.allclose(res1.preserved[n], K1.T @ K1, rtol=0, atol=FORWARD_TOL)
    base = copy.deepcopy(model)
    res2 = apply_closed_form(model, TOK, modules, second, C, TOY, method="alphaedit", preserved=res1.preserved,
                             null_bases=res1.null_bases, prefixes=prefixes)
    mods = {n: base.get_submodule(n) for n in modules}
    forgetful = apply_closed_form(base, TOK, mods, second, C, TOY, method="alphaedit", prefixes=prefixes)
    for n, m in modules.items():
        D = res2.deltas[n]
        # the protected span of C (eigenvalue ≥ threshold) is annihilated
        vals, vecs = torch.linalg.eigh(C[n])
        protected = vecs[:, vals >= TOY.nullspace_threshold * vals.max()]
        assert protected.shape[1] > 0
        assert ((D @ protected).norm(dim=0) / D.norm()).max() < ANNIHILATE_TOL
        # earlier edits' keys are a penalty, not a constraint: ‖ΔW K_p‖ shrinks but is not zero
        K1 = compute_keys(base, TOK, mods[n], first, prefixes)
        with_memory = (D @ K1.T).norm() / D.norm()
        without = (forgetful.deltas[n] @ K1.T).norm() / forgetful.deltas[n].norm()
        assert with_memory < 0.9 * without
        assert torch.allclose(res2.null_bases[n], res1.null_bases[n])


def test_alphaedit_with_memits_targets_equals_its_own_and_stale_targets_are_refused():
    """Targets optimised for MEMIT at the same weights serve AlphaEdit unchanged (same prefixes and
    options: the same computation); targets from before an edit are refused."""
    model, modules, C = _setup()
    base = copy.deepcopy(model)
    memit = apply_closed_form(model, TOK, modules, REQUESTS, C, TOY, method="memit")
    own = apply_closed_form(base, TOK, {n: base.get_submodule(n) for n in modules}, REQUESTS, C, TOY,
                            method="alphaedit", prefixes=memit.prefixes)
    fresh = _setup()[0]  # the base weights again (same seed)
    shared = apply_closed_form(fresh, TOK, {n: fresh.get_submodule(n) for n in modules}, REQUESTS, C, TOY,
                               method="alphaedit", prefixes=memit.prefixes, targets=memit.targets)
    assert torch.equal(shared.targets.z, memit.targets.z)
    assert torch.allclose(own.targets.z, memit.targets.z, rtol=0, atol=FORWARD_TOL)
    for n in modules:
        assert torch.allclose(shared.deltas[n], own.deltas[n], rtol=0, atol=FORWARD_TOL * own.deltas[n].norm())
    with pytest.raises(MemitError, match="other weights"):  # `model` carries MEMIT's edit now
        apply_closed_form(model, TOK, modules, REQUESTS, C, TOY, method="alphaedit", targets=memit.targets)
    with pytest.raises(MemitError, match="targets for 3 requests"):
        apply_closed_form(fresh, TOK, {n: fresh.get_submodule(n) for n in modules}, REQUESTS[:2], C, TOY,
                          method="alphaedit", targets=memit.targets)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_edit_makes_the_targets_more_likely(method, model_type):
    model, modules, C = _setup(model_type)
    before = [_nll(model, r) for r in REQUESTS]
    res = apply_closed_form(model, TOK, modules, REQUESTS, C, TOY, method=method)
    after = [_nll(model, r) for r in REQUESTS]
    drops = [b - a for a, b in zip(after, before)]
    assert min(drops) > 0.5 and sum(drops) / len(drops) > 1.0, (before, after)  # measured: 0.6-3.4 nats
    assert res.residual_after < 0.9 * min(v["residual"] for v in res.layers.values())
    for n, m in modules.items():
        assert res.deltas[n].shape == m.weight.shape and res.deltas[n].dtype == torch.float64


@pytest.mark.skipif(not (STORIES.exists() and BIBLE.exists()),
                    reason="shared/models/stories260K or shared/data/general is absent")
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_edit_of_a_real_pretrained_model(method):
    """stories260K (d_in 172), C from 60 paragraphs (3,563 tokens) of real English text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    modules = find_modules(model, [1, 2])
    lines = [t for t in BIBLE.read_text(encoding="utf-8").splitlines() if t.strip()][:60]
    C = collect(model, modules, [tok(t)["input_ids"][:64] for t in lines], labels="empirical", dtype=torch.float64).A
    reqs = [EditRequest("Once upon a time, there was a little girl named", "Tom", subject="little girl", case_id=1),
            EditRequest("The dog liked to eat", "rocks", subject="dog", case_id=2)]

    def nll():
        with torch.no_grad():
            return [float(edit_loss(model, *_batch(tokenize_requests(tok, [r]), 0, "cpu"))) for r in reqs]

    before = nll()
    # λ = d_in (λ = 15,000 is tuned to LLaMA-3's d_in = 14,336); a null space of 137 and 162 of 172 directions
    cfg = MemitConfig(mom2_update_weight=172.0, nullspace_threshold=0.2, nullspace_relative=True)
    apply_closed_form(model, tok, modules, reqs, C, cfg, method=method)
    drops = [b - a for a, b in zip(nll(), before)]
    assert min(drops) > 0.2, drops  # measured: MEMIT 2.10 and 0.43 nats, AlphaEdit 1.78 and 0.35


def test_prefix_count_reaches_the_target_optimisation():
    """--prefix-count 0: the target is optimised on the plain prompt alone, so its mean P(target) over
    the prefixes is the plain prompt's; with prefixes the two differ."""
    from crispedit.options import MethodOptions
    from crispedit.session import EditSession

    model, modules, _ = _setup()
    stats = collect(model, modules, CORPUS, labels="empirical", dtype=torch.float64)
    fields = dict(mom2_update_weight=TOY.mom2_update_weight, v_lr=TOY.v_lr, clamp_norm_factor=TOY.clamp_norm_factor,
                  v_weight_decay=TOY.v_weight_decay)
    for count in (0, 2):
        session = EditSession.start(model, TOK, modules, MethodOptions(method="memit", prefix_count=count, **fields), stats)
        session.edit(REQUESTS)
        session.restore_base()
        same = [loss["prob"] == loss["prob_plain"] for loss in session.targets.losses]
        assert all(same) if count == 0 else not any(same), (count, session.targets.losses)


def test_session_takes_memits_targets_for_alphaedit_and_refuses_them_elsewhere():
    from crispedit.options import MethodOptions
    from crispedit.session import EditSession, SessionError

    model, modules, _ = _setup()
    stats = collect(model, modules, CORPUS, labels="empirical", dtype=torch.float64)
    fields = dict(mom2_update_weight=TOY.mom2_update_weight, v_lr=TOY.v_lr, clamp_norm_factor=TOY.clamp_norm_factor,
                  v_weight_decay=TOY.v_weight_decay, nullspace_threshold=0.1, nullspace_relative=True)
    memit = EditSession.start(model, TOK, modules, MethodOptions(method="memit", **fields), stats)
    memit.edit(REQUESTS)
    memit.restore_base()
    alpha = EditSession.start(model, TOK, modules, MethodOptions(method="alphaedit", **fields), stats)
    record = alpha.edit(REQUESTS, targets=memit.targets)
    assert alpha.targets is memit.targets and record["seconds_targets"] < memit.history[0]["seconds_targets"]
    alpha.restore_base()
    ft = EditSession.start(model, TOK, modules, MethodOptions(method="ft"), stats)
    with pytest.raises(SessionError, match="not --method ft"):
        ft.edit(REQUESTS, targets=memit.targets)
