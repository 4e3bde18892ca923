"""Statistics for "does GradSim predict ripple": pure functions on arrays; a pair's cluster is its edit.

Pairs that share an edit are not independent (one edit moves all its pieces together), so intervals come from
a bootstrap that resamples whole edits, and the permutation test shuffles ripple only within an edit.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import numpy as np
from scipy import stats as sps


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose: adding a statistic never changes another one's resamples."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def finite_mask(*arrays) -> np.ndarray:
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        mask &= np.isfinite(np.asarray(a, dtype=np.float64))
    return mask


def _varies(a: np.ndarray) -> bool:
    return len(a) >= 3 and np.ptp(a) > 0


def rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy's rankdata, without its per-call overhead: the
    bootstrap ranks thousands of small arrays."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.flatnonzero(starts), len(a)]
    ranks = np.empty(len(a))
    ranks[order] = 0.5 * (bounds[group] + bounds[group + 1] + 1)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """NaN, not an error, when a correlation is undefined (fewer than 3 pairs or a constant variable)."""
    if not (_varies(x) and _varies(y)):
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.clip(dx @ dy / np.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if not (_varies(x) and _varies(y)):
        return float("nan")
    return pearson(rank(x), rank(y))


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    if not (_varies(x) and _varies(y)):
        return float("nan")
    return float(sps.kendalltau(x, y).statistic)


def correlation_tests(x: np.ndarray, y: np.ndarray) -> dict:
    """Pearson r, Spearman ρ and Kendall τ-b with their (pairs-independent) p-values."""
    out: dict = {"n": int(len(x))}
    if not (_varies(x) and _varies(y)):
        return out | {name: {"value": None, "p": None} for name in ("pearson", "spearman", "kendall")}
    for name, test in (("pearson", sps.pearsonr), ("spearman", sps.spearmanr), ("kendall", sps.kendalltau)):
        result = test(x, y)
        out[name] = {"value": float(result.statistic), "p": float(result.pvalue)}
    return out


def pearson_by_cluster(x: np.ndarray, y: np.ndarray, clusters: np.ndarray) -> float:
    """Pearson r accumulated cluster by cluster with torchmetrics: constant memory, and the same metric state
    merges exactly across ranks if edits are ever scored in parallel."""
    import torch
    from torchmetrics.regression import PearsonCorrCoef

    if not (_varies(x) and _varies(y)):
        return float("nan")
    # Analysis runs on one rank: never wait for the others at compute().
    metric = PearsonCorrCoef(sync_on_compute=False).set_dtype(torch.float64)
    for members in cluster_members(clusters):
        metric.update(torch.from_numpy(x[members].astype(np.float64)),
                      torch.from_numpy(y[members].astype(np.float64)))
    return float(metric.compute())


def cluster_members(clusters: np.ndarray) -> list[np.ndarray]:
    """Row indices of each cluster, clusters in order of first appearance."""
    _, first, codes = np.unique(clusters, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.flatnonzero(codes == c) for c in order]


class ClusterBootstrap:
    """Resamples whole clusters with replacement. Every statistic sees the same resamples, so the difference
    of two statistics (GradSim vs a baseline) has a paired interval."""

    def __init__(self, clusters: np.ndarray, n_resamples: int, rng: np.random.Generator):
        self.members = cluster_members(np.asarray(clusters))
        k = len(self.members)
        # One cluster cannot be resampled into anything new: no interval then.
        self.draws = rng.integers(0, k, size=(n_resamples, k)) if k >= 2 else np.empty((0, k), dtype=int)

    def indices(self) -> Iterator[np.ndarray]:
        for draw in self.draws:
            yield np.concatenate([self.members[c] for c in draw])

    def distribution(self, statistic: Callable[..., float], *arrays: np.ndarray) -> np.ndarray:
        return np.array([statistic(*(a[idx] for a in arrays)) for idx in self.indices()], dtype=np.float64)


def percentile_interval(distribution: np.ndarray, confidence: float) -> list[float | None]:
    """Percentile interval of a bootstrap distribution; None when most resamples left it undefined."""
    valid = distribution[np.isfinite(distribution)]
    if len(valid) == 0 or len(valid) < len(distribution) / 2:
        return [None, None]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(valid, [tail, 100 - tail])
    return [float(low), float(high)]


def within_cluster_permutation_test(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, n_permutations: int,
                                    rng: np.random.Generator, ranked: bool = True, chunk: int = 100) -> dict:
    """Two-sided test of the pooled (Spearman, or Pearson if ranked=False) correlation against shuffling y
    within each cluster: the null keeps each edit's ripple values and breaks only which piece got which."""
    if not (_varies(x) and _varies(y)):
        return {"observed": None, "p": None, "p_greater": None, "n_permutations": 0}
    if ranked:  # a within-cluster shuffle permutes the pooled ranks too: rank once
        x, y = rank(x), rank(y)
    zx = (x - x.mean()) / x.std()
    zy = (y - y.mean()) / y.std()
    observed = float(np.mean(zx * zy))
    _, codes = np.unique(clusters, return_inverse=True)
    grouped = np.argsort(codes, kind="stable")
    tolerance = 1e-12  # permutations that tie the observed value count as extreme
    as_extreme = at_least = 0
    done = 0
    while done < n_permutations:
        b = min(chunk, n_permutations - done)
        # Sorting by (cluster, random key) shuffles each cluster's block independently.
        shuffled = np.argsort(codes[None, :] + rng.random((b, len(codes))), axis=1)
        perm = np.empty_like(shuffled)
        perm[:, grouped] = shuffled
        r = (zy[perm] * zx[None, :]).mean(axis=1)
        as_extreme += int(np.sum(np.abs(r) >= abs(observed) - tolerance))
        at_least += int(np.sum(r >= observed - tolerance))
        done += b
    return {"observed": observed, "p": (as_extreme + 1) / (n_permutations + 1),
            "p_greater": (at_least + 1) / (n_permutations + 1), "n_permutations": int(n_permutations)}


