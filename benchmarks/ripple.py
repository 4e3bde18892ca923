"""The ripple stage's re-scoring of every piece after an edit: before and after batching the greedy match.

    python benchmarks/ripple.py --model /tmp/smollm2-hf --pieces RUN_DIR [--repeat 2] [--threads 2] [--edit]

RUN_DIR holds a knowledge_pieces.json tokenised for the model (`lit-coupling run --stages pieces ...`). Three
ways of scoring the same pieces (logP, teacher-forced EM and greedy answer match), timed in one process:

- full: the previous implementation: the whole B×T×V logits, then HF greedy decoding of every piece to its
  batch's longest answer + 2 tokens;
- window: logits only where the answer is scored (`logits_to_keep`), greedy decoding of every piece;
- now: window logits, and greedy decoding only of the pieces the teacher-forced pass cannot settle
  (`ripple.greedy_decision`), the ripple stage's scoring.

It checks that the three agree (logP to 1e-4, EM and greedy match exactly) and prints seconds per re-scoring
(one edit's "after" pass) and per 100 pieces. The machine may be shared: run the cases in one process (they are)
and say so with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.ripple import EXTRA_GENERATED_TOKENS, PieceScores, checked_drafts, score_pieces
from lit_coupling.errors import UserError
from lit_coupling.inject.embedded import ensure_embedded
from lit_coupling.models.loading import load_model
from lit_coupling.scoring import (
    answer_token_logprobs,
    collate_clozes,
    forward_logits,
    generated_exact_match,
    greedy_continuations,
    score_batch,
)


@torch.no_grad()
def previous_scoring(model, tokenizer, pieces, batch_size: int, pad_id: int, window: bool) -> PieceScores:
    """The scoring before this change: every piece decoded greedily (`window` only trims the LM head)."""
    n = len(pieces)
    order = sorted(range(n), key=lambda i: (len(pieces[i].prompt_ids), len(pieces[i].answer_ids)))
    logp, tf_em, gen_em = [0.0] * n, [False] * n, [False] * n
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        chunk = [(pieces[i].prompt_ids, pieces[i].answer_ids) for i in rows]
        batch = collate_clozes(chunk, pad_id)
        if window:
            result = score_batch(model, batch)
            lp, tf = result["logp"].tolist(), result["tf_em"].tolist()
        else:
            logits = forward_logits(model, batch)
            token_logp, hit, r = answer_token_logprobs(logits, batch["input_ids"], batch["answer_mask"])
            lp = torch.zeros(len(rows), dtype=torch.float64).index_add(0, r, token_logp.double()).tolist()
            misses = torch.zeros(len(rows), dtype=torch.long).index_add(0, r, (~hit).long())
            tf = (misses == 0).tolist()
        generated = greedy_continuations(
            model,
            [p for p, _ in chunk],
            max(len(a) for _, a in chunk) + EXTRA_GENERATED_TOKENS,
            pad_id,
            tokenizer.eos_token_id,
        )
        for i, lp_i, t, ids in zip(rows, lp, tf, generated):
            logp[i], tf_em[i] = lp_i, t
            ids = ids[: len(pieces[i].answer_ids) + EXTRA_GENERATED_TOKENS]
            gen_em[i] = generated_exact_match(tokenizer, ids, pieces[i].answer)
    return PieceScores(logp, tf_em, gen_em)


def edit_cases(model, tokenizer, pieces, args, pad, results: dict, scores: dict, cpu_s: dict) -> None:
    """after-full / after-reuse: re-scoring every piece after a synthetic edit of the MEMIT layers, the model run
    whole or from the first edited block (scoring.PrefixReuse); they must agree (logP to 1e-4, EM exactly)."""
    from lit_coupling.editing.hparams import resolve_hparams
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.scoring import prefix_reuse

    adapter = ModelAdapter(model)
    layers = resolve_hparams("auto", adapter).layers
    reuse = prefix_reuse(model, adapter, min(layers))
    start, cpu = time.perf_counter(), time.process_time()
    before = score_pieces(model, tokenizer, pieces, args.batch_size, pad, reuse=reuse)  # keeps the states
    scores["before (keeps states)"] = before
    results["before (keeps states)"] = time.perf_counter() - start
    cpu_s["before (keeps states)"] = time.process_time() - cpu
    drafts = checked_drafts(model, tokenizer, pieces, before, pad)  # on the unedited model, as the ripple stage
    assert drafts is not None, "the drafts could not be checked in the scoring pass on this model"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            weight = adapter.target(layer).weight()
            u = torch.randn(weight.shape[0], 1, generator=generator)
            v = torch.randn(weight.shape[1], 1, generator=generator)
            adapter.target(layer).add_((u @ v.T) * (args.edit_size * weight.norm() / (u.norm() * v.norm())))
    import lit_coupling.editing.ripple as ripple_module

    cut = ripple_module.padded_batches

    def one_batch(lengths, batch_size, overhead=0):  # the previous batching: batch_size rows, padded to the longest
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    for name, kept, batches, given in (
        ("after-full, one padded batch (previous)", None, one_batch, None),
        ("after-full", None, cut, None),
        ("after-reuse", reuse, cut, None),
        # the first repetition keeps the states of the drafts' layout: --repeat 2 or more for the steady state
        ("after-reuse + drafts (the ripple stage)", reuse, cut, drafts),
    ):
        best = float("inf")
        ripple_module.padded_batches = batches
        try:
            for _ in range(args.repeat):
                start, cpu = time.perf_counter(), time.process_time()
                scores[name] = score_pieces(model, tokenizer, pieces, args.batch_size, pad, reuse=kept, drafts=given)
                best = min(best, time.perf_counter() - start)
                cpu_s[name] = time.process_time() - cpu
        finally:
            ripple_module.padded_batches = cut
        results[name] = best
    full, kept = scores["after-full"], scores["after-reuse"]
    previous = scores["after-full, one padded batch (previous)"]
    assert previous.gen_em == full.gen_em and max(abs(a - b) for a, b in zip(previous.logp, full.logp)) < 1e-4
    assert reuse.usable and reuse.reruns > 0, "the re-scoring did not run from the first edited block"
    assert kept.tf_em == full.tf_em and kept.gen_em == full.gen_em, "after-reuse: exact matches differ"
    assert max(abs(a - b) for a, b in zip(kept.logp, full.logp)) < 1e-4, "after-reuse: logP differs"
    drafted = scores["after-reuse + drafts (the ripple stage)"]
    assert drafted.tf_em == full.tf_em and drafted.gen_em == full.gen_em, "drafts: exact matches differ"
    assert max(abs(a - b) for a, b in zip(drafted.logp, full.logp)) < 1e-4, "drafts: logP differs"
    print(f"greedy decoding ran for {full.decoded} pieces without drafts, {drafted.decoded} with them")
    print(
        f"edit layers {layers}: re-scoring from block {min(layers)} of {adapter.num_layers}; the edit changed "
        f"{sum(a != b for a, b in zip(full.gen_em, before.gen_em))} greedy matches"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model path (a local HF directory or an embedded name)")
    parser.add_argument("--pieces", required=True, help="run directory holding knowledge_pieces.json")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions of each case (the best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["full", "window", "now"],
        choices=["full", "window", "now"],
        help="the scorings to time before any edit (none: only --edit's)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--edit",
        action="store_true",
        help="also time re-scoring after an edit: a seeded rank-one change to the MLP output of the "
        "model's MEMIT layers, scored whole (after-full) and from the first edited block with "
        "the states kept from the before-edit pass (after-reuse, what the ripple stage does)",
    )
    parser.add_argument(
        "--edit-size",
        type=float,
        default=0.5,
        help="the rank-one change's norm, as a fraction of each edited weight's (0.05 is a MEMIT edit's order: few "
        "greedy continuations change; 0.5 changes most)",
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeat", "threads", "edit_size"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    try:  # before the model loads: a wrong path is said at once
        pieces, meta = load_pieces(args.pieces)
    except (UserError, OSError) as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    ensure_embedded(args.model)  # an embedded name (tiny-gpt2) is trained on first use
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = meta["tokenizer"]["pad_id"]
    cases = {
        "full": lambda: previous_scoring(model, tokenizer, pieces, args.batch_size, pad, window=False),
        "window": lambda: previous_scoring(model, tokenizer, pieces, args.batch_size, pad, window=True),
        "now": lambda: score_pieces(model, tokenizer, pieces, args.batch_size, pad),
    }
    results, scores, cpu_s = {}, {}, {}
    cases = {name: run for name, run in cases.items() if name in args.cases}
    for name, run in cases.items():
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            scores[name] = run()
            best = min(best, time.perf_counter() - start)
        results[name] = best
    if args.edit:
        edit_cases(model, tokenizer, pieces, args, pad, results, scores, cpu_s)
    first_case = args.cases[0] if args.cases else "before (keeps states)"
    ref = scores.get(first_case) or scores["after-full"]
    for name, s in scores.items():
        if name.startswith("after"):
            continue
        assert s.tf_em == ref.tf_em and s.gen_em == ref.gen_em, f"{name}: exact matches differ"
        assert max(abs(a - b) for a, b in zip(s.logp, ref.logp)) < 1e-4, f"{name}: logP differs"
    n = len(pieces)
    tokens = sum(len(p.prompt_ids) + len(p.answer_ids) for p in pieces)
    print(
        f"model {args.model}, {n} pieces ({tokens} tokens), batch {args.batch_size}, {args.threads} threads, "
        f"best of {args.repeat}; greedy match known {sum(ref.gen_em)}/{n}, teacher-forced {sum(ref.tf_em)}/{n}"
    )
    print(f"| scoring | s per re-scoring ({n} pieces) | s per 100 pieces | vs {first_case} | CPU s (last) |")
    print("|---|---|---|---|---|")
    for name, seconds in results.items():
        first = results[first_case]
        cpu = f"{cpu_s[name]:.2f}" if name in cpu_s else "—"
        print(f"| {name} | {seconds:.2f} | {seconds / n * 100:.2f} | {first / seconds:.1f}× | {cpu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model, "pieces": n, "tokens": tokens, "threads": args.threads, "seconds": results},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
