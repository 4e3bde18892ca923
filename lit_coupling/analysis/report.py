"""`final_mvp_report.md`: model, data, method, the tables of `correlation_analysis.json`, plots, verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lit_coupling import outputs
from lit_coupling.analysis.correlation import MIN_EDITS, NO_PRACTICAL, PUBLISHED, RIPPLE_LABELS, STRENGTH

PLOT_CAPTIONS = {
    outputs.HEATMAP: "Coupling matrix, chains together",
    outputs.COMPREHENSIVE: "Coupling, ripple and their relation (six panels)",
    outputs.LAYER_PLOT: "Coupling by layer",
    outputs.PREDICTOR_PLOT: "Every predictor's ρ with the ripple, ranked",
}


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def interval(ci) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci and ci[0] is not None else "n/a"


def p_value(p) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def size_text(parameters) -> str:
    if not parameters:
        return "n/a"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{unit} parameters ({parameters:,})"
    return f"{parameters} parameters"


def _model_section(ctx: dict) -> str:
    layers = ctx.get("layers")
    layers_text = ", ".join(map(str, layers)) if isinstance(layers, list) else fmt(layers)
    return "## Model\n\n" + table(
        ["", ""],
        [
            ["name", ctx.get("model_name")],
            ["family", fmt(ctx.get("family"))],
            ["size", size_text(ctx.get("parameters"))],
            ["layers", f"{fmt(ctx.get('num_layers'))} in the model; GradSim over {layers_text}"],
            ["dtype", fmt(ctx.get("dtype"))],
        ],
    )


def _data_section(ctx: dict) -> str:
    rows = [
        ["source", f"{fmt(ctx.get('source_kind'))} ({fmt(ctx.get('source_path'))})"],
        ["records", fmt(ctx.get("records"))],
        ["pieces", fmt(ctx.get("pieces"))],
    ]
    rows += [[f"pieces: {kind}", fmt(count)] for kind, count in ctx.get("pieces_by_kind", {}).items()]
    text = "## Data\n\n" + table(["", ""], rows)
    skipped = ctx.get("skipped_by_reason") or {}
    if not skipped:
        return text + "\n\nNothing was skipped."
    return (
        text + "\n\nSkipped (a record or piece that cannot give a clean cloze is left out, with its "
        "reason):\n\n" + table(["reason", "count"], [[reason, fmt(n)] for reason, n in skipped.items()])
    )


def layer_choice_text(choice: dict) -> str:
    """The edit band chosen by causal tracing (`--memit.layers traced`), and why: the mean MLP indirect effect of
    each layer, the chosen window's and the hyperparameters' own band's."""
    effects = choice.get("indirect_effect") or []
    scaled = choice.get("scaled_layers") or []
    band = choice.get("layers")
    own = f"{scaled[0]}–{scaled[-1]}" if scaled else "?"
    if band is None:
        head = f"**Edit layers by causal tracing**: kept the hyperparameters' band {own}: {choice.get('reason')}."
    else:
        head = (
            f"**Edit layers by causal tracing**: {band[0]}–{band[-1]} (the hyperparameters' band: {own}). Mean "
            f"indirect effect of restoring one layer's MLP output at the fact token on P(answer), over "
            f"{fmt(choice.get('facts'))} known, unedited facts (P(answer) {fmt(choice.get('p_clean'))} clean, "
            f"{fmt(choice.get('p_corrupt'))} with noise on the subject): chosen band "
            f"{fmt(choice.get('band_effect'))}, the hyperparameters' band {fmt(choice.get('scaled_effect'))}."
        )
    if not effects:
        return head
    rows = [
        [str(layer), fmt(e), "chosen" if band and layer in band else ("set's own" if layer in scaled else "")]
        for layer, e in enumerate(effects)
    ]
    return head + "\n\n" + table(["layer", "MLP indirect effect", "band"], rows)


