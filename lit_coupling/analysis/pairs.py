"""The pair table: one row per (edit i, piece j ≠ i) with GradSim(i, j), the ripple of edit i on j, baselines.

Built only from a run directory's files (pieces, coupling matrix, ripple experiments, hidden states), so every
number of the analysis can be recomputed from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lit_coupling.analysis.predictors import cosine_of_inner, gradient_norms, layer_inner, shared_entity
from lit_coupling.data.piece import KnowledgePiece, load_pieces
from lit_coupling.errors import UserError
from lit_coupling.gradients.cosine import cosine_from_inner, load_layer_inner
from lit_coupling.outputs import (
    COUPLING_ANALYSIS,
    COUPLING_LAYERS,
    COUPLING_MATRIX,
    EDIT_PREDICTORS,
    PIECE_HIDDEN,
    PIECES,
    RIPPLE,
    read_json,
)

# Which stage writes each file the analysis needs (for the error message when one is missing).
_WRITTEN_BY = {PIECES: "pieces", COUPLING_MATRIX: "gradsim", RIPPLE: "ripple"}


@dataclass
class LayerCoupling:
    """Per-layer gradient inner products (coupling_layers.npz): inner[l, i, j] = ⟨g_i, g_j⟩ at layers[l]."""

    layers: list[int]
    inner: np.ndarray  # (L, N, N)

    def cosine(self, index: int) -> np.ndarray:
        """GradSim restricted to one layer (0 where a piece's gradient vanishes there)."""
        # One layer at a time in float64: the file can be large.
        return cosine_from_inner(self.inner[index].astype(np.float64), in_place=True)[0]


@dataclass
class RunData:
    """What one run directory holds, as the analysis reads it."""

    directory: Path
    pieces: list[KnowledgePiece]
    pieces_meta: dict
    coupling: np.ndarray
    ripple: dict
    coupling_info: dict = field(default_factory=dict)
    hidden: np.ndarray | None = None
    layers: LayerCoupling | None = None
    edit_predictors: dict | None = None  # edit_predictors.npz (analysis stage), when computed

    @property
    def edit_layers(self) -> list[int]:
        return [int(layer) for layer in (self.ripple.get("hparams") or {}).get("layers") or []]

    @property
    def editor(self) -> str:
        return self.ripple.get("editor") or "memit"

    @property
    def model(self) -> dict:
        """The model section, from whichever file has the fullest one."""
        merged: dict = {}
        for doc in (self.pieces_meta, self.ripple, self.coupling_info):
            merged.update(doc.get("model") or {})
        return merged

    @property
    def bos_ids(self) -> list[int]:
        return list((self.pieces_meta.get("tokenizer") or {}).get("bos_ids") or [])


def _load_layers(path: Path, n: int) -> LayerCoupling | None:
    inner, layers = load_layer_inner(path)
    if inner.ndim != 3 or inner.shape[1:] != (n, n):
        return None  # from another run: the per-layer view is left out rather than misaligned
    return LayerCoupling(layers=[int(layer) for layer in layers], inner=inner)


def load_run(directory: str | Path) -> RunData:
    """Read a run directory; a missing input names the stage that writes it."""
    directory = Path(directory)
    for name, stage in _WRITTEN_BY.items():
        if not (directory / name).exists():
            raise UserError(
                f"{directory / name} is missing: run the {stage} stage first "
                f"(lit-coupling run --stages {stage} --output_dir {directory})"
            )
    pieces, pieces_meta = load_pieces(directory / PIECES)
    coupling = np.load(directory / COUPLING_MATRIX).astype(np.float64)
    n = len(pieces)
    if coupling.shape != (n, n):
        raise UserError(
            f"{directory / COUPLING_MATRIX} is {coupling.shape}, but {PIECES} has {n} pieces: "
            "the two files come from different runs"
        )
    ripple = read_json(directory / RIPPLE)
    ids = ripple.get("piece_ids")
    if ids is not None and list(ids) != [p.id for p in pieces]:
        raise UserError(
            f"{directory / RIPPLE} lists other pieces than {PIECES}: the two files come from different runs"
        )
    info = read_json(directory / COUPLING_ANALYSIS) if (directory / COUPLING_ANALYSIS).exists() else {}
    hidden = np.load(directory / PIECE_HIDDEN) if (directory / PIECE_HIDDEN).exists() else None
    if hidden is not None and len(hidden) != n:
        hidden = None  # from another run: the baseline is reported as unavailable rather than misaligned
    layers = _load_layers(directory / COUPLING_LAYERS, n) if (directory / COUPLING_LAYERS).exists() else None
    edit_predictors = None
    if (directory / EDIT_PREDICTORS).exists():
        with np.load(directory / EDIT_PREDICTORS) as saved:
            edit_predictors = {name: saved[name] for name in saved.files}
        if edit_predictors.get("first_order", np.empty((0, 0))).shape[1:] != (n,):
            edit_predictors = None  # from another run
    return RunData(directory, pieces, pieces_meta, coupling, ripple, info, hidden, layers, edit_predictors)


def hop_relation(source: KnowledgePiece, piece: KnowledgePiece) -> str:
    """'hop1→hop2', 'hop1→question', ... inside a chain; 'other chain' across chains."""
    if source.chain_id != piece.chain_id:
        return "other chain"
    return f"{source.kind}→{piece.kind}"


def token_overlap(a: set[int], b: set[int]) -> float:
    """Jaccard overlap of two pieces' token sets (prompt and answer): the cheapest baseline predictor."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _as_float(values, n: int) -> np.ndarray:
    """EM flags / log-probs as floats; None (not measured) → NaN."""
    if values is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix, dtype=np.float64), where=norms > 0)


def usable_experiments(ripple: dict, n: int) -> tuple[list[dict], dict[str, int]]:
    """The edits that ran to the end, and the others counted by reason."""
    used, skipped = [], {}
    for experiment in ripple.get("experiments", []):
        status = experiment.get("status", "ok")
        scores = experiment.get("pieces") or {}
        if status != "ok":
            reason = f"status {status}"
        elif len(scores.get("logp_before") or []) != n or len(scores.get("logp_after") or []) != n:
            reason = "per-piece scores missing or of the wrong length"
        elif not 0 <= int(experiment.get("source_index", -1)) < n:
            reason = "source piece not among the pieces"
        else:
            used.append(experiment)
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return used, skipped


def known_pieces(ripple: dict, n: int) -> np.ndarray:
    """Per piece, did the model know it before editing: the ripple stage's `baseline.known` when present, else
    the teacher-forced exact match before the first edit; NaN when neither was measured."""
    known = (ripple.get("baseline") or {}).get("known")
    if known is not None and len(known) == n:
        return _as_float(known, n)
    experiments, _ = usable_experiments(ripple, n)
    return _as_float(experiments[0]["pieces"].get("tf_em_before"), n) if experiments else np.full(n, np.nan)


def build_pair_table(
    pieces: list[KnowledgePiece],
    coupling: np.ndarray,
    ripple: dict,
    hidden: np.ndarray | None = None,
    bos_ids: list[int] | tuple[int, ...] = (),
    layers: LayerCoupling | None = None,
    edit_predictors: dict | None = None,
) -> pd.DataFrame:
    """One row per (edit i, piece j ≠ i). Edits that did not finish are left out (`usable_experiments`).

    Besides GradSim and the ripple, every predictor of `predictors.PREDICTORS` that the inputs allow: from the
    per-layer inner products (`layers`) restricted to the edit layers, from `edit_predictors` (first-order
    ripple, new-target inner product, whitened key cosine), and the baselines that know nothing of the edit."""
    n = len(pieces)
    experiments, _ = usable_experiments(ripple, n)
    entity = shared_entity([p.subject for p in pieces], [p.answer for p in pieces])
    known = known_pieces(ripple, n)
    edit_layers = [int(layer) for layer in (ripple.get("hparams") or {}).get("layers") or []]
    per_layer = {}
    if layers is not None and edit_layers and set(edit_layers) <= set(layers.layers):
        inner = layer_inner(layers.inner, [layers.layers.index(layer) for layer in edit_layers])
        per_layer = {
            "gradsim_edit_layers": cosine_of_inner(inner),
            "inner_edit_layers": inner,
            "grad_norm": gradient_norms(inner),
        }
    edit_rows = {}
    if edit_predictors is not None:
        edit_rows = {int(e): k for k, e in enumerate(edit_predictors["edit_ids"])}
    bos = set(bos_ids)
    tokens = [(set(p.prompt_ids) | set(p.answer_ids)) - bos for p in pieces]
    unit_hidden = _unit_rows(np.asarray(hidden, dtype=np.float64)) if hidden is not None else None
    # A zero-gradient piece has a zero diagonal: its GradSim is undefined, not 0 (doc: outputs.md).
    has_gradient = np.diag(coupling) > 0
    frames = []
    for position, experiment in enumerate(experiments):
        i = int(experiment["source_index"])
        j = np.array([k for k in range(n) if k != i])
        scores = experiment["pieces"]
        before, after = _as_float(scores["logp_before"], n), _as_float(scores["logp_after"], n)
        delta = after - before
        edit_delta = delta[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = delta / edit_delta if edit_delta != 0 else np.full(n, np.nan)
        frame = {
            "edit_id": position if experiment.get("edit_id") is None else experiment["edit_id"],
            "source_index": i,
            "source_piece": pieces[i].id,
            "piece_index": j,
            "piece_id": [pieces[k].id for k in j],
            "gradsim": coupling[i, j],
            "gradsim_defined": has_gradient[i] & has_gradient[j],
            "logp_before": before[j],
            "logp_after": after[j],
            "delta_logp": delta[j],
            "abs_delta_logp": np.abs(delta[j]),
            "neg_delta_logp": -delta[j],
            "relative_delta_logp": relative[j],
            "edit_delta_logp": edit_delta,
            "edit_success": (experiment.get("efficacy") or {}).get("success"),
            "same_chain": [pieces[k].chain_id == pieces[i].chain_id for k in j],
            "hop_relation": [hop_relation(pieces[i], pieces[k]) for k in j],
            "source_kind": pieces[i].kind,
            "piece_kind": [pieces[k].kind for k in j],
            "token_overlap": [token_overlap(tokens[i], tokens[k]) for k in j],
            "hidden_cosine": unit_hidden[j] @ unit_hidden[i] if unit_hidden is not None else np.nan,
            "shared_entity": entity[i, j],
            "known": known[j],
            "neg_logp_before": -before[j],
        }
        frame["related"] = np.asarray(frame["same_chain"]) | entity[i, j]
        for name in ("gradsim_edit_layers", "inner_edit_layers"):
            frame[name] = per_layer[name][i, j] if per_layer else np.nan
        frame["grad_norm"] = per_layer["grad_norm"][j] if per_layer else np.nan
        row = edit_rows.get(int(experiment.get("edit_id", position)))
        for name in ("first_order", "new_target_inner", "whitened_cosine"):
            frame[name] = edit_predictors[name][row, j] if row is not None else np.nan
        for em in ("tf_em", "gen_em"):
            em_before = _as_float(scores.get(f"{em}_before"), n)
            em_after = _as_float(scores.get(f"{em}_after"), n)
            frame[f"{em}_before"], frame[f"{em}_after"] = em_before[j], em_after[j]
            changed = np.where(
                np.isnan(em_before[j]) | np.isnan(em_after[j]), np.nan, (em_before[j] != em_after[j]).astype(float)
            )
            frame[f"{em}_flip"] = changed
        frames.append(pd.DataFrame(frame))
    if not frames:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    table["abs_gradsim"] = table["gradsim"].abs()
    return table[PAIR_COLUMNS]


PAIR_COLUMNS = [
    "edit_id",
    "source_index",
    "source_piece",
    "piece_index",
    "piece_id",
    "source_kind",
    "piece_kind",
    "same_chain",
    "hop_relation",
    "gradsim",
    "abs_gradsim",
    "gradsim_defined",
    "logp_before",
    "logp_after",
    "delta_logp",
    "abs_delta_logp",
    "neg_delta_logp",
    "relative_delta_logp",
    "edit_delta_logp",
    "edit_success",
    "tf_em_before",
    "tf_em_after",
    "tf_em_flip",
    "gen_em_before",
    "gen_em_after",
    "gen_em_flip",
    "token_overlap",
    "hidden_cosine",
    "related",
    "shared_entity",
    "known",
    "neg_logp_before",
    "gradsim_edit_layers",
    "inner_edit_layers",
    "grad_norm",
    "first_order",
    "new_target_inner",
    "whitened_cosine",
]


def pair_table(run: RunData) -> pd.DataFrame:
    return build_pair_table(
        run.pieces, run.coupling, run.ripple, run.hidden, run.bos_ids, run.layers, run.edit_predictors
    )


def describe_run(run: RunData) -> dict:
    """Model, data and method of a run, as the report, the caveats and `compare` show them."""
    model = run.model
    counts = run.pieces_meta.get("counts") or {}
    source = run.pieces_meta.get("source") or {}
    method = run.coupling_info.get("method") or {}
    n = len(run.pieces)
    experiments, skipped = usable_experiments(run.ripple, n)
    successes = [(e.get("efficacy") or {}).get("success") for e in experiments]
    reported = [s for s in successes if s is not None]
    known_flags = known_pieces(run.ripple, n)
    known = float(np.nanmean(known_flags)) if np.isfinite(known_flags).any() else None
    layers = model.get("layers")
    return {
        "model_name": model.get("name") or run.directory.name,
        "family": model.get("family"),
        "parameters": model.get("parameters"),
        "num_layers": model.get("num_layers"),
        "layers": layers,
        "dtype": model.get("dtype"),
        "records": counts.get("records", source.get("records_read")),
        "pieces": n,
        "pieces_by_kind": counts.get("by_kind") or {},
        "skipped_by_reason": run.pieces_meta.get("skipped") or {},
        "source_kind": source.get("kind"),
        "source_path": source.get("path"),
        "gradsim_mode": method.get("mode"),
        "gradsim_method": method,
        "memit_hparams": run.ripple.get("hparams") or {},
        "covariance": run.ripple.get("covariance") or {},
        "deviations": run.ripple.get("deviations"),  # None: a ripple stage that did not record them
        "layer_choice": run.ripple.get("layer_choice"),  # --memit.layers traced: why these edit layers
        "edits_total": len(run.ripple.get("experiments", [])),
        "edits_skipped": skipped,
        "efficacy": {"ok": len(experiments), "success": sum(map(bool, reported)) if reported else None},
        "known_fraction": known,
        "editor": run.editor,
        "finetune": run.ripple.get("finetune"),
        "edit_layers": run.edit_layers,
        "seed": run.ripple.get("seed", run.pieces_meta.get("seed")),
    }
