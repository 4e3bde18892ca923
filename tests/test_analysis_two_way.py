"""Two-way clustered pairs (edits × pieces): the bootstrap's weighted Spearman, the permutation test's level on
null worlds, and the verdict's words."""

import numpy as np
import pytest

from lit_coupling.analysis import stats as S
from lit_coupling.analysis.correlation import NO_PRACTICAL, words


def null_world(seed: int, n_edits: int = 12, n_pieces: int = 40):
    """Pairs (edit i, piece j ≠ source of i) whose predictor and ripple both carry edit and piece effects but are
    independent of each other: the null the permutation test must hold its level on."""
    rng = np.random.default_rng(seed)
    sources = rng.choice(n_pieces, n_edits, replace=False)
    e, p = np.meshgrid(np.arange(n_edits), np.arange(n_pieces), indexing="ij")
    keep = p != sources[:, None]
    e, p = e[keep], p[keep]
    x = rng.normal(size=n_edits)[e] + rng.normal(size=n_pieces)[p] + rng.normal(size=len(e))
    y = np.exp(rng.normal(size=n_edits)[e] + 1.5 * rng.normal(size=n_pieces)[p] + 0.5 * rng.normal(size=len(e)))
    return x, y, e, p


def test_resample_spearman_is_the_spearman_of_the_expanded_sample():
    x, y, e, p = null_world(0)
    x = np.round(x, 1)  # ties too
    boot = S.TwoWayBootstrap(e, p, 6, S.rng_for(0, "test"))
    table = S.spearman_table(boot, {"x": x, "minus_x": -x}, y, np.ones(len(x), bool))
    weights = np.concatenate(list(boot.weights()))
    for k in range(6):
        expanded = np.repeat(np.arange(len(x)), weights[k].astype(int))
        assert table["x"][1][k] == pytest.approx(S.spearman(x[expanded], y[expanded]), abs=1e-12)
    assert table["x"][0] == pytest.approx(S.spearman(x, y))
    np.testing.assert_allclose(table["minus_x"][1], -table["x"][1])  # paired: the same resamples


def test_two_way_permutation_holds_its_level_on_200_null_worlds_and_within_edit_shuffles_do_not():
    alpha, worlds = 0.05, 200
    two_way, within = [], []
    for seed in range(worlds):
        x, y, e, p = null_world(seed)
        two_way.append(S.two_way_permutation_test(x, y, e, p, 199, S.rng_for(seed, "perm"))["p"] < alpha)
        within.append(S.within_cluster_permutation_test(x, y, e, 199, S.rng_for(seed, "perm"))["p"] < alpha)
    assert np.mean(two_way) <= 0.06, np.mean(two_way)
    assert np.mean(within) > 0.1, np.mean(within)  # why the analysis no longer uses it


def test_two_way_permutation_detects_a_planted_relation():
    x, y, e, p = null_world(3)
    y = np.exp(0.8 * x + np.log(y))
    result = S.two_way_permutation_test(x, y, e, p, 199, S.rng_for(0, "perm"))
    assert result["p"] < 0.01 and result["observed"] == pytest.approx(S.spearman(x, y))


def test_effect_size_decides_the_words():
    # a tiny but "significant" correlation is never called support
    assert words(0.06, [0.04, 0.08], 0.001)[0] == "no practical association"
    assert words(-0.09, [-0.12, -0.06], 0.001)[0] == "no practical association"
    assert words(0.35, [0.2, 0.5])[0] == "supported"
    assert words(0.35, [0.2, 0.5], 0.2)[0] == "inconclusive"  # the permutation test does not reject
    assert words(0.25, [-0.05, 0.5])[0] == "inconclusive"
    assert words(-0.4, [-0.6, -0.2])[0] == "reversed"
    assert words(None, None)[0] == "no data"
    for rho in np.linspace(-0.099, 0.099, 11):
        assert words(rho, [rho - 0.01, rho + 0.01], 0.0)[0] != "supported"
    assert NO_PRACTICAL == 0.1


def test_pair_table_reads_known_pieces_and_related_facts():
    from lit_coupling.analysis.pairs import build_pair_table
    from lit_coupling.data.piece import KnowledgePiece

    def piece(i, chain, subject, answer):
        return KnowledgePiece(
            f"p{i}", chain, chain, "hop1", 1, f"prompt {i}", answer, subject, prompt_ids=[i + 1], answer_ids=[i + 50]
        )

    pieces = [
        piece(0, "a", "Mira", "Paris"),
        piece(1, "a", "Paris", "France"),
        piece(2, "b", "Olo", "paris"),
        piece(3, "c", "Zed", "Spain"),
    ]
    scores = {
        "logp_before": [-1.0, -2.0, -3.0, -0.5],
        "logp_after": [-5.0, -2.5, -3.0, -0.4],
        "tf_em_before": [True, True, False, True],
    }
    ripple = {"experiments": [{"edit_id": 0, "source_index": 0, "status": "ok", "pieces": scores}]}
    table = build_pair_table(pieces, np.eye(4), ripple)
    assert table["related"].tolist() == [True, True, False]  # same chain; shared entity "Paris"; nothing shared
    assert table["shared_entity"].tolist() == [True, True, False]
    assert table["known"].tolist() == [1.0, 0.0, 1.0]  # falls back on teacher-forced EM before editing
    assert table["neg_logp_before"].tolist() == [2.0, 3.0, 0.5]
    ripple["baseline"] = {"known": [True, False, True, False]}  # the ripple stage's own judgement wins
    assert build_pair_table(pieces, np.eye(4), ripple)["known"].tolist() == [0.0, 1.0, 0.0]