def _method_section(ctx: dict, result: dict) -> str:
    method = ctx.get("gradsim_method") or {}
    gradsim_rows = [[key, fmt(value)] for key, value in method.items() if not isinstance(value, dict | list)]
    parts = [
        "## Method",
        "**GradSim**: cosine of the gradients of log P(answer | prompt) (every answer token) with "
        "respect to the MLP output projections of the chosen layers, on the pre-edit model.",
        table(["setting", "value"], gradsim_rows or [["mode", fmt(ctx.get("gradsim_mode"))]]),
        "**MEMIT**: one real edit per source piece (its answer changed to a counterfactual); every "
        "other piece rescored; weights restored bit for bit between edits.",
    ]
    hparams = ctx.get("memit_hparams") or {}
    # As written in the run (0.0625 stays 0.0625), lists as comma-separated values.
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in hparams.items()]
    parts.append(table(["hyperparameter", "value"], rows) if rows else "(no hyperparameters recorded)")
    choice = ctx.get("layer_choice")
    if choice:  # --memit.layers traced
        parts.append(layer_choice_text(choice))
    covariance = ctx.get("covariance") or {}
    if covariance:  # nested entries (per-layer details, cache paths) stay in ripple_experiments.json
        items = [
            f"{k} {', '.join(map(str, v)) if isinstance(v, dict | list) else fmt(v)}" for k, v in covariance.items()
        ]
        parts.append("Key covariance statistics: " + ", ".join(items) + ".")
    deviations = ctx.get("deviations")
    if ctx.get("editor") != "ft" and deviations is not None:  # what this MEMIT does unlike the paper, and why
        parts.append(
            "**Deviations from the published MEMIT** (docs/memit.md gives each one's measured effect):\n\n"
            + (
                "\n".join(f"- {d}" for d in deviations)
                if deviations
                else "- none: the published algorithm and settings"
            )
        )
    efficacy = ctx.get("efficacy") or {}
    skipped = ctx.get("edits_skipped") or {}
    edits = (
        f"Edits: {fmt(ctx.get('edits_total'))} attempted, {fmt(efficacy.get('ok'))} finished, "
        f"{fmt(efficacy.get('success'))} succeeded (efficacy: P(new) > P(true) on the edit prompt)"
    )
    parts.append(
        edits
        + (": not finished: " + ", ".join(f"{reason} ×{n}" for reason, n in skipped.items()) if skipped else "")
        + "."
    )
    s = result["settings"]
    editor = (
        "**Editor: fine-tuning** (positive control, FT-L style: gradient ascent on the new answer at the "
        "edit layers, ‖ΔW‖_F ≤ max_norm·‖W‖_F): "
        + ", ".join(f"{k} {v}" for k, v in (ctx.get("finetune") or {}).items())
        if ctx.get("editor") == "ft"
        else "**Editor: MEMIT.**"
    )
    parts.append(editor)
    parts.append(
        f"**Analysis**: headline ripple |ΔlogP| (magnitude) and ΔlogP (signed); secondary sections "
        f"{RIPPLE_LABELS[s['ripple']]}; {s['confidence']:.0%} intervals from {s['bootstrap']} two-way "
        f"cluster-bootstrap resamples over edits and pieces (secondary sections: over edits only); "
        f"two-way permutation test on all pairs with {s['permutations']} permutations; seed {s['seed']}."
    )
    return "\n\n".join(parts)


def _correlation_rows(entry: dict) -> list[list]:
    rows = []
    for name, label in (("spearman", "Spearman ρ"), ("pearson", "Pearson r"), ("kendall", "Kendall τ")):
        stat = entry.get(name) or {}
        rows.append([label, fmt(stat.get("value")), interval(stat.get("ci")), p_value(stat.get("p"))])
    return rows


def _headline_rows(entry: dict) -> list[list]:
    signed = entry["signed"]["spearman"]
    return [
        [
            "|GradSim| vs |ΔlogP| (magnitude)",
            "Spearman ρ",
            fmt(entry["spearman"]["value"]),
            interval(entry["spearman"].get("ci")),
            entry["conclusion"],
        ],
        ["", "Pearson r", fmt(entry["pearson"]["value"]), "", ""],
        ["", "Kendall τ", fmt(entry["kendall"]["value"]), "", ""],
        [
            "GradSim vs ΔlogP (signed)",
            "Spearman ρ",
            fmt(signed["value"]),
            interval(signed.get("ci")),
            entry["signed"]["conclusion"],
        ],
    ]


