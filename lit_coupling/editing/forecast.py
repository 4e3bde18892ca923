"""Forecast an edit's ripple before making it (#19): the first-order change of every stored fact's log P under
MEMIT's ΔW, and whether its greedy first answer token flips.

Notation (as `lit_coupling.analysis.predictors`): for one edit layer with weight W (out, in), fact j's gradient of
log P(a_j | q_j) is G_j = D_jᵀ X_j — X_j (T_j, d_in) the layer's inputs at the fact's tokens, D_j (T_j, d_out) the
gradients of log P at the layer's outputs. MEMIT's update of the layer is low rank, ΔW = U Vᵀ (U (d_out, r): the
spread residuals, V (d_in, r): the adjusted keys; `EditResult.updates`), r = the number of requests.

- **exact** first order: Δlog P_j ≈ Σ_l ⟨G_j,l, ΔW_l⟩ = Σ_l Σ_t (d_tᵀ U_l)(x_tᵀ V_l) — the ghost trick: one batched
  forward/backward over the store, no per-fact gradient and no dense ΔW ever built (`ForecastPass`). The per-token
  terms say which prompt tokens carry the predicted change; the per-layer sums which layers.
- **projected**: the GradSim stage's Kronecker projection g̃_j = P_outᵀ G_j P_in (k_out × k_in per layer), cached once
  per (model, store, layers, k, seed) (`ProjectedCache`); the edit is projected the same way, P_outᵀ ΔW P_in =
  (P_outᵀU)(P_inᵀV)ᵀ, and the forecast is one matrix product, ⟨g̃_j, P_outᵀ ΔW P_in⟩. With P entries N(0, 1/k) it is an
  unbiased estimate of the exact first order: E[P Pᵀ] = I.
- **greedy flip**: at the position predicting the answer's first token a, the margin m_j = z_a − z_c between the
  answer's logit and its top competitor's c (the highest-logit other token before the edit, held fixed). The first
  order of its change is ⟨∇_W m_j, ΔW⟩, the same ghost sum with the margin's output gradients. The predicted margin
  after the edit is m_j + Δm_j; a flip is predicted when its sign differs from m_j's (the answer's first token
  stops, or starts, being the top choice — exactly when `PieceScores.rank` moves between 0 and not 0). The flip
  score `flip_score` = −sign(m_j)·(m_j + Δm_j) grows with the predicted risk (> 0: a flip is predicted).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from lit_coupling.analysis.predictors import low_rank_change
from lit_coupling.gradients.inner import accumulation_dtype, segment_sum
from lit_coupling.gradients.projection import kronecker_projection, project_gradients
from lit_coupling.models.hooks import Hooks
from lit_coupling.progress import Progress
from lit_coupling.scoring import answer_logprobs, answer_window, collate_clozes, takes_logits_to_keep

Update = dict[int, tuple[Tensor, Tensor]]  # layer → (U (d_out, r), V (d_in, r)), ΔW = U Vᵀ in (out, in)
Cloze = tuple[Sequence[int], Sequence[int]]  # (prompt ids, answer ids)


# --- pure maths on captured tensors -------------------------------------------------------------------------------


def token_terms(x: Tensor, d: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Per-token first-order terms d_tᵀ U Vᵀ x_t: (ΣT,) for packed x (ΣT, d_in), d (ΣT, d_out)."""
    return ((d @ u.to(d)) * (x @ v.to(x))).sum(1)


def first_order(x: dict[int, Tensor], d: dict[int, Tensor], tokens: Tensor, update: Update) -> Tensor:
    """(L, n): ⟨G_j,l, ΔW_l⟩ per edit layer l (in the order of `update`) and packed fact j; sum over l for Δlog P_j."""
    return torch.stack([low_rank_change(x[layer], d[layer], tokens, u, v) for layer, (u, v) in update.items()])


def project_update(u: Tensor, v: Tensor, p_in: Tensor, p_out: Tensor) -> Tensor:
    """P_outᵀ (U Vᵀ) P_in flattened as `project_gradients` lays out a projected gradient: (k_out·k_in,)."""
    return ((p_out.T @ u.to(p_out)) @ (p_in.T @ v.to(p_in)).T).flatten()


