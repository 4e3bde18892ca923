"""Cost of forecasting an edit's ripple (#19), printed as a table (`--json FILE` keeps the numbers).

    python benchmarks/forecast.py --model smollm2-135m --pieces runs/smollm2 \\
        --counterfact ../shared/data/counterfact/counterfact-edit.sample200.json --facts 1000 --batch 32

Rows:
- exact forecast of one edit over N stored facts (one forward and two backwards per batch of facts, on the
  unedited model) against making the edit and re-scoring the same facts (a forward per batch, then the restore);
  both need ΔW, timed apart;
- the exact forecast of E edits at once (one pass over the store whatever E) against E re-scorings;
- projected forecast time per edit over `--cached` facts: SYNTHETIC random projected gradients (only the matrix
  product is timed, and it does not depend on the values), per k; and the cache's memory per fact;
- a batch of B requests as one MEMIT edit against B single edits: B singles are extrapolated from `--singles`
  measured ones (each single edit is an independent optimisation of the same cost), said in the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lit_coupling.data.counterfact import read_counterfact
from lit_coupling.editing.forecast import exact_forecast, project_update, projected_change
from lit_coupling.editing.forecast_cli import load_facts, memit_setup
from lit_coupling.editing.memit import apply_memit
from lit_coupling.editing.requests import EditRequest, subject_span
from lit_coupling.editing.ripple import score_clozes
from lit_coupling.editing.snapshot import restored_after
from lit_coupling.gradients.projection import kronecker_projection
from lit_coupling.inject.embedded import ensure_embedded
from lit_coupling.models.adapters import ModelAdapter, ensure_padding
from lit_coupling.models.loading import load_model


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pieces", default=None)
    p.add_argument("--counterfact", default=None)
    p.add_argument("--facts", type=int, default=1000)
    p.add_argument("--edits", type=int, default=8, help="E for the many-edits exact row")
    p.add_argument("--batch", type=int, default=32, help="B requests as one MEMIT edit")
    p.add_argument("--singles", type=int, default=4, help="single edits measured (B singles extrapolated)")
    p.add_argument("--cached", type=int, default=100_000, help="synthetic cached facts for the projected row")
    p.add_argument("--k", default="16x16,32x16,64x32")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: exact,projected,batch")
    p.add_argument(
        "--projected_only",
        default=None,
        metavar="D_OUTxD_INxLAYERS",
        help="time only the projected forecast for edit layers of this shape (e.g. 576x1536x5: SmolLM2's "
        "down_proj at 5 layers), without loading a model",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    rows: list[tuple[str, str, str]] = []
    results: dict = {"model": args.model, "threads": torch.get_num_threads()}
    if args.projected_only:
        d_out, d_in, n_layers = (int(v) for v in args.projected_only.lower().split("x"))
        results["projected"] = projected_rows(rows, [(d_out, d_in)] * n_layers, args)
        show(rows, f"projected forecast, edit layers {n_layers} × (out {d_out}, in {d_in})", args, results)
        return

    ensure_embedded(args.model)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    pad = ensure_padding(tok)
    bos = list(ModelAdapter(model).bos_ids(tok))
    cases = read_counterfact(args.counterfact)
    facts, info = load_facts(tok, bos, args.pieces, cases, args.facts)
    setup = argparse.Namespace(
        memit="auto",
        layers=None,
        cov_corpus="hotpot",
        cov_tokens=100_000,
        stats_dir=None,
        model_path=args.model,
        seed=0,
    )
    hp, solvers, prefixes, _ = memit_setup(
        setup, ModelAdapter(model), tok, bos, (info["meta"].get("source") or {}).get("path")
    )
    adapter = ModelAdapter(model, layers=hp.layers)
    weights = {t.name: t.module.weight for t in (adapter.target(layer) for layer in hp.layers)}
    usable = [c for c in cases if subject_span(c.prompt, c.subject)]
    requests = [
        EditRequest(i, -1, f"counterfact/{c.case_id}", c.prompt, c.subject, c.target_true, c.target_new)
        for i, c in enumerate(usable[: max(args.batch, args.edits, args.singles)])
    ]
    clozes = [(f.prompt_ids, f.answer_ids) for f in facts]
    answers = [f.answer for f in facts]
    n = len(facts)
    results["facts"] = n
    results["layers"] = hp.layers

    singles = []
    for r in requests[: max(args.singles, args.edits if "exact" not in skip else 0)]:
        with restored_after(weights):
            result, seconds = timed(lambda r=r: apply_memit(adapter, tok, [r], hp, solvers, prefixes, bos, pad))
            if not singles and "exact" not in skip:
                _, score_s = timed(
                    lambda: score_clozes(model, tok, clozes, answers, args.batch_size, pad, generate="none")
                )
        singles.append((result, seconds))
    single_s = sum(s for _, s in singles[: args.singles]) / min(args.singles, len(singles))
    results["single_edit_s"] = [s for _, s in singles]

    if "exact" not in skip:
        updates = [{layer: (u.float(), v.float()) for layer, (u, v) in res.updates.items()} for res, _ in singles]
        _, exact1 = timed(lambda: exact_forecast(model, adapter, updates[:1], clozes, pad, args.batch_size))
        many = updates[: args.edits]
        _, exact_e = timed(lambda: exact_forecast(model, adapter, many, clozes, pad, args.batch_size))
        results.update(score_after_s=score_s, exact_1_s=exact1, exact_many_s=exact_e, many=len(many))
        rows += [
            (f"exact forecast, 1 edit, {n} facts", f"{exact1:.1f} s", "one forward + two backwards per batch"),
            ("make the edit's ΔW (needed by both)", f"{single_s:.1f} s", "apply_memit, one request"),
            (f"re-score the {n} facts after the edit", f"{score_s:.1f} s", "teacher-forced, per edit"),
            (
                f"exact forecast, {len(many)} edits at once",
                f"{exact_e:.1f} s",
                f"vs {len(many)} re-scorings: {len(many) * score_s:.1f} s",
            ),
        ]

    if "projected" not in skip:
        results["projected"] = projected_rows(rows, [adapter.target(layer).shape for layer in hp.layers], args)

    if "batch" not in skip:
        batch = requests[: args.batch]
        with restored_after(weights):
            result, batch_s = timed(lambda: apply_memit(adapter, tok, batch, hp, solvers, prefixes, bos, pad))
        results.update(
            batch=len(batch),
            batch_s=batch_s,
            batch_targets_s=result.time_targets_s,
            single_extrapolated_s=single_s * len(batch),
            singles_measured=min(args.singles, len(singles)),
        )
        rows += [
            (
                f"{len(batch)} requests as one MEMIT edit",
                f"{batch_s:.1f} s",
                f"targets {result.time_targets_s:.1f} s (rows batched, prefix KV cache)",
            ),
            (
                f"{len(batch)} single edits",
                f"{single_s * len(batch):.1f} s",
                f"extrapolated: {min(args.singles, len(singles))} measured, {single_s:.1f} s each",
            ),
            ("batch / singles", f"{batch_s / (single_s * len(batch)):.2f}", "goal ≤ 0.5"),
        ]

    show(rows, f"{args.model}, edit layers {hp.layers}", args, results)


def projected_rows(rows: list, shapes: list[tuple[int, int]], args) -> dict:
    """Time per edit of the projected forecast over `args.cached` SYNTHETIC cached facts (random values: the cost of
    the products does not depend on them), per k; the cache's bytes per fact (log P and margin, float32)."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for spec in filter(None, args.k.split(",")):
        k_in, k_out = (int(v) for v in spec.lower().split("x"))
        total, total_many, bytes_per_fact, many = 0.0, 0.0, 0, 32
        for layer, (d_out, d_in) in enumerate(shapes):
            p_in, p_out = kronecker_projection(d_in, d_out, k_in, k_out, 0, layer, dtype=torch.float64)
            width = p_in.shape[1] * p_out.shape[1]
            bytes_per_fact += 2 * width * 4
            u = torch.randn(d_out, 1, generator=gen, dtype=torch.float64)
            v = torch.randn(d_in, 1, generator=gen, dtype=torch.float64)
            cache = torch.randn(args.cached, width, generator=gen)
            pu, t_proj = timed(lambda u=u, v=v, p_in=p_in, p_out=p_out: project_update(u, v, p_in, p_out))
            t_mv = min(timed(lambda cache=cache, pu=pu: projected_change(cache, pu))[1] for _ in range(3))
            total += t_proj + 2 * t_mv  # log P and margin caches: two products
            # E edits at once: one (n, K) @ (K, E) product reads the cache once for all of them
            pus = torch.randn(width, many, generator=gen)
            t_mm = min(timed(lambda cache=cache, pus=pus: cache @ pus)[1] for _ in range(3))
            total_many += t_proj + 2 * t_mm / many
            del cache
        out[spec] = {
            "s_per_edit": total,
            "s_per_edit_in_32": total_many,
            "bytes_per_fact": bytes_per_fact,
            "gib_for_cached": bytes_per_fact * args.cached / 2**30,
        }
        rows.append(
            (
                f"projected forecast, k={spec}, {args.cached:,} cached facts (synthetic)",
                f"{total * 1e3:.0f} ms/edit",
                f"{total_many * 1e3:.0f} ms/edit for 32 edits at once; cache {bytes_per_fact / 1024:.0f} "
                f"KiB/fact, {bytes_per_fact * args.cached / 2**30:.2f} GiB",
            )
        )
    return out


def show(rows, title: str, args, results: dict) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}, {torch.get_num_threads()} threads")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
