"""Settings of the analysis and report stages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnalysisOptions:
    bootstrap: int = 1000
    """Cluster-bootstrap resamples over edits for confidence intervals."""
    permutations: int = 1000
    """Within-edit permutations for the permutation test."""
