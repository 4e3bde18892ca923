"""Every statistic of `correlation_analysis.json`, computed from the pair table, and the verdict in words."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lit_coupling.analysis import stats as S
from lit_coupling.analysis.options import RIPPLE_METRICS, AnalysisOptions
from lit_coupling.analysis.pairs import LayerCoupling
from lit_coupling.errors import UserError

CORRELATION_FORMAT = "lit_coupling.correlation_analysis/1"

RIPPLE_LABELS = {
    "abs_delta_logp": "|ΔlogP| of the piece's true answer",
    "delta_logp": "ΔlogP of the piece's true answer",
    "neg_delta_logp": "drop of the piece's true-answer logP (−ΔlogP)",
    "relative_delta_logp": "ΔlogP relative to the edited piece's own ΔlogP",
}

# Cohen's (1988) conventions for the size of a correlation.
STRENGTH = ((0.5, "strong"), (0.3, "moderate"), (0.1, "weak"), (0.0, "negligible"))

# Below these, the caveats say so: a bootstrap over fewer edits has too few clusters for its percentiles to be
# trusted, and fewer pairs leave even the point estimate loose.
FEW_EDITS = 10
FEW_PAIRS = 100
# Up to this many parameters the model is "tiny" (GPT-2 small has 124M).
TINY_MODEL_PARAMETERS = 100_000_000
# Qin et al. (EMNLP 2024), Spearman between GradSim and ripple on related facts (reference.md).
PUBLISHED_SPEARMAN = (0.598, 0.811)


def why_no_pairs(context: dict) -> str:
    """The plain reason a run has no (edit, piece) pairs, from what the ripple stage recorded."""
    skipped = context.get("edits_skipped") or {}
    if not context.get("edits_total"):
        return (
            "No edit was made: edit sources are drawn from facts the model knows, and it knew too few (see "
            "'requests' in ripple_experiments.json). Use more records, a model that knows the facts, or "
            "--memit.known any to edit unknown facts too."
        )
    if skipped.get("source piece not among the pieces"):
        return (
            "The edits' facts are not among the pieces (CounterFact-sourced edits): GradSim pairs an edited "
            "fact with a piece, so it needs the edit among the pieces. The CounterFact metrics and the ripple "
            "on every piece are in ripple_experiments.json."
        )
    return "Every edit failed or was skipped: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + "."


def strength(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "undefined"
    return next(label for bound, label in STRENGTH if abs(value) >= bound)


def short(value: float | None, digits: int = 2) -> str:
    """A statistic as prose and plots show it: 0.46, or n/a when undefined."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def p_text(value: float | None) -> str:
    """'p = 0.03' / 'p < 0.001'."""
    if value is None:
        return "p n/a"
    return f"p = {value:.2g}" if value >= 1e-3 else "p < 0.001"


class _Analysis:
    """Holds the usable pairs and one bootstrap plan so every interval is computed on the same resamples."""

    def __init__(self, table: pd.DataFrame, options: AnalysisOptions, seed: int):
        self.options = options
        self.seed = seed
        metric = options.ripple
        if metric not in RIPPLE_METRICS:
            raise UserError(f"unknown ripple metric {metric!r}: choose from {', '.join(RIPPLE_METRICS)}")
        defined = table["gradsim_defined"].astype(bool).to_numpy()
        usable = defined & S.finite_mask(table["gradsim"], table[metric])
        self.table = table[usable].reset_index(drop=True)
        self.excluded = {
            "gradsim undefined (zero gradient)": int(np.sum(~defined)),
            "ripple not finite": int(np.sum(defined & ~usable)),
        }
        self.x = self.table["gradsim"].to_numpy(np.float64)
        self.y = self.table[metric].to_numpy(np.float64)
        self.edits = self.table["edit_id"].to_numpy()
        self.plan = S.ClusterBootstrap(self.edits, options.bootstrap, S.rng_for(seed, "cluster bootstrap"))

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(np.float64)

    # Secondary sections are descriptive (no interval) in correlation_analysis: their only intervals would resample
    # edits alone, too narrow when pieces are shared; the headline and the predictor table carry two-way ones.
    descriptive = False

    def interval(self, statistic, *arrays) -> tuple[list, np.ndarray]:
        if self.descriptive:
            return [None, None], np.empty(0)
        distribution = self.plan.distribution(statistic, *arrays)
        return S.percentile_interval(distribution, self.options.confidence), distribution

    def correlations(self, x: np.ndarray, y: np.ndarray, kendall_interval: bool = True) -> dict:
        """Pearson/Spearman/Kendall with p-values and cluster-bootstrap intervals, on the finite pairs."""
        mask = S.finite_mask(x, y)
        result = S.correlation_tests(x[mask], y[mask])
        statistics = {"pearson": S.pearson, "spearman": S.spearman}
        if kendall_interval:
            statistics["kendall"] = S.kendall
        for name, statistic in statistics.items():

            def masked(a, b, m, statistic=statistic):
                return statistic(a[m], b[m])

            result[name]["ci"], _ = self.interval(masked, x, y, mask)
        return result


