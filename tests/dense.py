"""Dense references that the fast code must equal (small sizes only).

``dense_ggn`` is the exact Gauss–Newton block of the token-mean cross-entropy w.r.t. one weight,
computed independently of ``crispedit.curvature``: ``torch.func`` Jacobians of the logits w.r.t.
the weight (every position ``s ≤ t`` of the causal model included) and ``F_t = diag(p_t) − p_t p_tᵀ``.
``vec`` is column-major over the ``d_out × d_in`` orientation, matching ``A ⊗ G``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev

from crispedit.layers import is_conv1d


def dense_ggn(model, weight_name: str, docs, positions, forward=None) -> torch.Tensor:
    """``(1/N) Σ_docs Σ_{t labelled} J_tᵀ (diag p_t − p_t p_tᵀ) J_t``, ``J_t = ∂ logits_t / ∂ vec W``."""
    module = model.get_submodule(weight_name.rsplit(".", 1)[0])
    W0 = module.weight.detach()
    conv = is_conv1d(module)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits_of(W, ids):
        p = dict(params)
        p[weight_name] = W
        if forward is not None:
            return functional_call(model, p, (ids,))[0]
        return functional_call(model, p, (), {"input_ids": ids, "use_cache": False}).logits[0]

    n = W0.numel()
    H = torch.zeros(n, n, dtype=torch.float64)
    N = 0
    for doc, pos in zip(docs, positions):
        ids = torch.tensor([doc])
        logits = logits_of(W0, ids).detach().to(torch.float64)
        J = jacrev(logits_of)(W0, ids).to(torch.float64)  # [T, V, *W.shape]
        for t in pos:
            Jt = J[t].reshape(J.shape[1], -1) if conv else J[t].transpose(-1, -2).reshape(J.shape[1], -1)
            p = torch.softmax(logits[t], -1)
            F = torch.diag(p) - torch.outer(p, p)
            H += Jt.T @ F @ Jt
            N += 1
    return H / N


def dense_projector(U_A: torch.Tensor, U_G: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(U_A ⊗ U_G) diag(vec M) (U_A ⊗ U_G)ᵀ`` (column-major vec)."""
    U = torch.kron(U_A, U_G)
    return U @ torch.diag(mask.T.reshape(-1).to(U.dtype)) @ U.T


def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-major vec."""
    return X.T.reshape(-1)


def rel_err(X: torch.Tensor, Y: torch.Tensor) -> float:
    return float(torch.linalg.norm(X - Y) / torch.linalg.norm(Y))
