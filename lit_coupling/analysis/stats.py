"""Statistics for "does GradSim predict ripple": pure functions on arrays; a pair's cluster is its edit.

Pairs that share an edit are not independent (one edit moves all its pieces together), so intervals come from
a bootstrap that resamples whole edits, and the permutation test shuffles ripple only within an edit.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

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


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r (scipy); NaN, not an error, when it is undefined (fewer than 3 pairs or a constant variable)."""
    if not (_varies(x) and _varies(y)):
        return float("nan")
    return float(sps.pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ (scipy; ties share their mean rank); NaN when undefined, as `pearson`."""
    if not (_varies(x) and _varies(y)):
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


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


def within_cluster_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    ranked: bool = True,
    chunk: int = 100,
) -> dict:
    """Two-sided test of the pooled (Spearman, or Pearson if ranked=False) correlation against shuffling y
    within each cluster: the null keeps each edit's ripple values and breaks only which piece got which."""
    if not (_varies(x) and _varies(y)):
        return {"observed": None, "p": None, "p_greater": None, "n_permutations": 0}
    if ranked:  # a within-cluster shuffle permutes the pooled ranks too: rank once
        x, y = sps.rankdata(x), sps.rankdata(y)
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
    return {
        "observed": observed,
        "p": (as_extreme + 1) / (n_permutations + 1),
        "p_greater": (at_least + 1) / (n_permutations + 1),
        "n_permutations": int(n_permutations),
    }


def prob_superiority(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) + ½·P(A = B) for a random A from a and B from b: the AUROC / common-language effect size."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    ranks = sps.rankdata(np.concatenate([a, b]))
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2  # Mann–Whitney U of a
    return float(u / (len(a) * len(b)))


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) − P(A < B), in [−1, 1]; the rank-biserial correlation of a Mann–Whitney test."""
    return 2 * prob_superiority(a, b) - 1


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the `positive` class (torchmetrics; ties count half)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    # Scores as ranks scaled into [0, 1]: torchmetrics would squash anything else through a sigmoid, which ties
    # large scores in float precision. The ROC curve depends on the order only.
    scaled = sps.rankdata(np.asarray(score, np.float64)) / len(positive)
    return float(binary_auroc(torch.as_tensor(scaled), torch.as_tensor(positive)))


def mann_whitney(a: np.ndarray, b: np.ndarray) -> dict:
    """Is a stochastically larger than b? Two-sided Mann–Whitney with Cliff's δ as the effect size."""
    if len(a) == 0 or len(b) == 0:
        return {"n": [len(a), len(b)], "u": None, "p": None, "cliffs_delta": None, "prob_superiority": None}
    result = sps.mannwhitneyu(a, b, alternative="two-sided")
    return {
        "n": [int(len(a)), int(len(b))],
        "u": float(result.statistic),
        "p": float(result.pvalue),
        "cliffs_delta": cliffs_delta(a, b),
        "prob_superiority": prob_superiority(a, b),
        "median": [float(np.median(a)), float(np.median(b))],
    }


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
    ranks = sps.rankdata(target)
    coef, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    return ranks - design @ coef


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman ρ of x and y after removing from both ranks what is linear in the ranks of z."""
    if not (_varies(x) and _varies(y) and _varies(z)) or len(x) < 4:
        return float("nan")
    rz = sps.rankdata(z)
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
    summary = {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "q1": float(np.quantile(values, 0.25)),
        "q3": float(np.quantile(values, 0.75)),
        "min": float(values.min()),
        "max": float(values.max()),
        "positive": int(np.sum(values > 0)),
        "negative": int(np.sum(values < 0)),
    }
    nonzero = values[values != 0]
    summary["sign_test_p"] = (
        float(sps.binomtest(int(np.sum(nonzero > 0)), len(nonzero)).pvalue) if len(nonzero) else None
    )
    summary["wilcoxon_p"] = float(sps.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else None
    return summary


# --- two-way clustering: pairs share an edit *and* a piece -----------------------------------------------------


def _codes(labels: np.ndarray) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.ravel(), int(codes.max()) + 1 if len(codes) else 0


class TwoWayBootstrap:
    """Resamples edits and pieces independently, with replacement; a pair (edit i, piece j) enters a resample as
    many times as edit i was drawn times piece j was drawn (the "pigeonhole" two-way bootstrap, McCullagh 2000;
    Owen 2007). Pairs of one edit move together (one edit shifts all its pieces), and so do pairs of one piece (a
    fragile piece moves under every edit): resampling only edits would leave the piece effects' variance out.

    Each resample is a weight per pair, so every statistic sees the same resamples (paired differences), and
    Spearman's ρ of a resample is computed exactly (ties between copies included) without materialising it.
    """

    def __init__(
        self, edits: np.ndarray, pieces: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 8
    ):
        self.edit_codes, n_edits = _codes(edits)
        self.piece_codes, n_pieces = _codes(pieces)
        self.n_resamples = n_resamples if n_edits >= 2 and n_pieces >= 2 else 0
        # Few resamples at a time: a chunk's (b, pairs) arrays then stay in cache (chunks of 8 take 40% less CPU
        # than chunks of 100 on 120,000 pairs).
        self.chunk = chunk
        # Counts drawn once: (B, n_edits) and (B, n_pieces) multinomial draws of a resample of each size.
        self.edit_counts = (
            np.stack(
                [np.bincount(rng.integers(0, n_edits, n_edits), minlength=n_edits) for _ in range(self.n_resamples)]
            )
            if self.n_resamples
            else np.empty((0, 0))
        )
        self.piece_counts = (
            np.stack(
                [np.bincount(rng.integers(0, n_pieces, n_pieces), minlength=n_pieces) for _ in range(self.n_resamples)]
            )
            if self.n_resamples
            else np.empty((0, 0))
        )

    def weights(self, mask: np.ndarray | None = None, dtype=np.float64) -> Iterator[np.ndarray]:
        """(b, n) pair weights, a chunk of resamples at a time (only the pairs in `mask`)."""
        e, p = self.edit_codes, self.piece_codes
        if mask is not None:
            e, p = e[mask], p[mask]
        edit_counts, piece_counts = self.edit_counts.astype(dtype), self.piece_counts.astype(dtype)
        for start in range(0, self.n_resamples, self.chunk):
            stop = min(start + self.chunk, self.n_resamples)
            yield np.take(edit_counts[start:stop], e, axis=1) * np.take(piece_counts[start:stop], p, axis=1)

    @property
    def exact_dtype(self):
        """The narrowest float that holds every resample's ranks exactly: a resample has at most n_edits ×
        n_pieces copies, and mid-ranks are half-integers, exact in float32 below 2^23. Half the memory traffic of
        float64 on the gathers and cumulative sums that dominate the bootstrap's time."""
        n_edits = self.edit_counts.shape[1] if self.edit_counts.ndim == 2 else 0
        n_pieces = self.piece_counts.shape[1] if self.piece_counts.ndim == 2 else 0
        return np.float32 if n_edits * n_pieces < 2**22 else np.float64

    def spearman_distribution(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Spearman ρ of x and y in every resample (restricted to `mask`, finite pairs only); NaN where undefined."""
        everything = np.ones(len(x), bool) if mask is None else mask
        return spearman_table(self, {"x": x}, y, everything)["x"][1]


def spearman_table(
    boot: TwoWayBootstrap, predictors: dict[str, np.ndarray], y: np.ndarray, mask: np.ndarray
) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """For each predictor: (Spearman ρ with y over the pairs in `mask` where both are finite, its bootstrap
    distribution, the mask used). Predictors finite on the same pairs share y's ranks and every resample's
    weights, so their distributions are paired."""
    groups: dict[bytes, list[str]] = {}
    masks = {}
    for name, x in predictors.items():
        keep = mask & finite_mask(x, y)
        masks[name] = keep
        groups.setdefault(np.packbits(keep).tobytes(), []).append(name)
    out = {}
    dtype = boot.exact_dtype
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 4))) as pool:
        for names in groups.values():
            keep = masks[names[0]]
            yk = np.asarray(y, np.float64)[keep]
            xs = {name: np.asarray(predictors[name], np.float64)[keep] for name in names}
            points = {name: spearman(x, yk) for name, x in xs.items()}
            rank_y = _WeightedRanker(yk)
            rankers = {name: _WeightedRanker(x) for name, x in xs.items()}
            parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
            if keep.sum() >= 3:
                for w in boot.weights(keep, dtype):
                    middle = ((w.sum(1, dtype=np.float64) + 1) / 2).astype(dtype)[:, None]
                    ry = rank_y.centred(w, middle)
                    # numpy's gathers, cumulative sums and einsum release the GIL: one predictor per thread.
                    rhos = pool.map(lambda name: centred_pearson(rankers[name].centred(w, middle), ry, w), names)
                    for name, rho in zip(names, rhos):
                        parts[name].append(rho)
            for name in names:
                dist = np.concatenate(parts[name]) if parts[name] else np.empty(0)
                out[name] = (points[name], dist, keep)
    return out


class _WeightedRanker:
    """Mid-ranks of a sample in which value k appears w_k times, for many weight vectors at once: sort once, then
    each resample is a cumulative sum."""

    def __init__(self, values: np.ndarray):
        self.order = np.argsort(values, kind="mergesort")
        self.inverse = np.empty_like(self.order)
        self.inverse[self.order] = np.arange(len(values))
        ordered = values[self.order]
        starts = np.r_[True, ordered[1:] != ordered[:-1]] if len(values) else np.array([], bool)
        self.ties = bool(len(values)) and not starts.all()
        self.starts = np.flatnonzero(starts)
        self.group_of = (np.cumsum(starts) - 1)[self.inverse]  # each value's tie group

    def centred(self, weights: np.ndarray, middle: np.ndarray) -> np.ndarray:
        """Mid-ranks minus their weighted mean `middle` ((total copies + 1) / 2, exact for mid-ranks), in the
        values' own order, for (b, n) weights. Centring first keeps the Pearson sums free of cancellation."""
        if weights.shape[1] == 0:
            return weights.copy()
        ordered = np.take(weights, self.order, axis=1)
        if not self.ties:  # rank of a value's copies: all copies before it, plus the middle of its own
            ranks = np.cumsum(ordered, axis=1)
            ordered -= 1
            ordered *= 0.5
            ranks -= ordered
            ranks -= middle
            return np.take(ranks, self.inverse, axis=1)
        totals = np.add.reduceat(ordered, self.starts, axis=1)  # (b, groups): copies per tie group
        mid = np.cumsum(totals, axis=1) - (totals - 1) / 2 - middle
        return np.take(mid, self.group_of, axis=1)


def centred_pearson(dx: np.ndarray, dy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise weighted Pearson r of (b, n) arrays already centred on their weighted means; sums in float64
    whatever the inputs' dtype. NaN where a variable is constant."""
    wdx = w * dx
    cov = np.einsum("ij,ij->i", wdx, dy, dtype=np.float64)
    var = np.einsum("ij,ij->i", wdx, dx, dtype=np.float64) * np.einsum("ij,ij->i", w * dy, dy, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(var)
    r[~(var > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of (b, n) arrays x, y with weights w (copies); NaN where a variable is constant."""
    total = w.sum(1)
    wx = w * x
    sx, sy = wx.sum(1), np.einsum("ij,ij->i", w, y)
    sxy = np.einsum("ij,ij->i", wx, y)
    sxx = np.einsum("ij,ij->i", wx, x)
    syy = np.einsum("ij,ij->i", w * y, y)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / total
        var = (sxx - sx * sx / total) * (syy - sy * sy / total)
        r = cov / np.sqrt(var)
    r[~(var > 1e-12 * np.maximum(sxx * syy, 1e-300))] = np.nan
    return np.clip(r, -1.0, 1.0)


def two_way_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    edits: np.ndarray,
    pieces: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    chunk: int = 50,
) -> dict:
    """Two-sided test of the pooled Spearman ρ against relabelling edits and pieces of the ripple.

    The ripple of pair (i, j) is replaced by that of (σ(i), π(j)) for random permutations σ of the edits and π of
    the pieces (pairs whose image was not measured — an edit's own source piece — drop out). Under the null that
    ripple is independent of the predictor and its edit and piece effects are exchangeable, this keeps both
    clusterings of the ripple intact, which shuffling within an edit does not: with piece effects in both the
    predictor and the ripple, a within-edit shuffle gives type-I error far above α (tests/test_analysis_stats.py,
    the null-world simulation)."""
    keep = finite_mask(x, y)
    x, y = np.asarray(x, np.float64)[keep], np.asarray(y, np.float64)[keep]
    e, n_e = _codes(np.asarray(edits)[keep])
    p, n_p = _codes(np.asarray(pieces)[keep])
    if not (_varies(x) and _varies(y)) or n_e < 2 or n_p < 2:
        return {"observed": None, "p": None, "n_permutations": 0, "scheme": "edits × pieces relabelled"}
    # Ranks are taken once over all pairs; a permutation that maps a pair onto an unmeasured one drops it, and
    # the statistic is the Pearson r of the fixed ranks over the kept pairs (on the observed data: Spearman's ρ).
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    observed = pearson(rx, ry)
    grid = np.full((n_e, n_p), np.nan)
    grid[e, p] = ry
    as_extreme = done = 0
    for start in range(0, n_permutations, chunk):
        b = min(chunk, n_permutations - start)
        sigma = np.argsort(rng.random((b, n_e)), axis=1)
        pi = np.argsort(rng.random((b, n_p)), axis=1)
        permuted = grid[sigma[:, e], pi[:, p]]  # (b, pairs)
        ok = np.isfinite(permuted).astype(np.float64)
        r = weighted_pearson(np.broadcast_to(rx, permuted.shape), np.nan_to_num(permuted), ok)
        r = r[np.isfinite(r)]
        as_extreme += int(np.sum(np.abs(r) >= abs(observed) - 1e-12))
        done += len(r)
    return {
        "observed": observed,
        "p": (as_extreme + 1) / (done + 1),
        "n_permutations": int(done),
        "scheme": "edits × pieces relabelled",
    }
