"""The figures of a run (heatmap, six-panel analysis, per-layer coupling) and of `compare`: thin drawing code
over the pair table and `correlation_analysis.json`.

Figures are built with `matplotlib.figure.Figure` directly: no pyplot state, no GUI backend, safe in a worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lit_coupling.analysis.correlation import RIPPLE_LABELS, p_text, short
from lit_coupling.data.piece import KINDS, KnowledgePiece

SAME, OTHER = "#c0392b", "#7f8c8d"  # same-chain pairs stand out; other-chain pairs are the background
MAX_TICK_LABELS = 60  # beyond this many pieces, per-piece tick labels are unreadable
COLOUR_PERCENTILE = 99  # the heatmap's colour scale: one near-duplicate pair must not wash out the rest
MAX_CHAIN_LINES = 150  # beyond this many chains, separating lines would cover the cells


def corner_text(ax, text: str) -> None:
    """A small text box in a panel's top-left corner."""
    ax.text(
        0.02,
        0.98,
        text,
        transform=ax.transAxes,
        va="top",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )


def chain_order(pieces: Sequence[KnowledgePiece]) -> list[int]:
    """Piece indices with each chain's pieces together (chains in first-appearance order), hop 1, hop 2,
    question, comparison inside a chain."""
    first_seen: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        first_seen.setdefault(piece.chain_id, index)
    kind_rank = {kind: r for r, kind in enumerate(KINDS)}
    return sorted(
        range(len(pieces)), key=lambda k: (first_seen[pieces[k].chain_id], kind_rank.get(pieces[k].kind, len(KINDS)), k)
    )


def _interval(ci) -> str:
    return f"[{short(ci[0])}, {short(ci[1])}]" if ci and ci[0] is not None else "[n/a]"


def _positive_spread(values: np.ndarray) -> bool:
    """Heavy-tailed positive values (|ΔlogP|) read better on a log axis."""
    values = values[np.isfinite(values)]
    return len(values) > 0 and values.min() > 0 and values.max() / values.min() > 100


def coupling_heatmap(coupling: np.ndarray, pieces: Sequence[KnowledgePiece], title: str = "") -> Figure:
    order = chain_order(pieces)
    matrix = coupling[np.ix_(order, order)].astype(np.float64)
    n = len(order)
    masked = np.ma.masked_array(matrix, mask=np.eye(n, dtype=bool))  # the diagonal (1) would swamp the scale
    off_diagonal = np.abs(matrix[~np.eye(n, dtype=bool)])
    limit = float(np.percentile(off_diagonal, COLOUR_PERCENTILE)) if off_diagonal.size else 1.0
    limit = limit if limit > 0 else 1.0
    clipped = off_diagonal.size and off_diagonal.max() > limit
    size = min(14.0, 5.0 + n * 0.12)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    cmap = _cmap("RdBu_r")
    image = ax.imshow(masked, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
    label = "GradSim = cos(∇log P(a_i|q_i), ∇log P(a_j|q_j)); diagonal in grey"
    if clipped:
        label += f"; colours saturate at the {COLOUR_PERCENTILE}th percentile of |GradSim|"
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label, extend="both" if clipped else "neither")
    chains = [pieces[k].chain_id for k in order]
    boundaries = [k for k in range(1, n) if chains[k] != chains[k - 1]]
    if len(boundaries) <= MAX_CHAIN_LINES:
        for b in boundaries:
            ax.axhline(b - 0.5, color="black", linewidth=0.4)
            ax.axvline(b - 0.5, color="black", linewidth=0.4)
    if n <= MAX_TICK_LABELS:
        labels = [f"{pieces[k].chain_id[:10]}·{pieces[k].kind}" for k in order]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(f"{n} pieces, grouped by chain ({len(set(chains))} chains; lines separate chains)")
    ax.set_ylabel("piece")
    ax.set_title(title or "Knowledge coupling (GradSim), chains together")
    fig.tight_layout()
    return fig


def _cmap(name: str):
    import matplotlib

    cmap = matplotlib.colormaps[name].copy()
    cmap.set_bad("#d0d0d0")
    return cmap