def projected_change(cached: Tensor, projected_update: Tensor) -> Tensor:
    """⟨g̃_j, P_outᵀ ΔW P_in⟩ for every cached fact: cached (n, k_out·k_in) → (n,). One matrix-vector product."""
    return cached @ projected_update.to(cached)


def flip_score(margin: Tensor, margin_change: Tensor) -> Tensor:
    """−sign(m)·(m + Δm): > 0 where the first-order margin changes sign (a predicted greedy flip); larger = riskier."""
    sign = torch.where(margin >= 0, 1.0, -1.0).to(margin)
    return -sign * (margin + margin_change)


def predicted_flip(margin: Tensor, margin_change: Tensor) -> Tensor:
    return flip_score(margin, margin_change) > 0


# --- one batched forward/backward over the store --------------------------------------------------------------------


@dataclass
class Batch:
    """What one batch of facts gives at the edit layers: padded x (B, T, d_in), output gradients of log P (d) and of
    the first-token margin (dm) (B, T, d_out), the mask of the tokens that carry a gradient, log P, the margin and
    the competitor token."""

    rows: list[int]
    mask: Tensor
    x: dict[int, Tensor]
    d: dict[int, Tensor]
    dm: dict[int, Tensor]
    logp: Tensor
    margin: Tensor
    competitor: Tensor


class _Capture:
    """Forward hooks on the target modules: each input X and output (made a leaf where nothing before it needs a
    gradient, so the backward stops at the first edit layer and no weight gradient is formed)."""

    def __init__(self, targets):
        self.targets, self.x, self.out = targets, {}, {}
        self.hooks = Hooks(forward=[(t.module, partial(self._hook, t.layer)) for t in targets])

    def _hook(self, layer, _module, args, output):
        self.x[layer] = args[0].detach()
        if not output.requires_grad:
            output = output.detach().requires_grad_()
        self.out[layer] = output
        return output

    def __enter__(self):
        self.hooks.attach()
        return self

    def __exit__(self, *exc):
        self.hooks.remove()


def fact_batches(
    model,
    adapter,
    layers: Sequence[int],
    clozes: Sequence[Cloze],
    pad_id: int,
    batch_size: int = 32,
    margin: bool = True,
    sort: bool = True,
) -> Iterator[Batch]:
    """One forward and one or two backwards per batch of facts (log P, and the first-token margin).

    The weights are not touched and get no gradient. With `sort`, batches are drawn shortest fact first (less
    padding); `Batch.rows` says which facts a batch holds."""
    device = next(model.parameters()).device
    targets = [adapter.target(layer) for layer in layers]
    order = list(range(len(clozes)))
    if sort:
        order.sort(key=lambda i: (len(clozes[i][0]) + len(clozes[i][1]), len(clozes[i][1])))
    for start in range(0, len(clozes), batch_size):
        rows = order[start : start + batch_size]
        batch = collate_clozes([clozes[i] for i in rows], pad_id)
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        positions = answer_window(batch).to(device)
        extra = {"logits_to_keep": positions} if takes_logits_to_keep(type(model)) else {}
        with _Capture(targets) as cap, torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False, **extra).logits
            if not extra:
                logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
            w_ids, w_answer = ids.gather(1, positions), batch["answer_mask"].to(device).gather(1, positions)
            logp = answer_logprobs(logits, w_ids, w_answer)
            outs = [cap.out[layer] for layer in layers]
            grads = torch.autograd.grad(logp.sum(), outs, retain_graph=margin)
            n = len(rows)
            first = (batch["prompt_lengths"].to(device) - 1) - positions[:, 0]  # window index predicting a_1
            at = logits[torch.arange(n, device=device), first]  # (B, V)
            at = at.to(torch.promote_types(at.dtype, torch.float32))
            answer = ids[torch.arange(n, device=device), batch["prompt_lengths"].to(device)]
            others = at.scatter(1, answer[:, None], float("-inf"))
            competitor = others.argmax(1)
            m = at.gather(1, answer[:, None])[:, 0] - at.gather(1, competitor[:, None])[:, 0]
            dms = torch.autograd.grad(m.sum(), outs) if margin else [torch.zeros_like(g) for g in grads]
        lengths = batch["lengths"].to(device)
        mask = torch.arange(ids.shape[1], device=device)[None, :] < (lengths - 1)[:, None]
        yield Batch(
            rows,
            mask,
            {layer: cap.x[layer] for layer in layers},
            {layer: g.detach() for layer, g in zip(layers, grads)},
            {layer: g.detach() for layer, g in zip(layers, dms)},
            logp.detach().double().cpu(),
            m.detach().double().cpu(),
            competitor.cpu(),
        )


