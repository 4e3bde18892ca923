"""MEMIT (Meng et al., ICLR 2023) as published: target vectors, keys, residual spread, the least-squares update.

Functions of a model, its adapter and tensors; nothing here knows about Lightning. `apply_memit` edits the weights in
place — the caller snapshots and restores them (`lit_coupling.editing.snapshot`).

Keys are read and the target vector written at the *fact token* (`MemitHparams.fact_token`): the subject's last
token as published, or another position relative to the subject as the public implementation allows.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.requests import EditRequest, TokenizedPrompt, kl_prompt, request_prompts
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.hooks import Hooks
from lit_coupling.progress import Progress
from lit_coupling.scoring import collate_clozes, padded_batches

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")  # the public implementation's prefix openings


class EditError(RuntimeError):
    """An edit could not be computed (a non-finite target vector or update)."""


# --- the closed-form update -------------------------------------------------------------------------------------------


class CovarianceSolver:
    """Solves (λC + K Kᵀ)⁻¹ K for one layer's key covariance C, in float64.

    C's Cholesky factor is computed once and reused by every edit: with Woodbury, (λC + KKᵀ)⁻¹K =
    (λC)⁻¹K (I + Kᵀ(λC)⁻¹K)⁻¹, which costs O(d²n) per edit instead of a fresh O(d³) solve. A C that is not positive
    definite (fewer corpus tokens than key dimensions) falls back to the direct solve.
    """

    def __init__(self, cov: torch.Tensor):
        self.cov = cov.to(torch.float64)
        self._chol: torch.Tensor | None = None
        self._factored = False

    def _cholesky(self) -> torch.Tensor | None:
        if not self._factored:
            chol, info = torch.linalg.cholesky_ex(self.cov)
            self._chol = chol if int(info) == 0 else None
            self._factored = True
        return self._chol

    def adjusted_keys(self, keys: torch.Tensor, lam: float) -> torch.Tensor:
        """(λC + KKᵀ)⁻¹K for keys K of shape (d_in, n)."""
        keys = keys.to(device=self.cov.device, dtype=torch.float64)
        chol = self._cholesky()
        if chol is not None:
            a_inv_k = torch.cholesky_solve(keys, chol) / lam
            small = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device) + keys.T @ a_inv_k
            adjusted = torch.linalg.solve(small, a_inv_k.T).T  # small is symmetric
            # A nearly singular C factorises but loses digits: keep the result only if it solves the system.
            error = (lam * (self.cov @ adjusted) + keys @ (keys.T @ adjusted) - keys).norm()
            if error <= 1e-9 * keys.norm():
                return adjusted
        return torch.linalg.solve(lam * self.cov + keys @ keys.T, keys)


def closed_form_update(
    residuals: torch.Tensor, keys: torch.Tensor, solver: CovarianceSolver, lam: float
) -> torch.Tensor:
    """ΔW = R [(λC + KKᵀ)⁻¹K]ᵀ, (out, in) orientation, float64; R: (d_out, n) residuals, K: (d_in, n) keys."""
    u, v = closed_form_factors(residuals, keys, solver, lam)
    return u @ v.T


def closed_form_factors(
    residuals: torch.Tensor, keys: torch.Tensor, solver: CovarianceSolver, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update as low-rank factors (U, V), ΔW = U Vᵀ: U = R (d_out, n), V = (λC + KKᵀ)⁻¹K (d_in, n)."""
    adjusted = solver.adjusted_keys(keys, lam)
    return residuals.to(adjusted), adjusted