def _headline_section(result: dict) -> str:
    h, counts = result["headline"], result["counts"]
    header = ["pairing", "statistic", "ours", "95% CI (edits × pieces resampled)", "in words"]
    text = (
        f"## Results\n\n{counts['pairs']} (edit, piece) pairs from {counts['edits']} edits over "
        f"{fmt(counts.get('pieces'))} pieces; {fmt(counts.get('related_pairs'))} of them related.\n\n"
        f"### 1. {h['label'][0].upper() + h['label'][1:]} ({h['n']} pairs, {fmt(h.get('edits'))} edits)\n\n"
        + table(header, _headline_rows(h))
        + f"\n\n{h['permutation'].get('why', '')}"
    )
    a = result.get("all_pairs")
    if a and a is not h and h["stratum"] != "all":
        perm = a["permutation"]
        text += (
            f"\n\n### 2. All pairs ({a['n']} pairs)\n\n"
            + table(header, _headline_rows(a))
            + f"\n\nTwo-way permutation test (ripple relabelled over edits and pieces, "
            f"{perm.get('n_permutations')} permutations): p = {p_value(perm.get('p'))}."
        )
    others = result.get("ripple_metrics") or {}
    rows = [
        [
            RIPPLE_LABELS[metric],
            fmt(e["spearman"]["value"]),
            fmt(e["pearson"]["value"]),
            fmt(e["kendall"]["value"]),
            fmt(e["n"]),
        ]
        for metric, e in others.items()
        if e.get("spearman")
    ]
    if rows:
        text += "\n\n### Other ripple metrics (signed GradSim; descriptive)\n\n" + table(
            ["ripple", "Spearman", "Pearson", "Kendall", "pairs"], rows
        )
    return text


def _published_section(result: dict) -> str:
    h = result["headline"]
    rows = [[setting, fmt(pearson), fmt(spearman)] for setting, pearson, spearman in PUBLISHED]
    rows.append(
        [
            f"**ours**: {h['label']}, |GradSim| vs |ΔlogP|",
            fmt(h["pearson"]["value"]),
            f"{fmt(h['spearman']['value'])} {interval(h['spearman'].get('ci'))}",
        ]
    )
    rows.append(
        [
            f"**ours**: {h['label']}, signed",
            "",
            f"{fmt(h['signed']['spearman']['value'])} {interval(h['signed']['spearman'].get('ci'))}",
        ]
    )
    return "### GradSim paper (Qin et al., EMNLP 2024, related facts) beside ours\n\n" + table(
        ["setting", "Pearson", "Spearman"], rows
    )


def _cell(row: dict | None) -> str:
    if not row or row.get("rho") is None:
        return "n/a"
    return f"{fmt(row['rho'], 2)} {interval_short(row.get('ci'))}"


def interval_short(ci) -> str:
    return f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci and ci[0] is not None else ""


