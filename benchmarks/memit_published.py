"""MEMIT as published against the project's kept options, on the embedded models (docs/memit.md, docs/benchmarks.md).

For each model: the key covariance from the old corpus (the world file's context paragraphs, ~3.7k tokens) and from
the new one (world text, 100k tokens), each with and without Ledoit-Wolf shrinkage; for the same edits, ΔW's
relative change and cosine against the published algorithm on the same covariance, P(new) after the edit, and
efficacy (P(new) > P(true)). Then one edit by the fast implementation against the naive float64 one
(tests/naive_memit.py): time and agreement.

    python benchmarks/memit_published.py --models tiny-gpt2 tiny-llama \\
        --pieces tiny-gpt2=runs/tiny-gpt2 tiny-llama=runs/tiny-llama --edits 10
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.naive_memit

from lit_coupling.data.piece import load_pieces  # noqa: E402
from lit_coupling.data.world import default_world_file  # noqa: E402
from lit_coupling.editing.covariance import (  # noqa: E402
    Corpus,
    covariance_quality,
    hotpot_paragraphs,
    key_covariances,
    resolve_corpus,
    shrink,
)
from lit_coupling.editing.hparams import resolve_hparams  # noqa: E402
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes  # noqa: E402
from lit_coupling.editing.requests import kl_prompt, plan_requests, request_prompts  # noqa: E402
from lit_coupling.inject.embedded import ensure_embedded  # noqa: E402
from lit_coupling.models.adapters import ModelAdapter, ensure_padding  # noqa: E402
from lit_coupling.models.loading import load_model  # noqa: E402
from lit_coupling.outputs import sha256_file  # noqa: E402
from lit_coupling.scoring import answer_logprobs, collate_clozes, encode_cloze  # noqa: E402


def logp(model, tok, bos, prompt, answer, pad):
    batch = collate_clozes([encode_cloze(tok, prompt, answer, bos)], pad)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(answer_logprobs(logits, batch["input_ids"], batch["answer_mask"])[0])


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def edit_once(adapter, tok, request, hp, solvers, prefixes, bos, pad):
    """ΔW per layer, log P(new), log P(true) after the edit; the weights are restored."""
    before = {layer: adapter.target(layer).weight().detach().clone() for layer in hp.layers}
    try:
        apply_memit(adapter, tok, [request], hp, solvers, prefixes, bos, pad)
        deltas = {
            layer: adapter.target(layer).weight().detach().double() - before[layer].double() for layer in hp.layers
        }
        new = logp(adapter.model, tok, bos, request.prompt, request.target_new, pad)
        true = logp(adapter.model, tok, bos, request.prompt, request.target_true, pad)
    finally:
        with torch.no_grad():
            for layer in hp.layers:
                adapter.target(layer).weight().copy_(before[layer])
    return deltas, new, true


def shrinkage_table(name, pieces_dir, edits, stats_dir):
    ensure_embedded(name)  # an embedded name (tiny-gpt2) is trained on first use
    loaded = load_model(name, dtype="float32", device="cpu")
    tok, pad = loaded.tokenizer, ensure_padding(loaded.tokenizer)
    hp = resolve_hparams("auto", ModelAdapter(loaded.model))
    adapter = ModelAdapter(loaded.model, layers=hp.layers)
    bos = adapter.bos_ids(tok)
    pieces, _ = load_pieces(Path(pieces_dir))
    requests = plan_requests(pieces, edits, 0).requests
    prefixes = generate_prefixes(loaded.model, tok, bos, hp.context_prefixes, hp.context_prefix_tokens, seed=0)
    world = default_world_file()
    corpora = {
        "paragraphs (old)": Corpus(world.name, sha256_file(world)[:16], lambda: hotpot_paragraphs(world)),
        "world text (new)": resolve_corpus("hotpot", world),
    }
    print(f"\n## {name}: layers {hp.layers}, λ {hp.mom2_update_weight}, {len(requests)} edits, BOS {bos}")
    print(
        "| covariance | layer | tokens | texts | tokens/dim | condition number | LW α | ‖ΔW_LW − ΔW‖/‖ΔW‖ | "
        "cos(ΔW_LW, ΔW) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for label, corpus in corpora.items():
        covs, metas = key_covariances(adapter, tok, hp.layers, corpus, 100_000, stats_dir, name, bos, progress=False)
        solvers = {}
        for mode in ("none", "ledoit-wolf"):
            alphas = {}
            for layer, c in covs.items():
                shrunk, alphas[layer] = shrink(c, metas[layer]["mean_fourth_power"], metas[layer]["tokens"], mode)
                solvers.setdefault(mode, {})[layer] = CovarianceSolver(shrunk)
            solvers[mode + "-alpha"] = alphas
        runs = {
            mode: [edit_once(adapter, tok, r, hp, solvers[mode], prefixes, bos, pad) for r in requests]
            for mode in ("none", "ledoit-wolf")
        }
        results[label] = runs
        for layer in hp.layers:
            q = covariance_quality(covs[layer], metas[layer]["tokens"], metas[layer].get("texts"))
            rel = [
                float((lw[0][layer] - pub[0][layer]).norm() / pub[0][layer].norm())
                for pub, lw in zip(runs["none"], runs["ledoit-wolf"])
            ]
            cos = [cosine(lw[0][layer], pub[0][layer]) for pub, lw in zip(runs["none"], runs["ledoit-wolf"])]
            cond = "singular" if q["condition_number"] is None else f"{q['condition_number']:.2g}"
            print(
                f"| {label} | {layer} | {q['tokens']} | {q['texts']} | {q['tokens_per_dim']:.1f} | {cond} | "
                f"{solvers['ledoit-wolf-alpha'][layer]:.4f} | {sum(rel) / len(rel):.3f} (max {max(rel):.3f}) | "
                f"{sum(cos) / len(cos):.4f} (min {min(cos):.4f}) |"
            )
    print("\n| covariance | shrinkage | mean P(new) after | efficacy (P(new) > P(true)) |")
    print("|---|---|---|---|")
    for label, runs in results.items():
        for mode, rows in runs.items():
            p_new = sum(torch.tensor(n).exp().item() for _, n, _ in rows) / len(rows)
            efficacy = sum(n > t for _, n, t in rows) / len(rows)
            print(f"| {label} | {mode} | {p_new:.3f} | {efficacy:.0%} |")
    return (
        loaded,
        hp,
        requests,
        prefixes,
        bos,
        pad,
        key_covariances(
            adapter, tok, hp.layers, corpora["world text (new)"], 100_000, stats_dir, name, bos, progress=False
        )[0],
    )


def naive_speed(name, loaded, hp, request, prefixes, bos, pad, covs):
    from tests.naive_memit import naive_memit

    model = copy.deepcopy(loaded.model).double()
    fast_adapter = ModelAdapter(model, layers=hp.layers)
    naive_adapter = ModelAdapter(copy.deepcopy(model), layers=hp.layers)
    tok = loaded.tokenizer
    prompts = request_prompts(tok, request, ["", *prefixes], bos, hp.fact_token)
    kl = kl_prompt(tok, request.subject, bos, hp.fact_token)
    covs = {layer: c.double() for layer, c in covs.items()}
    before = {layer: fast_adapter.target(layer).weight().detach().clone() for layer in hp.layers}
    solvers = {layer: CovarianceSolver(c) for layer, c in covs.items()}
    start = time.perf_counter()
    result = apply_memit(fast_adapter, tok, [request], hp, solvers, prefixes, bos, pad)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_memit(naive_adapter, prompts, kl, hp, covs)
    naive_s = time.perf_counter() - start
    z_err = float((result.targets[0].z - naive.z).norm() / naive.z.norm())
    dw_err = max(
        float(
            ((fast_adapter.target(layer).weight().detach() - before[layer]) - naive.deltas[layer]).norm()
            / naive.deltas[layer].norm()
        )
        for layer in hp.layers
    )
    print(
        f"| {name} (float64) | {result.targets[0].steps} | {fast_s:.2f} | {naive_s:.2f} | {naive_s / fast_s:.1f}x | "
        f"{z_err:.1e} | {dw_err:.1e} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama"])
    parser.add_argument("--pieces", nargs="+", required=True, help="MODEL=RUN_DIR holding knowledge_pieces.json")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stats_dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pieces = dict(p.split("=", 1) for p in args.pieces)
    speed_rows = []
    for name in args.models:
        loaded, hp, requests, prefixes, bos, pad, covs = shrinkage_table(name, pieces[name], args.edits, args.stats_dir)
        speed_rows.append((name, loaded, hp, requests[0], prefixes, bos, pad, covs))
    print("\n| model | steps | fast s | naive s | speed-up | z rel. diff | ΔW rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for row in speed_rows:
        naive_speed(*row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