def correlation_analysis(
    table: pd.DataFrame,
    options: AnalysisOptions,
    seed: int,
    layers: LayerCoupling | None = None,
    chain_ids: list[str] | None = None,
    context: dict | None = None,
) -> dict:
    """All statistics of step 4 of the mission. `layers` and `chain_ids` (per piece) give the per-layer view;
    `context` (model, data, method: `pairs.describe_run`) only feeds the caveats."""
    a = _Analysis(table, options, seed)
    a.descriptive = True
    context = context or {}
    n_pairs, n_edits = len(a.x), len(a.plan.members)
    result: dict = {
        "format": CORRELATION_FORMAT,
        "settings": {**vars(options), "seed": seed},
        "definitions": _definitions(options),
        "counts": {
            "pairs": n_pairs,
            "edits": n_edits,
            "pieces": context.get("pieces"),
            "pairs_excluded": a.excluded,
            "edits_skipped": context.get("edits_skipped", {}),
        },
    }
    if n_pairs < 3:
        result["verdict"] = {
            "conclusion": "no data",
            "strength": "undefined",
            "caveats": [],
            "text": f"Only {n_pairs} usable (edit, piece) pairs: nothing to correlate. " + why_no_pairs(context),
        }
        return result

    result["predictor_table"] = ptable = predictor_table(table, options, seed)
    related = ptable["strata"]["related"]["n"]
    result["counts"]["related_pairs"] = related
    # The comparison the GradSim paper makes: related facts first (all pairs when too few are related).
    first = "related" if related >= options.min_stratum_pairs else "all"
    result["headline"] = pair_headline(table, ptable, first, options, seed)
    result["all_pairs"] = result["headline"] if first == "all" else pair_headline(table, ptable, "all", options, seed)
    result["control"] = control_check(ptable, context)
    shown = {options.ripple, "delta_logp" if options.ripple == "neg_delta_logp" else "neg_delta_logp"}
    result["ripple_metrics"] = {  # the other ripple metrics, for robustness (one of ±ΔlogP is enough)
        metric: a.correlations(a.x, a.column(metric), kendall_interval=False)
        for metric in RIPPLE_METRICS
        if metric not in shown
    }
    result["per_edit"] = _per_edit(a)
    result["strata"] = _strata(a)
    result["coupling_groups"] = _coupling_groups(a)
    result["partial"] = _partial(a)
    result["predictors"] = _predictors_view(ptable)
    if layers is not None and chain_ids is not None:
        result["by_layer"] = _by_layer(a, layers, np.asarray(chain_ids))
    for section in ("ripple_metrics", "per_edit", "strata", "coupling_groups", "partial"):
        result[section] = _without_pair_p_values(result[section])
    result["verdict"] = verdict(result, options, context)
    return result


def _without_pair_p_values(value):
    """Drop the p-values that treat pairs as independent (pairs share edits and pieces: they come out far too
    small). The intervals, the effect sizes and the tests with edits as units stay."""
    if isinstance(value, dict):
        return {k: _without_pair_p_values(v) for k, v in value.items() if k not in ("p", "u")}
    if isinstance(value, list):
        return [_without_pair_p_values(v) for v in value]
    return value


def control_check(ptable: dict, context: dict) -> dict | None:
    """The positive control: after one small fine-tuning step, ⟨g_new,i, g_j⟩ must predict ΔlogP_j (signed) and
    the first-order ripple must too; None for MEMIT runs."""
    if context.get("editor") != "ft":
        return None
    signed = ptable["strata"]["all"]["signed"]
    magnitude = ptable["strata"]["all"]["magnitude"]
    rows = {
        name: {"signed": signed.get(name), "magnitude": magnitude.get(name)}
        for name in ("new_target_inner", "first_order", "inner_edit_layers")
        if name in signed
    }
    rho = (signed.get("new_target_inner") or {}).get("rho")
    steps = (context.get("finetune") or {}).get("steps")
    return {
        "editor": "ft",
        "finetune": context.get("finetune"),
        "rows": rows,
        "required_rho": CONTROL_MIN_RHO,
        "passed": rho is not None and rho >= CONTROL_MIN_RHO,
        "text": (
            f"Positive control (fine-tuning, {steps} step(s)): ⟨g_new,i, g_j⟩ vs signed ΔlogP_j, "
            f"Spearman ρ = {short(rho)} (first-order theory: ≥ {CONTROL_MIN_RHO} expected for one small "
            f"step) — {'passed' if rho is not None and rho >= CONTROL_MIN_RHO else 'FAILED'}."
        ),
    }


