"""MEMIT (Meng et al., ICLR 2023) as published: target vectors, keys, residual spread, the least-squares update.

Functions of a model, its adapter and tensors; nothing here knows about Lightning. `apply_memit` edits the weights in
place — the caller snapshots and restores them (`lit_coupling.editing.snapshot`).

Keys are read and the target vector written at the *fact token* (`MemitHparams.fact_token`): the subject's last
token as published, or another position relative to the subject as the public implementation allows.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.requests import EditRequest, TokenizedPrompt, kl_prompt, request_prompts
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.hooks import Hooks
from lit_coupling.progress import Progress
from lit_coupling.scoring import collate_clozes

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
        later = list(adapter.blocks)[layer + 1 :]
        calls: list[tuple[tuple, dict]] = []
        captured: dict[str, torch.Tensor] = {}

        def pre_hook(_module, args, kwargs):
            calls.append((args, kwargs))

        def out_hook(_module, _args, output):
            captured["h"] = _hidden(output).detach()

        hooks = Hooks(forward=[(adapter.blocks[layer], out_hook)], pre=[(b, pre_hook) for b in later], pre_kwargs=True)
        with hooks, torch.no_grad():
            full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        self.hidden = captured["h"]  # (B, T, d): block `layer`'s output, the residual stream δ is added to
        self.later, self.calls = later, calls
        self.head, self.norm = model.get_output_embeddings(), adapter.final_norm
        self.shortcut = self.head is not None and self.norm is not None and len(calls) == len(later)
        if self.shortcut:
            with torch.no_grad():
                got = self._shortcut_logits(torch.zeros(self.hidden.shape[-1], device=self.hidden.device))
            want = full[positions].float()
            tol = 1e-3 if self.hidden.dtype in (torch.float32, torch.float64) else 5e-2  # bf16 rounds more
            scale = max(1.0, want.abs().max().item())
            self.shortcut = bool(torch.allclose(got.float(), want, rtol=tol, atol=tol * scale))

    def _add(self, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        rows, cols = self.batch.rows, self.batch.fact_index
        return hidden.index_put((rows, cols), delta.to(hidden.dtype).expand(len(rows), -1), accumulate=True)

    def _shortcut_logits(self, delta: torch.Tensor) -> torch.Tensor:
        h = self._add(self.hidden, delta)
        for block, (args, kwargs) in zip(self.later, self.calls):
            if args:
                h = _hidden(block(h, *args[1:], **kwargs))
            else:
                h = _hidden(block(**{**kwargs, "hidden_states": h}))
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


def _rewind(cache, width: int) -> None:
    """Drop what a forward appended to a KV cache after its first `width` positions; what stays is cut from the
    graph of the step that appended (the prefix never depended on δ)."""
    extra = cache.get_seq_length() - width
    if extra > 0:
        cache.crop(-extra)  # negative: "remove this many" (transformers 4 and 5 alike)
    if hasattr(cache, "layers"):  # transformers 5
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    else:
        cache.key_cache = [k.detach() for k in cache.key_cache]
        cache.value_cache = [v.detach() for v in cache.value_cache]


class PrefixCachedEditor:
    """`ResidualEditor.logits` without recomputing what δ cannot change: every token before a row's fact token.

    δ is added at the fact token, so in a causal model the states of the tokens before it (the context prefix and
    the prompt up to the subject's last token) are the same at every optimisation step. They run once, as a KV
    cache (left-padded, explicit position ids); each step runs only each row's suffix — the fact token, the rest
    of the prompt and the answer — through the model, δ added at the suffix's first position of block `layer`, and
    the LM head only at the needed positions. `ok` is False (use `ResidualEditor`) when the model takes no cache or
    position ids, or when the cached forward does not reproduce the full model's logits at δ = 0.
    """

    def __init__(
        self, adapter: ModelAdapter, batch: PromptBatch, layer: int, positions: tuple[torch.Tensor, torch.Tensor]
    ):
        self.adapter, self.layer, self.ok = adapter, layer, False
        model = adapter.model
        self.head, self.norm = model.get_output_embeddings(), adapter.final_norm
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.head is None or self.norm is None or self.cache_kw not in params or "position_ids" not in params:
            return
        device = batch.input_ids.device
        lengths = batch.attention_mask.sum(1)
        split = batch.fact_index  # each row's first δ-dependent token
        n_rows = len(split)
        width_p, width_s = int(split.max()), int((lengths - split).max())
        if width_p == 0:
            return
        cols_p = torch.arange(width_p, device=device)
        # prefix: right-aligned (left padding); suffix: left-aligned (right padding)
        src_p = cols_p[None, :] - (width_p - split)[:, None]
        self.prefix_mask = (src_p >= 0).long()
        prefix_ids = batch.input_ids.gather(1, src_p.clamp(min=0))
        prefix_pos = src_p.clamp(min=0)
        cols_s = torch.arange(width_s, device=device)
        src_s = split[:, None] + cols_s[None, :]
        self.suffix_mask = (src_s < lengths[:, None]).long()
        self.suffix_ids = batch.input_ids.gather(1, src_s.clamp(max=batch.input_ids.shape[1] - 1))
        self.suffix_pos = src_s
        self.width_p = width_p
        rows, cols = positions
        self.rows, self.cols = rows, cols - split[rows]
        self.n_rows = n_rows
        with torch.no_grad():
            out = model(input_ids=prefix_ids, attention_mask=self.prefix_mask, position_ids=prefix_pos, use_cache=True)
            self.cache = getattr(out, "cache", None) if self.cache_kw == "cache" else out.past_key_values
            if self.cache is None or not hasattr(self.cache, "crop"):
                return
            try:
                got = self.logits(torch.zeros(adapter.d_model, device=device, dtype=model.dtype))
            except Exception:  # a family whose forward cannot take this: the plain editor
                return
            seen: dict[str, torch.Tensor] = {}
            with Hooks(forward=[(self.norm, lambda _m, _a, out: seen.update(h=out))], stop_after=self.norm):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            want = self.head(seen["h"][positions]).float()  # the full model at the needed positions only
        tol = 1e-3 if want.dtype in (torch.float32, torch.float64) and got.dtype != torch.bfloat16 else 5e-2
        scale = max(1.0, want.abs().max().item())
        self.ok = bool(torch.allclose(got.float(), want, rtol=tol, atol=tol * scale))

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """(K, V) logits at `positions` with δ ((d,) or one row per batch row (R, d)) added at the fact tokens."""
        found: dict[str, torch.Tensor] = {}
        delta = delta.expand(self.n_rows, -1) if delta.dim() == 1 else delta

        def add(_module, _args, output):
            hidden = _hidden(output)
            hidden = torch.cat([hidden[:, :1] + delta[:, None].to(hidden.dtype), hidden[:, 1:]], 1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def normed(_module, _args, output):
            found["h"] = output

        mask = torch.cat([self.prefix_mask, self.suffix_mask], 1)
        try:
            with Hooks(forward=[(self.adapter.blocks[self.layer], add), (self.norm, normed)], stop_after=self.norm):
                self.adapter.model(
                    input_ids=self.suffix_ids,
                    attention_mask=mask,
                    position_ids=self.suffix_pos,
                    use_cache=True,
                    **{self.cache_kw: self.cache},
                )
        finally:
            _rewind(self.cache, self.width_p)
        return self.head(found["h"][self.rows, self.cols])


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
    layer = hp.layers[-1]
    device = _device(adapter.model)
    batch = PromptBatch.of([*rewrite, kl], pad_id, device)
    n_rewrite = len(rewrite)
    target_mask = batch.answer_mask[:n_rewrite, 1:]  # logits at t−1 predict the token at t
    t_rows, t_cols = target_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[:n_rewrite, 1:][t_rows, t_cols]
    kl_row = torch.tensor([n_rewrite], device=device)
    rows = torch.cat([t_rows, kl_row])
    cols = torch.cat([t_cols, batch.fact_index[n_rewrite:]])
    editor = ResidualEditor(adapter, batch, layer, (rows, cols))
    h0 = _work(editor.hidden[0, batch.fact_index[0]])
    h_norm = h0.norm()
    tokens_per_row = target_mask.sum(1).to(h0.dtype)

    delta = torch.zeros_like(h0, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: torch.Tensor | None = None
    nll = torch.tensor(float("nan"))
    steps = 0
    bar = Progress(hp.v_num_grad_steps, "target vector (stops early at the loss floor)", progress, "step")
    with torch.enable_grad():
        for step in range(hp.v_num_grad_steps):
            steps = step + 1
            bar.update()
            logits = _work(editor.logits(delta))
            log_probs = torch.log_softmax(logits[: len(t_rows)], dim=-1)
            token_logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            per_row = torch.zeros(n_rewrite, device=device, dtype=h0.dtype).index_add(0, t_rows, token_logp)
            nll = -(per_row / tokens_per_row).mean()
            kl_logp = torch.log_softmax(logits[len(t_rows) :], dim=-1)
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl_loss = hp.kl_factor * torch.nn.functional.kl_div(
                kl_init, kl_logp, log_target=True, reduction="batchmean"
            )
            decay = hp.v_weight_decay * delta.norm() / h_norm**2
            loss = nll + kl_loss + decay
            if loss.item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
                break
            # Only δ's gradient: whatever the caller's requires_grad, no weight gradient is computed or stored.
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            optimiser.step()
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * h_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    bar.close()
    z = (h0 + delta).detach()
    if not torch.isfinite(z).all():
        raise EditError("the target vector is not finite")
    return TargetVector(z, h_norm.item(), delta.detach().norm().item(), steps, nll.item(), editor.shortcut)


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
    stop (a request that stops is frozen while the others go on): the target vectors of B separate optimisations.
    B = 1 is `optimise_target` itself."""
    if len(rewrites) == 1:
        return [optimise_target(adapter, rewrites[0], kls[0], hp, pad_id, progress)]
    layer = hp.layers[-1]
    device = _device(adapter.model)
    n_req = len(rewrites)
    prompts, row_request, kl_rows, bare_rows = [], [], [], []
    for i, (rewrite, kl) in enumerate(zip(rewrites, kls)):
        bare_rows.append(len(prompts))
        prompts += list(rewrite)
        row_request += [i] * len(rewrite)
        kl_rows.append(len(prompts))
        prompts.append(kl)
        row_request.append(i)
    batch = PromptBatch.of(prompts, pad_id, device)
    row_request_t = torch.tensor(row_request, device=device)
    is_rewrite = torch.ones(len(prompts), dtype=torch.bool, device=device)
    is_rewrite[kl_rows] = False
    target_mask = batch.answer_mask[:, 1:] & is_rewrite[:, None]
    t_rows, t_cols = target_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[:, 1:][t_rows, t_cols]
    kl_rows_t = torch.tensor(kl_rows, device=device)
    positions = (torch.cat([t_rows, kl_rows_t]), torch.cat([t_cols, batch.fact_index[kl_rows_t]]))
    cached = PrefixCachedEditor(adapter, batch, layer, positions)
    editor = cached if cached.ok else ResidualEditor(adapter, batch, layer, positions)
    bare = torch.tensor(bare_rows, device=device)
    h0 = capture_at_subject(adapter, batch, [], layer)[1][bare]  # (B, d): block `layer`'s output at the fact token
    h_norm = h0.norm(dim=1)
    tokens_per_row = target_mask.sum(1).to(h0.dtype).clamp(min=1)
    rewrites_per_request = torch.tensor([len(r) for r in rewrites], device=device, dtype=h0.dtype)

    delta = torch.zeros_like(h0, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: torch.Tensor | None = None
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = [0] * n_req
    nll_at_stop = [float("nan")] * n_req
    bar = Progress(
        hp.v_num_grad_steps, f"target vectors of {n_req} requests (each stops at the loss floor)", progress, "step"
    )
    with torch.enable_grad():
        for step in range(hp.v_num_grad_steps):
            bar.update()
            logits = _work(editor.logits(delta[row_request_t]))
            log_probs = torch.log_softmax(logits[: len(t_rows)], dim=-1)
            token_logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            per_row = torch.zeros(len(prompts), device=device, dtype=h0.dtype).index_add(0, t_rows, token_logp)
            per_row = per_row / tokens_per_row
            nll = (
                -torch.zeros(n_req, device=device, dtype=h0.dtype).index_add(
                    0, row_request_t[is_rewrite], per_row[is_rewrite]
                )
                / rewrites_per_request
            )
            kl_logp = torch.log_softmax(logits[len(t_rows) :], dim=-1)  # (B, V), request order
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl_loss = hp.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            decay = hp.v_weight_decay * delta.norm(dim=1) / h_norm**2
            loss = nll + kl_loss + decay
            values, nll_values = loss.detach(), nll.detach()
            for i in torch.nonzero(active).flatten().tolist():
                steps[i] = step + 1
                nll_at_stop[i] = nll_values[i].item()
                if values[i].item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
                    active[i] = False
            if not active.any():
                break
            (grad,) = torch.autograd.grad(loss[active].sum(), [delta])
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
        raise EditError("a target vector is not finite")
    return [
        TargetVector(
            z[i],
            h_norm[i].item(),
            delta.detach()[i].norm().item(),
            steps[i],
            nll_at_stop[i],
            cached.ok or editor.shortcut,
        )
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
