"""MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025): closed-form locate-then-edit.

Both write, for every request ``i``, a key ``k_i`` (what the edited matrix reads at the subject) to a
new value, spreading the change over the edited layers. Notation: one column per request in the
maths; in the code ``K`` is ``[n, d_in]`` and ``R`` is ``[n, d_out]`` (one row per request), ``ΔW``
is ``d_out × d_in`` (``nn.Linear`` orientation; GPT-2's ``Conv1D`` gets ``ΔWᵀ``).

Keys. ``k`` is the input of the edited MLP output projection (``mlp.down_proj``, ...) at the last
token of the subject in the prompt, averaged over short context prefixes as MEMIT's ``compute_ks``
does: a mean within each group of prefixes, then a mean over groups. The default groups are
``[[""], [5 texts of 10 tokens]]`` (the empty prefix, and texts the model writes itself from "The",
"Therefore", "Because", "I", "You" with top-5 sampling, each followed by ". "): the bare prompt
weighs 1/2 and the five prefixed ones 1/10 each. ``context_prefixes`` makes them from a seed;
callers may pass their own.

Target value. At the last edited block ``L`` (its output, the residual stream) and the last subject
token, a vector ``δ`` is optimised with Adam (``v_lr``, ``v_num_grad_steps`` forward passes, at
most one fewer steps) on MEMIT's loss, per request::

    mean over prefixes p of  −(1/|y|) Σ_t log P(y_t | p + prompt + y_<t ; h_L += δ)        (NLL)
    + kl_factor · KL(P_δ ‖ P_0)  at the last subject token of "{subject} is a"               (KL)
    + v_weight_decay · ‖δ‖ / ‖h‖²                                                            (decay)

and after every step ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖h‖``; a request stops when its loss
is below ``loss_stop`` (5e-2 in the reference code). ``h`` is the block output at the subject of the
bare prompt before editing and the target is ``z = h + δ``. The KL direction, the unsquared decay and
the stopping rule are those of the authors' ``compute_z`` (the papers do not print them). Requests
are optimised ``z_batch`` at a time with one ``δ`` row each: every row's gradient depends on its own
request only, Adam is elementwise and a finished row is restored after each step, so the result is
the one-at-a-time result up to the rounding of batched matmuls.

Spreading. For the edited layers ``l = 1..L`` in block order: recompute the keys ``K_l`` with the
layers before ``l`` already edited and the current block output ``h`` at the bare prompts;
``R = (z − h) / (L − l + 1)``; then

    MEMIT:      ΔW_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹                     λ = mom2_update_weight

    AlphaEdit:  ΔW_l = R K_lᵀ U (Uᵀ (K_l K_lᵀ + K_p K_pᵀ) U + L2 · I)⁻¹ Uᵀ

MEMIT is the minimiser of ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)`` (the paper's ``C₀ = λ E[k kᵀ]``).
``C_l = E[k kᵀ]`` is the uncentred second moment of the layer inputs over a text corpus: exactly the
K-FAC input factor ``A`` of ``crispedit.curvature.collect``. Sample counts: MEMIT's ``mom2_n_samples``
(100,000 Wikipedia articles) is how many *documents* feed its statistics; the matrix it uses,
``SecondMoment.moment()``, is the sum of ``k kᵀ`` over all non-padding tokens divided by the token
count, a per-token mean like our ``A`` (ours counts the labelled positions: every position but the
last of a document). So λ = 15,000 carries over unchanged; only the corpus differs. A corpus of fewer
distinct tokens than ``d_in`` leaves ``C`` singular, and ``λC + KKᵀ`` too unless the keys fill the
gap: the solve then refuses instead of returning noise. Scale of λ: for a key distributed like the
corpus ``E[kᵀ C⁻¹ k] = tr(C⁻¹ C) = d_in``, and a lone request moves its key the fraction ``s/(1+s)``,
``s = kᵀ (λC)⁻¹ k ≈ d_in/λ``, of the way to its value (Sherman–Morrison): λ = 15,000 is matched to
``d_in`` = 14,336 (LLaMA-3-8B) or 16,384 (GPT-J). Scaling λ with ``d_in`` keeps ``d_in``/λ ≈ 1, a share
near 1/2 per layer; whether that writes an edit depends on the model, so λ is chosen by measurement: the
result reports, per request and matrix, ``s`` and the share ``H_jj`` of its own residual that the
batched solve writes (``key_shares``). On stories260K (``d_in`` 172, blocks 1-2;
``benchmarks/bench_memit_lambda.py``) subject keys give ``s`` ≈ 1.4-2.6 × ``d_in``/λ, and an edit
that does not land at the width-scaled λ ≈ 180 (``s`` ≈ 1.8) lands from λ = 30 (``s`` ≈ 10, share 0.91);
below that the share saturates while the drift keeps growing.

AlphaEdit restricts the update to the null space of the preserved keys: ``U`` (``d_in × r``)
holds the eigenvectors of ``C`` whose eigenvalues are below a threshold and ``P = U Uᵀ``. The paper
writes ``ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + I)⁻¹``, the minimiser over ``Δ̃ = ΔW P`` of
``‖Δ̃ K₁ − R‖² + ‖Δ̃‖² + ‖Δ̃ K_p‖²``; the authors' code (``AlphaEdit_main.py``) solves
``(P (K₁K₁ᵀ + K_pK_pᵀ) + L2·I) X = P K₁ Rᵀ`` and adds ``Xᵀ``: the same with the regulariser
``L2 · ‖Δ̃‖²`` (L2 = 10 in their ``hparams/AlphaEdit/Llama3-8B.json``; 1 in the EasyEdit file
CrispEdit's authors used). ``Xᵀ = Xᵀ P`` exactly (multiply the system by ``I − P``), so writing
``ΔW = B Uᵀ`` and solving the ``r × r`` system above is the same minimiser, with ``ΔW k₀ = 0`` to
rounding for every ``k₀`` in the protected span (eigenvalue ≥ threshold) and a symmetric positive
definite matrix to factor. ``K_p`` (the keys of earlier edits, sequential use) enter as a *penalty*
``‖ΔW K_p‖²``, not a constraint: earlier edits are protected softly, not annihilated. The running
sum ``Σ k kᵀ`` over edited keys (``K_p K_pᵀ``, raw, not divided) is returned for the next chunk; the
keys of layer ``l`` after the whole edit are the ``K_l`` of its solve (edits of later layers cannot
reach an earlier layer's input, and a matrix's own edit does not change its input), so no extra pass
is needed. ``P`` comes from ``C`` alone and does not change between chunks, as in the authors' code.

Threshold. The paper's threshold is absolute (2e-2 on the eigenvalues of ``C`` for LLaMA-3-8B,
``nullspace_threshold``). Eigenvalues of ``C`` scale with the square of the activation scale, which
differs between models and layers, so an absolute value protects all or nothing outside the model it
was tuned on; ``nullspace_relative=True`` reads the threshold as a fraction of ``C``'s largest
eigenvalue instead (scale-free). The paper's setting stays the default; the null-space dimension is
reported per matrix.

Defaults (``MemitConfig``) are the LLaMA-3-8B settings of the AlphaEdit authors' repository
(jianghoucheng/AlphaEdit, ``hparams/MEMIT/Llama3-8B.json`` and ``hparams/AlphaEdit/Llama3-8B.json``,
identical except for the two AlphaEdit fields): layers 4-8 (``MEMIT_LAYERS``; the caller chooses the
modules), 25 gradient steps, lr 0.1, weight decay 0.5, KL factor 0.0625, clamp 0.75, λ 15,000,
threshold 2e-2, L2 10; ``loss_stop`` 5e-2 and the prefixes (5 texts of 10 tokens, top-5) are constants
in their code. The MEMIT paper itself gives settings for GPT-J and GPT-NeoX only. CrispEdit's
repository (EasyEdit ``hparams/MEMIT/llama3-8b.yaml``) runs MEMIT with lr 0.5, clamp 4, decay 1e-3
and AlphaEdit with L2 1.

Differences from the reference code, on purpose: the target is tokenised with the prompt
(``prompt + " " + target``, prompt length from the prompt alone, as in ``editor``) rather than
separately; the subject's last token comes from the tokenizer's character offsets (the token that
overlaps the subject's end in the very text fed to the model) when the tokenizer has them, else from
the length of the tokenised text up to the subject's end (the reference method); the subject is
searched in the prompt only, never in a prefix; the logits are the model's own (the reference code
recomputes them from the last layer with ``ln_f`` and ``lm_head``, the same for LLaMA).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import decoder_blocks, is_conv1d, weight_shape
from .requests import EditRequest, edit_text
from .running import frozen, full_precision, input_device, pad_batch

METHODS = ("memit", "alphaedit")
START_WORDS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's prefix generation
MEMIT_LAYERS = {"llama3-8b": [4, 5, 6, 7, 8]}  # the layers MEMIT / AlphaEdit edit in the authors' runs

Prefixes = Sequence[Sequence[str]]  # groups of context prefixes


class MemitError(ValueError):
    """A request, option or statistic the closed-form editors cannot use."""


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class MemitConfig:
    v_num_grad_steps: int = _opt(25, "forward passes of the target optimisation (at most one fewer Adam steps)")
    v_lr: float = _opt(0.1, "Adam learning rate of the target residual δ")
    v_weight_decay: float = _opt(0.5, "weight of ‖δ‖ / ‖h‖² in the target loss")
    kl_factor: float = _opt(0.0625, "weight of KL(P_δ ‖ P_0) on '{subject} is a' in the target loss")
    clamp_norm_factor: float = _opt(0.75, "‖δ‖ is clamped to this multiple of ‖h‖ after every step")
    loss_stop: float = _opt(5e-2, "a request's target optimisation stops once its loss is below this")
    kl_prompt: str = _opt("{} is a", "prompt of the KL term; {} is the subject")
    mom2_update_weight: float = _opt(15000.0, "MEMIT: λ in (λ C + K Kᵀ), C the per-token mean of k kᵀ")
    nullspace_threshold: float = _opt(2e-2, "AlphaEdit: eigenvectors of C with eigenvalue below this are kept")
    nullspace_relative: bool = _opt(False, "AlphaEdit: read the threshold as a fraction of C's largest eigenvalue")
    L2: float = _opt(10.0, "AlphaEdit: weight of ‖ΔW‖² (the paper's I; the authors' LLaMA-3 setting)")
    prefix_count: int = _opt(5, "context prefixes the model writes itself (plus the empty prefix)")
    prefix_length: int = _opt(10, "tokens of each generated prefix, start word (and BOS) included")
    prefix_top_k: int = _opt(5, "top-k sampling of the generated prefixes")
    batch_size: int = _opt(64, "texts per forward pass when reading keys and hidden states")
    z_batch: int = _opt(8, "requests whose targets are optimised together (same result as one at a time)")
    solve_dtype: str = _opt("float64", "dtype of the closed-form solves: float64 or float32")

    def check(self) -> None:
        positive = ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "nullspace_threshold", "prefix_length",
                    "prefix_top_k", "batch_size", "z_batch")
        for name in positive:
            if not getattr(self, name) > 0:
                raise MemitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "loss_stop", "mom2_update_weight", "L2", "prefix_count"):
            if getattr(self, name) < 0:
                raise MemitError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.solve_dtype not in ("float32", "float64"):
            raise MemitError(f"--solve-dtype must be float32 or float64, got {self.solve_dtype!r}")
        if self.kl_prompt.count("{}") != 1:
            raise MemitError(f"--kl-prompt needs exactly one '{{}}' for the subject, got {self.kl_prompt!r}")


# ---------------------------------------------------------------------------------------------
# the closed forms (pure maths; rows of K and R are requests)


def _spd_solve(M: Tensor, B: Tensor, what: str) -> Tensor:
    """``M⁻¹ B`` for a symmetric positive definite ``M`` (Cholesky); refuse a singular one."""
    L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
    if int(info) != 0:
        raise MemitError(f"{what} is not positive definite (Cholesky failed at column {int(info)})")
    return torch.cholesky_solve(B, L)


def memit_delta(R: Tensor, K: Tensor, C: Tensor, lam: float, what: str = "λC + KKᵀ") -> Tensor:
    """MEMIT: ``ΔW = Rᵀ K (λ C + Kᵀ K)⁻¹`` with rows as requests, i.e. ``R Kᵀ (λC + KKᵀ)⁻¹`` in the
    paper's columns; the minimiser of ``‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ)``.

    ``R``: ``[n, d_out]``, ``K``: ``[n, d_in]``, ``C``: ``[d_in, d_in]``; returns ``[d_out, d_in]`` in
    their common dtype."""
    return memit_solve(R, K, C, lam, what)[0]


def memit_solve(R: Tensor, K: Tensor, C: Tensor, lam: float, what: str = "λC + KKᵀ") -> tuple[Tensor, Tensor]:
    """``(ΔW, H)``: MEMIT's ``ΔW`` (``memit_delta``) and ``H = K (λC + KᵀK)⁻¹ Kᵀ`` (``[n, n]``), what
    the update does to the keys: ``ΔW Kᵀ = Rᵀ H`` (see ``key_shares``). ``H`` reuses the solve of ``ΔW``."""
    X = _spd_solve(lam * C + K.T @ K, K.T, what)  # (λC + KᵀK)⁻¹ Kᵀ, [d_in, n]
    return R.T @ X.T, K @ X


def key_shares(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(diag H, s)`` for ``H = K (A + KᵀK)⁻¹ Kᵀ`` of a solve whose update does ``ΔW Kᵀ = Rᵀ H``.

    MEMIT: ``A = λC``. AlphaEdit: ``K → KU``, ``A = Uᵀ S_p U + L2 · I`` (alone and without earlier edits
    ``s = ‖Uᵀk‖² / L2``: L2 is absolute, like λ).

    ``H_jj`` is the share of request ``j``'s own residual that the update writes at its key
    (``ΔW k_j = Σ_i H_ij r_i``; the off-diagonal ``H_ij`` is what the other requests' residuals add).
    ``s_j = k_jᵀ A⁻¹ k_j`` is what request ``j`` sees alone, where Sherman–Morrison gives the share
    ``s/(1+s)``. Both come from ``H``: with ``S = K A⁻¹ Kᵀ``, Woodbury gives ``H = S (I + S)⁻¹``, so
    ``S = H (I − H)⁻¹`` and ``s_j = Σ_m V_jm² η_m / (1 − η_m)`` over the eigenpairs ``(η_m, V_·m)`` of
    ``H`` (``n × n``; no second ``d_in``-sized solve). Rounding: ``s`` carries a relative error of
    about ``eps · (1 + s)`` (``1 − η`` is a subtraction); ``η = 1``, a key direction ``A`` does not
    penalise (``C`` singular there, or ``L2 = 0``), reads ``s ≈ 1/eps`` instead of ``∞``.

    Against the width: ``E[kᵀ C⁻¹ k] = d_in`` for a key distributed like the corpus, so MEMIT's
    ``s ≈ d_in / λ`` for such a key (measured on stories260K's subject keys: 1.4-2.6 × d_in / λ)."""
    eta, V = torch.linalg.eigh(0.5 * (H + H.T))
    gap = (1 - eta).clamp_min(torch.finfo(H.dtype).eps)
    return torch.diagonal(H).clone(), V**2 @ (eta / gap)


