"""Seeded Kronecker (LoGra-style) projection of per-piece weight gradients: (D P_out)ᵀ (X P_in), k_out × k_in.

With P entries N(0, 1/k) the projected inner products are unbiased estimates of the exact ones. A factor whose k is
at least its dimension is the identity instead: exact, and no larger than the gradient it would project.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def layer_seed(seed: int, layer: int) -> int:
    """An independent, reproducible stream per (seed, layer)."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1, dtype=np.uint64)[0] >> 1)


def gaussian_factor(dim: int, k: int, generator: torch.Generator) -> Tensor:
    """dim × k with N(0, 1/k) entries (float64, CPU), or the identity when k ≥ dim."""
    if k >= dim:
        return torch.eye(dim, dtype=torch.float64)
    return torch.randn(dim, k, generator=generator, dtype=torch.float64) / k**0.5


def kronecker_projection(
    d_in: int,
    d_out: int,
    k_in: int,
    k_out: int,
    seed: int,
    layer: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(P_in (d_in, k_in'), P_out (d_out, k_out')) for one layer, k' = min(k, dim); drawn in float64 on the CPU so
    the same seed gives the same projection on every device and dtype."""
    generator = torch.Generator().manual_seed(layer_seed(seed, layer))
    p_in = gaussian_factor(d_in, k_in, generator)
    p_out = gaussian_factor(d_out, k_out, generator)
    return p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype)


def project_gradients(x: Tensor, d: Tensor, mask: Tensor, p_in: Tensor, p_out: Tensor) -> Tensor:
    """Projected per-piece gradients (B, k_out·k_in) of a padded batch: x (B, T, d_in), d (B, T, d_out), mask (B, T).

    Computed in the projections' dtype (fp32 for bf16 models) whatever the dtype of x and d.
    """
    xp = x.to(p_in.dtype) @ p_in
    dp = (d.to(p_out.dtype) @ p_out) * mask[..., None].to(p_out.dtype)
    return (dp.transpose(1, 2) @ xp).flatten(1)
