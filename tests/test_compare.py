"""`lit-coupling compare` on two runs (a tiny GPT-2 and a tiny LLaMA), and its consistency judgement."""

from lit_coupling.__main__ import main
from lit_coupling.analysis.compare import COMPARISON_PLOT, COMPARISON_REPORT, consistency
from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.pipeline.run import RunConfig
from lit_coupling.pipeline.stages import analysis_stage
from tests.analysis_synthetic import write_synthetic_run


def test_compare_two_runs_writes_its_report(tmp_path):
    gpt2 = write_synthetic_run(tmp_path / "gpt2", family="gpt2", effect=3.0, n_chains=6, n_edits=6)
    llama = write_synthetic_run(tmp_path / "llama", family="llama", effect=2.0, n_chains=6, n_edits=6, seed=1)
    options = AnalysisOptions(bootstrap=100, permutations=100)
    analysis_stage(RunConfig(output_dir=str(gpt2), analysis=options), gpt2)
    # The LLaMA run has no correlation_analysis.json: compare analyses it itself (and says so).
    out = tmp_path / "comparison"
    assert main(["compare", str(gpt2), str(llama), "--output_dir", str(out)]) == 0
    report = (out / COMPARISON_REPORT).read_text()
    assert (out / COMPARISON_PLOT).stat().st_size > 10_000
    assert "| tiny-gpt2 | gpt2 |" in report and "| tiny-llama | llama |" in report
    assert "analysed here with default settings" in report
    assert report.split("\n\n")[1].startswith(("**Consistent.**", "**Same direction.**"))
    assert not (llama / "correlation_analysis.json").exists()  # compare never writes into a run


def test_compare_needs_two_runs(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "at least two run directories" in capsys.readouterr().err


def _analysis(rho, ci, per_edit):
    return {
        "headline": {"spearman": {"value": rho, "ci": ci}},
        "per_edit": {"edits": [{"spearman": v} for v in per_edit]},
    }


def test_consistency_judgement():
    agree = [_analysis(0.5, [0.3, 0.7], [0.4, 0.5, 0.6, 0.5]), _analysis(0.45, [0.2, 0.6], [0.5, 0.4, 0.45, 0.5])]
    assert consistency(agree, ["a", "b"], 0.05)["conclusion"] == "consistent"
    opposite = [_analysis(0.5, [0.3, 0.7], [0.5, 0.6, 0.55, 0.4]), _analysis(-0.4, [-0.6, -0.2], [-0.5, -0.3, -0.4])]
    assert consistency(opposite, ["a", "b"], 0.05)["conclusion"] == "inconsistent"
    unsure = [_analysis(0.5, [0.3, 0.7], [0.5, 0.6, 0.1]), _analysis(0.1, [-0.1, 0.3], [0.3, -0.1, 0.2])]
    verdict = consistency(unsure, ["a", "b"], 0.05)
    assert verdict["conclusion"] == "same direction" and "b cannot confirm" in verdict["text"]
    neither = [_analysis(0.05, [-0.1, 0.2], [0.1, -0.1, 0.0]), _analysis(0.1, [-0.1, 0.3], [0.3, -0.1, 0.2])]
    assert consistency(neither, ["a", "b"], 0.05)["conclusion"] == "no relation shown"