def prob_superiority(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) + ½·P(A = B) for a random A from a and B from b: the AUROC / common-language effect size."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    ranks = rank(np.concatenate([a, b]))
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) − P(A < B), in [−1, 1]; the rank-biserial correlation of a Mann–Whitney test."""
    return 2 * prob_superiority(a, b) - 1


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    return prob_superiority(score[positive], score[~positive])


def mann_whitney(a: np.ndarray, b: np.ndarray) -> dict:
    """Is a stochastically larger than b? Two-sided Mann–Whitney with Cliff's δ as the effect size."""
    if len(a) == 0 or len(b) == 0:
        return {"n": [len(a), len(b)], "u": None, "p": None, "cliffs_delta": None, "prob_superiority": None}
    result = sps.mannwhitneyu(a, b, alternative="two-sided")
    return {"n": [int(len(a)), int(len(b))], "u": float(result.statistic), "p": float(result.pvalue),
            "cliffs_delta": cliffs_delta(a, b), "prob_superiority": prob_superiority(a, b),
            "median": [float(np.median(a)), float(np.median(b))]}


def quartile_groups(x: np.ndarray, fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(bottom, top) masks: x at or below its `fraction` quantile, at or above its 1 − `fraction` quantile."""
    low, high = np.quantile(x, [fraction, 1 - fraction])
    return x <= low, x >= high


def top_vs_bottom_delta(x: np.ndarray, y: np.ndarray) -> float:
    """Cliff's δ of y between the top and bottom quartiles of x (the statistic the bootstrap resamples)."""
    bottom, top = quartile_groups(x)
    return cliffs_delta(y[top], y[bottom])


def _rank_residual(target: np.ndarray, control_ranks: np.ndarray) -> np.ndarray:
    design = np.column_stack([np.ones_like(control_ranks), control_ranks])
    ranks = rank(target)
    coef, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    return ranks - design @ coef


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman ρ of x and y after removing from both ranks what is linear in the ranks of z."""
    if not (_varies(x) and _varies(y) and _varies(z)) or len(x) < 4:
        return float("nan")
    rz = rank(z)
    return pearson(_rank_residual(x, rz), _rank_residual(y, rz))


def partial_spearman_test(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict:
    rho = partial_spearman(x, y, z)
    if not np.isfinite(rho):
        return {"value": None, "p": None, "n": int(len(x))}
    df = len(x) - 3  # one controlled variable
    t = rho * np.sqrt(df / max(1 - rho**2, np.finfo(float).tiny))
    return {"value": rho, "p": float(2 * sps.t.sf(abs(t), df)), "n": int(len(x))}


def distribution_summary(values: np.ndarray) -> dict:
    """How a per-edit statistic is spread, and whether it is centred away from 0 with edits as the units."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"n": 0}
    summary = {"n": int(len(values)), "mean": float(values.mean()), "median": float(np.median(values)),
               "q1": float(np.quantile(values, 0.25)), "q3": float(np.quantile(values, 0.75)),
               "min": float(values.min()), "max": float(values.max()),
               "positive": int(np.sum(values > 0)), "negative": int(np.sum(values < 0))}
    nonzero = values[values != 0]
    summary["sign_test_p"] = float(sps.binomtest(int(np.sum(nonzero > 0)), len(nonzero)).pvalue) \
        if len(nonzero) else None
    summary["wilcoxon_p"] = float(sps.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else None
    return summary