# --- running the model ------------------------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor  # answer positions (the tokens to predict)
    fact_index: torch.Tensor  # (B,) the fact token: where keys are read and δ is added (the subject's last token)

    @classmethod
    def of(cls, prompts: Sequence[TokenizedPrompt], pad_id: int, device: torch.device | str = "cpu") -> PromptBatch:
        batch = collate_clozes([(p.prompt_ids, p.answer_ids) for p in prompts], pad_id)
        return cls(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["answer_mask"].to(device),
            torch.tensor([p.fact_index for p in prompts], device=device),
        )

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.input_ids.shape[0], device=self.input_ids.device)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _work(x: torch.Tensor) -> torch.Tensor:
    """The precision the edit is computed in: float32, or float64 for a float64 model (the parity test's)."""
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def capture_at_subject(
    adapter: ModelAdapter, batch: PromptBatch, key_layers: Sequence[int], hidden_layer: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Keys (inputs of the MLP output projections) at `key_layers` and block `hidden_layer`'s output, at each
    row's fact token (the subject's last token unless `fact_token` says otherwise).

    Only the blocks up to `hidden_layer` run. Returns ({layer: (B, d_in)}, (B, d_model)), float32 (float64 for a float64
    model).
    """
    rows, cols = batch.rows, batch.fact_index
    keys: dict[int, torch.Tensor] = {}
    found: dict[str, torch.Tensor] = {}

    def key_hook(layer):
        def hook(_module, args):
            keys[layer] = _work(args[0][rows, cols])

        return hook

    def block_hook(_module, _args, output):
        found["h"] = _work(_hidden(output)[rows, cols])

    block = adapter.blocks[hidden_layer]
    pre = [(adapter.target(layer).module, key_hook(layer)) for layer in key_layers]
    with Hooks(forward=[(block, block_hook)], pre=pre, stop_after=block):
        adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if "h" not in found:
        raise EditError(f"block {hidden_layer} did not run")
    return keys, found["h"]


class ResidualEditor:
    """Logits at chosen positions when δ is added to block `layer`'s output at each row's fact token.

    Block `layer`'s output and the arguments of every later block are captured in one full forward; each
    optimisation step then runs only the later blocks, the final norm and the LM head at the needed positions.
    If that shortcut does not reproduce the full model (a family with extra output scaling), every step runs the
    full model with a hook instead.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        batch: PromptBatch,
        layer: int,
        positions: tuple[torch.Tensor, torch.Tensor],
    ):
        self.adapter, self.batch, self.layer, self.positions = adapter, batch, layer, positions
        model = adapter.model
        hidden, later, calls, out = _later_calls(
            adapter, layer, whole=True, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        full = out.logits
        self.hidden = hidden  # (B, T, d): block `layer`'s output, the residual stream δ is added to
        self.later, self.calls = later, calls
        self.head, self.norm = model.get_output_embeddings(), adapter.final_norm
        self.shortcut = self.head is not None and self.norm is not None and len(calls) == len(later)
        if self.shortcut:
            with torch.no_grad():
                got = self._shortcut_logits(torch.zeros(self.hidden.shape[-1], device=self.hidden.device))
            self.shortcut = _same_logits(got, full[positions])

    @property
    def fact_hidden(self) -> torch.Tensor:
        """(B, d): block `layer`'s output at each row's fact token, before any δ."""
        return self.hidden[self.batch.rows, self.batch.fact_index]

    def _add(self, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        rows, cols = self.batch.rows, self.batch.fact_index
        return hidden.index_put((rows, cols), delta.to(hidden.dtype).expand(len(rows), -1), accumulate=True)

    def _shortcut_logits(self, delta: torch.Tensor) -> torch.Tensor:
        h = _run_blocks(self._add(self.hidden, delta), self.later, self.calls)
        return self.head(self.norm(h[self.positions]))

    def _full_logits(self, delta: torch.Tensor) -> torch.Tensor:
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (self._add(output[0], delta), *output[1:])
            return self._add(output, delta)

        with Hooks(forward=[(self.adapter.blocks[self.layer], hook)]):
            logits = self.adapter.model(
                input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False
            ).logits
        return logits[self.positions]

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """(K, V) logits at `positions` with δ added."""
        return self._shortcut_logits(delta) if self.shortcut else self._full_logits(delta)


def _same_logits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Does a shortcut forward reproduce the whole model's logits (bf16 rounds more)?"""
    want = want.float()
    tol = 1e-3 if got.dtype in (torch.float32, torch.float64) else 5e-2
    scale = max(1.0, want.abs().max().item())
    return got.shape == want.shape and bool(torch.allclose(got.float(), want, rtol=tol, atol=tol * scale))


def _rewind(cache, width: int) -> None:
    """Cut every layer of a KV cache back to its first `width` positions (the prefix), out of any step's graph.

    Per layer, not `cache.crop`: a step runs only the blocks after the edit layer, so only their layers grew."""
    if hasattr(cache, "layers"):  # transformers 5
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() > 1:
                layer.keys, layer.values = layer.keys[..., :width, :].detach(), layer.values[..., :width, :].detach()
    else:
        cache.key_cache = [k[..., :width, :].detach() for k in cache.key_cache]
        cache.value_cache = [v[..., :width, :].detach() for v in cache.value_cache]


def _run_blocks(h: torch.Tensor, blocks: Sequence[nn.Module], calls: Sequence[tuple[tuple, dict]]) -> torch.Tensor:
    """`h` through `blocks`, each called with the other arguments it was called with in a captured forward."""
    for block, (args, kwargs) in zip(blocks, calls):
        if args:
            h = _hidden(block(h, *args[1:], **kwargs))
        else:
            h = _hidden(block(**{**kwargs, "hidden_states": h}))
    return h


def _later_calls(adapter: ModelAdapter, layer: int, whole: bool = False, **inputs) -> tuple:
    """One forward (no grad) of `inputs`: block `layer`'s output, the later blocks, how each of them was called
    (attention mask, position embeddings, cache: what a step that runs only those blocks passes them again), and
    the model's output when `whole` (else the forward stops after the final norm)."""
    later = list(adapter.blocks)[layer + 1 :]
    calls: list[tuple[tuple, dict]] = []
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args, kwargs):
        calls.append((args, kwargs))

    def out_hook(_module, _args, output):
        captured["h"] = _hidden(output).detach()

    norm = adapter.final_norm
    hooks = Hooks(
        forward=[(adapter.blocks[layer], out_hook)],
        pre=[(b, pre_hook) for b in later],
        pre_kwargs=True,
        stop_after=norm if norm is not None and not whole else None,
    )
    with hooks, torch.no_grad():
        out = adapter.model(**inputs)
    return captured["h"], later, calls, (out if whole else None)


# model → {edit layer: whether PrefixCachedEditor reproduced the full model there}: checked on the first editor of
# a model and layer (a whole extra forward of the batch), not on every edit and every rebuilt batch of a mass edit.
_EDITOR_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PrefixCachedEditor:
    """`ResidualEditor.logits` without recomputing what δ cannot change.

    δ is added to block `layer`'s output at the fact token, so in a causal model nothing before the fact token, and
    no block up to `layer`, depends on it. The tokens before each row's fact token (the context prefix and the prompt
    up to the subject's last token) run once, as a KV cache (left-padded, explicit position ids); the rest of each
    row — the fact token, the rest of the prompt and the answer — runs once through blocks 0..`layer`. Each step then
    runs only the blocks after `layer` on those suffix tokens, δ added at the suffix's first position, and the LM
    head only at the needed positions. `ok` is False (use `ResidualEditor`) when the model takes no cache or position
    ids, or when this does not reproduce the full model's logits at δ = 0.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        batch: PromptBatch,
        layer: int,
        positions: tuple[torch.Tensor, torch.Tensor],
    ):
        self.adapter, self.layer, self.ok = adapter, layer, False
        model = adapter.model
        self.head, self.norm = model.get_output_embeddings(), adapter.final_norm
        params = inspect.signature(model.forward).parameters
        checked = _EDITOR_CHECKED.setdefault(model, {})
        if checked.get(layer) is False:
            return
        cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.head is None or self.norm is None or cache_kw not in params or "position_ids" not in params:
            return
        device = batch.input_ids.device
        lengths = batch.attention_mask.sum(1)
        split = batch.fact_index  # each row's first δ-dependent token
        self.n_rows = len(split)
        width_p, width_s = int(split.max()), int((lengths - split).max())
        if width_p == 0:
            return
        # prefix: right-aligned (left padding); suffix: left-aligned (right padding)
        src_p = torch.arange(width_p, device=device)[None, :] - (width_p - split)[:, None]
        prefix_mask = (src_p >= 0).long()
        src_s = split[:, None] + torch.arange(width_s, device=device)[None, :]
        suffix_mask = (src_s < lengths[:, None]).long()
        self.suffix_ids = batch.input_ids.gather(1, src_s.clamp(max=batch.input_ids.shape[1] - 1))
        self.width_p = width_p
        rows, cols = positions
        self.rows, self.cols = rows, cols - split[rows]
        with torch.no_grad():
            out = model(
                input_ids=batch.input_ids.gather(1, src_p.clamp(min=0)),
                attention_mask=prefix_mask,
                position_ids=src_p.clamp(min=0),
                use_cache=True,
            )
            self.cache = getattr(out, "cache", None) if cache_kw == "cache" else out.past_key_values
            if not hasattr(self.cache, "layers") and not hasattr(self.cache, "key_cache"):
                return  # no cache, or one `_rewind` cannot cut back to the prefix
            try:
                self.hidden, self.later, self.calls, _ = _later_calls(
                    adapter,
                    layer,
                    input_ids=self.suffix_ids,
                    attention_mask=torch.cat([prefix_mask, suffix_mask], 1),
                    position_ids=src_s,
                    use_cache=True,
                    **{cache_kw: self.cache},
                )
            except Exception:  # a family whose forward cannot take this: the plain editor
                return
            finally:
                _rewind(self.cache, width_p)
            if len(self.calls) != len(self.later):
                checked[layer] = False
                return
            if checked.get(layer):  # this model and layer passed the check below: the same code path since
                self.ok = True
                return
            got = self.logits(torch.zeros(adapter.d_model, device=device, dtype=model.dtype))
            seen: dict[str, torch.Tensor] = {}
            with Hooks(forward=[(self.norm, lambda _m, _a, out: seen.update(h=out))], stop_after=self.norm):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            self.ok = checked[layer] = _same_logits(got, self.head(seen["h"][positions]))  # the full model's

    @property
    def fact_hidden(self) -> torch.Tensor:
        """(B, d): block `layer`'s output at each row's fact token (the suffix's first position), before any δ."""
        return self.hidden[:, 0]

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """(K, V) logits at `positions` with δ ((d,) or one row per batch row (R, d)) added at the fact tokens."""
        delta = delta.expand(self.n_rows, -1) if delta.dim() == 1 else delta
        h = torch.cat([self.hidden[:, :1] + delta[:, None].to(self.hidden.dtype), self.hidden[:, 1:]], 1)
        try:
            h = _run_blocks(h, self.later, self.calls)
        finally:
            _rewind(self.cache, self.width_p)
        return self.head(self.norm(h[self.rows, self.cols]))


class GroupedEditor:
    """`PrefixCachedEditor`s over groups of rows of about the same suffix length, as one editor: each step runs a
    row's suffix padded only to its group's longest (a mass edit's rows run from 3 to 9 suffix tokens: padded to the
    longest in one batch, a step computes ~1.8 times the tokens it needs). Rows are independent, so the logits are
    the same; `ok` as `PrefixCachedEditor`'s, for every group."""

    GROUP_OVERHEAD = 32  # a group's fixed cost per step (one more pass through the later blocks), in tokens

    def __init__(
        self, adapter: ModelAdapter, batch: PromptBatch, layer: int, positions: tuple[torch.Tensor, torch.Tensor]
    ):
        rows, cols = positions
        suffix = (batch.attention_mask.sum(1) - batch.fact_index).tolist()
        self.groups: list[tuple[torch.Tensor, PrefixCachedEditor]] = []
        picked = []
        for members in padded_batches(suffix, len(suffix), self.GROUP_OVERHEAD):
            index = torch.tensor(members, device=rows.device)
            local = torch.full((len(suffix),), -1, dtype=torch.long, device=rows.device)
            local[index] = torch.arange(len(members), device=rows.device)
            here = (local[rows] >= 0).nonzero()[:, 0]  # the positions in these rows, in `positions` order
            part = PromptBatch(
                batch.input_ids[index], batch.attention_mask[index], batch.answer_mask[index], batch.fact_index[index]
            )
            editor = PrefixCachedEditor(adapter, part, layer, (local[rows[here]], cols[here]))
            self.groups.append((index, editor))
            picked.append(here)
        self.ok = all(editor.ok for _, editor in self.groups)
        self.order = torch.argsort(torch.cat(picked))  # group outputs back to `positions` order
        self.n_rows = len(suffix)

    @property
    def fact_hidden(self) -> torch.Tensor:
        """(B, d): block `layer`'s output at each row's fact token, in the batch's row order."""
        rows = torch.cat([index for index, _ in self.groups])
        return torch.cat([editor.fact_hidden for _, editor in self.groups])[torch.argsort(rows)]

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """(K, V) logits at `positions`; δ is (d,) or one row per batch row (R, d)."""
        delta = delta.expand(self.n_rows, -1) if delta.dim() == 1 else delta
        return torch.cat([editor.logits(delta[index]) for index, editor in self.groups])[self.order]


# --- target vectors ---------------------------------------------------------------------------------------------------


@dataclass
class TargetVector:
    z: torch.Tensor  # (d_model,) float32: the hidden state at the last edit layer that makes the model say the target
    h_norm: float  # ‖h‖ of the hidden state before the edit
    delta_norm: float
    steps: int  # forward passes run
    nll: float  # mean target NLL per token at the last step
    shortcut: bool  # whether the later-layers-only forward was used


def optimise_target(
    adapter: ModelAdapter,
    rewrite: Sequence[TokenizedPrompt],
    kl: TokenizedPrompt,
    hp: MemitHparams,
    pad_id: int,
    progress: bool = False,
) -> TargetVector:
    """Find δ at the last edit layer so the model outputs the new answer after every prefixed prompt.

    Loss = mean over prompts of the per-token target NLL + kl_factor · KL(p ‖ p₀) on "{subject} is a"
    + v_weight_decay · ‖δ‖/‖h‖²; Adam with lr v_lr; ‖δ‖ clamped to clamp_norm_factor · ‖h‖; stops early below
    early_stop_loss. `rewrite[0]` is the bare prompt: h is read there, as in the public implementation.
    """
    return optimise_targets(adapter, [rewrite], [kl], hp, pad_id, progress)[0]


class _Rows:
    """The batch rows of some requests (each request's prompts, then its KL prompt) and an editor over them: what one
    optimisation step runs. Rebuilt for the requests still optimising when enough of them have stopped, so a
    stopped request's rows leave the forward."""

    def __init__(self, adapter, rewrites, kls, requests: Sequence[int], layer: int, pad_id: int, device):
        prompts, row_request, kl_rows, self.bare_rows = [], [], [], []
        for i in requests:
            self.bare_rows.append(len(prompts))
            prompts += list(rewrites[i])
            row_request += [i] * len(rewrites[i])
            kl_rows.append(len(prompts))
            prompts.append(kls[i])
            row_request.append(i)
        self.requests = torch.tensor(list(requests), device=device)
        batch = PromptBatch.of(prompts, pad_id, device)
        self.row_request = torch.tensor(row_request, device=device)  # request id of every row
        self.row_local = torch.searchsorted(self.requests, self.row_request)  # its position among `requests`
        self.is_rewrite = torch.ones(len(prompts), dtype=torch.bool, device=device)
        self.is_rewrite[kl_rows] = False
        target_mask = batch.answer_mask[:, 1:] & self.is_rewrite[:, None]  # logits at t−1 predict the token at t
        self.t_rows, t_cols = target_mask.nonzero(as_tuple=True)
        self.targets = batch.input_ids[:, 1:][self.t_rows, t_cols]
        self.tokens_per_row = target_mask.sum(1).clamp(min=1)
        kl_rows_t = torch.tensor(kl_rows, device=device)
        positions = (torch.cat([self.t_rows, kl_rows_t]), torch.cat([t_cols, batch.fact_index[kl_rows_t]]))
        cached = GroupedEditor(adapter, batch, layer, positions)
        self.editor = cached if cached.ok else ResidualEditor(adapter, batch, layer, positions)
        self.shortcut = cached.ok or self.editor.shortcut
        self.n_rows = len(prompts)

    def losses(self, logits: torch.Tensor, n_rewrites: torch.Tensor):
        """Per request of these rows (in `requests` order): mean target NLL per token, and the KL logits."""
        dtype = logits.dtype
        token_logp = torch.log_softmax(logits[: len(self.t_rows)], dim=-1).gather(-1, self.targets[:, None])[:, 0]
        per_row = torch.zeros(self.n_rows, dtype=dtype, device=logits.device).index_add(0, self.t_rows, token_logp)
        per_row = per_row / self.tokens_per_row.to(dtype)
        nll = -torch.zeros(len(self.requests), dtype=dtype, device=logits.device).index_add(
            0, self.row_local[self.is_rewrite], per_row[self.is_rewrite]
        )
        return nll / n_rewrites[self.requests].to(dtype), torch.log_softmax(logits[len(self.t_rows) :], dim=-1)


REBUILD_SHARE = 0.5  # rebuild the rows when the requests still optimising are at most this share of those run


def optimise_targets(
    adapter: ModelAdapter,
    rewrites: Sequence[Sequence[TokenizedPrompt]],
    kls: Sequence[TokenizedPrompt],
    hp: MemitHparams,
    pad_id: int,
    progress: bool = False,
) -> list[TargetVector]:
    """`optimise_target` for B requests at once: every request's prompts and KL prompt are rows of one batch, each
    request has its own δ (a row of a (B, d) parameter) added at its rows' fact tokens, so one forward per step
    serves all of them. Each request keeps its own loss, Adam moments (Adam is element-wise), ‖δ‖ clamp and early
    stop: the target vectors of B separate optimisations. A request that stops is frozen, and once at most
    `REBUILD_SHARE` of the requests in the forward are still going, the forward is rebuilt with theirs only (rows
    are independent: the others' losses and gradients are the same without them)."""
    layer = hp.layers[-1]
    device = _device(adapter.model)
    n_req = len(rewrites)
    rows = _Rows(adapter, rewrites, kls, range(n_req), layer, pad_id, device)
    h0 = _work(rows.editor.fact_hidden[torch.tensor(rows.bare_rows, device=device)])  # (B, d) at the bare prompts
    h_norm = h0.norm(dim=1)
    n_rewrites = torch.tensor([len(r) for r in rewrites], device=device)
    shortcut = rows.shortcut

    delta = torch.zeros_like(h0, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: torch.Tensor | None = None
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = [0] * n_req
    nll_at_stop = [float("nan")] * n_req
    label = "target vector (stops early at the loss floor)"
    if n_req > 1:
        label = f"target vectors of {n_req} requests (each stops at the loss floor)"
    bar = Progress(hp.v_num_grad_steps, label, progress, "step")
    with torch.enable_grad():
        for step in range(hp.v_num_grad_steps):
            bar.update()
            if int(active.sum()) <= REBUILD_SHARE * len(rows.requests):
                rows = _Rows(adapter, rewrites, kls, active.nonzero()[:, 0].tolist(), layer, pad_id, device)
            logits = _work(rows.editor.logits(delta[rows.row_request]))
            nll, kl_logp = rows.losses(logits, n_rewrites)
            if kl_init is None:
                kl_init = kl_logp.detach()  # (B, V) at δ = 0, request order
            kl_loss = hp.kl_factor * (kl_logp.exp() * (kl_logp - kl_init[rows.requests])).sum(-1)
            ran = delta[rows.requests]
            loss = nll + kl_loss + hp.v_weight_decay * ran.norm(dim=1) / h_norm[rows.requests] ** 2
            values, nll_values = loss.detach(), nll.detach()
            for local, i in enumerate(rows.requests.tolist()):
                if active[i]:
                    steps[i] = step + 1
                    nll_at_stop[i] = nll_values[local].item()
                    if values[local].item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
                        active[i] = False
            if not active.any():
                break
            # Only δ's gradient: whatever the caller's requires_grad, no weight gradient is computed or stored.
            (grad,) = torch.autograd.grad(loss[active[rows.requests]].sum(), [delta])
            frozen = delta.detach()[~active].clone()
            delta.grad = grad
            optimiser.step()
            with torch.no_grad():
                delta[~active] = frozen
                max_norm = hp.clamp_norm_factor * h_norm
                norms = delta.norm(dim=1)
                scale = torch.where(active & (norms > max_norm), max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
    bar.close()
    z = (h0 + delta).detach()
    if not torch.isfinite(z).all():
        raise EditError("a target vector is not finite" if n_req > 1 else "the target vector is not finite")
    return [
        TargetVector(z[i], h_norm[i].item(), delta.detach()[i].norm().item(), steps[i], nll_at_stop[i], shortcut)
        for i in range(n_req)
    ]


# --- context prefixes -------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_prefixes(
    model: nn.Module, tokenizer, bos_ids: Sequence[int], count: int = 5, length: int = 10, seed: int = 0
) -> list[str]:
    """Short texts the model writes itself (top-5 sampling, seeded on the CPU), each closed with ". ".

    The same seed gives the same prefixes on any device and in any process.
    """
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    # transformers 5 names the KV cache argument `cache`; older versions `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefixes = []
    for i in range(count):
        start = tokenizer.encode(PREFIX_STARTS[i % len(PREFIX_STARTS)], add_special_tokens=False)
        ids = list(bos_ids) + start
        past, fresh = None, ids
        for _ in range(max(0, length - len(start))):
            # The whole mask (past and fresh tokens): without it HF warns about padding when BOS is the pad id.
            mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)
            out = model(
                input_ids=torch.tensor([fresh], device=device), attention_mask=mask, use_cache=True, **{cache_kw: past}
            )
            past = out.cache if cache_kw == "cache" else out.past_key_values
            logits = out.logits[0, -1]
            top = torch.topk(logits.float().cpu(), 5)
            token = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)])
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
            fresh = [token]
        text = tokenizer.decode(ids[len(bos_ids) :], skip_special_tokens=True)
        prefixes.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return prefixes