def _predictor_table_section(result: dict, ctx: dict) -> str:
    ptable = result["predictor_table"]
    strata = ptable["strata"]
    names = ptable["ranking_all_pairs_magnitude"] + [
        n for n in ptable["predictors"] if n not in ptable["ranking_all_pairs_magnitude"]
    ]
    header = [
        "predictor",
        "related: magnitude",
        "related: signed",
        "all: magnitude",
        "all: signed",
        "Δρ vs GradSim (all, magnitude)",
    ]
    has_known = "known" in strata
    if has_known:
        header += ["known pieces", "unknown pieces"]
    rows = []
    for name in names:
        info = ptable["predictors"][name]
        label = info["label"] + (" **[oracle]**" if info["kind"] == "oracle" else "")
        row_all = strata["all"]["magnitude"].get(name) or {}
        delta = (
            f"{fmt(row_all['minus_gradsim'], 2)} {interval_short(row_all.get('minus_gradsim_ci'))}"
            if row_all.get("minus_gradsim") is not None
            else "—"
        )
        signed = info["kind"] != "magnitude"
        row = [
            label,
            _cell(strata["related"]["magnitude"].get(name)),
            _cell(strata["related"]["signed"].get(name)) if signed else "—",
            _cell(row_all),
            _cell(strata["all"]["signed"].get(name)) if signed else "—",
            delta,
        ]
        if has_known:
            row += [_cell(strata["known"]["magnitude"].get(name)), _cell(strata["unknown"]["magnitude"].get(name))]
        rows.append(row)
    counts = ", ".join(f"{entry['label']}: {entry['n']} pairs, {entry['edits']} edits" for entry in strata.values())
    editor = "fine-tuning (positive control)" if ctx.get("editor") == "ft" else "MEMIT"
    text = (
        f"## Which similarity forecasts ripple (editor: {editor})\n\n"
        "Spearman ρ with the ripple of edit i on piece j, every predictor on the same pairs. *Magnitude*: "
        "|predictor| against |ΔlogP| (the baselines have no sign); *signed*: predictor against ΔlogP. "
        f"95% intervals from a two-way cluster bootstrap over edits and pieces ({ptable['resamples']} "
        "resamples; Δρ on the same resamples). Ranked by all pairs, magnitude. The oracle sees the edit's "
        f"actual ΔW and is an upper reference, not a forecast.\n\n{counts}.\n\n" + table(header, rows)
    )
    if ptable.get("unavailable"):
        text += (
            "\n\nNot available on this run: "
            + ", ".join(ptable["unavailable"])
            + (f" ({ptable['why_unavailable']})" if ptable.get("why_unavailable") else "")
            + "."
        )
    if result.get("control"):
        text += "\n\n" + result["control"]["text"]
    return text


def _thresholds_text(result: dict) -> str:
    bands = ", ".join(f"{label} |ρ| ≥ {bound}" for bound, label in STRENGTH if bound > 0)
    return (
        f"Thresholds: |ρ| < {NO_PRACTICAL} is *no practical association* whatever the p-value; {bands} "
        f"(Cohen). *Supported* needs |ρ| ≥ {NO_PRACTICAL} and a 95% interval that excludes 0. Fewer than "
        f"{MIN_EDITS} edits earn a caveat. No p-value that treats pairs as independent is shown."
    )


def _per_edit_section(result: dict) -> str:
    per_edit = result["per_edit"]
    rows = [
        [
            fmt(e["edit_id"]),
            e["source_piece"],
            e["source_kind"],
            fmt(e["n"]),
            fmt(e["spearman"]),
            fmt(e["edit_success"]),
            fmt(e["mean_gradsim"]),
            fmt(e["mean_ripple"]),
        ]
        for e in per_edit["edits"]
    ]
    text = "### Per edit (signed GradSim vs the chosen ripple)\n\n" + table(
        ["edit", "source piece", "kind", "pairs", "Spearman", "edit succeeded", "mean GradSim", "mean ripple"], rows
    )
    s = per_edit["summary"]
    if s.get("n"):
        text += (
            f"\n\nPer-edit ρ: median {fmt(s['median'])} (IQR {fmt(s['q1'])} to {fmt(s['q3'])}), "
            f"positive in {s['positive']} of {s['n']} edits; sign test p = {p_value(s['sign_test_p'])}, "
            f"Wilcoxon p = {p_value(s['wilcoxon_p'])} (edits as units)."
        )
    return text


def _strata_section(result: dict) -> str:
    strata = result["strata"]
    entries = [("chain", name, strata["chain"][name]) for name in ("same chain", "other chains")]
    entries += [("hop relation", name, entry) for name, entry in strata["hop_relation"].items()]
    if "successful_edits" in strata:
        entries.append(("edits", "successful only", strata["successful_edits"]))
    rows = []
    for group, name, entry in entries:
        spearman = entry.get("spearman") or {}
        rows.append(
            [
                group,
                name,
                fmt(entry["n"]),
                fmt(entry["edits"]),
                fmt(entry["mean_gradsim"]),
                fmt(entry["median_ripple"]),
                fmt(spearman.get("value")),
            ]
        )
    mw = strata["chain"]["same_vs_other_ripple"]
    return (
        "### Strata (descriptive)\n\n"
        + table(["stratum", "", "pairs", "edits", "mean GradSim", "median ripple", "Spearman"], rows)
        + f"\n\nSame chain vs other chains, ripple: Cliff's δ = {fmt(mw.get('cliffs_delta'))}. "
        "Descriptive: no intervals or p-values here (pairs share edits and pieces). Strata with fewer than "
        f"{result['settings']['min_stratum_pairs']} pairs get no correlation."
    )