def headline_statistics(a: _Analysis) -> dict:
    """GradSim vs the chosen ripple over all pairs: the three correlations with intervals, and the permutation
    test."""
    headline = a.correlations(a.x, a.y)
    headline["permutation"] = S.within_cluster_permutation_test(
        a.x, a.y, a.edits, a.options.permutations, S.rng_for(a.seed, "within-edit permutation")
    )
    return headline


def headline_for_pairs(x: np.ndarray, y: np.ndarray, edits: np.ndarray, options: AnalysisOptions, seed: int) -> dict:
    """The headline statistics on bare arrays (one entry per pair; `edits` names each pair's edit)."""
    table = pd.DataFrame({"gradsim": x, options.ripple: y, "edit_id": edits, "gradsim_defined": True})
    return headline_statistics(_Analysis(table, options, seed))


def _definitions(options: AnalysisOptions) -> dict:
    return {
        "pairs": "one per (edit i, piece j ≠ i) of every edit with status ok; i = source_index",
        "predictor": "GradSim(i, j) = coupling_matrix.npy[i, j]",
        "ripple": f"{options.ripple}: {RIPPLE_LABELS[options.ripple]}; ΔlogP_j = logp_after[j] − "
        "logp_before[j] of that edit in ripple_experiments.json",
        "related": "same chain, or a shared entity (the subject or answer of one piece is the subject or answer "
        "of the other, case-insensitive)",
        "headline": "related facts first (the GradSim paper's comparison): Spearman of |GradSim| with |ΔlogP| "
        "(magnitude with magnitude) and of GradSim with ΔlogP (signed with signed)",
        "intervals": f"{options.confidence:.0%} percentile intervals of a two-way cluster bootstrap that "
        "resamples edits and pieces independently (a pair counts (times its edit drawn) × (times "
        f"its piece drawn)); {options.bootstrap} resamples, the same for every predictor, so "
        "differences of ρ are paired. Headline, all_pairs and predictor_table only: the secondary "
        "sections are descriptive",
        "permutation": "all pairs only; two-sided; the ripple relabelled by a random permutation of the edits and "
        "one of the pieces (pairs mapped onto an unmeasured cell drop out); statistic: Spearman",
        "words": f"|ρ| < {NO_PRACTICAL}: no practical association, whatever the p-value; otherwise supported "
        "(reversed) when the interval lies above (below) 0 and the permutation test, where there is "
        "one, rejects; else inconclusive",
        "per_edit": "Spearman ρ over the pairs of one edit (edits with ≥ 3 pairs)",
        "coupling_groups": "top vs bottom quartile of GradSim over all pairs; Cliff's δ = P(top ripples "
        "more) − P(bottom ripples more)",
        "partial": "Spearman of GradSim and ripple after removing what is linear in the rank of the piece's "
        "baseline logP (logp_before)",
        "predictor_table": "Spearman ρ of each predictor (lit_coupling.analysis.predictors.PREDICTORS) with the "
        "ripple per stratum; magnitude: |predictor| vs |ΔlogP|; signed: predictor vs ΔlogP; "
        "minus_gradsim: ρ − ρ(GradSim) on the same resamples",
    }


def _per_edit(a: _Analysis) -> dict:
    rows = []
    for members in a.plan.members:
        first = a.table.iloc[members[0]]
        x, y = a.x[members], a.y[members]
        tests = S.correlation_tests(x, y)
        rows.append(
            {
                "edit_id": _plain(first["edit_id"]),
                "source_piece": first["source_piece"],
                "source_kind": first["source_kind"],
                "n": int(len(members)),
                "spearman": tests["spearman"]["value"],
                "p": tests["spearman"]["p"],
                "edit_success": _plain(first["edit_success"]),
                "mean_ripple": float(np.mean(y)),
                "mean_gradsim": float(np.mean(x)),
            }
        )
    values = np.array([np.nan if r["spearman"] is None else r["spearman"] for r in rows], dtype=float)
    return {"edits": rows, "summary": S.distribution_summary(values)}