def packed_gradient_factors(
    model, adapter, layers: Sequence[int], clozes: Sequence[Cloze], pad_id: int, progress: Progress | None = None
) -> list[Update]:
    """Each cloze's own gradient of log P at the edit layers as update factors (Dᵀ, Xᵀ) (rank = its tokens), so
    ⟨g_i, g_j⟩ (GradSim's inner product on the edit layers) is the same ghost sum as a forecast. `progress` advances
    by the clozes of each batch."""
    out: list[Update] = [{} for _ in clozes]
    for b in fact_batches(model, adapter, layers, clozes, pad_id, batch_size=8, margin=False, sort=False):
        if progress is not None:
            progress.update(len(b.rows))
        for k, row in enumerate(b.rows):
            keep = b.mask[k]
            out[row] = {
                layer: (b.d[layer][k][keep].T.double().cpu(), b.x[layer][k][keep].T.double().cpu()) for layer in layers
            }
    return out


def gradient_norms_sq(b: Batch, layer: int) -> Tensor:
    """‖G_j‖²_F = Σ_ts (x_t·x_s)(d_t·d_s) per fact of a batch (the ghost self inner product): (B,) float64."""
    mask = b.mask.to(b.x[layer].dtype)
    x, d = b.x[layer] * mask[..., None], b.d[layer] * mask[..., None]
    return ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2)).double().cpu()


# --- the exact forecast: a streaming ghost sum for any number of edits ---------------------------------------------


@dataclass
class ExactForecast:
    """Per edit e, layer l and fact j: the first-order Δlog P (delta[e, l, j]) and Δmargin (margin_change[e, l, j]);
    the facts' log P, margin, top competitor and squared gradient norm per layer before the edit; and per edit the
    per-token terms of each fact's Δlog P (token_terms[e][j]: (T_j, L), prompt tokens first, the last answer token
    dropped: it carries no gradient)."""

    layers: list[int]
    delta: Tensor  # (E, L, n) float64
    margin_change: Tensor  # (E, L, n)
    logp: Tensor  # (n,)
    margin: Tensor  # (n,)
    competitor: Tensor  # (n,) token ids
    norm_sq: Tensor  # (L, n) ‖G_j,l‖²
    token_terms: list[list[Tensor]] = field(default_factory=list)

    def total(self) -> Tensor:
        """(E, n) Σ over layers: the predicted Δlog P."""
        return self.delta.sum(1)

    def margin_total(self) -> Tensor:
        return self.margin_change.sum(1)

    def terms_of(self, edit: int, fact: int) -> Tensor:
        """(T_j, L) per-token, per-layer terms of one fact's predicted Δlog P."""
        return self.token_terms[edit][fact]


