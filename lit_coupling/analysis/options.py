"""Settings of the analysis and report stages (`run --analysis.*`, and `compare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

RippleMetric = Literal["abs_delta_logp", "delta_logp", "neg_delta_logp", "relative_delta_logp"]
RIPPLE_METRICS: tuple[str, ...] = get_args(RippleMetric)


@dataclass
class AnalysisOptions:
    bootstrap: int = 1000
    """Cluster-bootstrap resamples over edits for confidence intervals."""
    permutations: int = 1000
    """Within-edit permutations for the permutation test."""
    ripple: RippleMetric = "abs_delta_logp"
    """Headline ripple of piece j under edit i: abs_delta_logp (|ΔlogP_j|, how much j moved), delta_logp,
    neg_delta_logp (the drop of j's true answer), or relative_delta_logp (ΔlogP_j ÷ the edited piece's own
    ΔlogP)."""
    confidence: float = 0.95
    """Coverage of every confidence interval."""
    alpha: float = 0.05
    """Significance level the verdict uses."""
    ripple_quantile: float = 0.75
    """A pair "rippled" (for AUROC) when its ripple is above this quantile of all pairs' ripple..."""
    ripple_threshold: float | None = None
    """...or above this absolute value of the ripple metric, when set."""
    coupling_bins: int = 5
    """Equal-count GradSim bins for the 'EM change by coupling bin' panel."""
    min_stratum_pairs: int = 10
    """Strata (hop relations) with fewer pairs are listed with their counts but get no correlation."""