def _plain(value):
    """pandas/numpy scalars → JSON-ready Python values (NaN → None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _stratum(a: _Analysis, mask: np.ndarray) -> dict:
    entry = {
        "n": int(mask.sum()),
        "edits": int(len(np.unique(a.edits[mask]))),
        "mean_gradsim": float(a.x[mask].mean()) if mask.any() else None,
        "median_ripple": float(np.median(a.y[mask])) if mask.any() else None,
    }
    if mask.sum() >= a.options.min_stratum_pairs:
        tests = S.correlation_tests(a.x[mask], a.y[mask])
        entry["spearman"] = tests["spearman"]
        entry["spearman"]["ci"], _ = a.interval(lambda x, y, m: S.spearman(x[m], y[m]), a.x, a.y, mask)
    return entry


def _strata(a: _Analysis) -> dict:
    same = a.table["same_chain"].astype(bool).to_numpy()
    strata = {
        "chain": {
            "same chain": _stratum(a, same),
            "other chains": _stratum(a, ~same),
            "same_vs_other_ripple": S.mann_whitney(a.y[same], a.y[~same]),
            "same_vs_other_gradsim": S.mann_whitney(a.x[same], a.x[~same]),
        }
    }
    relations = a.table["hop_relation"].to_numpy()
    strata["hop_relation"] = {str(rel): _stratum(a, relations == rel) for rel in sorted(set(relations))}
    success = a.table["edit_success"].to_numpy()
    if np.any(success == True) and not np.all(success == True):  # noqa: E712 — the column may hold None
        strata["successful_edits"] = _stratum(a, success == True)  # noqa: E712
    return strata


def _coupling_groups(a: _Analysis) -> dict:
    bottom, top = S.quartile_groups(a.x)
    test = S.mann_whitney(a.y[top], a.y[bottom])
    test["cliffs_delta_ci"], _ = a.interval(S.top_vs_bottom_delta, a.x, a.y)
    low, high = np.quantile(a.x, [0.25, 0.75])
    return {"bottom_max_gradsim": float(low), "top_min_gradsim": float(high), "groups": ["top", "bottom"], **test}


def _partial(a: _Analysis) -> dict:
    z = a.column("logp_before")
    mask = S.finite_mask(z)
    test = S.partial_spearman_test(a.x[mask], a.y[mask], z[mask])
    test["ci"], _ = a.interval(lambda x, y, z, m: S.partial_spearman(x[m], y[m], z[m]), a.x, a.y, z, mask)
    test["control"] = "logp_before"
    test["spearman_ripple_vs_control"] = S.spearman(z[mask], a.y[mask])
    return test


def _predictors_view(ptable: dict) -> dict:
    """The predictor table's all-pairs, magnitude column in the shape of the earlier `predictors` section."""
    rows = ptable["strata"]["all"]["magnitude"]
    table = {
        name: {
            "label": info["label"],
            "kind": info["kind"],
            "available": True,
            "n": rows[name]["n"],
            "spearman": rows[name]["rho"],
            "spearman_ci": rows[name]["ci"],
        }
        for name, info in ptable["predictors"].items()
        if name in rows
    }
    table.update({name: {"label": name, "available": False} for name in ptable["unavailable"]})
    differences = {
        name: {
            "spearman": -row["minus_gradsim"],
            "spearman_ci": [
                None if row["minus_gradsim_ci"][1] is None else -row["minus_gradsim_ci"][1],
                None if row["minus_gradsim_ci"][0] is None else -row["minus_gradsim_ci"][0],
            ],
        }
        for name, row in rows.items()
        if row.get("minus_gradsim") is not None
    }
    return {
        "stratum": "all pairs, magnitude (|predictor| vs |ΔlogP|)",
        "table": table,
        "gradsim_minus_baseline": differences,
    }


def _by_layer(a: _Analysis, layers: LayerCoupling, chain_ids: np.ndarray) -> list[dict]:
    """GradSim of one layer at a time: how coupled chains are there, and whether it tracks the ripple."""
    i, j = a.table["source_index"].to_numpy(int), a.table["piece_index"].to_numpy(int)
    off_diagonal = ~np.eye(len(chain_ids), dtype=bool)
    same = (chain_ids[:, None] == chain_ids[None, :]) & off_diagonal
    other = chain_ids[:, None] != chain_ids[None, :]
    rows = []
    for index, layer in enumerate(layers.layers):
        cosine = layers.cosine(index)
        x = cosine[i, j]
        rows.append(
            {
                "layer": layer,
                "mean_gradsim": float(cosine[off_diagonal].mean()),
                "mean_gradsim_same_chain": float(cosine[same].mean()) if same.any() else None,
                "mean_gradsim_other_chains": float(cosine[other].mean()) if other.any() else None,
                "spearman": S.spearman(x, a.y),
            }
        )
    return rows


CONCLUSION_WORDS = {
    "supported": 'The hypothesis "GradSim high ⇔ ripple strong" is supported on this run',
    "reversed": "The relation runs the other way on this run",
    "not supported": "The hypothesis is not supported on this run",
    "no practical association": "GradSim has no practical association with the ripple on this run",
    "inconclusive": "This run cannot decide the hypothesis",
    "no data": "Nothing to decide",
}


def _ci_text(ci) -> str:
    return f"[{short(ci[0])}, {short(ci[1])}]" if ci and ci[0] is not None else "(no interval)"