def _hist_same_other(ax, values: np.ndarray, same: np.ndarray, bins, log: bool = False) -> None:
    """Same-chain vs other-chain histograms, each as fractions of its own pairs (the groups differ in size;
    densities would mislead on log-spaced bins). Dashed: the mean (the median on a log axis)."""
    for mask, colour, label in ((~same, OTHER, "other chains"), (same, SAME, "same chain")):
        v = values[mask]
        v = v[np.isfinite(v)]
        if len(v):
            centre = np.median(v) if log else np.mean(v)
            ax.hist(
                v,
                bins=bins,
                weights=np.full(len(v), 1 / len(v)),
                histtype="stepfilled",
                alpha=0.35,
                color=colour,
                label=f"{label} (n={len(v)}, {'median' if log else 'mean'} {centre:.3g})",
            )
            ax.axvline(centre, color=colour, linestyle="--", linewidth=1)
    ax.set_ylabel("fraction of pairs")
    ax.legend(fontsize=7)


def _bins(values: np.ndarray, log: bool, count: int = 40):
    values = values[np.isfinite(values)]
    if log:
        return np.geomspace(values.min(), values.max(), count)
    return np.linspace(values.min(), values.max(), count) if np.ptp(values) > 0 else count


def no_ripple_figure(coupling: np.ndarray, pieces: Sequence[KnowledgePiece], reason: str, title: str = "") -> Figure:
    """The analysis figure of a run without usable (edit, piece) pairs: the coupling distribution, and why the
    ripple panels are empty (so the run still shows what it measured, and says what to change)."""
    fig = Figure(figsize=(14, 5.5))
    left, right = fig.subplots(1, 2)
    chains = np.array([p.chain_id for p in pieces])
    upper = np.triu_indices(len(pieces), k=1)
    values = coupling[upper].astype(float)
    if len(values):
        _hist_same_other(left, values, chains[upper[0]] == chains[upper[1]], _bins(values, False))
    left.set_title("Coupling distribution (all piece pairs)")
    left.set_xlabel("GradSim")
    right.axis("off")
    right.text(0.0, 0.5, "No ripple to analyse.\n\n" + reason, wrap=True, va="center", fontsize=11)
    fig.suptitle(title or "Coupling and ripple")
    return fig


