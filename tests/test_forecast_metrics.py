"""The forecast's validation statistics (analysis/forecast_metrics.py) against brute-force definitions."""

import itertools

import numpy as np
import pytest

from lit_coupling.analysis.forecast_metrics import additivity, evaluate, flip_auroc, precision_at_k, spearman


def test_precision_at_k_counts_the_shared_most_negative():
    pred = np.array([-5.0, -4.0, -3.0, 0.0, 1.0, np.nan])
    meas = np.array([-1.0, 0.5, -2.0, -3.0, 2.0, -9.0])  # the NaN pair is left out, not counted as damaged
    # predicted top-2: {0, 1}; measured top-2: {3, 2}
    assert precision_at_k(pred, meas, 2) == 0.0
    assert precision_at_k(pred, meas, 3) == pytest.approx(2 / 3)  # {0,1,2} ∩ {3,2,0}
    assert precision_at_k(pred, meas, 50) == 1.0


def test_flip_auroc_is_the_pairwise_probability_for_any_score_scale():
    rng = np.random.default_rng(0)
    score = rng.normal(50, 20, 40)  # far outside [0, 1]: no sigmoid saturation
    flipped = rng.random(40) < 0.3
    pos, neg = score[flipped], score[~flipped]
    want = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
    assert flip_auroc(score, flipped) == pytest.approx(want)
    assert np.isnan(flip_auroc(score, np.zeros(40, dtype=bool)))


def test_evaluate_pools_pairs_and_resamples_edits():
    rng = np.random.default_rng(1)
    measured = rng.normal(size=(6, 30))
    predicted = measured + 0.3 * rng.normal(size=(6, 30))
    out = evaluate(predicted, measured, -predicted, measured < -1, n_resamples=200)
    assert out["edits"] == 6 and out["pairs"] == 180
    assert out["spearman"]["value"] == pytest.approx(spearman(predicted.ravel(), measured.ravel()))
    per_edit = np.mean([spearman(p, m) for p, m in zip(predicted, measured)])
    assert out["spearman_per_edit"]["value"] == pytest.approx(per_edit)
    low, high = out["spearman"]["ci"]
    assert low <= out["spearman"]["value"] <= high
    prec = np.mean([precision_at_k(p, m, 10) for p, m in zip(predicted, measured)])
    assert out["precision_at_10"]["value"] == pytest.approx(prec)
    assert out["flips"] == int((measured < -1).sum())


def test_additivity():
    singles = np.array([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, -2.0]])
    out = additivity(singles, singles.sum(0))
    assert out["spearman"] == pytest.approx(1.0) and out["relative_l2"] == 0.0


def test_nan_pairs_are_left_out_of_counts_and_additivity():
    """A NaN pair (the edited fact itself) is counted nowhere: not in pairs, not in flips, not in the L2 norms."""
    rng = np.random.default_rng(2)
    measured = rng.normal(size=(3, 20))
    predicted = measured + 0.1 * rng.normal(size=(3, 20))
    flipped = measured < -1
    measured[0, 0] = measured[1, 5] = np.nan
    flipped[0, 0] = flipped[1, 5] = True  # the edited facts flip: their own edit
    score = np.where(np.isnan(measured), np.nan, -predicted)
    out = evaluate(predicted, measured, score, flipped, n_resamples=50)
    assert out["pairs"] == 58 and out["flips"] == int(flipped[np.isfinite(measured)].sum())
    joint = measured.sum(0)
    with_nan = additivity(measured, joint)
    keep = np.isfinite(joint)
    assert with_nan["relative_l2"] == 0.0 and with_nan["spearman"] == pytest.approx(1.0)
    noisy = additivity(predicted, joint)
    want = np.linalg.norm(predicted.sum(0)[keep] - joint[keep]) / np.linalg.norm(joint[keep])
    assert noisy["relative_l2"] == pytest.approx(want)