def verdict(result: dict, options: AnalysisOptions, context: dict) -> dict:
    """The verdict in words, decided by effect sizes: the related-facts headline first, all pairs second, then
    how GradSim ranks among the predictors, then what a reader should take away (two sentences)."""
    h, all_pairs = result["headline"], result["all_pairs"]
    editor = "fine-tuning (control)" if context.get("editor") == "ft" else "MEMIT"
    rho, ci = h["spearman"]["value"], h["spearman"]["ci"]
    signed = h["signed"]["spearman"]
    sentences = [
        f"{CONCLUSION_WORDS.get(h['conclusion'], h['conclusion'])} for {h['label']}: {h['reason']}.",
        f"On {h['n']} {h['label']} pairs from {h['edits']} {editor} edits, |GradSim| and |ΔlogP| have Spearman "
        f"ρ = {short(rho)} {_ci_text(ci)} ({options.confidence:.0%} two-way cluster bootstrap over edits and "
        f"pieces); signed GradSim and signed ΔlogP have ρ = {short(signed['value'])} {_ci_text(signed['ci'])}. "
        f"Qin et al. (2024) report Spearman {min(r[2] for r in PUBLISHED):.2f}–{max(r[2] for r in PUBLISHED):.2f} "
        "(Pearson "
        f"{min(r[1] for r in PUBLISHED):.2f}–{max(r[1] for r in PUBLISHED):.2f}) for related facts on LLaMA-2-7B "
        "and GPT-2 XL.",
    ]
    if h["stratum"] != "all":
        a_rho, a_ci = all_pairs["spearman"]["value"], all_pairs["spearman"]["ci"]
        perm = all_pairs["permutation"]
        sentences.append(
            f"All {all_pairs['n']} pairs: |GradSim| vs |ΔlogP| ρ = {short(a_rho)} {_ci_text(a_ci)} "
            f"({all_pairs['conclusion']}; two-way permutation {p_text(perm.get('p'))}); signed ρ = "
            f"{short(all_pairs['signed']['spearman']['value'])} "
            f"{_ci_text(all_pairs['signed']['spearman']['ci'])}."
        )
    ptable = result["predictor_table"]
    ranking = ptable["ranking_all_pairs_magnitude"]
    magnitude = ptable["strata"]["all"]["magnitude"]
    takeaway = []
    if ranking:
        best = ranking[0]
        place = ranking.index("gradsim") + 1 if "gradsim" in ranking else None
        best_row = magnitude[best]
        sentences.append(
            f"Of {len(ranking)} predictors (all pairs, magnitude), the best is {ptable['predictors'][best]['label']} "
            f"(ρ = {short(best_row['rho'])} {_ci_text(best_row['ci'])})"
            + (f"; GradSim ranks {place} of {len(ranking)}" if place else "")
            + (
                f" (Δρ best − GradSim = {short(best_row.get('minus_gradsim'))} "
                f"{_ci_text(best_row.get('minus_gradsim_ci'))}, same resamples)"
                if best != "gradsim" and best_row.get("minus_gradsim") is not None
                else ""
            )
            + "."
        )
        oracle = magnitude.get("first_order", {}).get("rho")
        gradsim_word = h["conclusion"]
        if gradsim_word in ("supported",):
            low_paper, high_paper = min(r[2] for r in PUBLISHED), max(r[2] for r in PUBLISHED)
            where = (
                "below the paper's"
                if rho < low_paper
                else "within the paper's"
                if rho <= high_paper
                else "above the paper's"
            )
            first = (
                f"GradSim does track how much an edit moves related facts here (ρ = {short(rho)} "
                f"{_ci_text(ci)}, {strength(rho)}), {where} {low_paper:.2f}–{high_paper:.2f}"
            )
        elif gradsim_word == "reversed":
            first = f"GradSim runs against the ripple on related facts here (ρ = {short(rho)})"
        elif gradsim_word == "no practical association":
            first = (
                f"GradSim shows no practical association with how much an edit moves related facts "
                f"(ρ = {short(rho)}, far below the paper's 0.60–0.81)"
            )
        else:
            first = (
                f"This run cannot tell whether GradSim tracks the ripple on related facts (ρ = {short(rho)} "
                f"{_ci_text(ci)})"
            )
        if oracle is not None and abs(oracle) >= 0.5:
            first += (
                f", while the edit's own first-order prediction reaches ρ = {short(oracle)} on all pairs: "
                "far more of the ripple is predictable than gradient cosine captures"
            )
        takeaway.append(first + ".")
        second_best = next((name for name in ranking if name != "first_order"), None)
        if second_best:
            takeaway.append(
                f"Without the edit's ΔW, the best forecast of ripple on this run is "
                f"{ptable['predictors'][second_best]['label']} (ρ = {short(magnitude[second_best]['rho'])}); "
                "read GradSim's number with the thresholds stated below, and these results as those of one "
                f"{'tiny ' if (context.get('parameters') or 0) <= TINY_MODEL_PARAMETERS else ''}model."
            )
    control = result.get("control")
    if control:
        sentences.append(control["text"])
    return {
        "conclusion": h["conclusion"],
        "strength": strength(rho),
        "stratum": h["stratum"],
        "text": " ".join(sentences),
        "takeaway": " ".join(takeaway),
        "thresholds": {
            "no practical association": f"|ρ| < {NO_PRACTICAL}",
            **{label: f"|ρ| ≥ {bound}" for bound, label in STRENGTH if bound > 0},
            "supported / reversed": f"|ρ| ≥ {NO_PRACTICAL} and the {options.confidence:.0%} "
            "interval excludes 0 (and, on all pairs, the two-way "
            f"permutation p < {options.alpha})",
        },
        "caveats": caveats(result, context),
    }