def nullspace_basis(C: Tensor, threshold: float, relative: bool = False, what: str = "C") -> Tensor:
    """``U`` (``d_in × r``): orthonormal eigenvectors of the symmetric ``C`` with eigenvalue below
    ``threshold`` (times the largest eigenvalue when ``relative``); ``P = U Uᵀ`` is AlphaEdit's
    projector. Refuses an empty null space (the update would be zero)."""
    vals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
    if not torch.isfinite(vals).all():
        raise MemitError(f"{what}: eigenvalues are not finite")
    tau = threshold * float(vals.max()) if relative else threshold
    keep = vals < tau
    if not keep.any():
        raise MemitError(
            f"{what}: no eigenvalue below the null-space threshold {tau:.3g} (smallest {float(vals.min()):.3g});"
            f" raise --nullspace-threshold or use --nullspace-relative"
        )
    return vecs[:, keep]


def alphaedit_delta(R: Tensor, K: Tensor, U: Tensor, preserved: Tensor | None, L2: float,
                    what: str = "AlphaEdit system") -> Tensor:
    """AlphaEdit's ``ΔW``; see ``alphaedit_solve``."""
    return alphaedit_solve(R, K, U, preserved, L2, what)[0]


def alphaedit_solve(R: Tensor, K: Tensor, U: Tensor, preserved: Tensor | None, L2: float,
                    what: str = "AlphaEdit system") -> tuple[Tensor, Tensor]:
    """AlphaEdit: ``ΔW = Rᵀ K U (Uᵀ (Kᵀ K + S_p) U + L2 · I)⁻¹ Uᵀ`` (rows as requests), the minimiser
    over ``ΔW = ΔW U Uᵀ`` of ``‖ΔW Kᵀ − Rᵀ‖² + L2 ‖ΔW‖² + tr(ΔW S_p ΔWᵀ)``, ``S_p = K_pᵀ K_p``
    (``preserved``: the summed ``k kᵀ`` of earlier edits, or None). Equal to the paper's
    ``R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + L2·I)⁻¹`` with ``P = U Uᵀ`` (see the module docstring).

    ``R``: ``[n, d_out]``, ``K``: ``[n, d_in]``, ``U``: ``[d_in, r]``; returns ``(ΔW, H)``: ``ΔW``
    ``[d_out, d_in]`` and ``H = KU (Uᵀ (KᵀK + S_p) U + L2 · I)⁻¹ (KU)ᵀ`` (``[n, n]``), with
    ``ΔW Kᵀ = Rᵀ H`` as for MEMIT (see ``key_shares``)."""
    KU = K @ U
    M = KU.T @ KU + L2 * torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    if preserved is not None:
        M = M + U.T @ preserved @ U
    X = _spd_solve(M, KU.T, what)  # [r, n]
    return (R.T @ X.T) @ U.T, KU @ X


