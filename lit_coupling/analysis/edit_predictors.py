"""The predictors that need the model: per (edit, piece), from the pre-edit model and each edit's saved ΔW.

For every piece j, one forward/backward of log P(a_j | q_j) captures X_j and D_j at the edit layers (the GradSim
hooks); for every edit i, one forward/backward of log P(new_i | q_i) gives the new-target gradient. Then
(`lit_coupling.analysis.predictors`):

- first_order[i, j] = Σ_l ⟨G_j,l, ΔW_i,l⟩ — the first-order change of log P_j the edit should cause (an oracle: it
  sees the edit's actual ΔW, read from edit_updates.pt);
- new_target_inner[i, j] = Σ_l ⟨G_new,i,l, G_j,l⟩;
- whitened_cosine[i, j] = mean over edit layers of the key cosine in the metric of the edit's key covariance
  (MEMIT runs only), keys read at the fact token the edit used.

Written to `edit_predictors.npz` by the analysis stage; `pairs.build_pair_table` turns them into columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lit_coupling import outputs
from lit_coupling.analysis.predictors import cosine_to, low_rank_change, whiten
from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.requests import subject_span, tokenize_with_subject

EDIT_PREDICTOR_NAMES = ("first_order", "new_target_inner", "whitened_cosine")


def load_updates(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def fact_index(tokenizer, prompt: str, subject: str, answer: str, bos_ids, fact_token: str) -> int | None:
    """Where MEMIT reads the key of this cloze; None when the subject is not in the prompt."""
    span = subject_span(prompt, subject)
    if span is None:
        return None
    try:
        return tokenize_with_subject(tokenizer, prompt, span[1], answer, bos_ids, span[0], fact_token).fact_index
    except Exception:  # a subject that ends inside the answer: no key for this cloze
        return None


class GradientCapture:
    """X and D at the edit layers for a list of clozes, packed (padding and each cloze's last token dropped), and
    the MLP input at one position per cloze (its key)."""

    def __init__(self, model, adapter, layers: list[int], pad_id: int, device):
        self.model, self.adapter, self.layers, self.pad_id, self.device = model, adapter, layers, pad_id, device

    def __call__(
        self,
        clozes: list[tuple[list[int], list[int]]],
        key_positions: list[int | None],
        batch_size: int = 64,
        desc: str = "gradients at the edit layers",
    ) -> tuple[dict, dict, torch.Tensor, dict]:
        from lit_coupling.gradients.module import TargetHooks, backward_log_prob, gradient_mask
        from lit_coupling.progress import Progress
        from lit_coupling.scoring import collate_clozes, padded_batches

        targets = [self.adapter.target(layer) for layer in self.layers]
        n = len(clozes)
        # per cloze: its packed X and D rows and its key, per layer; put back in the clozes' order at the end
        xs: dict[int, list] = {layer: [None] * n for layer in self.layers}
        ds: dict[int, list] = {layer: [None] * n for layer in self.layers}
        keys: dict[int, list] = {layer: [None] * n for layer in self.layers}
        tokens = torch.zeros(n, dtype=torch.long)
        # One forward/backward per batch: minutes for thousands of pieces on a real model. Batches cut by length
        # (real pieces run from 5 to 45 tokens: in their own order they pad ~2x).
        with TargetHooks(targets) as hooks, Progress(n, desc, unit="cloze") as progress:
            for rows in padded_batches([len(p) + len(a) for p, a in clozes], batch_size):
                batch = collate_clozes([clozes[i] for i in rows], self.pad_id)
                hooks.clear()
                backward_log_prob(self.model, batch, self.device)
                lengths = batch["lengths"].to(self.device)
                mask = gradient_mask(lengths, batch["input_ids"].shape[1])
                tokens[rows] = mask.sum(1).cpu()
                for layer in self.layers:
                    x, d = hooks.x[layer], hooks.d[layer]
                    for k, i in enumerate(rows):
                        xs[layer][i] = x[k][mask[k]].float().cpu()
                        ds[layer][i] = d[k][mask[k]].float().cpu()
                        pos = key_positions[i]
                        keys[layer][i] = (
                            x[k, pos].double().cpu()
                            if pos is not None
                            else torch.full((x.shape[-1],), float("nan"), dtype=torch.float64)
                        )
                hooks.clear()
                progress.update(len(rows))
        return (
            {layer: torch.cat(v) for layer, v in xs.items()},
            {layer: torch.cat(v) for layer, v in ds.items()},
            tokens,
            {layer: torch.stack(v) for layer, v in keys.items()},
        )


def _covariances(ripple: dict, layers: list[int]) -> dict[int, torch.Tensor] | None:
    """The shrunk key covariance each MEMIT edit used, from the cache the ripple stage recorded; None if gone."""
    from lit_coupling.editing.covariance import load_cached, shrink

    info = (ripple.get("covariance") or {}).get("layers") or {}
    found = {}
    for layer in layers:
        entry = info.get(str(layer))
        cached = load_cached(Path(entry["cache"])) if entry and entry.get("cache") else None
        if cached is None:
            return None
        found[layer] = shrink(cached[0], 0.0, 1, float(entry.get("shrinkage") or 0.0))[0]
    return found


def compute_edit_predictors(
    directory: Path,
    pieces: list[KnowledgePiece],
    ripple: dict,
    model_path: str,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """The arrays of edit_predictors.npz: edit_ids (E,), source_index (E,), and (E, N) per predictor."""
    from lit_coupling.analysis.pairs import usable_experiments
    from lit_coupling.models.adapters import ModelAdapter, ensure_padding
    from lit_coupling.models.loading import load_model, resolve_device

    updates = load_updates(directory / outputs.EDIT_UPDATES)
    layers = [int(layer) for layer in updates["layers"]]
    n = len(pieces)
    experiments, _ = usable_experiments(ripple, n)
    experiments = [e for e in experiments if int(e["edit_id"]) in updates["edits"]]
    if not experiments:  # no edit finished (or none was planned): empty matrices, nothing to load
        empty = np.zeros((0, n))
        return {
            "edit_ids": np.zeros(0, dtype=int),
            "source_index": np.zeros(0, dtype=int),
            "layers": np.array(layers),
            "editor": np.array(updates.get("editor", "memit")),
            "first_order": empty,
            "new_target_inner": empty,
            "whitened_cosine": empty,
        }
    device = resolve_device(device)
    loaded = load_model(model_path, dtype="float32", device=str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    pad_id = ensure_padding(tokenizer)
    adapter = ModelAdapter(model, layers=layers)
    bos = list(adapter.bos_ids(tokenizer))
    fact_token = (ripple.get("hparams") or {}).get("fact_token", "subject_last")
    capture = GradientCapture(model, adapter, layers, pad_id, device)

    piece_keys_at = [fact_index(tokenizer, p.prompt, p.subject, p.answer, bos, fact_token) for p in pieces]
    x, d, tokens, keys = capture(
        [(p.prompt_ids, p.answer_ids) for p in pieces],
        piece_keys_at,
        batch_size,
        "gradients of the pieces at the edit layers",
    )

    requests = [e["request"] for e in experiments]
    new_clozes, new_keys_at = [], []
    for r in requests:
        span = subject_span(r["prompt"], r["subject"])
        tokenized = (
            tokenize_with_subject(tokenizer, r["prompt"], span[1], r["target_new"], bos, span[0], fact_token)
            if span
            else None
        )
        if tokenized is None:
            from lit_coupling.scoring import encode_cloze

            new_clozes.append(encode_cloze(tokenizer, r["prompt"], r["target_new"], bos))
            new_keys_at.append(None)
        else:
            new_clozes.append((tokenized.prompt_ids, tokenized.answer_ids))
            new_keys_at.append(tokenized.fact_index)
    x_new, d_new, tokens_new, keys_new = capture(
        new_clozes, new_keys_at, batch_size, "gradients of the edits' new targets"
    )
    covariances = _covariances(ripple, layers) if updates.get("editor", "memit") == "memit" else None
    # Every key whitened once per layer (one Cholesky), not once per edit.
    white_keys = {layer: whiten(keys[layer], covariances[layer]) for layer in layers} if covariances else None
    white_new = {layer: whiten(keys_new[layer], covariances[layer]) for layer in layers} if covariances else None

    first_order = np.zeros((len(experiments), n))
    new_inner = np.zeros((len(experiments), n))
    whitened = np.full((len(experiments), n), np.nan)
    offsets = np.r_[0, np.cumsum(tokens_new.numpy())]
    # X and D stay float32 (their ranking is what matters; float64 would double the memory, which for a large
    # model and many pieces is that of GradSim's exact mode)
    for e, experiment in enumerate(experiments):
        per_layer = updates["edits"][int(experiment["edit_id"])]
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        white = []
        for layer in layers:
            xl, dl = x[layer], d[layer]
            factors = per_layer[layer]
            first_order[e] += low_rank_change(xl, dl, tokens, factors["u"], factors["v"]).double().numpy()
            new_inner[e] += low_rank_change(xl, dl, tokens, d_new[layer][rows].T, x_new[layer][rows].T).double().numpy()
            if covariances is not None and new_keys_at[e] is not None:
                white.append(cosine_to(white_keys[layer], white_new[layer][e]).numpy())
        if white:
            whitened[e] = np.mean(white, axis=0)
    return {
        "edit_ids": np.array([int(e["edit_id"]) for e in experiments]),
        "source_index": np.array([int(e["source_index"]) for e in experiments]),
        "layers": np.array(layers),
        "editor": np.array(updates.get("editor", "memit")),
        "first_order": first_order,
        "new_target_inner": new_inner,
        "whitened_cosine": whitened,
    }