def caveats(result: dict, context: dict) -> list[str]:
    """The limitations that apply to this run, each with its number."""
    counts = result["counts"]
    notes = []
    if counts["edits"] < MIN_EDITS:
        notes.append(
            f"Few edits ({counts['edits']}), fewer than {MIN_EDITS}: intervals come from resampling "
            f"{counts['edits']} edits and are rough (a cluster bootstrap over so few clusters tends to "
            "be too narrow); more edits (--max_experiments) narrow them honestly."
        )
    if counts["pairs"] < FEW_PAIRS:
        notes.append(f"Small N: {counts['pairs']} pairs.")
    parameters = context.get("parameters")
    if parameters and parameters <= TINY_MODEL_PARAMETERS:
        notes.append(
            f"Tiny model ({parameters / 1e6:.1f}M parameters): coupling and ripple in a model this "
            "small need not carry over to GPT-2 XL or LLaMA-2."
        )
    if context.get("source_kind") == "synthetic-world":
        notes.append("Synthetic data: the facts come from the embedded generated world, not from HotpotQA.")
    if context.get("gradsim_mode") == "projected":
        notes.append("GradSim is estimated with a random projection, not computed exactly.")
    efficacy = context.get("efficacy")
    if efficacy and efficacy.get("ok") and efficacy.get("success") is not None and efficacy["success"] < efficacy["ok"]:
        notes.append(
            f"Only {efficacy['success']} of {efficacy['ok']} edits succeeded (efficacy); the ripple "
            "of a failed edit is small by construction."
        )
    skipped = sum(counts.get("edits_skipped", {}).values())
    if skipped:
        notes.append(f"{skipped} edit(s) did not finish and are left out.")
    known = context.get("known_fraction")
    if known is not None and known < 0.5:
        notes.append(
            f"The model knows few of the facts before editing (teacher-forced EM {known:.0%}); "
            "ripple on facts a model never knew is mostly noise."
        )
    if result["counts"]["pairs_excluded"].get("gradsim undefined (zero gradient)"):
        notes.append("Pairs with a zero-gradient piece (GradSim undefined) are left out.")
    notes.append(
        "Intervals come from a two-way cluster bootstrap (edits × pieces) and are given for the headline, "
        "the all-pairs figures and the predictor table only; the secondary sections (other ripple "
        "metrics, per-edit, hop relations, coupling groups, partial ρ) are descriptive. No p-value that "
        "treats pairs as independent is reported."
    )
    if context.get("editor") == "ft":
        notes.append(
            "Editor: fine-tuning (the positive control), not MEMIT: the GradSim figures describe how a "
            "gradient step ripples, not how a MEMIT edit does."
        )
    return notes


def correlation_rows(result: dict) -> pd.DataFrame:
    """The statistics of `correlation_analysis.json` as one long table (for W&B and quick reading)."""
    rows = []

    def add(section: str, name: str, entry: dict | None, value_key: str = "value", ci_key: str = "ci"):
        if not entry or entry.get(value_key) is None:
            return
        ci = entry.get(ci_key) or [None, None]
        rows.append(
            {
                "section": section,
                "statistic": name,
                "value": entry[value_key],
                "ci_low": ci[0],
                "ci_high": ci[1],
                "p": entry.get("p"),
                "n": entry.get("n"),
            }
        )

    headline = result.get("headline", {})
    for name in ("pearson", "spearman", "kendall"):
        add("headline", name, {**headline.get(name, {}), "n": headline.get("n")})
    permutation = headline.get("permutation", {})
    add("headline", "permutation (spearman)", {**permutation, "value": permutation.get("observed")})
    for metric, entry in result.get("ripple_metrics", {}).items():
        for name in ("pearson", "spearman", "kendall"):
            add(f"ripple: {metric}", name, {**entry.get(name, {}), "n": entry.get("n")})
    strata = result.get("strata", {})
    stratified = [
        (group, name, entry) for group in ("chain", "hop_relation") for name, entry in strata.get(group, {}).items()
    ]
    if "successful_edits" in strata:
        stratified.append(("edits", "successful only", strata["successful_edits"]))
    for group, name, entry in stratified:
        if "spearman" in entry:
            add(f"stratum: {group}", name, {**entry["spearman"], "n": entry.get("n")})
    groups = result.get("coupling_groups", {})
    add(
        "coupling groups",
        "Cliff's delta (top vs bottom quartile)",
        {**groups, "n": sum(groups.get("n") or [])},
        "cliffs_delta",
        "cliffs_delta_ci",
    )
    add("partial", "Spearman | baseline logP", result.get("partial"))
    for name, entry in result.get("predictors", {}).get("table", {}).items():
        add("predictors", f"{name}: Spearman", entry, "spearman", "spearman_ci")
        add("predictors", f"{name}: AUROC", entry, "auroc", "auroc_ci")
    for name, entry in result.get("predictors", {}).get("gradsim_minus_baseline", {}).items():
        add("gradsim minus baseline", f"{name}: Spearman", entry, "spearman", "spearman_ci")
        add("gradsim minus baseline", f"{name}: AUROC", entry, "auroc", "auroc_ci")
    summary = result.get("per_edit", {}).get("summary", {})
    add(
        "per edit",
        "median Spearman (p: sign test)",
        {"value": summary.get("median"), "p": summary.get("sign_test_p"), "n": summary.get("n")},
    )
    frame = pd.DataFrame(rows, columns=["section", "statistic", "value", "ci_low", "ci_high", "p", "n"])
    numeric = ["value", "ci_low", "ci_high", "p", "n"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric)  # None → NaN: one type per column
    return frame


