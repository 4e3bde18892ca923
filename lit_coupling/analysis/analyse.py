"""What the analysis and report stages compute on a run directory the earlier stages filled.

analysis: pair table + every statistic → `pair_table.csv`, `correlation_analysis.json` (`analyse_run`).
report: plots, `final_mvp_report.md`, and the same numbers, tables and images to the chosen logger (`write_plots`,
`log_run`). The stages themselves (which files, which rank) are `lit_coupling.pipeline.stages`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lit_coupling import loggers, outputs
from lit_coupling.analysis.correlation import correlation_analysis, correlation_rows
from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.analysis.pairs import RunData, describe_run, load_run, pair_table, usable_experiments
from lit_coupling.errors import UserError

# The inputs whose hashes go into correlation_analysis.json, when the run has them.
HASHED_INPUTS = (
    outputs.PIECES,
    outputs.COUPLING_MATRIX,
    outputs.RIPPLE,
    outputs.PIECE_HIDDEN,
    outputs.COUPLING_LAYERS,
    outputs.EDIT_UPDATES,
    outputs.EDIT_PREDICTORS,
)


def analyse_run(run: RunData, options: AnalysisOptions, seed: int) -> tuple[pd.DataFrame, dict]:
    """(pair table, the content of correlation_analysis.json — JSON-ready, NaN as None) for one run."""
    table = pair_table(run)
    result = correlation_analysis(
        table, options, seed, layers=run.layers, chain_ids=[p.chain_id for p in run.pieces], context=describe_run(run)
    )
    result["model"] = run.model
    # Which files these numbers come from, so a reader can check they recompute from the same bytes.
    result["inputs"] = {
        name: outputs.sha256_file(run.directory / name) for name in HASHED_INPUTS if (run.directory / name).exists()
    }
    return table, outputs.jsonable(result)


def headline_text(result: dict) -> str:
    conclusion = result.get("verdict", {}).get("conclusion", "")
    headline = result.get("headline", {})
    spearman = headline.get("spearman", {})
    if spearman.get("value") is None:
        return conclusion
    ci = spearman.get("ci") or [None, None]
    ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
    text = (
        f"{headline.get('stratum', '')} pairs: |GradSim| vs |ΔlogP| ρ = {spearman['value']:.3f}{ci_text}: {conclusion}"
    )
    oracle = (
        result.get("predictor_table", {}).get("strata", {}).get("all", {}).get("magnitude", {}).get("first_order") or {}
    ).get("rho")
    return text + (f"; first-order (oracle) ρ = {oracle:.2f}" if oracle is not None else "")


def edit_predictors(out_dir: Path, model_path: str | None, device: str) -> str | None:
    """Compute edit_predictors.npz (needs the model and edit_updates.pt); the reason when it cannot."""
    from lit_coupling.analysis.edit_predictors import compute_edit_predictors

    if not (out_dir / outputs.EDIT_UPDATES).exists():
        return f"{outputs.EDIT_UPDATES} is missing (a ripple stage of an older version): rerun --stages ripple"
    run = load_run(out_dir)
    try:
        arrays = compute_edit_predictors(out_dir, run.pieces, run.ripple, model_path or run.model.get("name"), device)
    except UserError as error:
        return f"the model could not be loaded for the gradient predictors: {error}"
    outputs.save_npz(out_dir / outputs.EDIT_PREDICTORS, **arrays)
    return None


def write_plots(run: RunData, table: pd.DataFrame, result: dict, out_dir: Path, name: str) -> list[Path]:
    from lit_coupling.analysis import plots

    figures = {outputs.HEATMAP: plots.coupling_heatmap(run.coupling, run.pieces, f"GradSim coupling, {name}")}
    if "headline" in result:
        figures[outputs.COMPREHENSIVE] = plots.comprehensive_figure(table, run.coupling, run.pieces, result, name)
    else:  # every run writes the same files; this one says why there is no ripple to plot
        reason = result.get("verdict", {}).get("text", "no usable (edit, piece) pairs")
        figures[outputs.COMPREHENSIVE] = plots.no_ripple_figure(run.coupling, run.pieces, reason, name)
    if result.get("predictor_table", {}).get("ranking_all_pairs_magnitude"):
        figures[outputs.PREDICTOR_PLOT] = plots.predictor_figure(
            result["predictor_table"], f"Which similarity forecasts ripple, {name}"
        )
    if result.get("by_layer"):
        edit_layers = [int(layer) for layer in (run.ripple.get("hparams") or {}).get("layers") or []]
        figures[outputs.LAYER_PLOT] = plots.layer_figure(
            result["by_layer"], result["headline"]["spearman"]["value"], edit_layers, name
        )
    return [outputs.save_figure(out_dir / file, figure, dpi=120) for file, figure in figures.items()]


def pieces_frame(run: RunData) -> pd.DataFrame:
    """The pieces without their token ids, with their pre-edit log P."""
    frame = pd.DataFrame([p.to_dict() for p in run.pieces])
    frame = frame.drop(columns=["prompt_ids", "answer_ids", "links"])
    experiments, _ = usable_experiments(run.ripple, len(run.pieces))
    if experiments:  # the same pre-edit scores in every edit (weights restored between edits)
        frame["logp_before"] = experiments[0]["pieces"]["logp_before"]
    return frame


def log_run(
    logger_kind: str,
    settings: dict,
    run: RunData,
    context: dict,
    table: pd.DataFrame,
    result: dict,
    figures: list[Path],
    report: Path,
) -> list[str]:
    """The run's settings, numbers, tables, plots and key files to W&B or CSV (`logger_kind`: `--logger`)."""
    name = f"{context['model_name']}-{run.directory.name}"
    logger = loggers.build_logger(logger_kind, run.directory, name)
    if logger is None:
        return []
    try:
        hyperparameters = {
            **settings,
            "model": run.model,
            "gradsim_method": context["gradsim_method"],
            "memit_hparams": context["memit_hparams"],
        }
        metrics = loggers.flatten_numbers(result, skip=("settings", "definitions", "inputs", "model"))
        verdict = result.get("verdict", {})
        texts = {
            "verdict": verdict.get("conclusion", ""),
            "verdict_text": verdict.get("text", ""),
            "caveats": "\n".join(verdict.get("caveats", [])),
        }
        tables = {"pieces": pieces_frame(run), "pair_table": table, "correlations": correlation_rows(result)}
        images = {f.stem: f for f in figures}
        files = {
            "coupling": (outputs.COUPLING_MATRIX, outputs.COUPLING_LAYERS),
            "report": (report.name, outputs.CORRELATION, outputs.PAIR_TABLE),
        }
        artifacts = {
            kind: [run.directory / name for name in names if (run.directory / name).exists()]
            for kind, names in files.items()
        }
        return loggers.log_results(
            logger,
            hyperparameters=hyperparameters,
            metrics=metrics,
            texts=texts,
            tables=tables,
            images=images,
            artifacts=artifacts,
        )
    finally:
        loggers.finish(logger)