# ---------------------------------------------------------------------------------------------
# where the subject is


def _where(req: EditRequest, i: int) -> str:
    return f"request {i}" + (f" (case_id {req.case_id})" if req.case_id is not None else "")


def subject_tokens(tokenizer, prompt: str, subject: str | None, prefix: str = "", suffix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of ``prefix + prompt + suffix`` and the positions of the tokens that overlap the first
    occurrence of ``subject`` in ``prompt`` (by character offsets; a tokenizer without offsets: the
    tokens the text up to the subject's end adds to the text before it)."""
    if not subject or not subject.strip():
        raise MemitError("no subject: MEMIT and AlphaEdit read the key at the subject's last token")
    at = prompt.find(subject)
    if at < 0:
        raise MemitError(f"subject {subject!r} is not in the prompt {prompt!r}")
    text = prefix + prompt + suffix
    start, end = len(prefix) + at, len(prefix) + at + len(subject)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        enc = None
    if enc is not None and "offset_mapping" in enc:
        ids = list(enc["input_ids"])
        hits = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    else:
        ids = list(tokenizer(text)["input_ids"])
        last = len(tokenizer(text[:end])["input_ids"]) - 1
        hits = list(range(min(len(tokenizer(text[:start])["input_ids"]), last), last + 1))
    if not hits:
        raise MemitError(f"subject {subject!r} covers no token of {text!r}")
    return ids, hits


def _locate(tokenizer, prefix: str, prompt: str, subject: str | None, suffix: str = "") -> tuple[list[int], int]:
    """Token ids of ``prefix + prompt + suffix`` and the index of the subject's last token."""
    ids, hits = subject_tokens(tokenizer, prompt, subject, prefix, suffix)
    return ids, hits[-1]


def last_subject_token(tokenizer, prompt: str, subject: str, prefix: str = "", suffix: str = "") -> int:
    """Index, in the tokens of ``prefix + prompt + suffix``, of the last token of ``subject``'s first
    occurrence in ``prompt`` (a prefix that happens to contain the subject is never searched)."""
    return _locate(tokenizer, prefix, prompt, subject, suffix)[1]


# ---------------------------------------------------------------------------------------------
# prefixes, keys and hidden states


def context_prefixes(model: nn.Module, tokenizer, seed: int = 0, count: int = 5, length: int = 10,
                     top_k: int = 5) -> list[list[str]]:
    """MEMIT's context prefixes: ``[[""], [text + ". ", ...]]`` with ``count`` texts the model writes
    from the start words "The", "Therefore", "Because", "I", "You" (in turn), ``length`` tokens in all,
    top-``top_k`` sampling from a generator seeded with ``seed`` (the same prefixes for a seed on
    any device). Whitespace is collapsed so a prefix is one line."""
    gen = torch.Generator().manual_seed(seed)
    with frozen(model), torch.no_grad():  # eval mode: no dropout
        texts = [_sample(model, tokenizer, START_WORDS[i % len(START_WORDS)], length, top_k, gen) for i in range(count)]
    return [[""], texts] if texts else [[""]]


def _sample(model: nn.Module, tokenizer, start: str, length: int, top_k: int, gen: torch.Generator) -> str:
    ids = list(tokenizer(start)["input_ids"])
    device = input_device(model)
    while len(ids) < length:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        top = logits.double().cpu().topk(min(top_k, logits.shape[-1]))
        nxt = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)])
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()) + ". "