# --- the predictor table, the related-facts headline and the verdict (issue 13) ------------------------------

# |ρ| below this is "no practical association", whatever the p-value: at ρ = 0.1 a predictor explains about 1%
# of the variance of the ripple's ranks. Above it, Cohen's labels (STRENGTH) name the size.
NO_PRACTICAL = 0.1
# Below this many edits, intervals from resampling edits rest on too few clusters (the percentile bootstrap
# under-covers with few clusters: Cameron, Gelbach & Miller 2008).
MIN_EDITS = 30
# Qin et al. (EMNLP 2024), GradSim vs ripple on related facts (reference.md): (setting, Pearson, Spearman).
PUBLISHED = (
    ("LLaMA-2-7B, ROME (popular), ΔlogP", 0.796, 0.811),
    ("LLaMA-2-7B, MEMIT, ΔlogP", 0.771, 0.598),
    ("GPT-2 XL, ROME, ΔlogP", 0.628, 0.708),
    ("MQuAKE 2-hop", 0.783, 0.767),
)
STRATA_LABELS = {
    "related": "related facts (same chain or shared entity)",
    "all": "all pairs",
    "known": "all pairs, pieces the model knew",
    "unknown": "all pairs, pieces it did not know",
}
# Where the positive control must land: first-order theory after one small fine-tuning step.
CONTROL_MIN_RHO = 0.8


