"""MEMIT cost and edit-layer choice. Prints tables; `--json FILE` keeps the numbers.

Time per edit (key statistics cached, one thread by default) and key-statistics time per million tokens:

    python benchmarks/memit.py --models tiny-gpt2 tiny-llama gpt2-small-shaped

Edit layers and fact token by measurement (causal tracing around the subject + real edits per fact token, layer
set, λ and clamp; "others kept" checks that other facts survive each edit):

    python benchmarks/memit.py --layer-sweep --models tiny-gpt2 --pieces runs/tiny-gpt2 \\
        --layer-sets 0 1 2 0,1 1,2 --lambdas 200 1600 --clamps 0.75 4 \\
        --fact-tokens subject_last subject_first_after_last --edits 20

`gpt2-small-shaped` is a randomly initialised GPT-2 small (12 × 768, 50257 tokens): timing only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.covariance import Corpus, key_covariances, resolve_corpus, shrink
from lit_coupling.editing.hparams import resolve_hparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.editing.requests import FACT_TOKENS, SOURCE_KINDS, EditRequest, plan_requests
from lit_coupling.editing.ripple import build_probes
from lit_coupling.editing.snapshot import restored_after
from lit_coupling.editing.tracing import OTHERS_NEW_TOKENS, causal_trace, edit_sweep
from lit_coupling.inject.embedded import ensure_embedded
from lit_coupling.models.adapters import ModelAdapter, ensure_padding
from lit_coupling.models.loading import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
HOTPOT_SAMPLE = SHARED / "data" / "hotpotqa" / "hotpot_dev_distractor_v1.sample40.json"

# CounterFact-style requests for models without pieces (timing only: the answers need not be known).
REQUESTS = [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French", "English"),
    (
        "Edwin of Northumbria's religious values strongly emphasize",
        "Edwin of Northumbria",
        "Christianity",
        "Islam",
    ),
    ("Toko Yasuda, the", "Toko Yasuda", "guitar", "piano"),
    (
        "Autonomous University of Madrid, which is located in",
        "Autonomous University of Madrid",
        "Spain",
        "Sweden",
    ),
    ("Thomas Joannes Stieltjes was born in", "Thomas Joannes Stieltjes", "Dutch", "Italian"),
    ("The headquarter of Google is in", "Google", "California", "Tokyo"),
]


def gpt2_small_shaped():
    """A random GPT-2 small with the real GPT-2 tokenizer when ../shared has it (a local BPE otherwise)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer_file = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    else:
        from lit_coupling.inject.tokenizer import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer([r[0] + " " + r[2] for r in REQUESTS] * 10, vocab_size=400)
    ensure_padding(tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=max(50257, len(tokenizer)), n_layer=12, n_embd=768, n_head=12)
    return GPT2LMHeadModel(config).eval(), tokenizer


def load(name: str):
    if name == "gpt2-small-shaped":
        return gpt2_small_shaped()
    ensure_embedded(name)  # an embedded name (tiny-gpt2) is trained on first use
    loaded = load_model(name, dtype="float32", device="cpu")
    return loaded.model, loaded.tokenizer


def corpus_for(pieces_dir: str | None) -> Corpus:
    if pieces_dir:
        _, meta = load_pieces(Path(pieces_dir))
        return resolve_corpus("hotpot", meta.get("source", {}).get("path"))
    if HOTPOT_SAMPLE.exists():
        return resolve_corpus(str(HOTPOT_SAMPLE))
    texts = [r[0] + " " + r[2] + "." for r in REQUESTS] * 200
    return Corpus("requests", "requests", lambda: iter(texts))