def _read(model: nn.Module, module: nn.Module, items: Sequence[tuple[list[int], int]], batch_size: int, side: str,
          owners: Sequence[int], weights: Sequence[float], n: int) -> Tensor:
    """``[n, d]`` float64: ``Σ_i weights[i] · x_i`` into row ``owners[i]``, where ``x_i`` is the input
    (``side="input"``) or output of ``module`` at position ``idx`` of item ``i = (ids, idx)``; batched
    with right padding, reduced as it goes (never all items' vectors at once)."""
    device = input_device(model)
    acc: list[Tensor] = []
    now: dict = {}

    def hook(mod, args, output):
        x = args[0] if side == "input" else (output[0] if isinstance(output, tuple) else output)
        x = x.detach()[now["rows"].to(x.device)].to(torch.float64).cpu()  # [batch, d], in item order
        if not acc:
            acc.append(torch.zeros(n, x.shape[1], dtype=torch.float64))
        acc[0].index_add_(0, now["owners"], x * now["weights"][:, None])

    handle = module.register_forward_hook(hook)
    try:
        with frozen(model), torch.no_grad():
            for lo in range(0, len(items), batch_size):
                chunk = items[lo : lo + batch_size]
                ids, attn, rows = pad_batch([d for d, _ in chunk], [[i] for _, i in chunk], device)
                now.update(rows=rows, owners=torch.tensor(owners[lo : lo + batch_size]),
                           weights=torch.tensor(weights[lo : lo + batch_size], dtype=torch.float64))
                model(input_ids=ids, attention_mask=attn, use_cache=False)
    finally:
        handle.remove()
    return acc[0]