def exact_forecast(
    model,
    adapter,
    updates: Sequence[Update],
    clozes: Sequence[Cloze],
    pad_id: int,
    batch_size: int = 32,
    keep_tokens: bool = True,
    progress: Progress | None = None,
) -> ExactForecast:
    """The exact first-order forecast of every update in `updates` (each {layer: (U, V)}, the same layers) over
    every fact, in one pass over the store: per batch and layer, one product D·[U_1 … U_E] and one X·[V_1 … V_E]
    whatever the number of edits. `progress` advances by the facts of each batch (the pass is minutes on a real
    model's store)."""
    layers = list(updates[0])
    n, n_edits = len(clozes), len(updates)
    delta = torch.zeros(n_edits, len(layers), n, dtype=torch.float64)
    margin_change = torch.zeros_like(delta)
    logp, margin = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    competitor = torch.zeros(n, dtype=torch.long)
    norm_sq = torch.zeros(len(layers), n, dtype=torch.float64)
    terms: list[list[Tensor | None]] = [[None] * n for _ in updates] if keep_tokens else []
    ranks = [updates[e][layers[0]][0].shape[1] for e in range(n_edits)]
    stacked = {
        layer: (torch.cat([u[layer][0] for u in updates], 1), torch.cat([u[layer][1] for u in updates], 1))
        for layer in layers
    }
    for b in fact_batches(model, adapter, layers, clozes, pad_id, batch_size):
        rows = torch.tensor(b.rows)
        count = b.mask.sum(1).cpu()
        logp[rows], margin[rows], competitor[rows] = b.logp, b.margin, b.competitor
        per_layer = []
        for li, layer in enumerate(layers):
            u, v = stacked[layer]
            x, d, dm = b.x[layer][b.mask], b.d[layer][b.mask], b.dm[layer][b.mask]
            xv = x @ v.to(x)  # (ΣT, Σr)
            # per edit: the sum over its rank columns, (ΣT, Σr) → (ΣT, E)
            t_logp = segment_sum(((d @ u.to(d)) * xv).T.double().cpu(), torch.tensor(ranks)).T
            t_margin = segment_sum(((dm @ u.to(dm)) * xv).T.double().cpu(), torch.tensor(ranks)).T
            delta[:, li, rows] = segment_sum(t_logp, count).T
            margin_change[:, li, rows] = segment_sum(t_margin, count).T
            norm_sq[li, rows] = gradient_norms_sq(b, layer)
            per_layer.append(t_logp)
        if keep_tokens:
            both = torch.stack(per_layer, 2)  # (ΣT, E, L)
            for e in range(n_edits):
                for row, part in zip(b.rows, torch.split(both[:, e], count.tolist())):
                    terms[e][row] = part
        if progress is not None:
            progress.update(len(b.rows))
    return ExactForecast(layers, delta, margin_change, logp, margin, competitor, norm_sq, terms)


# --- the projected forecast: a cache of projected gradients ---------------------------------------------------------


def cache_key(
    model_fingerprint: str, clozes: Sequence[Cloze], layers: Sequence[int], k_in: int, k_out: int, seed: int
) -> str:
    """What a cache of projected gradients depends on: the model's weights, the facts' tokens, layers, k, seed."""
    digest = hashlib.sha256(
        json.dumps(
            [model_fingerprint, [[list(p), list(a)] for p, a in clozes], list(layers), k_in, k_out, seed]
        ).encode()
    )
    return digest.hexdigest()[:16]