# --- the edit ---------------------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    targets: list[TargetVector]
    delta_norms: dict[int, float]  # ‖ΔW_l‖_F per edit layer
    residual_norms: dict[int, float]  # mean ‖z − h‖ remaining before each layer's update
    time_targets_s: float
    time_updates_s: float
    # layer → (U, V), ΔW_l = U Vᵀ (out, in), float64: the ripple stage saves them (edit_updates.pt)
    updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _mean_keys(keys: torch.Tensor, n_requests: int, n_prompts: int) -> torch.Tensor:
    """(n_requests·n_prompts, d) → (d, n_requests): the bare prompt and the generated prefixes weigh half each."""
    keys = keys.view(n_requests, n_prompts, -1)
    if n_prompts == 1:
        return keys[:, 0].T
    return ((keys[:, 0] + keys[:, 1:].mean(1)) / 2).T


def apply_memit(
    adapter: ModelAdapter,
    tokenizer,
    requests: Sequence[EditRequest],
    hp: MemitHparams,
    solvers: dict[int, CovarianceSolver],
    prefixes: Sequence[str],
    bos_ids: Sequence[int],
    pad_id: int,
    progress: bool = False,
    targets: Sequence[TargetVector] | None = None,
) -> EditResult:
    """Edit every request at once: targets at the last edit layer, then the update of each layer in turn.

    `targets`: the requests' target vectors when already optimised (`optimise_targets` of many requests at once,
    then each request edited alone: the forecast's single edits); they depend only on the unedited model."""
    device = _device(adapter.model)
    contexts = ["", *prefixes]
    start = time.perf_counter()
    prompts = [request_prompts(tokenizer, r, contexts, bos_ids, hp.fact_token) for r in requests]
    if targets is None:
        kls = [kl_prompt(tokenizer, r.subject, bos_ids, hp.fact_token) for r in requests]
        targets = optimise_targets(adapter, prompts, kls, hp, pad_id, progress)
    elif len(targets) != len(requests):
        raise ValueError(f"{len(targets)} target vectors for {len(requests)} requests")
    t_targets = time.perf_counter() - start
    z = torch.stack([t.z for t in targets], dim=1)  # (d_model, n)
    batch = PromptBatch.of([p for per_request in prompts for p in per_request], pad_id, device)
    bare = torch.arange(len(requests), device=device) * len(contexts)
    last = hp.layers[-1]
    delta_norms, residual_norms, updates = {}, {}, {}
    for i, layer in enumerate(hp.layers):
        keys, hidden = capture_at_subject(adapter, batch, [layer], last)
        k = _mean_keys(keys[layer], len(requests), len(contexts))
        residual = z - hidden[bare].T  # re-measured: earlier layers' updates already moved it
        residual_norms[layer] = residual.norm(dim=0).mean().item()
        spread = residual / (len(hp.layers) - i)
        update = closed_form_update(spread, k, solvers[layer], hp.mom2_update_weight)
        if not torch.isfinite(update).all():
            raise EditError(f"the update of layer {layer} is not finite")
        adapter.target(layer).add_(update)
        delta_norms[layer] = update.norm().item()
        # ΔW = R Vᵀ with R the spread residuals: V = ΔWᵀR(RᵀR)⁺ recovers the keys' factor exactly
        u = spread.to(update)
        updates[layer] = (u, update.T @ u @ torch.linalg.pinv(u.T @ u))
    return EditResult(targets, delta_norms, residual_norms, t_targets, time.perf_counter() - start - t_targets, updates)
