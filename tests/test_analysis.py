"""The pair table and the analysis/report stages on synthetic run directories in the documented formats."""

import json

import numpy as np
import pytest
from scipy import stats as sps

from lit_coupling import outputs
from lit_coupling.analysis.correlation import correlation_analysis
from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.analysis.pairs import build_pair_table, describe_run, load_run, pair_table
from lit_coupling.analysis.plots import chain_order
from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.errors import UserError
from lit_coupling.pipeline.run import RunConfig
from tests.analysis_synthetic import write_synthetic_run

# A model name that is neither embedded nor a directory: the manifest needs no trained model for it.
MODEL = "synthetic-model"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A planted run taken through `lit-coupling run --stages analysis,report` with the default settings
    (1,000 resamples and permutations): the default path, tested once."""
    from lit_coupling.__main__ import main

    directory = write_synthetic_run(tmp_path_factory.mktemp("planted") / "run", effect=3.0)
    assert (
        main(
            [
                "run",
                "--stages",
                "analysis,report",
                "--output_dir",
                str(directory),
                "--model_path",
                MODEL,
                "--logger",
                "none",
            ]
        )
        == 0
    )
    return directory


def test_pair_table_has_one_row_per_finished_edit_and_other_piece(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", n_chains=4, n_edits=5))
    table = pair_table(run)
    n = len(run.pieces)
    assert len(table) == 5 * (n - 1)  # the failed sixth edit is left out
    assert not (table["source_index"] == table["piece_index"]).any()
    assert table.groupby("edit_id")["same_chain"].sum().eq(2).all()  # the other two pieces of the chain
    same = table[table["same_chain"]]
    assert set(same["hop_relation"]) <= {
        f"{a}→{b}" for a in ("hop1", "hop2", "question") for b in ("hop1", "hop2", "question") if a != b
    }
    assert set(table.loc[~table["same_chain"], "hop_relation"]) == {"other chain"}
    row = table.iloc[0]
    i, j = int(row["source_index"]), int(row["piece_index"])
    assert row["gradsim"] == pytest.approx(run.coupling[i, j])
    experiment = run.ripple["experiments"][0]
    before, after = experiment["pieces"]["logp_before"], experiment["pieces"]["logp_after"]
    assert row["delta_logp"] == pytest.approx(after[j] - before[j])
    assert row["relative_delta_logp"] == pytest.approx((after[j] - before[j]) / (after[i] - before[i]))


def test_token_overlap_ignores_bos_and_hidden_cosine_is_a_cosine():
    pieces = [
        KnowledgePiece("a", "r", "r", "hop1", 1, "p", "x", "s", prompt_ids=[0, 5, 6], answer_ids=[7]),
        KnowledgePiece("b", "r", "r", "hop2", 2, "p", "y", "s", prompt_ids=[0, 7, 8], answer_ids=[9]),
        KnowledgePiece("c", "q", "q", "hop1", 1, "p", "z", "s", prompt_ids=[0, 10], answer_ids=[11]),
    ]
    scores = {"logp_before": [-1.0, -2.0, -3.0], "logp_after": [-5.0, -2.5, -3.0]}
    ripple = {"experiments": [{"edit_id": 0, "source_index": 0, "status": "ok", "pieces": scores}]}
    hidden = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    table = build_pair_table(pieces, np.eye(3), ripple, hidden, bos_ids=[0])
    # {5,6,7} vs {7,8,9} share one of five tokens; counting BOS would make it 2 of 6
    assert table["token_overlap"].tolist() == [pytest.approx(1 / 5), 0.0]
    assert table["hidden_cosine"].tolist() == [pytest.approx(1 / np.sqrt(2)), pytest.approx(0.0)]
    assert table["hop_relation"].tolist() == ["hop1→hop2", "other chain"]
    assert np.isnan(table["tf_em_flip"]).all()  # not measured → NaN, never a made-up flip


def test_zero_gradient_pieces_are_left_out_not_counted_as_uncoupled(tmp_path):
    directory = write_synthetic_run(tmp_path / "run", n_chains=4, n_edits=4)
    matrix = np.load(directory / outputs.COUPLING_MATRIX)
    matrix[3, :] = matrix[:, 3] = 0.0  # doc: a zero-gradient piece has a zero row and column
    np.save(directory / outputs.COUPLING_MATRIX, matrix)
    run = load_run(directory)
    result = correlation_analysis(pair_table(run), AnalysisOptions(bootstrap=20, permutations=20), 0)
    excluded = result["counts"]["pairs_excluded"]["gradsim undefined (zero gradient)"]
    sources = {e["source_index"] for e in run.ripple["experiments"][:4]}
    assert excluded == sum(len(run.pieces) - 1 if s == 3 else 1 for s in sources)
    assert result["counts"]["pairs"] == 4 * (len(run.pieces) - 1) - excluded


def test_every_headline_number_recomputes_from_the_files(finished_run):
    """Independently of lit_coupling: read the matrix and the ripple file, rebuild the pairs, recompute."""
    result = json.loads((finished_run / outputs.CORRELATION).read_text())
    matrix = np.load(finished_run / outputs.COUPLING_MATRIX)
    ripple = json.loads((finished_run / outputs.RIPPLE).read_text())
    pieces = json.loads((finished_run / outputs.PIECES).read_text())["pieces"]
    chains = [p["chain_id"] for p in pieces]
    entities = [{p["subject"], p["answer"]} for p in pieces]
    x, y, delta, related, per_edit = [], [], [], [], []
    for experiment in ripple["experiments"]:
        if experiment["status"] != "ok":
            continue
        i = experiment["source_index"]
        before = np.array(experiment["pieces"]["logp_before"])
        after = np.array(experiment["pieces"]["logp_after"])
        others = [j for j in range(len(before)) if j != i]
        x_edit, y_edit = matrix[i, others], np.abs(after[others] - before[others])
        per_edit.append(sps.spearmanr(x_edit, y_edit).statistic)
        x.extend(x_edit)
        y.extend(y_edit)
        delta.extend(after[others] - before[others])
        related.extend(chains[j] == chains[i] or bool(entities[i] & entities[j]) for j in others)
    x, y, delta, related = map(np.array, (x, y, delta, related))
    # Issue 13: the headline is on related facts, magnitude with magnitude (|GradSim| vs |ΔlogP|), signed beside it
    headline, all_pairs = result["headline"], result["all_pairs"]
    assert headline["stratum"] == "related" and headline["n"] == related.sum() == result["counts"]["related_pairs"]
    assert result["counts"]["pairs"] == len(x) == all_pairs["n"]
    ax, ay = np.abs(x[related]), y[related]
    assert headline["spearman"]["value"] == pytest.approx(sps.spearmanr(ax, ay).statistic, abs=1e-9)
    assert headline["pearson"]["value"] == pytest.approx(sps.pearsonr(ax, ay).statistic, abs=1e-6)
    assert headline["kendall"]["value"] == pytest.approx(sps.kendalltau(ax, ay).statistic, abs=1e-9)
    assert headline["signed"]["spearman"]["value"] == pytest.approx(
        sps.spearmanr(x[related], delta[related]).statistic, abs=1e-9
    )
    assert all_pairs["spearman"]["value"] == pytest.approx(sps.spearmanr(np.abs(x), y).statistic, abs=1e-9)
    table = result["predictor_table"]["strata"]
    assert table["all"]["magnitude"]["gradsim"]["rho"] == pytest.approx(all_pairs["spearman"]["value"])
    assert table["all"]["signed"]["gradsim"]["rho"] == pytest.approx(sps.spearmanr(x, delta).statistic, abs=1e-9)
    assert [e["spearman"] for e in result["per_edit"]["edits"]] == pytest.approx(per_edit)
    matrix_hash = outputs.sha256_file(finished_run / outputs.COUPLING_MATRIX)
    assert result["inputs"][outputs.COUPLING_MATRIX] == matrix_hash


def test_default_path_writes_all_outputs_and_finds_the_planted_relation(finished_run):
    result = json.loads((finished_run / outputs.CORRELATION).read_text())
    assert result["settings"]["bootstrap"] == 1000 and result["settings"]["permutations"] == 1000
    low, high = result["headline"]["spearman"]["ci"]
    assert 0 < low < result["headline"]["spearman"]["value"] < high
    assert result["all_pairs"]["permutation"]["p"] < 0.01  # issue 13: the two-way test, on all pairs
    assert result["verdict"]["conclusion"] == "supported"
    chain = result["strata"]["chain"]
    assert chain["same chain"]["mean_gradsim"] > chain["other chains"]["mean_gradsim"]
    assert {"gradsim", "token_overlap", "hidden_cosine"} <= set(result["predictors"]["table"])
    assert len(result["by_layer"]) == 3
    for name in (outputs.PAIR_TABLE, outputs.HEATMAP, outputs.COMPREHENSIVE, outputs.LAYER_PLOT, outputs.REPORT):
        assert (finished_run / name).stat().st_size > 0, name


def test_analysis_is_deterministic_for_a_seed(tmp_path):
    from lit_coupling.analysis.analyse import analyse_run

    run = load_run(write_synthetic_run(tmp_path / "run", n_chains=5, n_edits=6))
    options = AnalysisOptions(bootstrap=50, permutations=50)
    first, second = analyse_run(run, options, seed=3)[1], analyse_run(run, options, seed=3)[1]
    assert first == second
    other_seed = analyse_run(run, options, seed=4)[1]
    assert other_seed["headline"]["spearman"]["ci"] != first["headline"]["spearman"]["ci"]


def test_no_planted_relation_is_not_reported_as_support(tmp_path):
    from lit_coupling.analysis.analyse import analyse_run

    run = load_run(write_synthetic_run(tmp_path / "run", effect=0.0, seed=5))
    result = analyse_run(run, AnalysisOptions(bootstrap=200, permutations=200), seed=0)[1]
    assert result["verdict"]["conclusion"] != "supported"
    assert result["all_pairs"]["permutation"]["p"] > 0.05  # issue 13: the two-way test, on all pairs


def test_caveats_name_what_applies(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", n_chains=4, n_edits=3))
    result = correlation_analysis(
        pair_table(run), AnalysisOptions(bootstrap=20, permutations=20), 0, context=describe_run(run)
    )
    text = " ".join(result["verdict"]["caveats"])
    for phrase in ("Few edits (3)", "Tiny model", "Synthetic data", "did not finish"):
        assert phrase in text, phrase


def test_only_global_rank_zero_works(tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_coupling.pipeline.stages import analysis_stage, report_stage

    directory = write_synthetic_run(tmp_path / "run", n_chains=3, n_edits=2)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cfg = RunConfig(output_dir=str(directory), logger="none")
    assert analysis_stage(cfg, directory).files == [] and report_stage(cfg, directory).files == []
    assert not (directory / outputs.CORRELATION).exists()


def test_a_missing_input_names_the_stage_that_writes_it(tmp_path):
    write_synthetic_run(tmp_path / "run", n_chains=2, n_edits=1)
    (tmp_path / "run" / outputs.COUPLING_MATRIX).unlink()
    with pytest.raises(UserError, match="gradsim stage"):
        load_run(tmp_path / "run")


def test_heatmap_order_puts_each_chain_together_in_hop_order():
    def piece(chain, kind):
        return KnowledgePiece(f"{chain}/{kind}", chain, chain, kind, 0, "p", "a", "s")

    pieces = [piece("b", "question"), piece("a", "hop2"), piece("b", "hop1"), piece("a", "hop1")]
    assert [pieces[k].id for k in chain_order(pieces)] == ["b/hop1", "b/question", "a/hop1", "a/hop2"]


def test_report_shows_model_data_method_results_plots_and_limitations(finished_run):
    report = (finished_run / outputs.REPORT).read_text()
    result = json.loads((finished_run / outputs.CORRELATION).read_text())
    for section in ("## Model", "## Data", "## Method", "## Results", "## Plots", "## Verdict", "## Limitations"):
        assert section in report, section
    for fact in (
        "tiny-gpt2",
        "gpt2",
        "1.2M parameters",
        "float32",
        "answer span not found in the hop-2 sentence",
        "mom2_update_weight",
        "20000",
        "kl_factor | 0.0625",
        "exact",
        "status failed ×1",
    ):
        assert fact in report, fact
    assert f"{result['headline']['spearman']['value']:.3f}" in report
    for plot in (outputs.HEATMAP, outputs.COMPREHENSIVE, outputs.LAYER_PLOT):
        assert f"]({plot})" in report
    assert result["verdict"]["text"] in report


def test_plots_are_real_images(finished_run):
    from matplotlib.image import imread

    for name in (outputs.HEATMAP, outputs.COMPREHENSIVE, outputs.LAYER_PLOT):
        image = imread(finished_run / name)
        assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0.05, name


def test_a_run_whose_edits_all_failed_still_gets_a_report(tmp_path):
    from lit_coupling.pipeline.stages import analysis_stage, report_stage

    directory = write_synthetic_run(tmp_path / "run", n_chains=3, n_edits=2)
    ripple = json.loads((directory / outputs.RIPPLE).read_text())
    for experiment in ripple["experiments"]:
        experiment.update(status="error", pieces=None)
    (directory / outputs.RIPPLE).write_text(json.dumps(ripple))
    cfg = RunConfig(output_dir=str(directory), logger="none")
    analysis_stage(cfg, directory)
    result = json.loads((directory / outputs.CORRELATION).read_text())
    assert result["verdict"]["conclusion"] == "no data"
    assert result["counts"]["edits_skipped"] == {"status error": 3}
    report_stage(cfg, directory)
    assert "no data" in (directory / outputs.REPORT).read_text()
    # Every run writes the same files: the analysis figure then shows the coupling and says why there is no ripple.
    assert (directory / outputs.HEATMAP).exists() and (directory / outputs.COMPREHENSIVE).exists()
    assert "Every edit failed or was skipped: status error: 3" in result["verdict"]["text"]


def test_the_report_names_every_deviation_from_the_published_memit(tmp_path):
    from lit_coupling.pipeline.stages import analysis_stage, report_stage

    directory = write_synthetic_run(tmp_path / "run", n_chains=3, n_edits=4)
    ripple = json.loads((directory / outputs.RIPPLE).read_text())
    ripple["deviations"] = ["fact_token = 'subject_first' (the paper: 'subject_last'): a reason"]
    (directory / outputs.RIPPLE).write_text(json.dumps(ripple))
    cfg = RunConfig(output_dir=str(directory), logger="none")
    analysis_stage(cfg, directory)
    report_stage(cfg, directory)
    report = (directory / outputs.REPORT).read_text()
    assert "**Deviations from the published MEMIT**" in report
    assert "- fact_token = 'subject_first' (the paper: 'subject_last'): a reason" in report