def _groups_section(result: dict) -> str:
    g = result["coupling_groups"]
    medians = g.get("median") or [None, None]
    return (
        "### High vs low coupling\n\n"
        + table(
            ["group", "GradSim", "pairs", "median ripple"],
            [
                ["top quartile", f"≥ {fmt(g['top_min_gradsim'])}", fmt(g["n"][0]), fmt(medians[0])],
                ["bottom quartile", f"≤ {fmt(g['bottom_max_gradsim'])}", fmt(g["n"][1]), fmt(medians[1])],
            ],
        )
        + "\n\nCliff's δ = "
        f"{fmt(g.get('cliffs_delta'))}; P(a top pair ripples more "
        f"than a bottom pair) = {fmt(g.get('prob_superiority'))}."
    )


def _partial_section(result: dict) -> str:
    partial = result["partial"]
    return (
        "### Controlling for the piece's baseline confidence\n\nPartial Spearman of GradSim and ripple "
        f"given the piece's baseline log P: {fmt(partial.get('value'))} "
        f"(baseline log P alone vs ripple: Spearman "
        f"{fmt(partial.get('spearman_ripple_vs_control'))})."
    )


def _layer_section(result: dict) -> str:
    rows = [
        [
            row["layer"],
            fmt(row["mean_gradsim"]),
            fmt(row.get("mean_gradsim_same_chain")),
            fmt(row.get("mean_gradsim_other_chains")),
            fmt(row["spearman"]),
        ]
        for row in result["by_layer"]
    ]
    return "### By layer\n\n" + table(
        ["layer", "mean GradSim", "same chain", "other chains", "Spearman with ripple"], rows
    )


def render_report(ctx: dict, result: dict, plots: list[str]) -> str:
    verdict = result["verdict"]
    editor = "fine-tuning (positive control)" if ctx.get("editor") == "ft" else "MEMIT"
    parts = [f"# Which similarity forecasts ripple? {ctx.get('model_name')}, editor: {editor}"]
    if "headline" in result:
        parts += [
            _predictor_table_section(result, ctx),
            f"**Verdict ({result['headline']['label']}): {verdict['conclusion']}** "
            f"({verdict['strength']} association). {verdict['text']}",
            f"**What to conclude.** {verdict.get('takeaway', '')}",
            _thresholds_text(result),
            _published_section(result),
        ]
    else:
        parts.append(f"**Verdict: {verdict['conclusion']}** ({verdict['strength']} association). {verdict['text']}")
    parts += [_model_section(ctx), _data_section(ctx), _method_section(ctx, result)]
    if "headline" in result:
        parts += [
            _headline_section(result),
            _per_edit_section(result),
            _strata_section(result),
            _groups_section(result),
            _partial_section(result),
        ]
        if result.get("by_layer"):
            parts.append(_layer_section(result))
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{PLOT_CAPTIONS.get(p, p)}]({p})" for p in plots))
    parts.append("## Verdict\n\n" + verdict["text"])
    parts.append("## Limitations\n\n" + "\n".join(f"- {c}" for c in verdict["caveats"]))
    files = (
        outputs.PIECES,
        outputs.COUPLING_MATRIX,
        outputs.COUPLING_ANALYSIS,
        outputs.RIPPLE,
        outputs.PAIR_TABLE,
        outputs.CORRELATION,
    )
    parts.append(
        "## Files\n\n"
        + "\n".join(f"- `{name}`" for name in files)
        + "\n\nEvery number above is in `correlation_analysis.json`, recomputable from "
        "`coupling_matrix.npy` and `ripple_experiments.json` (its `definitions` section spells "
        "out the pairs and each statistic)."
    )
    return "\n\n".join(parts) + "\n"


def write_report(path: Path, ctx: dict, result: dict, plots: list[str]) -> Path:
    return outputs.write_text(path, render_report(ctx, result, plots))
