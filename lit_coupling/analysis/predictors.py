"""Predictors of the ripple of edit i on piece j: pure functions of a run's tensors, one per row of the table.

Notation: for one linear layer, piece j's gradient of log P(a_j | q_j) with respect to the weight W (out, in) is
G_j = D_jᵀ X_j, with X_j (T_j, d_in) the layer's inputs and D_j (T_j, d_out) the gradients of log P at its outputs
(`lit_coupling.gradients.module.TargetHooks`). Pieces are packed: rows of every piece one after the other,
`tokens[j]` rows for piece j. An update ΔW (out, in) is held as factors U (d_out, r), V (d_in, r): ΔW = U Vᵀ.

First-order change of log P_j under ΔW: ⟨G_j, ΔW⟩ = Σ_t d_tᵀ ΔW x_t = Σ_t (d_t U)·(x_t V) — the ghost trick: no
per-piece gradient and no dense ΔW is ever built. The gradient of another cloze is itself a low-rank update
(U = D_newᵀ, V = X_newᵀ), so ⟨G_new, G_j⟩ is the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lit_coupling.gradients.inner import segment_sum

# name → (label, kind). kind: "signed" predicts the direction of ΔlogP as well as its size (the table shows it
# signed against ΔlogP and, as |predictor|, against |ΔlogP|); "magnitude" predicts only how much a piece moves
# (shown against |ΔlogP| only); "oracle" sees the edit's actual ΔW.
PREDICTORS: dict[str, tuple[str, str]] = {
    "first_order": ("first-order ripple ⟨∇_W log P_j, ΔW⟩ (oracle: sees the edit)", "oracle"),
    "gradsim": ("GradSim, all GradSim layers (the seed's)", "signed"),
    "gradsim_edit_layers": ("GradSim on the edited layers only", "signed"),
    "inner_edit_layers": ("inner product ⟨g_i, g_j⟩ on the edited layers", "signed"),
    "new_target_inner": ("⟨g_new,i, g_j⟩: gradient of the edit's new target", "signed"),
    "whitened_cosine": ("MEMIT-aware: key cosine whitened by the edit's covariance", "signed"),
    "hidden_cosine": ("hidden-state cosine", "signed"),
    "grad_norm": ("‖g_j‖ on the edited layers (knows nothing of the edit)", "magnitude"),
    "neg_logp_before": ("−log P_before of the piece (knows nothing of the edit)", "magnitude"),
    "related": ("same chain or shared entity (0/1)", "magnitude"),
    "token_overlap": ("lexical overlap (Jaccard of tokens)", "magnitude"),
}


def low_rank_change(x: Tensor, d: Tensor, tokens: Tensor | Sequence[int], u: Tensor, v: Tensor) -> Tensor:
    """⟨G_j, U Vᵀ⟩ = Σ_t d_tᵀ U Vᵀ x_t for every packed piece j: (n,) in the dtype of x.

    x (ΣT, d_in), d (ΣT, d_out), u (d_out, r), v (d_in, r). Cost O(ΣT·r·(d_in + d_out))."""
    tokens = torch.as_tensor(tokens, device=x.device)
    per_token = ((d @ u.to(d)) * (x @ v.to(x))).sum(1, keepdim=True)
    return segment_sum(per_token, tokens)[:, 0]


def gradient_factors(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """One cloze's gradient G = Dᵀ X as update factors (U, V) = (Dᵀ, Xᵀ)."""
    return d.T, x.T


def factors_norm(u: Tensor, v: Tensor) -> Tensor:
    """‖U Vᵀ‖_F without building U Vᵀ: sqrt(tr((UᵀU)(VᵀV)))."""
    return torch.sqrt(torch.clamp(((u.T @ u) * (v.T @ v)).sum(), min=0))


def whiten(keys: Tensor, cov: Tensor) -> Tensor:
    """L⁻¹k for each row k of `keys` (n, d_in), with C = L Lᵀ (Cholesky): inner products of whitened keys are
    kᵀC⁻¹k'. float64. Whiten every key of a layer once; each edit then costs one matrix-vector product."""
    cov = cov.to(torch.float64)
    chol = torch.linalg.cholesky(cov)
    return torch.linalg.solve_triangular(chol, keys.to(cov).T, upper=False).T


def cosine_to(white: Tensor, white_edit: Tensor) -> Tensor:
    """cos(white_j, white_edit) for each row j; 0 where a key is 0."""
    norms = white.norm(dim=1)
    dots = white @ white_edit
    denom = norms * white_edit.norm()
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), torch.zeros_like(dots))


def whitened_cosine(keys: Tensor, edit_key: Tensor, cov: Tensor) -> Tensor:
    """cos of C^{-1/2}k_j and C^{-1/2}k_i for each row k_j of `keys` (n, d_in): k_iᵀC⁻¹k_j / (‖k_i‖_C⁻¹ ‖k_j‖_C⁻¹).

    MEMIT moves a key k by ΔW k = R·[(λC + k_i k_iᵀ)⁻¹k_i]ᵀk, and (λC + k_i k_iᵀ)⁻¹k_i ∝ C⁻¹k_i: the edit reaches
    the keys that are close to the edited key in the metric of the key covariance, not in the Euclidean one.
    float64; 0 where a key is 0."""
    white = whiten(torch.cat([edit_key[None], keys]), cov)
    return cosine_to(white[1:], white[0])


def layer_inner(inner: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Σ over the chosen layers of the per-layer inner products inner[l, i, j] (coupling_layers.npz): (N, N)."""
    return np.asarray(inner)[list(indices)].astype(np.float64).sum(0)


def cosine_of_inner(inner: np.ndarray) -> np.ndarray:
    """Cosine matrix from an inner-product matrix; 0 where a piece's gradient vanishes (undefined)."""
    norms = np.sqrt(np.clip(np.diag(inner), 0, None))
    denom = np.outer(norms, norms)
    return np.divide(inner, denom, out=np.zeros_like(inner, dtype=np.float64), where=denom > 0)


def gradient_norms(inner: np.ndarray) -> np.ndarray:
    """‖g_j‖ from an inner-product matrix."""
    return np.sqrt(np.clip(np.diag(inner), 0, None))


def _entity(text: str) -> str:
    return " ".join(text.lower().split())


def shared_entity(subjects: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """(N, N) bool: pieces i and j name a common entity (the subject or the answer of either is the subject or the
    answer of the other, compared case- and space-insensitively). The diagonal is True."""
    entities = [{_entity(s), _entity(a)} - {""} for s, a in zip(subjects, answers)]
    index: dict[str, list[int]] = {}
    for k, names in enumerate(entities):
        for name in names:
            index.setdefault(name, []).append(k)
    n = len(entities)
    out = np.eye(n, dtype=bool)
    for members in index.values():
        out[np.ix_(members, members)] = True
    return out