def stratum_masks(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """related / all, and known / unknown pieces when the run says which pieces the model knew."""
    n = len(table)
    related = (
        table["related"].astype(bool).to_numpy() if "related" in table else table["same_chain"].astype(bool).to_numpy()
    )
    masks = {"related": related, "all": np.ones(n, dtype=bool)}
    known = table["known"].to_numpy(np.float64) if "known" in table else np.full(n, np.nan)
    if np.isfinite(known).any():
        masks["known"], masks["unknown"] = known == 1, known == 0
    return masks


def words(rho: float | None, ci: list | None, p: float | None = None, alpha: float = 0.05) -> tuple[str, str]:
    """(conclusion, the reason) from an effect size and its interval. The size decides first: |ρ| < 0.1 is "no
    practical association" even when the interval excludes 0; a larger ρ is "supported" (or "reversed") only when
    its interval excludes 0 (and the permutation test, where there is one, rejects)."""
    if rho is None or not np.isfinite(rho):
        return "no data", "the correlation is undefined"
    if abs(rho) < NO_PRACTICAL:
        return "no practical association", (
            f"|ρ| = {abs(rho):.2f} is below {NO_PRACTICAL}, too small to matter whatever its p-value"
        )
    low, high = ci if ci and ci[0] is not None else (None, None)
    if low is None:
        return "inconclusive", "there is no interval (fewer than 2 edits or pieces)"
    rejects = p is None or p < alpha
    if rho > 0 and low > 0 and rejects:
        return "supported", f"a {strength(rho)} positive association whose interval excludes 0"
    if rho < 0 and high < 0 and rejects:
        return "reversed", f"a {strength(rho)} negative association whose interval excludes 0"
    if not rejects:
        return "inconclusive", f"the permutation test does not reject chance (p ≥ {alpha})"
    return "inconclusive", "the interval includes 0"


def predictor_table(table: pd.DataFrame, options: AnalysisOptions, seed: int) -> dict:
    """Spearman ρ of every predictor with the ripple, per stratum, signed with signed ΔlogP and magnitude with
    |ΔlogP|, with two-way cluster-bootstrap intervals (edits × pieces) and Δρ against GradSim on the same
    resamples."""
    from lit_coupling.analysis.predictors import PREDICTORS as DEFINED

    usable = S.finite_mask(table["delta_logp"]) & table["gradsim_defined"].astype(bool).to_numpy()
    table = table[usable].reset_index(drop=True)
    boot = S.TwoWayBootstrap(
        table["edit_id"].to_numpy(),
        table["piece_index"].to_numpy(),
        options.bootstrap,
        S.rng_for(seed, "two-way bootstrap"),
    )
    available = [name for name in DEFINED if name in table and np.isfinite(table[name].to_numpy(np.float64)).sum() >= 3]
    strata = {}
    for stratum, mask in stratum_masks(table).items():
        entry = {
            "label": STRATA_LABELS[stratum],
            "n": int(mask.sum()),
            "edits": int(table.loc[mask, "edit_id"].nunique()),
            "pieces": int(table.loc[mask, "piece_index"].nunique()),
        }
        # known / unknown: magnitude only (the signed split adds little and costs as much as all pairs)
        for sign in ("magnitude", "signed") if stratum in ("related", "all") else ("magnitude",):
            ripple = table["abs_delta_logp" if sign == "magnitude" else "delta_logp"].to_numpy(np.float64)
            xs = {}
            for name in available:
                kind = DEFINED[name][1]
                x = table[name].to_numpy(np.float64)
                if sign == "magnitude":
                    xs[name] = x if kind == "magnitude" else np.abs(x)
                elif kind != "magnitude":
                    xs[name] = x
            results = S.spearman_table(boot, xs, ripple, mask)
            rows = {}
            for name, (rho, dist, keep) in results.items():
                row = {"rho": _finite(rho), "ci": S.percentile_interval(dist, options.confidence), "n": int(keep.sum())}
                if name != "gradsim" and "gradsim" in results and np.array_equal(keep, results["gradsim"][2]):
                    base_rho, base_dist = results["gradsim"][:2]
                    row["minus_gradsim"] = _finite(rho - base_rho)
                    row["minus_gradsim_ci"] = S.percentile_interval(dist - base_dist, options.confidence)
                rows[name] = row
            entry[sign] = rows
        strata[stratum] = entry
    ranking = sorted(
        (name for name in available if strata["all"]["magnitude"].get(name, {}).get("rho") is not None),
        key=lambda name: -abs(strata["all"]["magnitude"][name]["rho"]),
    )
    return {
        "predictors": {name: {"label": DEFINED[name][0], "kind": DEFINED[name][1]} for name in available},
        "unavailable": [name for name in DEFINED if name not in available],
        "ranking_all_pairs_magnitude": ranking,
        "strata": strata,
        "resamples": boot.n_resamples,
        "pairs": int(len(table)),
    }


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def pair_headline(table: pd.DataFrame, ptable: dict, stratum: str, options: AnalysisOptions, seed: int) -> dict:
    """GradSim vs ripple in one stratum, as the report's headline shows it: magnitude with magnitude (|GradSim|,
    |ΔlogP|) and signed with signed, intervals from the predictor table's two-way bootstrap."""
    entry = ptable["strata"].get(stratum) or {}
    magnitude = (entry.get("magnitude") or {}).get("gradsim") or {}
    signed = (entry.get("signed") or {}).get("gradsim") or {}
    mask = stratum_masks(table)[stratum] & table["gradsim_defined"].astype(bool).to_numpy()
    x, y = table["gradsim"].to_numpy(np.float64)[mask], table["abs_delta_logp"].to_numpy(np.float64)[mask]
    keep = S.finite_mask(x, y)
    result = {
        "stratum": stratum,
        "label": STRATA_LABELS[stratum],
        "predictor": "|GradSim|",
        "ripple": "abs_delta_logp",
        "n": int(keep.sum()),
        "edits": entry.get("edits"),
        "pieces": entry.get("pieces"),
        "spearman": {"value": magnitude.get("rho"), "ci": magnitude.get("ci") or [None, None]},
        "pearson": {"value": _finite(S.pearson(np.abs(x[keep]), y[keep]))},
        "kendall": {"value": _finite(S.kendall(np.abs(x[keep]), y[keep]))},
        "signed": {
            "predictor": "GradSim",
            "ripple": "delta_logp",
            "spearman": {"value": signed.get("rho"), "ci": signed.get("ci") or [None, None]},
        },
    }
    if stratum == "all":
        edits, pieces = table["edit_id"].to_numpy()[mask], table["piece_index"].to_numpy()[mask]
        result["permutation"] = S.two_way_permutation_test(
            np.abs(x), y, edits, pieces, options.permutations, S.rng_for(seed, "two-way permutation")
        )
    else:
        result["permutation"] = {
            "p": None,
            "n_permutations": 0,
            "why": (
                "no permutation test inside a stratum: relabelling edits and pieces would move pairs across the "
                "stratum boundary, and shuffling within edits ignores piece effects (type-I error 0.21 at α = 0.05 "
                "in a simulation); the interval alone decides"
            ),
        }
    conclusion, reason = words(
        result["spearman"]["value"], result["spearman"]["ci"], result["permutation"].get("p"), options.alpha
    )
    result["conclusion"], result["reason"] = conclusion, reason
    signed_conclusion, _ = words(signed.get("rho"), signed.get("ci"), None, options.alpha)
    result["signed"]["conclusion"] = signed_conclusion
    return result
