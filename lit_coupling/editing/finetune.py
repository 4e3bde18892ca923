"""FT-L style fine-tuning editor: the positive control beside MEMIT.

A few gradient-ascent steps on log P(new answer | edit prompt), on the MLP output projections of the edit layers
only, with the whole update kept inside a Frobenius ball around the original weights (Zhu et al. 2020's
constrained fine-tuning, as ROME's FT-L baseline uses it; a Frobenius ball instead of their L∞ box, because
scaling keeps the update a sum of gradients: low rank and first-order analysable).

Why a control: after one small step ΔW = η·∇_W log P(new | q_i), first-order theory says every piece moves by
ΔlogP_j ≈ η·⟨∇_W log P_j, ∇_W log P(new | q_i)⟩. If the analysis does not find that, something upstream
(gradients, scoring, pairing) is wrong.

The update is returned as per-layer factors (U, V), ΔW = U Vᵀ in (out, in) orientation: each step's gradient is
Dᵀ X for the step's output gradients D and inputs X, so the factors are the steps' D and X side by side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from lit_coupling.editing.requests import EditRequest
from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.scoring import answer_logprobs, collate_clozes, encode_cloze


@dataclass
class FinetuneHparams:
    steps: int = 1
    """Gradient steps (1: the first-order control; FT-L uses a few)."""
    lr: float = 1.0
    """Step size η of plain gradient ascent on Σ_answer-tokens log P(new | prompt)."""
    max_norm: float = 0.05
    """Radius of the constraint: ‖ΔW‖_F over all edit layers ≤ max_norm · ‖W‖_F (the whole update is scaled
    back onto the ball when a step leaves it; scaling keeps its direction)."""

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.max_norm <= 0:
            raise UserError(
                f"fine-tuning editor: steps ≥ 1, lr > 0 and max_norm > 0 needed, got steps="
                f"{self.steps}, lr={self.lr}, max_norm={self.max_norm}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneResult:
    updates: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → (U (d_out, r), V (d_in, r)), float32, CPU
    delta_norms: dict[int, float]  # ‖ΔW_l‖_F
    logp_new: list[float]  # log P(new | prompt) before each step and after the last
    scaled: bool  # whether the norm constraint bound
    time_s: float


def _factors_norm2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((u.T @ u) * (v.T @ v)).sum()


@torch.no_grad()
def score_one(model, batch: dict, device) -> float:
    """log P(answer | prompt) of the first row of a cloze batch."""
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    )
    return float(answer_logprobs(out.logits, batch["input_ids"].to(device), batch["answer_mask"].to(device))[0])


def apply_finetune(
    adapter: ModelAdapter,
    tokenizer,
    request: EditRequest,
    layers: Sequence[int],
    hp: FinetuneHparams,
    bos_ids: Sequence[int],
    pad_id: int,
) -> FinetuneResult:
    """Edit the weights of `layers` in place (the caller snapshots and restores them)."""
    from lit_coupling.gradients.module import TargetHooks, backward_log_prob, gradient_mask

    start = time.perf_counter()
    model = adapter.model
    device = next(model.parameters()).device
    targets = [adapter.target(layer) for layer in layers]
    prompt_ids, answer_ids = encode_cloze(tokenizer, request.prompt, request.target_new, bos_ids)
    batch = collate_clozes([(prompt_ids, answer_ids)], pad_id)
    mask = gradient_mask(batch["lengths"].to(device), batch["input_ids"].shape[1])
    radius = hp.max_norm * sum(float(t.weight().double().pow(2).sum()) for t in targets) ** 0.5
    u = {t.layer: torch.zeros(t.shape[0], 0, dtype=torch.float64, device=device) for t in targets}
    v = {t.layer: torch.zeros(t.shape[1], 0, dtype=torch.float64, device=device) for t in targets}
    written = {t.layer: torch.zeros(t.shape, dtype=torch.float64, device=device) for t in targets}
    logps, scaled = [], False
    with TargetHooks(targets) as hooks:
        for _ in range(hp.steps):
            hooks.clear()
            logp, _ = backward_log_prob(model, batch, device, window=False)
            logps.append(float(logp[0]))
            for t in targets:  # ascent on log P(new): ΔW += η Dᵀ X
                u[t.layer] = torch.cat([u[t.layer], hp.lr * hooks.d[t.layer][mask].double().T], dim=1)
                v[t.layer] = torch.cat([v[t.layer], hooks.x[t.layer][mask].double().T], dim=1)
            norm = sum(float(_factors_norm2(u[t.layer], v[t.layer])) for t in targets) ** 0.5
            if norm > radius:  # back onto the ball: one scale for every layer keeps the direction
                scaled = True
                for t in targets:
                    u[t.layer] = u[t.layer] * (radius / norm)
            for t in targets:  # the weights become W0 + U Vᵀ
                dense = u[t.layer] @ v[t.layer].T
                t.add_(dense - written[t.layer])
                written[t.layer] = dense
        hooks.clear()
    logps.append(float(score_one(model, batch, device)))
    if not all(torch.isfinite(u[t.layer]).all() and torch.isfinite(v[t.layer]).all() for t in targets):
        raise UserError(f"edit {request.edit_id}: the fine-tuning update is not finite")
    updates = {t.layer: (u[t.layer].float().cpu(), v[t.layer].float().cpu()) for t in targets}
    norms = {t.layer: float(_factors_norm2(u[t.layer], v[t.layer])) ** 0.5 for t in targets}
    return FinetuneResult(updates, norms, logps, scaled, time.perf_counter() - start)
