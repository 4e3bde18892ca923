"""A deliberately naive float64 MEMIT, written from the paper's equations (Meng et al., ICLR 2023, §4.3 and
Algorithm 1), for the parity test of `lit_coupling.editing.memit`.

Nothing is cached or batched: every optimisation step runs the whole model on each prompt alone (no padding), δ is
added by a hook at block L's output, Adam is written out, and each update is one dense solve. It takes the same
inputs as the fast code (token ids and fact-token positions of the prompts, the key covariance C, hyperparameters)
and shares none of its machinery beyond the adapter's module lookup.

    z      = h_L + δ*,   δ* = argmin  mean_j NLL(target | prefix_j + prompt; h_L += δ)
                                  + kl_factor · KL(p_δ ‖ p_0)("{subject} is a") + decay · ‖δ‖ / ‖h_L‖²
    k_l    = ½ k_l(prompt) + ½ mean_j k_l(prefix_j + prompt)               (keys after earlier layers' updates)
    r_l    = (z − h_L(prompt)) / (number of edit layers still to update)
    ΔW_l   = r_l k_lᵀ (λ C_l + k_l k_lᵀ)⁻¹                                  (= r (solve(λC + kkᵀ, k))ᵀ)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NaiveEdit:
    z: torch.Tensor  # (d_model,) target hidden state at the last edit layer
    steps: int
    keys: dict[int, torch.Tensor]  # layer → (d_in,) key used for that layer's update
    residuals: dict[int, torch.Tensor]  # layer → (d_model,) z − h_L before that layer's update (undivided)
    deltas: dict[int, torch.Tensor]  # layer → (d_out, d_in) ΔW


def _run(model, ids: list[int], block=None, delta=None, index=None, key_module=None):
    """One full forward of one unpadded sequence: logits (T, V), block output at `index`, key at `index`."""
    seen = {}
    handles = []
    if block is not None:

        def add(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if delta is not None:
                hidden = hidden.clone()
                hidden[0, index] = hidden[0, index] + delta
            seen["h"] = hidden[0, index]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(block.register_forward_hook(add))
    if key_module is not None:
        handles.append(key_module.register_forward_pre_hook(lambda _m, args: seen.update(k=args[0][0, index])))
    try:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen.get("h"), seen.get("k")


def target_nll(model, block, prompt, delta) -> torch.Tensor:
    """Mean NLL per answer token of `prompt` (a TokenizedPrompt) with δ added at its fact token."""
    ids = prompt.prompt_ids + prompt.answer_ids
    logits, _, _ = _run(model, ids, block, delta, prompt.fact_index)
    start = len(prompt.prompt_ids)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -torch.stack([log_probs[t - 1, ids[t]] for t in range(start, len(ids))]).mean()


def kl_log_probs(model, block, kl, delta) -> torch.Tensor:
    """log p(next token) at the KL prompt's fact token ("{subject} is a" read where the fact token is)."""
    logits, _, _ = _run(model, kl.prompt_ids + kl.answer_ids, block, delta, kl.fact_index)
    return torch.log_softmax(logits[kl.fact_index], dim=-1)


def naive_target(model, blocks, rewrite, kl, hp) -> tuple[torch.Tensor, int]:
    """z at the last edit layer: Adam on δ, the whole model every step (float64)."""
    block = blocks[hp.layers[-1]]
    _, h0, _ = _run(model, rewrite[0].prompt_ids + rewrite[0].answer_ids, block, None, rewrite[0].fact_index)
    h0 = h0.detach()
    delta = torch.zeros_like(h0, requires_grad=True)
    m, v = torch.zeros_like(h0), torch.zeros_like(h0)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    kl0 = kl_log_probs(model, block, kl, None).detach()
    steps = 0
    for step in range(hp.v_num_grad_steps):
        steps = step + 1
        nll = torch.stack([target_nll(model, block, p, delta) for p in rewrite]).mean()
        lp = kl_log_probs(model, block, kl, delta)
        kl_term = hp.kl_factor * (lp.exp() * (lp - kl0)).sum()  # KL(p_δ ‖ p_0)
        loss = nll + kl_term + hp.v_weight_decay * delta.norm() / h0.norm() ** 2
        if loss.item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        with torch.no_grad():
            t = step + 1
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad**2
            delta -= hp.v_lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            limit = hp.clamp_norm_factor * h0.norm()
            if delta.norm() > limit:
                delta *= limit / delta.norm()
    return (h0 + delta).detach(), steps