def requests_for(pieces_dir: str | None, tokenizer, bos, n: int, seed: int):
    """(requests, probes): from a run's pieces when given, else the CounterFact-style list."""
    if pieces_dir:
        pieces, _ = load_pieces(Path(pieces_dir))
        plan = plan_requests(pieces, n, seed)
        probes = []
        for r in plan.requests:
            p = build_probes(tokenizer, r, pieces, bos)
            probes.append((p.items[0][0], p.items[0][1], p.items[1][1]))
        return plan.requests, probes
    from lit_coupling.scoring import encode_cloze

    requests, probes = [], []
    for i, (prompt, subject, true, new) in enumerate((REQUESTS * (n // len(REQUESTS) + 1))[:n]):
        requests.append(EditRequest(i, i, str(i), prompt, subject, true, new))
        p_ids, t_ids = encode_cloze(tokenizer, prompt, true, bos)
        probes.append((p_ids, t_ids, encode_cloze(tokenizer, prompt, new, bos)[1]))
    return requests, probes


def prepare(model, tokenizer, layers, corpus: Corpus, tokens: int, stats_dir: Path, name: str):
    adapter = ModelAdapter(model, layers=layers)
    bos = adapter.bos_ids(tokenizer)
    start = time.perf_counter()
    covs, metas = key_covariances(
        adapter, tokenizer, adapter.layers, corpus, tokens, stats_dir, name, bos, progress=False
    )
    seconds = time.perf_counter() - start
    return adapter, bos, covs, metas, seconds


def bench(name: str, args) -> dict:
    model, tokenizer = load(name)
    adapter0 = ModelAdapter(model)
    hp = resolve_hparams(args.hparams, adapter0, args.layers)
    corpus = resolve_corpus(args.cov_corpus) if args.cov_corpus else corpus_for(args.pieces)
    with tempfile.TemporaryDirectory() as fresh:  # a cold cache: what computing the statistics costs
        adapter, bos, covs, metas, cov_s = prepare(
            model, tokenizer, hp.layers, corpus, args.cov_tokens, Path(fresh), name
        )
    tokens = next(iter(metas.values()))["tokens"]
    solvers = {
        layer: CovarianceSolver(
            shrink(c, metas[layer]["mean_fourth_power"], metas[layer]["tokens"], hp.mom2_shrinkage)[0]
        )
        for layer, c in covs.items()
    }
    prefixes = generate_prefixes(model, tokenizer, bos, hp.context_prefixes, hp.context_prefix_tokens, args.seed)
    requests, _ = requests_for(args.pieces, tokenizer, bos, args.edits + 1, args.seed)
    pad = tokenizer.pad_token_id
    times, target_s, steps = [], [], []
    for i, request in enumerate(requests):
        with restored_after({layer: adapter.target(layer).module.weight for layer in hp.layers}):
            start = time.perf_counter()
            result = apply_memit(adapter, tokenizer, [request], hp, solvers, prefixes, bos, pad)
            elapsed = time.perf_counter() - start
        if i == 0:
            continue  # warm-up (allocator, first Cholesky factorisation)
        times.append(elapsed)
        target_s.append(result.time_targets_s)
        steps.append(result.targets[0].steps)
    key_dim = adapter.target(hp.layers[0]).shape[1]
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "layers": hp.layers,
        "key_dim": key_dim,
        "edits": len(times),
        "s_per_edit": sum(times) / len(times),
        "target_share": sum(target_s) / sum(times),
        "mean_steps": sum(steps) / len(steps),
        "cov_tokens": tokens,
        "cov_s": cov_s,
        "cov_s_per_Mtok": cov_s / tokens * 1e6,
        "threads": torch.get_num_threads(),
    }


def known_others(model, tokenizer, pieces, exclude: set[int], n: int, seed: int) -> list[tuple[list[int], str]]:
    """Up to `n` single-hop pieces (seeded sample, none of them edited) that the model generates before any edit."""
    import random

    from lit_coupling.scoring import generated_exact_match, greedy_continuations

    candidates = [i for i, p in enumerate(pieces) if p.kind in SOURCE_KINDS and i not in exclude]
    random.Random(seed).shuffle(candidates)
    chosen = [pieces[i] for i in candidates[: 2 * n]]
    if not chosen:
        return []
    outs = greedy_continuations(
        model, [p.prompt_ids for p in chosen], OTHERS_NEW_TOKENS, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    known = [
        (list(p.prompt_ids), p.answer) for p, o in zip(chosen, outs) if generated_exact_match(tokenizer, o, p.answer)
    ]
    return known[:n]


def layer_sweep(name: str, args) -> dict:
    model, tokenizer = load(name)
    adapter = ModelAdapter(model)
    hp = resolve_hparams(args.hparams, adapter, None)
    bos = adapter.bos_ids(tokenizer)
    pad = tokenizer.pad_token_id
    pieces, _ = load_pieces(Path(args.pieces))
    singles = [p for p in pieces if p.kind in SOURCE_KINDS][: args.trace_pieces]
    start = time.perf_counter()
    trace = causal_trace(adapter, tokenizer, singles, bos, pad, seed=args.seed)
    trace_s = time.perf_counter() - start
    print(
        f"\n{name}: causal tracing over {trace['pieces']} pieces ({trace_s:.0f}s); "
        f"P(answer) clean {trace['p_clean']}, corrupted {trace['p_corrupt']}"
    )
    print("       subject's last token      token after the subject   for contrast: block output at")
    print("layer  block output  MLP output  block output  MLP output  subject's first token  last prompt token")
    columns = (
        "block",
        "mlp",
        "block_after_subject",
        "mlp_after_subject",
        "block_subject_first",
        "block_prompt_last",
    )
    for layer, row in enumerate(zip(*(trace[c] for c in columns))):
        print(
            f"{layer:5d}  {row[0]:12.3f}  {row[1]:10.3f}  {row[2]:12.3f}  {row[3]:10.3f}"
            f"  {row[4]:21.3f}  {row[5]:17.3f}"
        )
    layer_sets = (
        [[int(x) for x in s.split(",")] for s in args.layer_sets]
        if args.layer_sets
        else [[layer] for layer in range(adapter.num_layers)]
    )
    wanted = sorted({layer for s in layer_sets for layer in s})
    stats_dir = Path(args.stats_dir) if args.stats_dir else None
    corpus = corpus_for(args.pieces)
    covs, metas = key_covariances(
        adapter, tokenizer, wanted, corpus, args.cov_tokens, stats_dir, name, bos, progress=False
    )
    covs = {
        layer: shrink(c, metas[layer]["mean_fourth_power"], metas[layer]["tokens"], hp.mom2_shrinkage)[0]
        for layer, c in covs.items()
    }
    prefixes = generate_prefixes(model, tokenizer, bos, hp.context_prefixes, hp.context_prefix_tokens, args.seed)
    requests, probes = requests_for(args.pieces, tokenizer, bos, args.edits, args.seed)
    others = known_others(model, tokenizer, pieces, {r.source_index for r in requests}, args.others, args.seed)
    lambdas = args.lambdas or [hp.mom2_update_weight]
    rows = edit_sweep(
        adapter,
        tokenizer,
        requests,
        probes,
        hp,
        layer_sets,
        lambdas,
        covs,
        prefixes,
        bos,
        pad,
        args.clamps or [],
        args.fact_tokens or [],
        others,
    )
    print(
        f"\n{name}: {len(requests)} edits per setting (hyperparameters: {hp.source}); others kept: of "
        f"{len(others)} other single-hop facts the model generated before, the share still generated after an edit"
    )
    print(
        "fact token                layers      λ        clamp  target reached  P(new)>P(true)  generated  others kept"
    )
    for r in rows:
        layers = ",".join(map(str, r["layers"]))
        kept = "" if r["others_kept"] is None else f"{r['others_kept']:11.1%}"
        print(
            f"{r['fact_token']:24s}  {layers:10s}  {r['lambda']:<8g} {r['clamp']:<6g} {r['target_reached']:14.0%}  "
            f"{r['efficacy_logp']:14.0%}  {r['efficacy_generated']:9.0%}  {kept}"
        )
    return {"model": name, "trace": trace, "sweep": rows, "hparams": hp.to_dict(), "edits": len(requests)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama", "gpt2-small-shaped"])
    parser.add_argument("--pieces", help="run directory with knowledge_pieces.json (requests and corpus from it)")
    parser.add_argument("--hparams", default="auto", help="MEMIT hyperparameter YAML, or auto")
    parser.add_argument("--layers", help="edit layers for the timing (default: from the hyperparameters)")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--cov-tokens", type=int, default=20_000)
    parser.add_argument(
        "--cov-corpus",
        help="key-statistics corpus for the timing (default: the pieces' HotpotQA "
        "file, else ../shared's HotpotQA sample)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-sweep", action="store_true", help="measure edit layers instead of timing")
    parser.add_argument("--layer-sets", nargs="*", help="e.g. 0 1 0,1 (default: each layer alone)")
    parser.add_argument("--lambdas", nargs="*", type=float, help="λ values to sweep (default: the hparams' λ)")
    parser.add_argument("--clamps", nargs="*", type=float, help="clamp_norm_factor values to sweep")
    parser.add_argument(
        "--fact-tokens",
        nargs="*",
        choices=FACT_TOKENS,
        help="fact-token strategies to sweep (default: the hparams' fact_token)",
    )
    parser.add_argument("--trace-pieces", type=int, default=40)
    parser.add_argument(
        "--others", type=int, default=40, help="other known facts checked after each sweep edit (0: none)"
    )
    parser.add_argument("--stats-dir", help="key-statistics cache for the sweep (default: the usual cache)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    if args.layer_sweep:
        if not args.pieces:
            parser.error("--layer-sweep needs --pieces RUN_DIR (pieces the model knows)")
        results = [layer_sweep(name, args) for name in args.models]
    else:
        print("model               params(M)  layers      key dim  s/edit  z share  steps  cov s/Mtok")
        for name in args.models:
            r = bench(name, args)
            results.append(r)
            layers = ",".join(map(str, r["layers"]))
            print(
                f"{r['model']:18s}  {r['params_M']:9.2f}  {layers:10s}  {r['key_dim']:7d}"
                f"  {r['s_per_edit']:6.3f}  {r['target_share']:7.0%}  {r['mean_steps']:5.1f}"
                f"  {r['cov_s_per_Mtok']:10.1f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