def _flat(prefixes: Prefixes) -> list[str]:
    if not prefixes or any(len(g) == 0 for g in prefixes):
        raise MemitError("prefixes: every group needs at least one prefix (use [['']] for the bare prompt)")
    return [p for group in prefixes for p in group]


def compute_keys(model: nn.Module, tokenizer, module: nn.Module, requests: Sequence[EditRequest],
                 prefixes: Prefixes = (("",),), batch_size: int = 64) -> Tensor:
    """``[n, d_in]`` float64: per request, the input of ``module`` at the last subject token of
    ``prefix + prompt``, averaged within each group of ``prefixes`` and then over the groups."""
    flat = _flat(prefixes)
    each = [1.0 / (len(prefixes) * len(g)) for g in prefixes for _ in g]  # group mean, then mean over groups
    items, owners, weights = [], [], []
    for i, r in enumerate(requests):
        for p, w in zip(flat, each):
            try:
                items.append(_locate(tokenizer, p, r.prompt, r.subject))
            except MemitError as e:
                raise MemitError(f"{_where(r, i)}: {e}") from None
            owners.append(i)
            weights.append(w)
    return _read(model, module, items, batch_size, "input", owners, weights, len(requests))


def subject_hidden(model: nn.Module, tokenizer, block: nn.Module, requests: Sequence[EditRequest],
                   batch_size: int = 64) -> Tensor:
    """``[n, d_model]`` float64: the output of ``block`` at the last subject token of each bare prompt."""
    items = []
    for i, r in enumerate(requests):
        try:
            items.append(_locate(tokenizer, "", r.prompt, r.subject))
        except MemitError as e:
            raise MemitError(f"{_where(r, i)}: {e}") from None
    n = len(requests)
    return _read(model, block, items, batch_size, "output", range(n), [1.0] * n, n)


# ---------------------------------------------------------------------------------------------
# target values


@dataclass
class Targets:
    z: Tensor  # [n, d_model] float64: h + δ, what the last edited block should output at the subject
    h: Tensor  # [n, d_model] float64: the block output there before editing
    steps: list[int]  # Adam steps per request
    losses: list[dict]  # per request, at its last forward: nll, kl, weight_decay, loss, prob (mean P(target) over the
    # prefixes), prob_plain (P(target) on the prompt with the empty prefix)