def naive_key(model, target, prompts) -> torch.Tensor:
    """The key of one request at one layer: half the bare prompt's, half the mean over the prefixed ones."""
    keys = [_run(model, p.prompt_ids + p.answer_ids, None, None, p.fact_index, target)[2] for p in prompts]
    if len(keys) == 1:
        return keys[0]
    return (keys[0] + torch.stack(keys[1:]).mean(0)) / 2


@torch.no_grad()
def naive_memit(adapter, rewrite, kl, hp, covariances: dict[int, torch.Tensor]) -> NaiveEdit:
    """One request, edited in place on a float64 model; every stage returned for comparison."""
    model, blocks = adapter.model, adapter.blocks
    with torch.enable_grad():
        z, steps = naive_target(model, blocks, rewrite, kl, hp)
    last = hp.layers[-1]
    keys, residuals, deltas = {}, {}, {}
    for i, layer in enumerate(hp.layers):
        target = adapter.target(layer)
        k = naive_key(model, target.module, rewrite)
        _, h, _ = _run(model, rewrite[0].prompt_ids + rewrite[0].answer_ids, blocks[last], None, rewrite[0].fact_index)
        r = z - h
        K, R = k[:, None], (r / (len(hp.layers) - i))[:, None]
        A = hp.mom2_update_weight * covariances[layer].double() + K @ K.T
        delta = R @ torch.linalg.solve(A, K).T
        w = target.module.weight
        if target.transposed:  # Conv1D (GPT-2) stores (in, out)
            w += delta.T
        else:
            w += delta
        keys[layer], residuals[layer], deltas[layer] = k, r, delta
    return NaiveEdit(z, steps, keys, residuals, deltas)


@torch.no_grad()
def naive_covariance(adapter, layer: int, sequences: list[list[int]]) -> torch.Tensor:
    """E[k kᵀ] over every position of every sequence, each run alone (float64)."""
    keys = []
    handle = adapter.target(layer).module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0]))
    try:
        for ids in sequences:
            adapter.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return k.T @ k / len(k)


@torch.no_grad()
def naive_memit_batch(adapter, rewrites, kls, hp, covariances: dict[int, torch.Tensor]) -> NaiveEdit:
    """B requests as one MEMIT edit (the paper's mass editing, Algorithm 1): each request's z from its own
    optimisation, then per layer the keys K (d_in, B) and spread residuals R (d_out, B) of all requests and
    ΔW = R (solve(λC + K Kᵀ, K))ᵀ. keys/residuals hold (d, B) matrices."""
    model, blocks = adapter.model, adapter.blocks
    with torch.enable_grad():
        zs = [naive_target(model, blocks, rewrite, kl, hp)[0] for rewrite, kl in zip(rewrites, kls)]
    last = hp.layers[-1]
    keys, residuals, deltas = {}, {}, {}
    for i, layer in enumerate(hp.layers):
        target = adapter.target(layer)
        K = torch.stack([naive_key(model, target.module, rewrite) for rewrite in rewrites], 1)
        h = [_run(model, r[0].prompt_ids + r[0].answer_ids, blocks[last], None, r[0].fact_index)[1] for r in rewrites]
        r = torch.stack([z - hh for z, hh in zip(zs, h)], 1)
        R = r / (len(hp.layers) - i)
        A = hp.mom2_update_weight * covariances[layer].double() + K @ K.T
        delta = R @ torch.linalg.solve(A, K).T
        w = target.module.weight
        if target.transposed:
            w += delta.T
        else:
            w += delta
        keys[layer], residuals[layer], deltas[layer] = K, r, delta
    return NaiveEdit(torch.stack(zs, 1), 0, keys, residuals, deltas)
