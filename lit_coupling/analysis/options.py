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

    def validate(self) -> None:
        """Refuse values that would change the verdict silently (run before any stage computes)."""
        from lit_coupling.errors import check_choice, check_float, check_int

        check_float(
            "analysis.confidence", self.confidence, 0, 1, low_open=True, high_open=True, hint="0.95 is a 95% interval"
        )
        check_float(
            "analysis.alpha",
            self.alpha,
            0,
            1,
            low_open=True,
            high_open=True,
            hint="0.05 is the usual significance level",
        )
        # The smallest permutation p-value is 1/(permutations + 1): below floor(1/alpha) it can never reach alpha,
        # and the verdict could never be "supported" whatever the data say.
        least = max(1, int(1 / self.alpha))
        while 1 / (least + 1) >= self.alpha:
            least += 1
        check_int(
            "analysis.permutations",
            self.permutations,
            least,
            hint=f"with fewer, the smallest p-value 1/(permutations+1) cannot fall below --analysis.alpha "
            f"{self.alpha}; 1000 is the default",
        )
        # A percentile interval needs at least one resample in each tail.
        tail = (1 - self.confidence) / 2
        check_int(
            "analysis.bootstrap",
            self.bootstrap,
            max(2, int(-(-1 // tail))),
            hint=f"with fewer, a tail of the {self.confidence:.0%} interval holds no resample; 1000 is the default",
        )
        check_choice("analysis.ripple", self.ripple, RIPPLE_METRICS)
        check_float("analysis.ripple_quantile", self.ripple_quantile, 0, 1, low_open=True, high_open=True)
        check_float("analysis.ripple_threshold", self.ripple_threshold, optional=True)
        check_int("analysis.coupling_bins", self.coupling_bins, 2)
        check_int("analysis.min_stratum_pairs", self.min_stratum_pairs, 3, hint="a correlation needs at least 3 pairs")