@dataclass
class ProjectedCache:
    """Projected per-fact gradients of log P and of the first-token margin at the edit layers, and what the
    forecast needs besides (log P and margin before). g[layer]: (n, k_out'·k_in'), float32 (float64 models: float64)."""

    layers: list[int]
    k_in: int
    k_out: int
    seed: int
    g: dict[int, Tensor]
    gm: dict[int, Tensor]
    logp: Tensor
    margin: Tensor
    dims: dict[int, tuple[int, int]] = field(default_factory=dict)  # (k_out', k_in') per layer

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "layers": self.layers,
                "k_in": self.k_in,
                "k_out": self.k_out,
                "seed": self.seed,
                "g": self.g,
                "gm": self.gm,
                "logp": self.logp,
                "margin": self.margin,
                "dims": self.dims,
            },
            tmp,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ProjectedCache:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**data)

    def bytes_per_fact(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.g.values(), *self.gm.values()))

    def projections(self, shapes: dict[int, tuple[int, int]]) -> dict[int, tuple[Tensor, Tensor]]:
        """(P_in, P_out) per layer, float64, from layer shapes (d_out, d_in): the GradSim stage's draw (or, for a
        `restricted` cache, its parent's draw cut and rescaled the same way)."""
        parent = getattr(self, "_parent", None)
        if parent is not None:
            base, k_in, k_out = parent
            out = {}
            for layer, (p_in, p_out) in base.projections(shapes).items():
                ki, ko = min(k_in, p_in.shape[1]), min(k_out, p_out.shape[1])
                out[layer] = (p_in[:, :ki] * (p_in.shape[1] / ki) ** 0.5, p_out[:, :ko] * (p_out.shape[1] / ko) ** 0.5)
            return out
        return {
            layer: kronecker_projection(
                shapes[layer][1], shapes[layer][0], self.k_in, self.k_out, self.seed, layer, dtype=torch.float64
            )
            for layer in self.layers
        }

    @property
    def _dims(self) -> dict[int, tuple[int, int]]:
        """(k_out', k_in') per layer as stored (k' = min(k, the layer's dimension))."""
        return self.dims

    def restricted(self, k_in: int, k_out: int) -> ProjectedCache:
        """The cache under the leading k_out × k_in block of the projection, rescaled (√(K/k) per factor) so its
        entries are again N(0, 1/k): a projection of the smaller k drawn from the same numbers (not the one a
        fresh draw with that k gives, which has other numbers), for measuring the forecast against k from one pass
        over the store. `projections` of the result must be restricted alike (`restrict_projections`)."""
        out = {}
        for name in ("g", "gm"):
            per = {}
            for layer, t in getattr(self, name).items():
                ko, ki = self._dims[layer]
                block = t.view(-1, ko, ki)[:, : min(k_out, ko), : min(k_in, ki)]
                scale = ((ko / min(k_out, ko)) * (ki / min(k_in, ki))) ** 0.5
                per[layer] = (block * scale).reshape(len(t), -1).contiguous()
            out[name] = per
        dims = {layer: (min(k_out, ko), min(k_in, ki)) for layer, (ko, ki) in self._dims.items()}
        cache = ProjectedCache(self.layers, k_in, k_out, self.seed, out["g"], out["gm"], self.logp, self.margin, dims)
        cache._parent = (self, k_in, k_out)
        return cache

    def forecast(self, update: Update, projections: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(L, n) projected Δlog P and (L, n) projected Δmargin of one update."""
        delta, margin = [], []
        for layer in self.layers:
            p_in, p_out = projections[layer]
            pu = project_update(*update[layer], p_in, p_out)
            delta.append(projected_change(self.g[layer], pu))
            margin.append(projected_change(self.gm[layer], pu))
        return torch.stack(delta).double(), torch.stack(margin).double()


def build_projected_cache(
    model,
    adapter,
    layers: Sequence[int],
    clozes: Sequence[Cloze],
    pad_id: int,
    k_in: int,
    k_out: int,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> ProjectedCache:
    """Projected gradients of every fact, one pass over the store (the GradSim stage's `project_gradients`);
    `progress` advances by the facts of each batch."""
    shapes = {layer: adapter.target(layer).shape for layer in layers}
    device = next(model.parameters()).device
    acc = accumulation_dtype(adapter.target(layers[0]).module.weight.dtype)  # float32, float64 for a float64 model
    proj = {
        layer: kronecker_projection(
            shapes[layer][1], shapes[layer][0], k_in, k_out, seed, layer, dtype=acc, device=device
        )
        for layer in layers
    }
    g, gm, logp, margin, rows = {layer: [] for layer in layers}, {layer: [] for layer in layers}, [], [], []
    for b in fact_batches(model, adapter, layers, clozes, pad_id, batch_size):
        for layer in layers:
            g[layer].append(project_gradients(b.x[layer], b.d[layer], b.mask, *proj[layer]).cpu())
            gm[layer].append(project_gradients(b.x[layer], b.dm[layer], b.mask, *proj[layer]).cpu())
        logp.append(b.logp)
        margin.append(b.margin)
        rows += b.rows
        if progress is not None:
            progress.update(len(b.rows))
    back = torch.argsort(torch.tensor(rows))  # batches ran shortest first: back to store order
    dims = {layer: (proj[layer][1].shape[1], proj[layer][0].shape[1]) for layer in layers}
    return ProjectedCache(
        list(layers),
        k_in,
        k_out,
        seed,
        {k: torch.cat(v)[back] for k, v in g.items()},
        {k: torch.cat(v)[back] for k, v in gm.items()},
        torch.cat(logp)[back],
        torch.cat(margin)[back],
        dims,
    )


def load_or_build_cache(
    directory: Path,
    model_fingerprint: str,
    model,
    adapter,
    layers,
    clozes,
    pad_id,
    k_in,
    k_out,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[ProjectedCache, Path, bool]:
    """The cache for (model, store, layers, k, seed) from `directory`, or built and saved there: (cache, path,
    found). `progress` advances while it is built (a found cache is only read)."""
    path = Path(directory) / f"forecast-{cache_key(model_fingerprint, clozes, layers, k_in, k_out, seed)}.pt"
    if path.exists():
        return ProjectedCache.load(path), path, True
    cache = build_projected_cache(model, adapter, layers, clozes, pad_id, k_in, k_out, seed, batch_size, progress)
    cache.save(path)
    return cache, path, False
