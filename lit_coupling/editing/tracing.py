"""Choosing edit layers (and the fact token) by measurement: causal tracing around the subject, and an efficacy
sweep.

`causal_trace` (Meng et al. 2022): corrupt the subject's token embeddings with noise, restore one layer's
clean state at one position — the subject's last token, the token after the subject, and for contrast the subject's
first and the prompt's last token — and see how much of P(answer) comes back, per layer, for the block output and
for the MLP output alone. `edit_sweep` runs real MEMIT edits for each (fact token, layer set, λ, clamp) and counts
those that take (and, given other known facts, how many of those survive each edit).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import torch

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.memit import CovarianceSolver, PromptBatch, _hidden, apply_memit
from lit_coupling.editing.requests import EditRequest, subject_span, tokenize_with_subject
from lit_coupling.editing.snapshot import restored_after
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.scoring import (
    answer_logprobs,
    collate_clozes,
    generated_exact_match,
    greedy_continuations,
    score_batch,
)

# Tokens generated to judge whether the model still produces an unrelated fact ("known" before, "kept" after).
OTHERS_NEW_TOKENS = 8


@torch.no_grad()
def causal_trace(
    adapter: ModelAdapter,
    tokenizer,
    pieces: Sequence[KnowledgePiece],
    bos_ids: Sequence[int],
    pad_id: int,
    noise: float = 3.0,
    samples: int = 5,
    seed: int = 0,
) -> dict:
    """Mean indirect effect per layer of restoring one clean state into the corrupted run.

    {"block": [L], "mlp": [L]} at the subject's last token (where published MEMIT reads keys and writes);
    {"block_after_subject": [L], "mlp_after_subject": [L]} at the first token after the subject (the fact token
    `subject_first_after_last`; the subject's last token when nothing follows it); for contrast
    {"block_subject_first": [L], "block_prompt_last": [L]}: the block output at the subject's first token and at
    the last prompt token (where the answer is predicted); plus "p_clean", "p_corrupt". Effects are in probability
    of the whole answer, averaged over pieces the corruption hurts (clean P > corrupted P). Noise is `noise` × the
    embeddings' standard deviation, as in the ROME paper.
    """
    model = adapter.model
    device = next(model.parameters()).device
    embed = adapter.embedding
    sigma = noise * embed.weight.float().std().item()
    generator = torch.Generator().manual_seed(seed)
    n_layers = adapter.num_layers
    block_effect, mlp_effect = torch.zeros(n_layers), torch.zeros(n_layers)
    first_effect, last_prompt_effect = torch.zeros(n_layers), torch.zeros(n_layers)
    after_block_effect, after_mlp_effect = torch.zeros(n_layers), torch.zeros(n_layers)
    p_clean_sum = p_corrupt_sum = 0.0
    used = 0
    for piece in pieces:
        span = subject_span(piece.prompt, piece.subject)
        if span is None:
            continue
        tp = tokenize_with_subject(
            tokenizer, piece.prompt, span[1], piece.answer, bos_ids, span[0], "subject_first_after_last"
        )
        batch = PromptBatch.of([tp] * (samples + 1), pad_id, device)
        subject_positions = torch.arange(tp.subject_first, tp.subject_index + 1)
        noise_tensor = (
            torch.randn(samples, len(subject_positions), embed.weight.shape[1], generator=generator) * sigma
        )

        def run(
            patch: tuple[torch.nn.Module, int] | None = None,
            batch=batch,
            positions=subject_positions,
            noise_tensor=noise_tensor,
        ) -> torch.Tensor:
            """P(answer) per row; rows 1.. have noisy subject embeddings; `patch` = (module, position)
            restores
            that module's clean output at that position."""

            def corrupt(_module, _args, output):  # row 0 stays clean
                out = output.clone()
                out[1:, positions] += noise_tensor.to(out)
                return out

            def restore(_module, _args, output):
                hidden = _hidden(output).clone()
                hidden[1:, patch[1]] = hidden[0, patch[1]]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handles = [embed.register_forward_hook(corrupt)]
            if patch is not None:
                handles.append(patch[0].register_forward_hook(restore))
            try:
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
            finally:
                for h in handles:
                    h.remove()
            return answer_logprobs(logits, batch.input_ids, batch.answer_mask).exp()

        base = run()
        p_clean, p_corrupt = base[0].item(), base[1:].mean().item()
        if p_clean <= p_corrupt:
            continue
        used += 1
        p_clean_sum += p_clean
        p_corrupt_sum += p_corrupt
        last_prompt = len(tp.prompt_ids) - 1
        for layer in range(n_layers):
            block, mlp = adapter.blocks[layer], adapter.target(layer).module
            # The positions often coincide (the fact token is the last prompt token in "The birthplace of X is";
            # a one-token subject starts where it ends): each distinct restoration runs once.
            restored: dict[tuple[int, int], float] = {}
            for module, position, effect in (
                (block, tp.subject_index, block_effect),
                (mlp, tp.subject_index, mlp_effect),
                (block, tp.fact_index, after_block_effect),
                (mlp, tp.fact_index, after_mlp_effect),
                (block, tp.subject_first, first_effect),
                (block, last_prompt, last_prompt_effect),
            ):
                key = (id(module), position)
                if key not in restored:
                    restored[key] = run((module, position))[1:].mean().item() - p_corrupt
                effect[layer] += restored[key]
    if used == 0:
        return {
            "pieces": 0,
            "block": [],
            "mlp": [],
            "block_after_subject": [],
            "mlp_after_subject": [],
            "block_subject_first": [],
            "block_prompt_last": [],
            "p_clean": None,
            "p_corrupt": None,
        }
    return {
        "pieces": used,
        "block": (block_effect / used).tolist(),
        "mlp": (mlp_effect / used).tolist(),
        "block_after_subject": (after_block_effect / used).tolist(),
        "mlp_after_subject": (after_mlp_effect / used).tolist(),
        "block_subject_first": (first_effect / used).tolist(),
        "block_prompt_last": (last_prompt_effect / used).tolist(),
        "p_clean": p_clean_sum / used,
        "p_corrupt": p_corrupt_sum / used,
    }


def edit_sweep(
    adapter: ModelAdapter,
    tokenizer,
    requests: Sequence[EditRequest],
    probes: Sequence[tuple[list[int], list[int], list[int]]],
    hp: MemitHparams,
    layer_sets: Sequence[Sequence[int]],
    lambdas: Sequence[float],
    covariances: dict[int, torch.Tensor],
    prefixes: Sequence[str],
    bos_ids: Sequence[int],
    pad_id: int,
    clamps: Sequence[float] = (),
    fact_tokens: Sequence[str] = (),
    others: Sequence[tuple[list[int], str]] = (),
) -> list[dict]:
    """Edit each request alone under every (fact token, layer set, λ, clamp), restoring the weights after each;
    a row each.

    `probes[i]` = (prompt ids, true answer ids, new answer ids) of request i. A row gives the fraction of
    edits whose
    target vector reached the new answer (NLL < 0.5), that made the new answer likelier than the true one
    (logp),
    and that made the model generate it (generated). Given `others` (prompt ids, answer) of facts the model
    generates before any edit, a row also gives the fraction of them it still generates after an edit, averaged
    over edits (others_kept: a coarse specificity check; the ripple stage measures it properly).
    """
    solvers = {layer: CovarianceSolver(c) for layer, c in covariances.items()}
    other_prompts = [prompt for prompt, _ in others or []]
    rows = []
    settings = itertools.product(
        fact_tokens or [hp.fact_token], layer_sets, lambdas, clamps or [hp.clamp_norm_factor]
    )
    for fact_token, layers, lam, clamp in settings:
        setting = replace(
            hp, layers=list(layers), mom2_update_weight=lam, clamp_norm_factor=clamp, fact_token=fact_token
        )
        reached = prefers = generated = kept = 0
        for request, (p_ids, true_ids, new_ids) in zip(requests, probes):
            with restored_after({layer: adapter.target(layer).module.weight for layer in layers}):
                result = apply_memit(
                    adapter, tokenizer, [request], setting, solvers, prefixes, bos_ids, pad_id
                )
                reached += result.targets[0].nll < 0.5
                logp = score_batch(
                    adapter.model, collate_clozes([(p_ids, new_ids), (p_ids, true_ids)], pad_id)
                )["logp"]
                prefers += bool(logp[0] > logp[1])
                out = greedy_continuations(
                    adapter.model, [p_ids], len(new_ids) + 2, pad_id, tokenizer.eos_token_id
                )[0]
                generated += generated_exact_match(tokenizer, out, request.target_new)
                if others:
                    outs = greedy_continuations(
                        adapter.model, other_prompts, OTHERS_NEW_TOKENS, pad_id, tokenizer.eos_token_id
                    )
                    kept += sum(
                        generated_exact_match(tokenizer, o, answer) for o, (_, answer) in zip(outs, others)
                    ) / len(others)
        n = max(len(requests), 1)
        rows.append(
            {
                "fact_token": fact_token,
                "layers": list(layers),
                "lambda": lam,
                "clamp": clamp,
                "edits": len(requests),
                "target_reached": reached / n,
                "efficacy_logp": prefers / n,
                "efficacy_generated": generated / n,
                "others_kept": kept / n if others else None,
            }
        )
    return rows
