"""How good a ripple forecast was (#19 `--validate`): pure functions of (edit, fact) arrays.

Rows are (edit, fact) pairs (a NaN pair is left out: the edited fact itself); a pair's cluster is its edit, so
every interval comes from a bootstrap that resamples whole edits (`stats.ClusterBootstrap`). Scores are oriented
like Δlog P: the most negative are the predicted most-damaged facts.

- spearman: pooled over every (edit, fact) pair, predicted vs measured Δlog P (signed);
- spearman_abs: pooled, |predicted| vs |measured Δlog P| (how much a fact moves, either way);
- spearman_per_edit: the mean over edits of each edit's own Spearman across facts;
- precision@k: per edit, the share of its k most negative predictions among its k most negative measured
  changes, averaged over edits;
- flip_auroc: AUROC (torchmetrics, rank-scaled scores) of the flip score for the facts whose greedy first answer
  token flipped (pooled).
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from lit_coupling.analysis.stats import ClusterBootstrap, auroc, percentile_interval, rng_for


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ; NaN (not an error) with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def precision_at_k(predicted: np.ndarray, measured: np.ndarray, k: int) -> float:
    """|top-k most negative predicted ∩ top-k most negative measured| / k (k capped at the number of facts; pairs
    with a NaN left out)."""
    keep = np.isfinite(predicted) & np.isfinite(measured)
    predicted, measured = predicted[keep], measured[keep]
    k = min(k, len(predicted))
    if k == 0:
        return float("nan")
    top_p = set(np.argsort(predicted, kind="stable")[:k].tolist())
    top_m = set(np.argsort(measured, kind="stable")[:k].tolist())
    return len(top_p & top_m) / k


def flip_auroc(score: np.ndarray, flipped: np.ndarray) -> float:
    """AUROC of `score` for the flipped facts (`stats.auroc`: torchmetrics on rank-scaled scores); NaN when all or
    none flipped; pairs with a NaN score left out."""
    score, flipped = np.asarray(score, dtype=np.float64), np.asarray(flipped, dtype=bool)
    keep = np.isfinite(score)
    return auroc(score[keep], flipped[keep])


def _per_edit(fn, pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return np.array([fn(p, m) for p, m in zip(pred, meas)], dtype=np.float64)


def evaluate(
    predicted: np.ndarray,
    measured: np.ndarray,
    flip_score: np.ndarray | None = None,
    flipped: np.ndarray | None = None,
    ks: tuple[int, ...] = (10, 50),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Every statistic of one forecast method with a cluster-bootstrap interval; arrays are (E, n)."""
    predicted, measured = np.atleast_2d(predicted).astype(np.float64), np.atleast_2d(measured).astype(np.float64)
    n_edits, n = predicted.shape
    edits = np.repeat(np.arange(n_edits), n)
    p, m = predicted.ravel(), measured.ravel()
    boot = ClusterBootstrap(edits, n_resamples, rng_for(seed, "forecast"))
    edit_boot = ClusterBootstrap(np.arange(n_edits), n_resamples, rng_for(seed, "forecast-edits"))

    def entry(value: float, distribution: np.ndarray) -> dict:
        return {
            "value": None if not np.isfinite(value) else float(value),
            "ci": percentile_interval(distribution, confidence) if len(distribution) else [None, None],
        }

    out = {"edits": n_edits, "facts": n, "pairs": int((np.isfinite(p) & np.isfinite(m)).sum())}
    out["spearman"] = entry(spearman(p, m), boot.distribution(spearman, p, m))
    out["spearman_abs"] = entry(spearman(np.abs(p), np.abs(m)), boot.distribution(spearman, np.abs(p), np.abs(m)))
    per_edit = _per_edit(spearman, predicted, measured)
    out["spearman_per_edit"] = entry(
        float(np.nanmean(per_edit)) if np.isfinite(per_edit).any() else np.nan,
        edit_boot.distribution(lambda v: float(np.nanmean(v)), per_edit),
    )
    for k in ks:
        prec = _per_edit(lambda a, b, k=k: precision_at_k(a, b, k), predicted, measured)
        out[f"precision_at_{k}"] = entry(float(np.mean(prec)), edit_boot.distribution(np.mean, prec))
    if flip_score is not None and flipped is not None:
        s, f = np.atleast_2d(flip_score).ravel().astype(np.float64), np.atleast_2d(flipped).ravel().astype(bool)
        out["flips"] = int(f[np.isfinite(s)].sum())  # the pairs the AUROC sees (a NaN score: left out)
        out["flip_auroc"] = entry(flip_auroc(s, f), boot.distribution(flip_auroc, s, f) if f.any() else np.array([]))
    return out


def additivity(singles: np.ndarray, joint: np.ndarray) -> dict:
    """How far the sum of B single-edit values (B, n) is from the joint edit's (n,): Spearman, Pearson-like
    relative L2 difference ‖Σ singles − joint‖ / ‖joint‖ (facts with a NaN on either side left out: the edited
    facts themselves)."""
    total = np.asarray(singles, dtype=np.float64).sum(0)
    joint = np.asarray(joint, dtype=np.float64)
    keep = np.isfinite(total) & np.isfinite(joint)
    total, joint = total[keep], joint[keep]
    norm = float(np.linalg.norm(joint))
    return {
        "spearman": spearman(total, joint),
        "relative_l2": float(np.linalg.norm(total - joint) / norm) if norm > 0 else None,
    }
