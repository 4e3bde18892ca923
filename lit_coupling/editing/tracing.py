"""Choosing edit layers (and the fact token) by measurement: causal tracing around the subject, and an efficacy sweep.

`causal_trace` (Meng et al. 2022): corrupt the subject's token embeddings with noise, restore one layer's clean state
at one position — the subject's last token, the token after the subject, and for contrast the subject's first and the
prompt's last token — and see how much of P(answer) comes back, per layer, for the block output and for the MLP output
alone. `edit_sweep` runs real MEMIT edits for each (fact token, layer set, λ, clamp) and counts those that take (and,
given other known facts, how many of those survive each edit).

`trace_band` picks MEMIT's edit layers for a model without a published set (`--memit.layers traced`): the MLP trace
alone (`mlp_indirect_effects`, every layer's restoration of one fact in one batched forward), at the fact token MEMIT
writes to, over facts the model knows; the band is the window of consecutive layers, as wide as the hyperparameters'
set, with the highest mean indirect effect (`best_band`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.memit import CovarianceSolver, PromptBatch, _hidden, apply_memit
from lit_coupling.editing.requests import EditRequest, subject_span, tokenize_with_subject
from lit_coupling.editing.snapshot import restored_after
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.hooks import Hooks
from lit_coupling.progress import Progress
from lit_coupling.scoring import (
    answer_logprobs,
    collate_clozes,
    generated_exact_match,
    greedy_continuations,
    score_batch,
    window_logits,
)

# Tokens generated to judge whether the model still produces an unrelated fact ("known" before, "kept" after).
OTHERS_NEW_TOKENS = 8

# `--memit.layers traced`: facts traced (known ones, none of them edited), noise draws per fact, and the fewest facts
# the corruption must hurt for the trace to decide (fewer: the scaled band stays, and the record says why).
TRACE_FACTS = 16
TRACE_SAMPLES = 5
TRACE_MIN_FACTS = 3


@dataclass(frozen=True)
class TraceFact:
    """A fact to trace: the prompt holds the subject, the answer follows it."""

    id: str
    prompt: str
    subject: str
    answer: str


def _answer_probability(model, items, pad_id: int) -> torch.Tensor:
    """P(whole answer | prompt) per row, the LM head run only where the answer is read (`window_logits`)."""
    logits, ids, mask, _ = window_logits(model, collate_clozes(items, pad_id))
    return answer_logprobs(logits, ids, mask).exp()


@torch.no_grad()
def mlp_indirect_effects(
    adapter: ModelAdapter,
    tokenizer,
    facts: Sequence[TraceFact],
    bos_ids: Sequence[int],
    pad_id: int,
    fact_token: str = "subject_last",
    noise: float = 3.0,
    samples: int = TRACE_SAMPLES,
    seed: int = 0,
    max_rows: int = 64,
    progress: bool = False,
) -> dict:
    """Indirect effect of each layer's MLP output at the fact token, per fact and averaged (Meng et al. 2022).

    Each fact runs clean once (keeping every layer's MLP output at the fact token), then with noise of `noise` ×
    the embeddings' standard deviation added to the subject's token embeddings (`samples` draws): P(answer) falls
    from p_clean to p_corrupt. Restoring layer l's clean MLP output at the fact token in the corrupted run brings
    back IE_l = P_l − p_corrupt. The rows of many layers share one forward (each layer restores only its own rows:
    the same numbers as one forward per layer, fewer calls). Facts the corruption does not hurt (p_clean ≤
    p_corrupt) say nothing about where the fact is recalled and are left out, as in `causal_trace`, whose "mlp"
    row these effects equal for fact_token subject_last and the same seed.

    Returns {"effects": [L] (mean over the facts used), "per_fact": {id: [L]}, "facts": n used, "p_clean",
    "p_corrupt" (means), "left_out": {reason: count}, and the settings}.
    """
    model = adapter.model
    embed = adapter.embedding
    sigma = noise * embed.weight.float().std().item()
    generator = torch.Generator().manual_seed(seed)
    n_layers = adapter.num_layers
    mlps = [adapter.target(layer).module for layer in range(n_layers)]
    chunk = max(1, max_rows // samples)  # layers per forward
    per_fact: dict[str, list[float]] = {}
    p_clean_sum = p_corrupt_sum = 0.0
    left_out = {"subject not in the prompt": 0, "corruption does not lower P(answer)": 0}
    bar = Progress(len(facts), "causal trace of the MLP", progress, "fact")
    for i, fact in enumerate(facts):
        bar.update(1 if i else 0)  # counts the facts done
        span = subject_span(fact.prompt, fact.subject)
        if span is None:
            left_out["subject not in the prompt"] += 1
            continue
        tp = tokenize_with_subject(tokenizer, fact.prompt, span[1], fact.answer, bos_ids, span[0], fact_token)
        item = (tp.prompt_ids, tp.answer_ids)
        subject = torch.arange(tp.subject_first, tp.subject_index + 1)
        position = tp.fact_index
        draws = torch.randn(samples, len(subject), embed.weight.shape[1], generator=generator) * sigma
        clean: dict[int, torch.Tensor] = {}

        def keep(layer):
            def hook(_module, _args, output):
                clean[layer] = output[0, position].clone()

            return hook

        with Hooks(forward=[(mlp, keep(layer)) for layer, mlp in enumerate(mlps)]):
            p_clean = _answer_probability(model, [item], pad_id)[0].item()

        def corrupted(layers: Sequence[int | None]) -> torch.Tensor:
            """(len(layers), samples) P(answer): a group of `samples` noisy rows per entry, each restoring that
            layer's clean MLP output at the fact token (None: nothing restored)."""

            def corrupt(_module, _args, output):
                out = output.clone()
                out[:, subject] += draws.repeat(len(layers), 1, 1).to(out)
                return out

            def restore(group: int, layer: int):
                def hook(_module, _args, output):
                    out = output.clone()
                    out[group * samples : (group + 1) * samples, position] = clean[layer].to(out)
                    return out

                return hook

            patches = [(mlps[layer], restore(g, layer)) for g, layer in enumerate(layers) if layer is not None]
            with Hooks(forward=[(embed, corrupt), *patches]):
                p = _answer_probability(model, [item] * (len(layers) * samples), pad_id)
            return p.view(len(layers), samples)

        p_corrupt = corrupted([None]).mean().item()
        if p_clean <= p_corrupt:
            left_out["corruption does not lower P(answer)"] += 1
            continue
        effects = []
        for start in range(0, n_layers, chunk):
            layers = list(range(start, min(start + chunk, n_layers)))
            effects += (corrupted(layers).mean(1) - p_corrupt).tolist()
        per_fact[fact.id] = effects
        p_clean_sum += p_clean
        p_corrupt_sum += p_corrupt
    bar.update(1 if facts else 0)
    bar.close()
    used = len(per_fact)
    mean = torch.tensor(list(per_fact.values()), dtype=torch.float64).mean(0).tolist() if used else []
    return {
        "effects": mean,
        "per_fact": per_fact,
        "facts": used,
        "left_out": left_out,
        "p_clean": p_clean_sum / used if used else None,
        "p_corrupt": p_corrupt_sum / used if used else None,
        "position": fact_token,
        "noise": noise,
        "samples": samples,
        "seed": seed,
    }


def best_band(effects: Sequence[float], width: int) -> tuple[list[int], list[float]]:
    """The window of `width` consecutive layers with the highest mean effect (the lowest such window on a tie), and
    every window's mean, by first layer."""
    width = max(1, min(width, len(effects)))
    values = torch.tensor(list(effects), dtype=torch.float64)
    means = values.unfold(0, width, 1).mean(1)
    start = int(torch.argmax(means))  # the first maximum
    return list(range(start, start + width)), means.tolist()


def trace_band(
    adapter: ModelAdapter,
    tokenizer,
    facts: Sequence[TraceFact],
    bos_ids: Sequence[int],
    pad_id: int,
    width: int,
    scaled: Sequence[int],
    fact_token: str = "subject_last",
    seed: int = 0,
    samples: int = TRACE_SAMPLES,
    progress: bool = False,
) -> dict:
    """MEMIT's edit band by causal tracing of the MLP over `facts`, and the record of why (ripple_experiments.json
    `layer_choice`). `scaled`: the band the hyperparameters give, kept when fewer than TRACE_MIN_FACTS facts are
    hurt by the corruption ("layers" is then None)."""
    start = time.perf_counter()
    trace = mlp_indirect_effects(
        adapter, tokenizer, facts, bos_ids, pad_id, fact_token, samples=samples, seed=seed, progress=progress
    )
    record = {
        "method": "causal tracing of the MLP (Meng et al. 2022): noise on the subject's token embeddings, each "
        "layer's clean MLP output restored at the fact token; the band is the window of consecutive "
        "layers, as wide as the hyperparameters' set, with the highest mean indirect effect",
        "width": width,
        "scaled_layers": list(scaled),
        "facts_traced": [f.id for f in facts],
        **{k: trace[k] for k in ("facts", "left_out", "p_clean", "p_corrupt", "position", "noise", "samples", "seed")},
        "indirect_effect": trace["effects"],
    }
    if trace["facts"] < TRACE_MIN_FACTS:
        record.update(
            layers=None,
            reason=f"only {trace['facts']} traced fact(s) lost P(answer) under the noise "
            f"(at least {TRACE_MIN_FACTS} needed): the scaled band is kept",
        )
    else:
        band, means = best_band(trace["effects"], width)
        effects = trace["effects"]
        record.update(
            layers=band,
            window_means=means,
            band_effect=means[band[0]],
            scaled_effect=sum(effects[layer] for layer in scaled) / len(scaled) if scaled else None,
            reason=f"layers {band[0]}-{band[-1]}: mean MLP indirect effect {means[band[0]]:.4f} over "
            f"{trace['facts']} facts (P(answer) {trace['p_clean']:.3f} clean, {trace['p_corrupt']:.3f} "
            "corrupted)",
        )
    record["time_s"] = round(time.perf_counter() - start, 2)
    return record


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
        noise_tensor = torch.randn(samples, len(subject_positions), embed.weight.shape[1], generator=generator) * sigma

        def run(
            patch: tuple[torch.nn.Module, int] | None = None,
            batch=batch,
            positions=subject_positions,
            noise_tensor=noise_tensor,
        ) -> torch.Tensor:
            """P(answer) per row; rows 1.. have noisy subject embeddings; `patch` = (module, position) restores
            that module's clean output at that position."""

            def corrupt(_module, _args, output):  # row 0 stays clean
                out = output.clone()
                out[1:, positions] += noise_tensor.to(out)
                return out

            def restore(_module, _args, output):
                hidden = _hidden(output).clone()
                hidden[1:, patch[1]] = hidden[0, patch[1]]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            hooks = [(embed, corrupt)] + ([(patch[0], restore)] if patch is not None else [])
            with Hooks(forward=hooks):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
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
    """Edit each request alone under every (fact token, layer set, λ, clamp), restoring the weights after each; a row
    each.

    `probes[i]` = (prompt ids, true answer ids, new answer ids) of request i. A row gives the fraction of edits whose
    target vector reached the new answer (NLL < 0.5), that made the new answer likelier than the true one (logp),
    and that made the model generate it (generated). Given `others` (prompt ids, answer) of facts the model
    generates before any edit, a row also gives the fraction of them it still generates after an edit, averaged
    over edits (others_kept: a coarse specificity check; the ripple stage measures it properly).
    """
    solvers = {layer: CovarianceSolver(c) for layer, c in covariances.items()}
    other_prompts = [prompt for prompt, _ in others or []]
    rows = []
    settings = itertools.product(fact_tokens or [hp.fact_token], layer_sets, lambdas, clamps or [hp.clamp_norm_factor])
    for fact_token, layers, lam, clamp in settings:
        setting = replace(
            hp, layers=list(layers), mom2_update_weight=lam, clamp_norm_factor=clamp, fact_token=fact_token
        )
        reached = prefers = generated = kept = 0
        for request, (p_ids, true_ids, new_ids) in zip(requests, probes):
            with restored_after({layer: adapter.target(layer).module.weight for layer in layers}):
                result = apply_memit(adapter, tokenizer, [request], setting, solvers, prefixes, bos_ids, pad_id)
                reached += result.targets[0].nll < 0.5
                logp = score_batch(adapter.model, collate_clozes([(p_ids, new_ids), (p_ids, true_ids)], pad_id))["logp"]
                prefers += bool(logp[0] > logp[1])
                out = greedy_continuations(adapter.model, [p_ids], len(new_ids) + 2, pad_id, tokenizer.eos_token_id)[0]
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
