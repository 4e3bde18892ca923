"""Exact inner products ⟨G_i, G_j⟩ of per-piece weight gradients G_i = D_iᵀ X_i of one linear layer.

Short prompts: the ghost dot product Σ_ts (X_i X_jᵀ ∘ D_i D_jᵀ)_ts, which never builds G_i. Long prompts: G_i built
in chunks and a GEMM. `choose_method` picks per layer by arithmetic cost; both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

METHODS = ("ghost", "gemm")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower (bf16 weights) accumulates inner products in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum(values: Tensor, tokens: Tensor) -> Tensor:
    """Sum consecutive runs of rows, `tokens[i]` rows for piece i: (ΣT, m) → (n, m)."""
    ids = torch.repeat_interleave(torch.arange(len(tokens), device=values.device), tokens.to(values.device))
    return values.new_zeros((len(tokens), values.shape[1])).index_add_(0, ids, values)


def ghost_inner(x_a: Tensor, d_a: Tensor, tokens_a: Tensor, x_b: Tensor, d_b: Tensor, tokens_b: Tensor) -> Tensor:
    """(n_a, n_b) matrix of ⟨G_i, G_j⟩ from packed tokens: x (ΣT, d_in) inputs, d (ΣT, d_out) output gradients."""
    # b's tokens index the rows so that both segment sums run over contiguous rows.
    products = x_b @ x_a.T
    products.mul_(d_b @ d_a.T)
    per_b = segment_sum(products, tokens_b)  # (n_b, ΣT_a)
    return segment_sum(per_b.T, tokens_a)  # (n_a, n_b)


def piece_gradients(x: Tensor, d: Tensor, tokens: Sequence[int] | Tensor) -> Tensor:
    """G_i = D_iᵀ X_i for each piece of a packed block: (n, d_out, d_in)."""
    counts = [int(t) for t in tokens]
    out = x.new_empty((len(counts), d.shape[1], x.shape[1]))
    start = 0
    for i, count in enumerate(counts):
        torch.mm(d[start : start + count].T, x[start : start + count], out=out[i])
        start += count
    return out


def gemm_inner(g_a: Tensor, g_b: Tensor) -> Tensor:
    """(n_a, n_b) matrix of ⟨G_i, G_j⟩ from built gradients (n, d_out, d_in), or projected ones (n, k)."""
    return g_a.flatten(1) @ g_b.flatten(1).T


def ghost_flops(tokens: Sequence[int], d_in: int, d_out: int) -> float:
    """Multiply-adds ×2 of the ghost route over the pairs j ≥ i: (ΣT)²/2 token pairs × 2(d_in + d_out)."""
    total = float(sum(tokens))
    return total * total * (d_in + d_out)


def gemm_flops(tokens: Sequence[int], d_in: int, d_out: int, pieces_per_block: int) -> float:
    """The GEMM route: N²/2 pairs × 2·d_in·d_out, plus building G_j once per row block at or before j."""
    n, total = len(tokens), float(sum(tokens))
    row_blocks = max(1.0, n / max(1, pieces_per_block))
    return d_in * d_out * (n * n + total * row_blocks)


def choose_method(tokens: Sequence[int], d_in: int, d_out: int, pieces_per_block: int) -> str:
    """ghost when prompts are short (ΣT² ≲ N²·d_in·d_out/(d_in+d_out)), gemm when they are long."""
    ghost = ghost_flops(tokens, d_in, d_out)
    return "ghost" if ghost <= gemm_flops(tokens, d_in, d_out, pieces_per_block) else "gemm"