def comprehensive_figure(
    table: pd.DataFrame, coupling: np.ndarray, pieces: Sequence[KnowledgePiece], result: dict, title: str = ""
) -> Figure:
    """The six panels of mission.md: coupling distribution, ripple distribution, GradSim vs ripple with fit,
    per-edit correlations, high vs low coupling groups, EM change by coupling bin."""
    settings = result["settings"]
    metric = settings["ripple"]
    pairs = table[table["gradsim_defined"].astype(bool) & np.isfinite(table["gradsim"]) & np.isfinite(table[metric])]
    x, y = pairs["gradsim"].to_numpy(float), pairs[metric].to_numpy(float)
    same = pairs["same_chain"].astype(bool).to_numpy()
    log_y = _positive_spread(y)
    ripple_label = RIPPLE_LABELS[metric]

    fig = Figure(figsize=(18, 11))
    axes = fig.subplots(2, 3)

    # 1. Coupling over all piece pairs of the matrix.
    ax = axes[0, 0]
    chains = np.array([p.chain_id for p in pieces])
    upper = np.triu_indices(len(pieces), k=1)
    values = coupling[upper].astype(float)
    same_matrix = chains[upper[0]] == chains[upper[1]]
    _hist_same_other(ax, values, same_matrix, _bins(values, False))
    ax.set_title("1. Coupling distribution (all piece pairs)")
    ax.set_xlabel("GradSim")

    # 2. Ripple over the (edit, piece) pairs.
    ax = axes[0, 1]
    _hist_same_other(ax, y, same, _bins(y, log_y), log=log_y)
    if log_y:
        ax.set_xscale("log")
    ax.set_title("2. Ripple distribution ((edit, piece) pairs)")
    ax.set_xlabel(ripple_label)

    # 3. Scatter with a least-squares fit (on log ripple when the axis is logarithmic).
    ax = axes[0, 2]
    ax.scatter(x[~same], y[~same], s=8, alpha=0.4, color=OTHER, label="other chains")
    ax.scatter(x[same], y[same], s=14, alpha=0.8, color=SAME, label="same chain")
    if len(x) >= 2 and np.ptp(x) > 0:
        target = np.log(y) if log_y else y
        slope, intercept = np.polyfit(x, target, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        fit = slope * grid + intercept
        ax.plot(
            grid,
            np.exp(fit) if log_y else fit,
            color="black",
            linewidth=1.5,
            label="least-squares fit" + (" (log ripple)" if log_y else ""),
        )
    if log_y:
        ax.set_yscale("log")
    h = result.get("headline", {})
    if h:
        lines = []
        for entry in (h, result.get("all_pairs")):
            if entry:
                lines.append(
                    f"{entry.get('stratum', '')}: |GradSim| vs |ΔlogP| ρ = "
                    f"{short(entry['spearman']['value'])} {_interval(entry['spearman'].get('ci'))}; "
                    f"signed ρ = {short(entry['signed']['spearman']['value'])}"
                )
        perm = (result.get("all_pairs") or {}).get("permutation") or {}
        text = "\n".join(lines) + f"\nall pairs: two-way permutation {p_text(perm.get('p'))}"
        corner_text(ax, text)
    ax.set_title("3. GradSim vs ripple (95% CIs: two-way bootstrap, edits × pieces)")
    ax.set_xlabel("GradSim(edited piece, piece)")
    ax.set_ylabel(ripple_label)
    ax.legend(fontsize=7, loc="lower right")

    # 4. Per-edit Spearman, sorted.
    ax = axes[1, 0]
    edits = [e for e in result.get("per_edit", {}).get("edits", []) if e["spearman"] is not None]
    edits.sort(key=lambda e: e["spearman"])
    if edits:
        values = [e["spearman"] for e in edits]
        colours = [SAME if e["edit_success"] is not False else OTHER for e in edits]
        ax.barh(range(len(edits)), values, color=colours)
        if len(edits) <= 30:
            # Edit number, what was edited, and the start of its record id (ids can be long hashes).
            labels = [
                f"{e['edit_id']} · {e['source_kind']} · {str(e['source_piece']).split('/')[0][:10]}" for e in edits
            ]
            ax.set_yticks(range(len(edits)), labels, fontsize=6)
        else:
            ax.set_yticks([])
        ax.axvline(0, color="black", linewidth=0.8)
        if h and h["spearman"]["value"] is not None:
            ax.axvline(
                h["spearman"]["value"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"pooled ρ = {short(h['spearman']['value'])}",
            )
        ax.legend(fontsize=7, title="grey bars: edit failed (efficacy)", title_fontsize=6)
    ax.set_title("4. Per-edit Spearman(GradSim, ripple)")
    ax.set_xlabel("Spearman ρ over the pieces of one edit")
    ax.set_xlim(-1.05, 1.05)

    # 5. Top vs bottom quartile of GradSim.
    ax = axes[1, 1]
    low, high = np.quantile(x, [0.25, 0.75]) if len(x) else (np.nan, np.nan)
    groups = [y[x <= low], y[(x > low) & (x < high)], y[x >= high]]
    ax.boxplot(
        groups,
        tick_labels=[f"bottom 25%\n(≤ {low:.2f})", "middle 50%", f"top 25%\n(≥ {high:.2f})"],
        showfliers=True,
        flierprops={"markersize": 2},
    )
    if log_y:
        ax.set_yscale("log")
    g = result.get("coupling_groups", {})
    if g.get("cliffs_delta") is not None:
        text = (
            f"top vs bottom: Cliff's δ = {short(g['cliffs_delta'])} {_interval(g['cliffs_delta_ci'])}\n"
            f"P(top ripples more) = {short(g['prob_superiority'])}\n"
            f"n = {g['n'][0]} vs {g['n'][1]} pairs"
        )
        corner_text(ax, text)
    ax.set_title("5. Ripple by coupling group")
    ax.set_ylabel(ripple_label)

    # 6. EM flips by equal-count GradSim bins.
    ax = axes[1, 2]
    bins = max(1, min(settings.get("coupling_bins", 5), len(x)))
    if len(x):
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
        which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        width = 0.38
        measured = changed = 0
        for offset, column, colour, label in (
            (-width / 2, "tf_em_flip", "#2c7fb8", "teacher-forced EM"),
            (width / 2, "gen_em_flip", "#f39c12", "generated EM"),
        ):
            flips = pairs[column].to_numpy(float)
            rates = [
                np.nanmean(flips[which == b]) if np.isfinite(flips[which == b]).any() else np.nan
                for b in range(len(edges) - 1)
            ]
            ax.bar(np.arange(len(rates)) + offset, rates, width=width, color=colour, label=label)
            measured += int(np.isfinite(flips).sum())
            changed += int(np.nansum(flips))
        if not changed:  # an empty panel should say why
            ax.text(
                0.5,
                0.5,
                "no piece's EM changed under any edit" if measured else "EM not measured",
                transform=ax.transAxes,
                ha="center",
                fontsize=9,
                color="#555555",
            )
        labels = [f"{edges[b]:.2f}…{edges[b + 1]:.2f}\nn={int(np.sum(which == b))}" for b in range(len(edges) - 1)]
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.legend(fontsize=7)
    ax.set_title("6. EM change by coupling bin")
    ax.set_xlabel("GradSim bin (equal counts)")
    ax.set_ylabel("fraction of pieces whose EM changed")
    ax.set_ylim(0, 1)

    verdict = result.get("verdict", {})
    fig.suptitle(
        (title + " — " if title else "") + f"verdict: {verdict.get('conclusion', 'n/a')} "
        f"({verdict.get('strength', 'n/a')})",
        fontsize=13,
    )
    fig.tight_layout()
    return fig


def layer_figure(
    by_layer: list[dict], headline_spearman: float | None, edit_layers: Sequence[int] = (), title: str = ""
) -> Figure:
    """Coupling per layer (same chain vs other chains) and how well each layer's GradSim tracks the ripple."""
    layers = [row["layer"] for row in by_layer]
    fig = Figure(figsize=(13, 4.8))
    left, right = fig.subplots(1, 2)
    for key, colour, label in (
        ("mean_gradsim_same_chain", SAME, "same chain"),
        ("mean_gradsim_other_chains", OTHER, "other chains"),
        ("mean_gradsim", "black", "all pairs"),
    ):
        values = [np.nan if row.get(key) is None else row[key] for row in by_layer]
        left.plot(layers, values, marker="o", color=colour, label=label)
    left.axhline(0, color="black", linewidth=0.5)
    left.set_xlabel("layer")
    left.set_ylabel("mean GradSim over piece pairs")
    left.set_title("Coupling by layer")
    left.legend(fontsize=8)
    spearman = [np.nan if row.get("spearman") is None else row["spearman"] for row in by_layer]
    right.bar(layers, spearman, color="#2c7fb8", label="this layer's GradSim")
    if headline_spearman is not None:
        right.axhline(headline_spearman, color="black", linestyle="--", label="all chosen layers")
    right.axhline(0, color="black", linewidth=0.5)
    right.set_xlabel("layer")
    right.set_ylabel("Spearman with ripple")
    right.set_title("Which layers' coupling tracks the ripple")
    for ax in (left, right):
        for layer in edit_layers:
            ax.axvspan(layer - 0.5, layer + 0.5, color="#f39c12", alpha=0.15, linewidth=0, zorder=0)
        ax.set_xticks(layers)
    if edit_layers:
        right.plot([], [], color="#f39c12", alpha=0.4, linewidth=8, label="MEMIT edit layers")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_figure(runs: list[dict]) -> Figure:
    """`compare`: one entry per run with label, off-diagonal coupling, ripple values and its analysis."""
    fig = Figure(figsize=(15, 10))
    axes = fig.subplots(2, 2)
    colours = [f"C{k}" for k in range(len(runs))]

    ax = axes[0, 0]
    shared_bins = _bins(np.concatenate([run["coupling"] for run in runs]), False)
    for run, colour in zip(runs, colours):
        values = run["coupling"]
        ax.hist(
            values,
            bins=shared_bins,
            weights=np.full(len(values), 1 / len(values)),
            histtype="step",
            linewidth=1.5,
            color=colour,
            label=f"{run['label']} (median {np.median(values):.3f})",
        )
    ax.set_title("Coupling distributions (off-diagonal GradSim)")
    ax.set_xlabel("GradSim")
    ax.set_ylabel("fraction of piece pairs")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    log = all(_positive_spread(run["ripple"]) for run in runs)
    everything = np.concatenate([run["ripple"] for run in runs])
    for run, colour in zip(runs, colours):
        values = run["ripple"]
        ax.hist(
            values,
            bins=_bins(everything, log),
            weights=np.full(len(values), 1 / max(len(values), 1)),
            histtype="step",
            linewidth=1.5,
            color=colour,
            label=f"{run['label']} (median {np.median(values):.3g})",
        )
    if log:
        ax.set_xscale("log")
    ax.set_title("Ripple distributions")
    ax.set_xlabel(RIPPLE_LABELS[runs[0]["analysis"]["settings"]["ripple"]])
    ax.set_ylabel("fraction of (edit, piece) pairs")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    names = ("spearman", "pearson", "kendall")
    for k, (run, colour) in enumerate(zip(runs, colours)):
        headline = run["analysis"].get("headline", {})
        for m, name in enumerate(names):
            entry = headline.get(name) or {}
            value, ci = entry.get("value"), entry.get("ci") or [None, None]
            if value is None:
                continue
            position = m + (k - (len(runs) - 1) / 2) * 0.8 / max(len(runs), 1)
            low, high = (ci[0] if ci[0] is not None else value), (ci[1] if ci[1] is not None else value)
            ax.errorbar(
                position,
                value,
                yerr=[[value - low], [high - value]],
                fmt="o",
                color=colour,
                capsize=4,
                label=run["label"] if m == 0 else None,
            )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), ["Spearman ρ", "Pearson r", "Kendall τ"])
    ax.set_ylabel("correlation of GradSim with ripple (95% CI)")
    ax.set_title("GradSim–ripple correlation per model")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    per_edit = [
        [e["spearman"] for e in run["analysis"].get("per_edit", {}).get("edits", []) if e["spearman"] is not None]
        for run in runs
    ]
    ax.boxplot([values or [np.nan] for values in per_edit], tick_labels=[run["label"] for run in runs])
    for k, values in enumerate(per_edit):
        ax.scatter(
            np.full(len(values), k + 1) + np.linspace(-0.08, 0.08, len(values)),
            values,
            s=10,
            color=colours[k],
            zorder=3,
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("per-edit Spearman ρ")
    ax.set_title("Per-edit correlations")
    fig.tight_layout()
    return fig


def predictor_figure(ptable: dict, title: str = "") -> Figure:
    """Every predictor's Spearman ρ with the ripple (magnitude with magnitude), with its two-way bootstrap
    interval, on related facts and on all pairs, ranked by all pairs; the |ρ| < 0.1 band shaded."""
    strata = ptable.get("strata", {})
    names = list(ptable.get("ranking_all_pairs_magnitude", []))
    fig = Figure(figsize=(11, 1.2 + 0.55 * max(len(names), 1)))
    ax = fig.add_subplot()
    ax.axvspan(-0.1, 0.1, color="#eeeeee", label="|ρ| < 0.1: no practical association")
    for offset, stratum, colour in ((-0.17, "related", SAME), (0.17, "all", "#2c3e50")):
        rows = strata.get(stratum, {}).get("magnitude", {})
        ys, xs, lows, highs = [], [], [], []
        for k, name in enumerate(names[::-1]):
            row = rows.get(name) or {}
            if row.get("rho") is None:
                continue
            ci = row.get("ci") or [None, None]
            ys.append(k + offset)
            xs.append(row["rho"])
            lows.append(row["rho"] - ci[0] if ci[0] is not None else 0)
            highs.append(ci[1] - row["rho"] if ci[1] is not None else 0)
        if xs:
            entry = strata.get(stratum, {})
            ax.errorbar(
                xs,
                ys,
                xerr=[lows, highs],
                fmt="o",
                color=colour,
                capsize=3,
                label=f"{entry.get('label', stratum)} (n = {entry.get('n')})",
            )
    labels = [ptable["predictors"][name]["label"] for name in names[::-1]]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman ρ with |ΔlogP| (|predictor| for signed predictors); 95% two-way cluster bootstrap")
    ax.set_title(title or "Which similarity forecasts ripple")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