@dataclass
class _Row:
    ids: list[int]
    idx: int  # where δ is added (the last subject token)
    n_prompt: int | None  # tokens before the target; None for the KL row


def _target_rows(tokenizer, req: EditRequest, prefixes: list[str], kl_prompt: str, where: str) -> list[_Row]:
    suffix = edit_text(req.prompt, req.target_new)[len(req.prompt):]
    rows = []
    try:
        for p in prefixes:
            ids, idx = _locate(tokenizer, p, req.prompt, req.subject, suffix)
            n_prompt = len(tokenizer(p + req.prompt)["input_ids"])
            if len(ids) <= n_prompt:
                raise MemitError(f"target {req.target_new!r} tokenises to nothing after the prompt")
            if idx >= n_prompt:
                raise MemitError(f"the subject's last token lies after the prompt in {p + req.prompt!r}")
            rows.append(_Row(ids, idx, n_prompt))
        kl = kl_prompt.replace("{}", req.subject)
        rows.append(_Row(*_locate(tokenizer, "", kl, req.subject), None))
    except MemitError as e:
        raise MemitError(f"{where}: {e}") from None
    return rows


def compute_targets(model: nn.Module, tokenizer, block: nn.Module, requests: Sequence[EditRequest], prefixes: Prefixes,
                    config: MemitConfig | None = None, progress: bool = False) -> Targets:
    """MEMIT's ``compute_z`` for every request (see the module docstring): ``z = h + δ`` at the
    output of ``block`` (the last edited block) and the last subject token. Parameters stay frozen."""
    from tqdm.auto import tqdm

    cfg = config or MemitConfig()
    cfg.check()
    flat = _flat(prefixes)
    rows = [_target_rows(tokenizer, r, flat, cfg.kl_prompt, _where(r, i)) for i, r in enumerate(requests)]
    device = input_device(model)
    with frozen(model):
        h = subject_hidden(model, tokenizer, block, requests, cfg.batch_size)
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        deltas, steps, losses = [], [], []
        with tqdm(total=len(requests), unit="request", desc="targets", disable=not progress) as bar:
            for lo in range(0, len(requests), cfg.z_batch):
                part = slice(lo, lo + cfg.z_batch)
                d, s, l = _optimise(model, block, rows[part], h[part].to(device, dtype), cfg, device)
                deltas.append(d)
                steps += s
                losses += l
                bar.update(len(s))
    delta = torch.cat(deltas).to(torch.float64).cpu()
    return Targets(h + delta, h, steps, losses)


