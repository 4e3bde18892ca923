"""The statistics on planted data: intervals cover the planted value; the permutation test holds its level."""

import numpy as np
import pytest
from scipy import stats as sps

from lit_coupling.analysis import stats as S
from lit_coupling.analysis.correlation import headline_for_pairs
from lit_coupling.analysis.options import AnalysisOptions
from tests.analysis_synthetic import planted_pairs


def test_rank_statistics_match_scipy_including_ties():
    rng = np.random.default_rng(0)
    other = rng.normal(size=50)
    for values in (rng.normal(size=50), rng.integers(0, 4, size=50).astype(float)):
        assert S.spearman(values, other) == pytest.approx(
            sps.pearsonr(sps.rankdata(values), sps.rankdata(other)).statistic
        )
        a, b = values[:20], values[20:]  # P(A > B) + ½ P(A = B), counted pair by pair
        pairs = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
        assert S.prob_superiority(a, b) == pytest.approx(pairs)
        labels = np.arange(50) < 20
        assert S.auroc(values, labels) == pytest.approx(pairs)
    assert np.isnan(S.spearman(np.array([2.0, 2.0, 2.0]), other[:3]))


def test_correlations_match_scipy_and_the_headline_pearson_is_the_pooled_one():
    x, y, edits = planted_pairs(0, rho=0.6)
    tests = S.correlation_tests(x, y)
    assert tests["spearman"]["value"] == pytest.approx(sps.spearmanr(x, y).statistic)
    assert tests["kendall"]["value"] == pytest.approx(sps.kendalltau(x, y).statistic)
    options = AnalysisOptions(bootstrap=0, permutations=0, ripple="delta_logp")
    assert headline_for_pairs(x, y, edits, options, 0)["pearson"]["value"] == pytest.approx(
        sps.pearsonr(x, y).statistic, abs=1e-12
    )
    assert np.isnan(S.spearman(x, np.ones_like(y)))  # undefined, not an error


def test_interval_covers_the_planted_correlation():
    """(x, y) pooled is bivariate normal with correlation ρ, built with edit-level effects in both, so the
    pairs of an edit are dependent. Population values: Pearson ρ, Spearman 6/π·asin(ρ/2), Kendall
    2/π·asin(ρ)."""
    rho, seeds = 0.5, 30
    truth = {"pearson": rho, "spearman": 6 / np.pi * np.arcsin(rho / 2), "kendall": 2 / np.pi * np.arcsin(rho)}
    options = AnalysisOptions(bootstrap=200, permutations=0, ripple="delta_logp")
    covered = {name: 0 for name in truth}
    iid_covered = 0
    for seed in range(seeds):
        x, y, edits = planted_pairs(seed, rho=rho)
        headline = headline_for_pairs(x, y, edits, options, seed)
        for name, value in truth.items():
            low, high = headline[name]["ci"]
            covered[name] += low <= value <= high
        # The same bootstrap over single pairs ignores that pairs share an edit: its interval is too narrow.
        iid = S.ClusterBootstrap(np.arange(len(x)), 200, S.rng_for(seed, "iid"))
        low, high = S.percentile_interval(iid.distribution(S.spearman, x, y), 0.95)
        iid_covered += low <= truth["spearman"] <= high
    for name in truth:
        assert covered[name] / seeds >= 0.85, (name, covered)
    assert iid_covered / seeds < 0.8  # why resampling whole edits matters on this data


def test_permutation_test_holds_its_level_when_ripple_is_independent_of_gradsim():
    options = AnalysisOptions(bootstrap=0, permutations=200, ripple="delta_logp")
    p_values = []
    for seed in range(100):
        x, y, edits = planted_pairs(1000 + seed, rho=0.0)
        p_values.append(headline_for_pairs(x, y, edits, options, seed)["permutation"]["p"])
    assert np.mean(np.array(p_values) > 0.05) >= 0.90


def test_permutation_test_detects_a_planted_relation_and_shuffles_only_within_edits():
    x, y, edits = planted_pairs(7, rho=0.4)
    result = S.within_cluster_permutation_test(x, y, edits, 500, S.rng_for(0, "p"))
    assert result["p"] < 0.01 and result["observed"] == pytest.approx(S.spearman(x, y))
    # Only between-edit association (edit means move together, nothing within): within-edit shuffles keep it.
    rng = np.random.default_rng(1)
    edits = np.repeat(np.arange(10), 20)
    level = rng.normal(size=10)[edits]
    x_between, y_between = level + 0.1 * rng.normal(size=200), level + 0.1 * rng.normal(size=200)
    assert S.spearman(x_between, y_between) > 0.8
    assert S.within_cluster_permutation_test(x_between, y_between, edits, 500, S.rng_for(0, "p"))["p"] > 0.05


def test_effect_sizes_on_known_groups():
    a, b = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0])
    # P(A > B) + ½ P(A = B) = (9 − 1 tie + 0.5)/9
    assert S.prob_superiority(a, b) == pytest.approx(8.5 / 9)
    assert S.cliffs_delta(a, b) == pytest.approx(2 * 8.5 / 9 - 1)
    assert S.auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    result = S.mann_whitney(a + 10, b)
    assert result["cliffs_delta"] == 1.0 and result["p"] < 0.2
    bottom, top = S.quartile_groups(np.arange(8.0))
    assert bottom.sum() == 2 and top.sum() == 2 and not (bottom & top).any()


def test_partial_spearman_removes_a_shared_cause():
    rng = np.random.default_rng(2)
    z = rng.normal(size=400)
    x, y = z + 0.3 * rng.normal(size=400), z + 0.3 * rng.normal(size=400)
    assert S.spearman(x, y) > 0.7
    assert abs(S.partial_spearman_test(x, y, z)["value"]) < 0.12
    y_direct = x + 0.2 * rng.normal(size=400)  # a direct relation survives the control
    assert S.partial_spearman(x, y_direct, z) > 0.6


def test_per_edit_summary_counts_signs():
    summary = S.distribution_summary(np.array([0.5, 0.2, -0.1, np.nan, 0.4]))
    assert summary["n"] == 4 and summary["positive"] == 3 and summary["negative"] == 1
    assert summary["median"] == pytest.approx(0.3)
