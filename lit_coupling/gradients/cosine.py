"""GradSim from gradient inner products: the cosine over any layer subset, zero gradients flagged, summary numbers.

GradSim over a set of layers is the cosine of the concatenated gradients, so it is built from the *sum* of the
per-layer inner products, never from an average of per-layer cosines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lit_coupling.errors import UserError


class NonFiniteGradient(UserError, FloatingPointError):
    """A piece's gradient overflowed or is NaN; the message names the pieces."""


def cosine_from_inner(inner: np.ndarray, in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cosine matrix, zero-gradient mask) from an N×N Gram matrix of gradients.

    A piece whose gradient is zero gets a zero row and column (its diagonal too) instead of NaN.
    """
    norms2 = np.diagonal(inner).astype(np.float64)
    bad = ~np.isfinite(norms2)
    if bad.any():
        raise NonFiniteGradient(
            f"{int(bad.sum())} piece(s) have a non-finite gradient (rows "
            f"{np.flatnonzero(bad)[:10].tolist()}): the gradient overflowed, or the model "
            "computed NaN (its weights are checked when it loads). Under --dtype bfloat16 run "
            "with --dtype float32; in float32, check those pieces' inputs and the model"
        )
    zero = norms2 <= 0
    scale = np.zeros_like(norms2)
    scale[~zero] = 1.0 / np.sqrt(norms2[~zero])
    out = inner if in_place else inner.copy()
    out *= scale[:, None].astype(out.dtype)
    out *= scale[None, :].astype(out.dtype)
    np.clip(out, -1.0, 1.0, out=out)
    diagonal = np.where(zero, 0.0, 1.0)
    out[np.diag_indices_from(out)] = diagonal  # a piece is its own exact match; rounding must not say 1 - 1e-7
    return out, zero


def load_layer_inner(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(inner (L, N, N), layers (L,)) from `coupling_layers.npz` or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        from lit_coupling.outputs import COUPLING_LAYERS

        path = path / COUPLING_LAYERS
    with np.load(path) as data:
        return data["inner"], data["layers"]


def gradsim_over_layers(inner: np.ndarray, layers: np.ndarray, subset: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """GradSim over a subset of the computed layers (model layer numbers): (cosine matrix, zero mask)."""
    positions = {int(layer): i for i, layer in enumerate(layers)}
    missing = [layer for layer in subset if layer not in positions]
    if missing:
        raise UserError(f"layers {missing} were not part of the GradSim run (it has {sorted(positions)})")
    total = np.zeros(inner.shape[1:], dtype=np.float64)
    for layer in subset:
        total += inner[positions[layer]]
    return cosine_from_inner(total, in_place=True)


def summarise(
    cosine: np.ndarray,
    zero: np.ndarray,
    chain_ids: Sequence[str] | None = None,
    max_quantile_pairs: int = 1_000_000,
    seed: int = 0,
) -> dict:
    """Distribution of GradSim over the pairs i < j of pieces with a gradient; same-chain vs other-chain means.

    Moments use every pair (row by row, so memory stays O(N)); quantiles use every pair up to
    `max_quantile_pairs`, else a seeded sample of that many pairs (said in the result).
    """
    n = cosine.shape[0]
    keep = ~zero
    chains = np.unique(np.asarray(chain_ids), return_inverse=True)[1] if chain_ids is not None else None
    count = total = total_sq = total_abs = 0.0
    low, high = np.inf, -np.inf
    same = [0.0, 0]
    for i in range(n - 1):
        if not keep[i]:
            continue
        row = cosine[i, i + 1 :][keep[i + 1 :]].astype(np.float64)
        if row.size == 0:
            continue
        count += row.size
        total += row.sum()
        total_sq += (row * row).sum()
        total_abs += np.abs(row).sum()
        low, high = min(low, row.min()), max(high, row.max())
        if chains is not None:
            match = chains[i + 1 :][keep[i + 1 :]] == chains[i]
            same[0] += row[match].sum()
            same[1] += int(match.sum())
    result: dict = {"pieces": n, "pieces_with_gradient": int(keep.sum()), "pairs": int(count)}
    if count == 0:
        return result
    mean = total / count
    result.update(
        mean=mean,
        std=float(np.sqrt(max(total_sq / count - mean * mean, 0.0))),
        mean_abs=total_abs / count,
        min=float(low),
        max=float(high),
    )
    rows, cols = np.triu_indices(n, 1) if count <= max_quantile_pairs else _sample_pairs(n, max_quantile_pairs, seed)
    ok = keep[rows] & keep[cols]
    values = cosine[rows[ok], cols[ok]].astype(np.float64)
    result["quantiles"] = {str(q): float(np.quantile(values, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
    result["quantiles_from"] = (
        "all pairs" if count <= max_quantile_pairs else f"a sample of {len(values)} pairs (seed {seed})"
    )
    if chains is not None:
        other_count = count - same[1]
        result["same_chain"] = {"pairs": same[1], "mean": same[0] / same[1] if same[1] else None}
        result["other_chain"] = {
            "pairs": int(other_count),
            "mean": (total - same[0]) / other_count if other_count else None,
        }
    return result


def _sample_pairs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, size), rng.integers(0, n, size)
    a, b = a[a != b], b[a != b]
    return np.minimum(a, b), np.maximum(a, b)
