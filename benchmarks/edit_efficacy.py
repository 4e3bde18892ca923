"""Efficacy of MEMIT edits on facts a real model knows, by the ripple stage's own code, without the ripple.

    python benchmarks/edit_efficacy.py --model smollm2-135m --pieces RUN_DIR --edits 5 \
        [--counterfact FILE --cf-edits 5] [--stats-dir DIR] [--json OUT]

RUN_DIR holds knowledge_pieces.json (`lit-coupling run --stages pieces`); its HotpotQA file gives the covariance
corpus (`--memit.cov_corpus hotpot`, read from --stats-dir's cache when a run computed it). The edits are planned
as the ripple stage plans them (`plan_requests` / `plan_counterfact`: sources the model knows by greedy answer match,
counterfactuals of the source's own type), made by `apply_memit` with the model's hyperparameters (`auto`), measured
on the probes the ripple stage measures (`build_probes`, `score_clozes`): P(new) > P(true) on the edited prompt,
the new answer generated greedily, CounterFact's paraphrase and neighbourhood scores. The weights are restored after
each edit. Use it to check the edit itself when a whole run (GradSim, re-scoring every piece) cannot be afforded.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lit_coupling.data.counterfact import read_counterfact
from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.covariance import key_covariances, resolve_corpus, shrink
from lit_coupling.editing.hparams import resolve_hparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.editing.requests import SOURCE_KINDS, entities_for_source, plan_counterfact, plan_requests
from lit_coupling.editing.ripple import build_probes, counterfact_metrics, score_clozes
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.loading import load_model
from lit_coupling.scoring import encode_cloze


def measure(model, adapter, tok, requests, pieces, hp, solvers, prefixes, bos, pad) -> list[dict]:
    rows = []
    for request in requests:
        probes = build_probes(tok, request, pieces, bos)
        saved = {layer: adapter.target(layer).module.weight.detach().clone() for layer in hp.layers}
        start = time.perf_counter()
        try:
            apply_memit(adapter, tok, [request], hp, solvers, prefixes, bos, pad)
            after, texts = score_clozes(
                model, tok, probes.items, probes.answers, len(probes.items), pad, generate="all"
            )
        finally:
            with torch.no_grad():
                for layer, weight in saved.items():
                    adapter.target(layer).module.weight.copy_(weight)
        metrics = counterfact_metrics(probes, after)
        row = {
            "source": request.source_id,
            "type": request.answer_type,
            "true": request.target_true,
            "new": request.target_new,
            "efficacy": after.logp[1] > after.logp[0],
            "generated": after.gen_em[1],
            "text": texts[1],
            "paraphrase": metrics["paraphrase_score"],
            "neighborhood": metrics["neighborhood_score"],
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def rate(rows, key):
    values = [r[key] for r in rows if r[key] is not None]
    return sum(map(float, values)) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pieces", required=True, help="run directory holding knowledge_pieces.json")
    parser.add_argument("--edits", type=int, default=5, help="edits of HotpotQA pieces the model knows")
    parser.add_argument("--counterfact", help="a CounterFact file: also edit its cases the model knows")
    parser.add_argument("--cf-edits", type=int, default=5)
    parser.add_argument("--stats-dir", help="key statistics cache (a run's --memit.stats_dir)")
    parser.add_argument("--cov-tokens", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every edit's figures here")
    args = parser.parse_args(argv)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    hp = resolve_hparams("auto", ModelAdapter(model))
    adapter = ModelAdapter(model, layers=hp.layers)
    bos = adapter.bos_ids(tok)
    pieces, meta = load_pieces(args.pieces)
    pad = meta["tokenizer"]["pad_id"]
    source = meta.get("source", {}).get("path")
    covs, metas = key_covariances(
        adapter=adapter,
        tokenizer=tok,
        layers=hp.layers,
        corpus=resolve_corpus("hotpot", source),
        tokens=args.cov_tokens,
        stats_dir=args.stats_dir,
        model_name=args.model,
        bos_ids=bos,
    )
    solvers = {
        layer: CovarianceSolver(
            shrink(c, metas[layer]["mean_fourth_power"], metas[layer]["tokens"], hp.mom2_shrinkage)[0]
        )
        for layer, c in covs.items()
    }
    prefixes = generate_prefixes(model, tok, bos, hp.context_prefixes, hp.context_prefix_tokens, seed=args.seed)
    results = {"model": args.model, "hparams": hp.to_dict()}
    # HotpotQA: only the single-fact pieces are sources, so only they are scored (as the ripple stage judges them)
    sources = [i for i, p in enumerate(pieces) if p.kind in SOURCE_KINDS]
    scores, _ = score_clozes(
        model,
        tok,
        [(pieces[i].prompt_ids, pieces[i].answer_ids) for i in sources],
        [pieces[i].answer for i in sources],
        128,
        pad,
    )
    known = [False] * len(pieces)
    for i, flag in zip(sources, scores.gen_em):
        known[i] = flag
    plan = plan_requests(pieces, args.edits, args.seed, known, entities_for_source(source))
    print(
        f"HotpotQA: {sum(known)} of {len(sources)} sources known; {plan.eligible} with a same-type "
        f"counterfactual; {plan.unmatched} unmatched; editing {len(plan.requests)}",
        flush=True,
    )
    rows = measure(model, adapter, tok, plan.requests, pieces, hp, solvers, prefixes, bos, pad)
    results["hotpotqa"] = {
        "sources": len(sources),
        "known": sum(known),
        "eligible": plan.eligible,
        "unmatched": plan.unmatched,
        "edits": rows,
    }
    if args.counterfact:
        cases = read_counterfact(args.counterfact)
        items = [encode_cloze(tok, c.prompt, c.target_true, bos) for c in cases]
        case_scores, _ = score_clozes(model, tok, items, [c.target_true for c in cases], 128, pad)
        cf_plan = plan_counterfact(cases, args.cf_edits, args.seed, case_scores.gen_em)
        print(
            f"CounterFact: {sum(case_scores.gen_em)} of {len(cases)} cases known; {cf_plan.eligible} edit-able "
            f"({cf_plan.unmatched} of another type); editing {len(cf_plan.requests)}",
            flush=True,
        )
        cf_rows = measure(model, adapter, tok, cf_plan.requests, pieces, hp, solvers, prefixes, bos, pad)
        results["counterfact"] = {
            "cases": len(cases),
            "known": sum(case_scores.gen_em),
            "eligible": cf_plan.eligible,
            "unmatched": cf_plan.unmatched,
            "edits": cf_rows,
        }
    for name in ("hotpotqa", "counterfact"):
        if name in results:
            rows = results[name]["edits"]
            print(
                f"{name}: {len(rows)} edits; efficacy {rate(rows, 'efficacy')}, generated {rate(rows, 'generated')}, "
                f"paraphrase {rate(rows, 'paraphrase')}, neighbourhood {rate(rows, 'neighborhood')}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