def _optimise(model: nn.Module, block: nn.Module, rows: list[list[_Row]], h: Tensor, cfg: MemitConfig,
              device) -> tuple[Tensor, list[int], list[dict]]:
    """One ``δ`` row per request, Adam on the sum of the still-running requests' losses."""
    n = len(rows)
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    h_norm = h.norm(dim=1)
    kl_init: list[Tensor | None] = [None] * n
    steps, last = [0] * n, [dict() for _ in range(n)]
    active = list(range(n))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for it in range(cfg.v_num_grad_steps):
        docs = [(r, row) for r in active for row in rows[r]]
        ids, attn, where = pad_batch([row.ids for _, row in docs], [[row.idx] for _, row in docs], device)
        owner = torch.tensor([r for r, _ in docs], device=device)
        b_at, t_at = where.nonzero(as_tuple=True)  # one position per document, in document order

        def add_delta(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            x = x + torch.zeros_like(x).index_put((b_at, t_at), delta[owner].to(x.dtype))
            return (x, *out[1:]) if isinstance(out, tuple) else x

        # the positions that enter the loss, in one index: the output head runs on them alone (a hook on its
        # input), and the backward is one scatter, where a slice per row would allocate and add a
        # logits-sized gradient per row
        at_b, at_t, spans = [], [], []
        for b, (r, row) in enumerate(docs):
            ts = [row.idx] if row.n_prompt is None else range(row.n_prompt - 1, len(row.ids) - 1)
            spans.append((len(at_t), len(at_t) + len(ts)))
            at_b += [b] * len(ts)
            at_t += ts
        at = (torch.tensor(at_b, device=device), torch.tensor(at_t, device=device))

        def pick(mod, args):
            x = args[0]
            return (x[at[0].to(x.device), at[1].to(x.device)][None], *args[1:])

        handles = [block.register_forward_hook(add_delta)]
        if head is not None:
            handles.append(head.register_forward_pre_hook(pick))
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        picked = logits[0] if head is not None else logits[at]
        lp_all = torch.log_softmax(picked.to(h.dtype), -1)
        per_request = {r: [] for r in active}
        kl_now = {}
        for (r, row), (lo, hi) in zip(docs, spans):
            if row.n_prompt is None:
                lp = lp_all[lo]
                if kl_init[r] is None:  # the first forward runs at δ = 0: the base model's distribution
                    kl_init[r] = lp.detach()
                kl_now[r] = (lp.exp() * (lp - kl_init[r])).sum()
            else:
                tgt = torch.tensor(row.ids[row.n_prompt :], device=lp_all.device)
                per_request[r].append(-lp_all[lo:hi].gather(1, tgt[:, None]).mean())
        loss = {}
        for r in active:
            nll_each = torch.stack(per_request[r])
            nll = nll_each.mean()
            decay = cfg.v_weight_decay * delta[r].norm() / h_norm[r] ** 2
            loss[r] = nll + cfg.kl_factor * kl_now[r] + decay
            parts = dict(nll=nll, kl=kl_now[r], weight_decay=decay, loss=loss[r], prob=torch.exp(-nll_each).mean(),
                         prob_plain=torch.exp(-nll_each[0]))  # rows[r][0]: the prompt with the empty prefix
            last[r] = {k: float(v.detach()) for k, v in parts.items()}
        going = [r for r in active if loss[r].item() >= cfg.loss_stop] if it < cfg.v_num_grad_steps - 1 else []
        if not going:
            break
        opt.zero_grad(set_to_none=True)
        torch.stack([loss[r] for r in going]).sum().backward()
        with torch.no_grad():
            before = delta.detach().clone()
            opt.step()
            stopped = torch.ones(n, dtype=torch.bool, device=delta.device)
            stopped[going] = False
            delta[stopped] = before[stopped]  # Adam's momentum must not move a finished request
            cap = cfg.clamp_norm_factor * h_norm
            norm = delta.norm(dim=1)
            scale = torch.where(norm > cap, cap / norm, torch.ones_like(norm))
            delta.mul_(scale[:, None])
        for r in going:
            steps[r] += 1
        active = going
    return delta.detach(), steps, last


# ---------------------------------------------------------------------------------------------
# the edit


@dataclass
class ClosedFormResult:
    deltas: dict[str, Tensor]  # ΔW per matrix, stored orientation, float64 (the change actually applied)
    preserved: dict[str, Tensor] | None  # AlphaEdit: Σ k kᵀ of earlier and these edits' keys, for the next chunk
    null_bases: dict[str, Tensor] | None  # AlphaEdit: U per matrix (pass back to skip the eigendecompositions)
    targets: Targets
    layers: dict[str, dict]  # per matrix: residual before its update, relative change, null-space dimension,
    # mean key share and median s (below)
    residual_after: float  # mean ‖z − h‖ at the last edited block after every update
    key_shares: dict[str, list[float]]  # per matrix and request: H_jj, the share of its own residual written
    s_single: dict[str, list[float]]  # per matrix and request: s = kᵀ A⁻¹ k (MEMIT A = λC); alone it writes s/(1+s)
    prefixes: list[list[str]]
    seconds: float
    seconds_targets: float


def _check_targets(targets: Targets, h: Tensor) -> None:
    """Targets given by the caller must belong to these requests at these weights: their ``h`` is the
    block output at the subject now (float rounding of the same forward aside)."""
    if targets.h.shape != h.shape:
        raise MemitError(f"targets for {targets.h.shape[0]} requests of width {targets.h.shape[1]}, "
                         f"editing {h.shape[0]} of width {h.shape[1]}")
    scale = h.norm(dim=1).clamp_min(1e-30)
    off = float(((targets.h.to(h) - h).norm(dim=1) / scale).max())
    if off > 1e-3:
        raise MemitError(f"the targets were optimised at other weights or for other requests (subject hidden "
                         f"states differ by {off:.2g} of their norm); optimise them again")


def _ordered(model: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, block index)`` in block order; one edited matrix per block."""
    blocks_name, _ = decoder_blocks(model)
    out, seen = [], {}
    for name, m in modules.items():
        rest = name[len(blocks_name) + 1 :] if name.startswith(blocks_name + ".") else ""
        head = rest.split(".", 1)[0]
        if not head.isdigit():
            raise MemitError(f"{name}: not inside a decoder block ({blocks_name}.N...); MEMIT spreads over blocks")
        b = int(head)
        if b in seen:
            raise MemitError(f"{name} and {seen[b]}: MEMIT and AlphaEdit edit one matrix per block")
        seen[b] = name
        out.append((name, m, b))
    return sorted(out, key=lambda x: x[2])


def apply_closed_form(
    model: nn.Module,
    tokenizer,
    modules: dict[str, nn.Module],
    requests: Sequence[EditRequest],
    C: dict[str, Tensor],
    config: MemitConfig | None = None,
    method: str = "memit",
    preserved: dict[str, Tensor] | None = None,
    null_bases: dict[str, Tensor] | None = None,
    prefixes: Prefixes | None = None,
    seed: int = 0,
    progress: bool = False,
    targets: Targets | None = None,
) -> ClosedFormResult:
    """Edit ``model`` in place with MEMIT or AlphaEdit; returns ΔW per matrix and what was done.

    ``C[name]``: the per-token ``E[k kᵀ]`` of the matrix's inputs (``KFACStatistics.A``).
    ``preserved[name]`` (AlphaEdit, sequential): ``Σ k kᵀ`` of the keys of earlier edits, as returned
    by the previous call. ``null_bases``: ``U`` per matrix from a previous call (else computed from
    ``C``). ``prefixes``: groups of context prefixes (default ``context_prefixes(model, tokenizer,
    seed)``). ``targets``: the target values of an earlier call on the same requests at the same
    weights (MEMIT's serve AlphaEdit: the optimisation, the slow part, is the same computation);
    refused unless their ``h`` is the block output at the subject now. Weights may have any dtype;
    the solves run in ``config.solve_dtype`` on each matrix's device and the update is applied as
    ``(W.to(float64) + ΔW).to(W.dtype)``. If a layer's solve fails (``MemitError``) the layers already
    edited are put back: the model is left as it came."""
    from tqdm.auto import tqdm

    cfg = config or MemitConfig()
    cfg.check()
    if method not in METHODS:
        raise MemitError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not requests:
        raise MemitError("no request to edit")
    if set(C) != set(modules):
        raise MemitError(f"statistics for {sorted(C)} but editing {sorted(modules)}")
    for name, m in modules.items():
        d_in = weight_shape(m)[1]
        if tuple(C[name].shape) != (d_in, d_in):
            raise MemitError(f"{name}: C is {tuple(C[name].shape)}, expected ({d_in}, {d_in})")
    if preserved is not None and method != "alphaedit":
        raise MemitError("preserved keys are AlphaEdit's; MEMIT takes none")
    ordered = _ordered(model, modules)
    for i, r in enumerate(requests):  # every request usable before anything runs
        try:
            _locate(tokenizer, "", r.prompt, r.subject)
        except MemitError as e:
            raise MemitError(f"{_where(r, i)}: {e}") from None
    block = decoder_blocks(model)[1][ordered[-1][2]]
    sdt = getattr(torch, cfg.solve_dtype)
    start = time.perf_counter()
    bases, kept = None, None
    if method == "alphaedit":  # before the slow part: an empty null space is refused at once
        with full_precision():
            bases = {n: null_bases[n] if null_bases and n in null_bases else
                     nullspace_basis(C[n].to(m.weight.device, sdt), cfg.nullspace_threshold, cfg.nullspace_relative,
                                     f"{n}: C")
                     for n, m, _ in ordered}
        kept = {}
    with frozen(model):
        if prefixes is None:
            prefixes = context_prefixes(model, tokenizer, seed, cfg.prefix_count, cfg.prefix_length, cfg.prefix_top_k)
        prefixes = [list(g) for g in prefixes]
        t0 = time.perf_counter()
        if targets is None:
            targets = compute_targets(model, tokenizer, block, requests, prefixes, cfg, progress)
            h = targets.h  # the block output at the subject before any update (read by compute_targets)
        else:
            h = subject_hidden(model, tokenizer, block, requests, cfg.batch_size)
            _check_targets(targets, h)
        seconds_targets = time.perf_counter() - t0
        deltas, layers, shares, singles = {}, {}, {}, {}
        originals = {}  # each edited matrix as it came (its dtype, on the CPU): put back if a later solve fails
        try:
            for i, (name, m, _) in enumerate(tqdm(ordered, unit="layer", desc=method, disable=not progress)):
                dev = m.weight.device
                K = compute_keys(model, tokenizer, m, requests, prefixes, cfg.batch_size).to(dev, sdt)
                if i:  # the layers before this one are edited: read h again
                    h = subject_hidden(model, tokenizer, block, requests, cfg.batch_size)
                R = ((targets.z - h) / (len(ordered) - i)).to(dev, sdt)
                with full_precision():  # no TF32 in the solves
                    if method == "memit":
                        D, H = memit_solve(R, K, C[name].to(dev, sdt), cfg.mom2_update_weight, f"{name}: λC + KKᵀ")
                    else:
                        U = bases[name].to(dev, sdt)
                        S = preserved[name].to(dev, sdt) if preserved is not None and name in preserved else None
                        D, H = alphaedit_solve(R, K, U, S, cfg.L2, f"{name}: AlphaEdit system")
                        kept[name] = (K.T @ K) if S is None else S + K.T @ K
                    share, s_one = key_shares(H)
                shares[name], singles[name] = share.tolist(), s_one.tolist()
                with torch.no_grad():
                    w = m.weight
                    originals[name] = w.detach().to("cpu", copy=True)
                    old = w.detach().to(torch.float64, copy=True)
                    step = D.T if is_conv1d(m) else D
                    w.copy_((old + step.to(torch.float64)).to(w.dtype))
                    deltas[name] = w.detach().to(torch.float64) - old
                layers[name] = {"residual": float((targets.z - h).norm(dim=1).mean()),
                                "relative_change": float(deltas[name].norm() / old.norm()),
                                "null_dim": None if bases is None else int(bases[name].shape[1]),
                                "key_share_mean": float(share.mean()), "s_median": float(s_one.median())}
        except BaseException:  # a later layer's solve failed (or the run was stopped): undo the layers already edited
            with torch.no_grad():
                for name, w0 in originals.items():
                    modules[name].weight.copy_(w0)
            raise
        after = subject_hidden(model, tokenizer, block, requests, cfg.batch_size)
    return ClosedFormResult(deltas, kept, bases, targets, layers, float((targets.z - after).norm(dim=1).mean()),
                            shares, singles, prefixes, time.perf_counter() - start, seconds_targets)
