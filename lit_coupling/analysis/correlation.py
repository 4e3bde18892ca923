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

# Predictors compared side by side: GradSim and the baselines the issue names (plus |GradSim|, since a
# strongly negative GradSim moves a piece as much as a strongly positive one does, in the other direction).
PREDICTORS = {
    "gradsim": "GradSim",
    "abs_gradsim": "|GradSim|",
    "token_overlap": "token overlap (Jaccard)",
    "hidden_cosine": "hidden-state cosine",
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
        self.excluded = {"gradsim undefined (zero gradient)": int(np.sum(~defined)),
                         "ripple not finite": int(np.sum(defined & ~usable))}
        self.x = self.table["gradsim"].to_numpy(np.float64)
        self.y = self.table[metric].to_numpy(np.float64)
        self.edits = self.table["edit_id"].to_numpy()
        self.plan = S.ClusterBootstrap(self.edits, options.bootstrap, S.rng_for(seed, "cluster bootstrap"))

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(np.float64)

    def interval(self, statistic, *arrays) -> tuple[list, np.ndarray]:
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


def correlation_analysis(table: pd.DataFrame, options: AnalysisOptions, seed: int,
                         layers: LayerCoupling | None = None, chain_ids: list[str] | None = None,
                         context: dict | None = None) -> dict:
    """All statistics of step 4 of the mission. `layers` and `chain_ids` (per piece) give the per-layer view;
    `context` (model, data, method: `pairs.describe_run`) only feeds the caveats."""
    a = _Analysis(table, options, seed)
    context = context or {}
    n_pairs, n_edits = len(a.x), len(a.plan.members)
    result: dict = {
        "format": CORRELATION_FORMAT,
        "settings": {**vars(options), "seed": seed},
        "definitions": _definitions(options),
        "counts": {"pairs": n_pairs, "edits": n_edits, "pieces": context.get("pieces"),
                   "pairs_excluded": a.excluded, "edits_skipped": context.get("edits_skipped", {})},
    }
    if n_pairs < 3:
        result["verdict"] = {"conclusion": "no data", "strength": "undefined", "caveats": [],
                             "text": f"Only {n_pairs} usable (edit, piece) pairs: nothing to correlate."}
        return result

    result["headline"] = {"predictor": "gradsim", "ripple": options.ripple, **headline_statistics(a)}
    shown = {options.ripple, "delta_logp" if options.ripple == "neg_delta_logp" else "neg_delta_logp"}
    result["ripple_metrics"] = {  # the other ripple metrics, for robustness (one of ±ΔlogP is enough)
        metric: a.correlations(a.x, a.column(metric), kendall_interval=False) for metric in RIPPLE_METRICS
        if metric not in shown}
    result["per_edit"] = _per_edit(a)
    result["strata"] = _strata(a)
    result["coupling_groups"] = _coupling_groups(a)
    result["partial"] = _partial(a)
    result["predictors"] = _predictors(a)
    if layers is not None and chain_ids is not None:
        result["by_layer"] = _by_layer(a, layers, np.asarray(chain_ids))
    result["verdict"] = verdict(result, options, context)
    return result


def headline_statistics(a: _Analysis) -> dict:
    """GradSim vs the chosen ripple over all pairs: the three correlations with intervals, and the permutation
    test. Pearson comes from torchmetrics, streamed edit by edit (`stats.pearson_by_cluster`)."""
    headline = a.correlations(a.x, a.y)
    if headline["pearson"]["value"] is not None:
        headline["pearson"]["value"] = S.pearson_by_cluster(a.x, a.y, a.edits)
    headline["permutation"] = S.within_cluster_permutation_test(
        a.x, a.y, a.edits, a.options.permutations, S.rng_for(a.seed, "within-edit permutation"))
    return headline


def headline_for_pairs(x: np.ndarray, y: np.ndarray, edits: np.ndarray, options: AnalysisOptions,
                       seed: int) -> dict:
    """The headline statistics on bare arrays (one entry per pair; `edits` names each pair's edit)."""
    table = pd.DataFrame({"gradsim": x, options.ripple: y, "edit_id": edits, "gradsim_defined": True})
    return headline_statistics(_Analysis(table, options, seed))


def _definitions(options: AnalysisOptions) -> dict:
    return {
        "pairs": "one per (edit i, piece j ≠ i) of every edit with status ok; i = source_index",
        "predictor": "GradSim(i, j) = coupling_matrix.npy[i, j]",
        "ripple": f"{options.ripple}: {RIPPLE_LABELS[options.ripple]}; ΔlogP_j = logp_after[j] − "
                  "logp_before[j] of that edit in ripple_experiments.json",
        "intervals": f"{options.confidence:.0%} percentile intervals of a bootstrap that resamples whole "
                     f"edits ({options.bootstrap} resamples; the same resamples for every statistic)",
        "permutation": "two-sided; ripple shuffled among the pairs of the same edit; statistic: pooled "
                       "Spearman",
        "per_edit": "Spearman ρ over the pairs of one edit (edits with ≥ 3 pairs)",
        "coupling_groups": "top vs bottom quartile of GradSim over all pairs; Cliff's δ = P(top ripples "
                           "more) − P(bottom ripples more)",
        "partial": "Spearman of GradSim and ripple after removing what is linear in the rank of the piece's "
                   "baseline logP (logp_before)",
        "predictors": "Spearman with ripple, and AUROC for 'ripple above the threshold', per predictor; "
                      "differences are GradSim minus the baseline on the same resamples",
    }


def _per_edit(a: _Analysis) -> dict:
    rows = []
    for members in a.plan.members:
        first = a.table.iloc[members[0]]
        x, y = a.x[members], a.y[members]
        tests = S.correlation_tests(x, y)
        rows.append({"edit_id": _plain(first["edit_id"]), "source_piece": first["source_piece"],
                     "source_kind": first["source_kind"], "n": int(len(members)),
                     "spearman": tests["spearman"]["value"], "p": tests["spearman"]["p"],
                     "edit_success": _plain(first["edit_success"]),
                     "mean_ripple": float(np.mean(y)), "mean_gradsim": float(np.mean(x))})
    values = np.array([np.nan if r["spearman"] is None else r["spearman"] for r in rows], dtype=float)
    return {"edits": rows, "summary": S.distribution_summary(values)}


def _plain(value):
    """pandas/numpy scalars → JSON-ready Python values (NaN → None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _stratum(a: _Analysis, mask: np.ndarray) -> dict:
    entry = {"n": int(mask.sum()), "edits": int(len(np.unique(a.edits[mask]))),
             "mean_gradsim": float(a.x[mask].mean()) if mask.any() else None,
             "median_ripple": float(np.median(a.y[mask])) if mask.any() else None}
    if mask.sum() >= a.options.min_stratum_pairs:
        tests = S.correlation_tests(a.x[mask], a.y[mask])
        entry["spearman"] = tests["spearman"]
        entry["spearman"]["ci"], _ = a.interval(lambda x, y, m: S.spearman(x[m], y[m]), a.x, a.y, mask)
    return entry


def _strata(a: _Analysis) -> dict:
    same = a.table["same_chain"].astype(bool).to_numpy()
    strata = {"chain": {"same chain": _stratum(a, same), "other chains": _stratum(a, ~same),
                        "same_vs_other_ripple": S.mann_whitney(a.y[same], a.y[~same]),
                        "same_vs_other_gradsim": S.mann_whitney(a.x[same], a.x[~same])}}
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
    return {"bottom_max_gradsim": float(low), "top_min_gradsim": float(high), "groups": ["top", "bottom"],
            **test}


def _partial(a: _Analysis) -> dict:
    z = a.column("logp_before")
    mask = S.finite_mask(z)
    test = S.partial_spearman_test(a.x[mask], a.y[mask], z[mask])
    test["ci"], _ = a.interval(lambda x, y, z, m: S.partial_spearman(x[m], y[m], z[m]), a.x, a.y, z, mask)
    test["control"] = "logp_before"
    test["spearman_ripple_vs_control"] = S.spearman(z[mask], a.y[mask])
    return test


def ripple_threshold(y: np.ndarray, options: AnalysisOptions) -> float:
    return float(options.ripple_threshold if options.ripple_threshold is not None
                 else np.quantile(y, options.ripple_quantile))


def _predictors(a: _Analysis) -> dict:
    threshold = ripple_threshold(a.y, a.options)
    positive = a.y > threshold
    table, distributions = {}, {}
    for name, label in PREDICTORS.items():
        score = a.column(name)
        mask = S.finite_mask(score)
        if mask.sum() < 3:
            table[name] = {"label": label, "available": False}
            continue
        spearman, spearman_dist = a.interval(lambda s, y, m: S.spearman(s[m], y[m]), score, a.y, mask)
        auroc, auroc_dist = a.interval(lambda s, p, m: S.auroc(s[m], p[m]), score, positive, mask)
        table[name] = {"label": label, "available": True, "n": int(mask.sum()),
                       "spearman": S.spearman(score[mask], a.y[mask]), "spearman_ci": spearman,
                       "auroc": S.auroc(score[mask], positive[mask]), "auroc_ci": auroc}
        distributions[name] = (spearman_dist, auroc_dist)
    differences = {}
    if "gradsim" in distributions:
        for name, (spearman_dist, auroc_dist) in distributions.items():
            if name in ("gradsim", "abs_gradsim"):
                continue
            g_spearman, g_auroc = distributions["gradsim"]
            differences[name] = {
                "spearman": table["gradsim"]["spearman"] - table[name]["spearman"],
                "spearman_ci": S.percentile_interval(g_spearman - spearman_dist, a.options.confidence),
                "auroc": table["gradsim"]["auroc"] - table[name]["auroc"],
                "auroc_ci": S.percentile_interval(g_auroc - auroc_dist, a.options.confidence)}
    return {"threshold": threshold, "positive_pairs": int(positive.sum()), "table": table,
            "gradsim_minus_baseline": differences}


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
        rows.append({"layer": layer, "mean_gradsim": float(cosine[off_diagonal].mean()),
                     "mean_gradsim_same_chain": float(cosine[same].mean()) if same.any() else None,
                     "mean_gradsim_other_chains": float(cosine[other].mean()) if other.any() else None,
                     "spearman": S.spearman(x, a.y)})
    return rows


def conclude(rho: float, ci: list, p: float, alpha: float) -> tuple[str, str]:
    """(conclusion, the reason in words) from the headline Spearman, its interval and the permutation test."""
    low, high = ci if ci and ci[0] is not None else (None, None)
    negligible = STRENGTH[-2][0]
    if low is None:
        return "inconclusive", "there is no interval (fewer than 2 edits)"
    if low > 0 and p < alpha:
        return "supported", "the interval lies above 0 and the within-edit permutation test rejects chance"
    if high < 0 and p < alpha:
        return "reversed", "the interval lies below 0: higher GradSim goes with weaker ripple"
    if -negligible < low and high < negligible:
        return "not supported", "the interval rules out more than a negligible relation"
    if low <= 0 <= high:
        return "inconclusive", "the interval includes 0"
    return "inconclusive", (f"the pooled correlation is not confirmed within edits (permutation p ≥ "
                            f"{alpha}): it may come from differences between edits")


CONCLUSION_WORDS = {
    "supported": "The hypothesis \"GradSim high ⇔ ripple strong\" is supported on this run",
    "reversed": "The relation runs the other way on this run",
    "not supported": "The hypothesis is not supported on this run",
    "inconclusive": "This run cannot decide the hypothesis",
}


def verdict(result: dict, options: AnalysisOptions, context: dict) -> dict:
    h, counts = result["headline"], result["counts"]
    rho, ci, p = h["spearman"]["value"], h["spearman"]["ci"], h["permutation"]["p"]
    conclusion, reason = conclude(rho, ci, p, options.alpha)
    label = strength(rho)
    ci_text = f"[{short(ci[0])}, {short(ci[1])}]" if ci and ci[0] is not None else "(no interval)"
    sentences = [
        f"{CONCLUSION_WORDS[conclusion]}: {reason}.",
        f"On {counts['pairs']} (edit, piece) pairs from {counts['edits']} MEMIT edits, GradSim and ripple "
        f"({RIPPLE_LABELS[options.ripple]}) have Spearman ρ = {short(rho)} {ci_text} "
        f"({options.confidence:.0%} cluster bootstrap over edits): a {label} "
        f"{'positive' if rho > 0 else 'negative'} association; the within-edit permutation test gives "
        f"{p_text(p)}."]
    per_edit = result["per_edit"]["summary"]
    if per_edit.get("n"):
        sentences.append(f"Per edit, ρ has median {short(per_edit['median'])} (IQR {short(per_edit['q1'])} "
                         f"to {short(per_edit['q3'])}) and is positive in {per_edit['positive']} of "
                         f"{per_edit['n']} edits (sign test {p_text(per_edit['sign_test_p'])}).")
    groups = result["coupling_groups"]
    if groups.get("cliffs_delta") is not None:
        ci = groups["cliffs_delta_ci"]
        sentences.append(f"Pairs in the top GradSim quartile vs the bottom quartile: Cliff's δ = "
                         f"{short(groups['cliffs_delta'])} [{short(ci[0])}, {short(ci[1])}] (the top pair "
                         f"ripples more with probability {short(groups['prob_superiority'])}; Mann–Whitney "
                         f"{p_text(groups['p'])}, pairs treated as independent).")
    chain = result["strata"]["chain"]
    same, other = chain["same chain"], chain["other chains"]
    if same["n"] and other["n"]:
        sentences.append(f"Same-chain pairs have median ripple {short(same['median_ripple'], 3)} and mean "
                         f"GradSim {short(same['mean_gradsim'])}; other-chain pairs "
                         f"{short(other['median_ripple'], 3)} and {short(other['mean_gradsim'])} (ripple "
                         f"Cliff's δ = {short(chain['same_vs_other_ripple']['cliffs_delta'])}).")
    partial = result["partial"]
    if partial.get("value") is not None:
        ci = partial["ci"]
        sentences.append(f"Controlling for the piece's baseline logP, partial ρ = {short(partial['value'])} "
                         f"[{short(ci[0])}, {short(ci[1])}].")
    baselines = result["predictors"]["gradsim_minus_baseline"]
    for name, diff in baselines.items():
        ci = diff["spearman_ci"]
        if ci[0] is None:
            continue
        comparison = "better than" if ci[0] > 0 else "worse than" if ci[1] < 0 else "no better than"
        sentences.append(f"GradSim predicts ripple {comparison} {PREDICTORS[name]} (Δρ = "
                         f"{short(diff['spearman'])} [{short(ci[0])}, {short(ci[1])}], ΔAUROC = "
                         f"{short(diff['auroc'])}).")
    sentences.append(f"For scale: Qin et al. (2024) report Spearman {PUBLISHED_SPEARMAN[0]:.2f}–"
                     f"{PUBLISHED_SPEARMAN[1]:.2f} between GradSim and ripple for related facts on "
                     "LLaMA-2-7B and GPT-2 XL (RippleEdits, MQuAKE).")
    return {"conclusion": conclusion, "strength": label, "text": " ".join(sentences),
            "caveats": caveats(result, context)}


def caveats(result: dict, context: dict) -> list[str]:
    """The limitations that apply to this run, each with its number."""
    counts = result["counts"]
    notes = []
    if counts["edits"] < FEW_EDITS:
        notes.append(f"Few edits ({counts['edits']}): intervals come from resampling {counts['edits']} edits "
                     "and are rough; more edits (--max_experiments) narrow them.")
    if counts["pairs"] < FEW_PAIRS:
        notes.append(f"Small N: {counts['pairs']} pairs.")
    parameters = context.get("parameters")
    if parameters and parameters <= TINY_MODEL_PARAMETERS:
        notes.append(f"Tiny model ({parameters / 1e6:.1f}M parameters): coupling and ripple in a model this "
                     "small need not carry over to GPT-2 XL or LLaMA-2.")
    if context.get("source_kind") == "synthetic-world":
        notes.append("Synthetic data: the facts come from the embedded generated world, not from HotpotQA.")
    if context.get("gradsim_mode") == "projected":
        notes.append("GradSim is estimated with a random projection, not computed exactly.")
    efficacy = context.get("efficacy")
    if efficacy and efficacy.get("ok") and efficacy.get("success") is not None \
            and efficacy["success"] < efficacy["ok"]:
        notes.append(f"Only {efficacy['success']} of {efficacy['ok']} edits succeeded (efficacy); the ripple "
                     "of a failed edit is small by construction.")
    skipped = sum(counts.get("edits_skipped", {}).values())
    if skipped:
        notes.append(f"{skipped} edit(s) did not finish and are left out.")
    known = context.get("known_fraction")
    if known is not None and known < 0.5:
        notes.append(f"The model knows few of the facts before editing (teacher-forced EM {known:.0%}); "
                     "ripple on facts a model never knew is mostly noise.")
    if result["counts"]["pairs_excluded"].get("gradsim undefined (zero gradient)"):
        notes.append("Pairs with a zero-gradient piece (GradSim undefined) are left out.")
    notes.append("Pairs share pieces as well as edits; the bootstrap accounts for the edits only, and the "
                 "p-values of Pearson/Spearman/Kendall and Mann–Whitney treat pairs as independent (they "
                 "come out too small).")
    return notes


def correlation_rows(result: dict) -> pd.DataFrame:
    """The statistics of `correlation_analysis.json` as one long table (for W&B and quick reading)."""
    rows = []

    def add(section: str, name: str, entry: dict | None, value_key: str = "value", ci_key: str = "ci"):
        if not entry or entry.get(value_key) is None:
            return
        ci = entry.get(ci_key) or [None, None]
        rows.append({"section": section, "statistic": name, "value": entry[value_key], "ci_low": ci[0],
                     "ci_high": ci[1], "p": entry.get("p"), "n": entry.get("n")})

    headline = result.get("headline", {})
    for name in ("pearson", "spearman", "kendall"):
        add("headline", name, {**headline.get(name, {}), "n": headline.get("n")})
    permutation = headline.get("permutation", {})
    add("headline", "permutation (spearman)", {**permutation, "value": permutation.get("observed")})
    for metric, entry in result.get("ripple_metrics", {}).items():
        for name in ("pearson", "spearman", "kendall"):
            add(f"ripple: {metric}", name, {**entry.get(name, {}), "n": entry.get("n")})
    strata = result.get("strata", {})
    stratified = [(group, name, entry) for group in ("chain", "hop_relation")
                  for name, entry in strata.get(group, {}).items()]
    if "successful_edits" in strata:
        stratified.append(("edits", "successful only", strata["successful_edits"]))
    for group, name, entry in stratified:
        if "spearman" in entry:
            add(f"stratum: {group}", name, {**entry["spearman"], "n": entry.get("n")})
    groups = result.get("coupling_groups", {})
    add("coupling groups", "Cliff's delta (top vs bottom quartile)",
        {**groups, "n": sum(groups.get("n") or [])}, "cliffs_delta", "cliffs_delta_ci")
    add("partial", "Spearman | baseline logP", result.get("partial"))
    for name, entry in result.get("predictors", {}).get("table", {}).items():
        add("predictors", f"{name}: Spearman", entry, "spearman", "spearman_ci")
        add("predictors", f"{name}: AUROC", entry, "auroc", "auroc_ci")
    for name, entry in result.get("predictors", {}).get("gradsim_minus_baseline", {}).items():
        add("gradsim minus baseline", f"{name}: Spearman", entry, "spearman", "spearman_ci")
        add("gradsim minus baseline", f"{name}: AUROC", entry, "auroc", "auroc_ci")
    summary = result.get("per_edit", {}).get("summary", {})
    add("per edit", "median Spearman (p: sign test)",
        {"value": summary.get("median"), "p": summary.get("sign_test_p"), "n": summary.get("n")})
    frame = pd.DataFrame(rows, columns=["section", "statistic", "value", "ci_low", "ci_high", "p", "n"])
    numeric = ["value", "ci_low", "ci_high", "p", "n"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric)  # None → NaN: one type per column
    return frame
