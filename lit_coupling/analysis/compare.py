"""`lit-coupling compare`: runs of several models side by side — coupling and ripple distributions, the
GradSim–ripple correlation per model with intervals, and whether the relation is consistent across them.

    lit-coupling compare runs/gpt2 runs/Llama-2-7b-hf --output_dir runs/comparison
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from lit_coupling import outputs
from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.analysis.pairs import describe_run, load_run, pair_table
from lit_coupling.analysis.report import fmt, interval, p_value, size_text, table
from lit_coupling.errors import UserError

COMPARISON_REPORT = "comparison.md"
COMPARISON_PLOT = "comparison.png"


@dataclass
class ComparedRun:
    label: str
    directory: Path
    context: dict
    analysis: dict
    computed_here: bool  # the run had no correlation_analysis.json: analysed with default settings
    coupling: np.ndarray  # off-diagonal GradSim over all piece pairs
    ripple: np.ndarray  # the run's headline ripple over its (edit, piece) pairs

    def as_plot_entry(self) -> dict:
        return {"label": self.label, "coupling": self.coupling, "ripple": self.ripple, "analysis": self.analysis}


def load_compared(directory: str | Path, options: AnalysisOptions, seed: int) -> ComparedRun:
    from lit_coupling.analysis.analyse import analyse_run

    run = load_run(directory)
    pairs = pair_table(run)
    path = run.directory / outputs.CORRELATION
    if path.exists():
        analysis, computed = outputs.read_json(path), False
    else:
        analysis, computed = analyse_run(run, options, seed)[1], True
    metric = analysis["settings"]["ripple"]
    usable = pairs["gradsim_defined"].astype(bool) & np.isfinite(pairs[metric])
    upper = np.triu_indices(len(run.pieces), k=1)
    context = describe_run(run)
    # A local model directory is named by its path: its last part labels it well enough.
    label = Path(context["model_name"]).name or context["model_name"]
    return ComparedRun(
        label,
        run.directory,
        context,
        analysis,
        computed,
        run.coupling[upper],
        pairs.loc[usable, metric].to_numpy(float),
    )


def consistency(analyses: list[dict], labels: list[str], alpha: float) -> dict:
    """Is the GradSim–ripple relation the same across models? Direction, significance, and a Kruskal–Wallis
    test of the per-edit Spearman distributions (edits as the independent units)."""
    rows = []
    for label, analysis in zip(labels, analyses):
        spearman = analysis.get("headline", {}).get("spearman") or {}
        ci = spearman.get("ci") or [None, None]
        rows.append(
            {
                "label": label,
                "rho": spearman.get("value"),
                "ci": ci,
                "excludes_zero": ci[0] is not None and (ci[0] > 0 or ci[1] < 0),
                "per_edit": [
                    e["spearman"]
                    for e in analysis.get("per_edit", {}).get("edits", [])
                    if e.get("spearman") is not None
                ],
            }
        )
    defined = [r for r in rows if r["rho"] is not None]
    signs = {int(np.sign(r["rho"])) for r in defined}
    significant_signs = {int(np.sign(r["rho"])) for r in defined if r["excludes_zero"]}
    groups = [r["per_edit"] for r in rows if len(r["per_edit"]) >= 2]
    heterogeneity = None
    if len(groups) >= 2 and len({v for g in groups for v in g}) > 1:
        heterogeneity = float(sps.kruskal(*groups).pvalue)
    with_ci = [r for r in defined if r["ci"][0] is not None]
    overlap = bool(with_ci) and max(r["ci"][0] for r in with_ci) <= min(r["ci"][1] for r in with_ci)

    if len(defined) < 2:
        conclusion = "undecided"
        text = "Fewer than two runs have a defined correlation: nothing to compare."
    elif len(significant_signs) > 1 or (heterogeneity is not None and heterogeneity < alpha):
        conclusion = "inconsistent"
        text = (
            "The relation differs between models: "
            + (
                "significant correlations of opposite sign"
                if len(significant_signs) > 1
                else f"the per-edit correlations differ (Kruskal–Wallis p = {p_value(heterogeneity)})"
            )
            + "."
        )
    elif len(signs) == 1 and all(r["excludes_zero"] for r in defined):
        conclusion = "consistent"
        direction = "positive" if signs == {1} else "negative"
        text = (
            f"Every model shows a {direction} GradSim–ripple correlation whose interval excludes 0"
            + (
                f", and the per-edit correlations do not differ detectably (Kruskal–Wallis p = "
                f"{p_value(heterogeneity)})"
                if heterogeneity is not None
                else ""
            )
            + "."
        )
    elif not significant_signs:
        conclusion = "no relation shown"
        text = "No model shows a GradSim–ripple correlation whose interval excludes 0."
    elif len(signs) == 1:
        conclusion = "same direction"
        text = (
            "Same direction in every model, but not every interval excludes 0: "
            + ", ".join(r["label"] for r in defined if not r["excludes_zero"])
            + " cannot confirm it."
        )
    else:
        conclusion = "undecided"
        text = "The point estimates differ in sign but none of the differences is significant."
    rhos = [r["rho"] for r in defined]
    if rhos:
        text += (
            f" Spearman ρ ranges from {min(rhos):.2f} to {max(rhos):.2f}; the intervals "
            f"{'overlap' if overlap else 'do not all overlap'}."
        )
    runs = [{k: v for k, v in r.items() if k != "per_edit"} for r in rows]
    return {
        "conclusion": conclusion,
        "text": text,
        "heterogeneity_p": heterogeneity,
        "intervals_overlap": overlap,
        "runs": runs,
    }


def render_comparison(runs: list[ComparedRun], verdict: dict) -> str:
    rows = []
    for run in runs:
        c, a = run.context, run.analysis
        h = a.get("headline", {})
        counts = a.get("counts", {})
        cell = {
            name: f"{fmt((h.get(name) or {}).get('value'))} {interval((h.get(name) or {}).get('ci'))}"
            for name in ("spearman", "pearson", "kendall")
        }
        rows.append(
            [
                run.label,
                fmt(c.get("family")),
                size_text(c.get("parameters")).split(" (")[0],
                fmt(c.get("pieces")),
                fmt(counts.get("edits")),
                fmt(counts.get("pairs")),
                f"{np.median(run.coupling):.3f}",
                f"{np.median(run.ripple):.3g}" if len(run.ripple) else "n/a",
                cell["spearman"],
                cell["pearson"],
                cell["kendall"],
                p_value(((a.get("all_pairs") or h).get("permutation") or {}).get("p")),
                a.get("verdict", {}).get("conclusion", "n/a"),
            ]
        )
    ripple_metrics = {run.analysis["settings"]["ripple"] for run in runs}
    parts = [
        f"# GradSim vs MEMIT ripple across {len(runs)} runs",
        f"**{verdict['conclusion'].capitalize()}.** {verdict['text']}",
        table(
            [
                "run",
                "family",
                "size",
                "pieces",
                "edits",
                "pairs",
                "median GradSim",
                "median ripple",
                "Spearman [95% CI]",
                "Pearson [95% CI]",
                "Kendall [95% CI]",
                "permutation p (all pairs)",
                "verdict",
            ],
            rows,
        ),
        "Headline: each run's related facts (same chain or shared entity), |GradSim| vs |ΔlogP|. Intervals: "
        "two-way cluster bootstrap over each run's edits and pieces. Ripple: "
        + ", ".join(sorted(ripple_metrics))
        + (
            " — the runs use different ripple metrics: compare their correlations with care."
            if len(ripple_metrics) > 1
            else "."
        ),
        f"![comparison]({COMPARISON_PLOT})",
    ]
    for run in runs:
        note = (
            " (analysed here with default settings: the run had no correlation_analysis.json)"
            if run.computed_here
            else ""
        )
        verdict_text = run.analysis.get("verdict", {}).get("text", "")
        parts.append(f"## {run.label}\n\n`{run.directory}`{note}\n\n{verdict_text}")
    return "\n\n".join(parts) + "\n"


def unique_labels(runs: list[ComparedRun]) -> None:
    """Two runs of the same model are told apart by their directory names."""
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.label} ({run.directory.name})"


def compare(
    run_dirs: list[str],
    output_dir: str | Path,
    labels: list[str] | None = None,
    options: AnalysisOptions | None = None,
    seed: int = 0,
) -> list[Path]:
    options = options or AnalysisOptions()
    if len(run_dirs) < 2:
        raise UserError("compare needs at least two run directories")
    if labels and len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run")
    runs = [load_compared(d, options, seed) for d in run_dirs]
    if labels:
        for run, label in zip(runs, labels):
            run.label = label
    else:
        unique_labels(runs)
    verdict = consistency([r.analysis for r in runs], [r.label for r in runs], options.alpha)
    from lit_coupling.analysis.plots import comparison_figure

    out = Path(output_dir)
    figure = comparison_figure([r.as_plot_entry() for r in runs])
    return [
        outputs.save_figure(out / COMPARISON_PLOT, figure, dpi=120),
        outputs.write_text(out / COMPARISON_REPORT, render_comparison(runs, verdict)),
    ]


@dataclass
class CompareOptions:
    """Where the comparison goes, and the seed of any run it analyses itself."""

    output_dir: str = "runs/comparison"
    """Where comparison.md and comparison.png go."""
    seed: int = 0
    """Seed for the runs analysed here (those without correlation_analysis.json)."""


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lit-coupling compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each written by lit-coupling run)")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: the model names)")
    parser.add_class_arguments(CompareOptions, None)
    args = parser.parse_args(argv)
    try:
        written = compare(args.runs, args.output_dir, args.labels, seed=args.seed)
    except UserError as error:
        print(f"lit-coupling compare: {error}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
