"""`lit-coupling forecast`: rank every stored fact by the damage an edit is predicted to do, before making it (#19).

    lit-coupling forecast --model_path tiny-gpt2 --pieces runs/default --n_edits 3 --output_dir /tmp/fc
    lit-coupling forecast --model_path smollm2-135m --pieces runs/smollm2 --counterfact cf.json --n_edits 30 \
        --batch --validate --k 64x32,256x128 --output_dir /tmp/fc-smol

Facts: the pieces of a run's knowledge_pieces.json (HotpotQA or the synthetic world), and with --counterfact the
neighbourhood prompts of its cases (with their true answers; --case_prompts: the cases' own prompts too). Edits:
CounterFact case ids (--cases), N seeded draws from the known sources (--n_edits, the ripple stage's planner), or
--edit "subject|prompt|new target". The edited fact itself is left out of --validate's statistics.

ΔW comes from `apply_memit`, the ripple stage's code path, on the live model; the edited weights are restored bit
for bit after each edit (a SHA-256 of the whole state before and after is written to forecast.json). The forecast
itself runs on the unedited model (`lit_coupling.editing.forecast`). `--batch` also makes all the requests one
MEMIT edit and forecasts it (the joint ripple), reporting additivity against the singles. `--validate` scores the
store after each edit (before restoring) and reports how good the forecast was (`analysis.forecast_metrics`).

Writes forecast.csv (one row per edit and fact, ranked by predicted Δlog P), forecast.json, forecast.png and
forecast_updates.pt (each edit's ΔW as factors u, v per layer: ΔW = u vᵀ).
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lit_coupling.errors import UserError


@dataclass
class Fact:
    id: str
    kind: str  # a piece's kind (hop1, hop2, question, compare), or counterfact_neighbourhood
    prompt: str
    answer: str
    prompt_ids: list[int]
    answer_ids: list[int]


def parse_k(spec: str) -> list[tuple[int, int]]:
    """'64x32,256x128' → [(k_in, k_out), ...]; '' → none."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            k_in, k_out = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserError(f"--k {spec!r}: write k_in x k_out pairs, e.g. 64x32,256x128") from None
        if k_in < 1 or k_out < 1:
            raise UserError(f"--k {part}: projection dimensions must be positive")
        out.append((k_in, k_out))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-coupling forecast",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model_path", default="tiny-gpt2", help="Hub id, local directory, .gguf, or embedded name")
    p.add_argument(
        "--pieces",
        default=None,
        help="knowledge_pieces.json (or a run directory): facts, and the "
        "default key-statistics corpus (its HotpotQA file)",
    )
    p.add_argument(
        "--counterfact",
        default=None,
        help="CounterFact JSON: its cases' neighbourhood prompts join the facts, and edits may name its case ids",
    )
    p.add_argument(
        "--case_prompts",
        action="store_true",
        help="the CounterFact cases' own prompts (with their true answers) join the facts too",
    )
    p.add_argument("--cases", default="", help="comma-separated CounterFact case ids to edit")
    p.add_argument(
        "--n_edits",
        type=int,
        default=0,
        help="draw N edits (seeded) from the known sources: the "
        "CounterFact cases when --counterfact is given, else the single-fact pieces",
    )
    p.add_argument("--edit", action="append", default=[], help="'subject|prompt|new target' (repeatable)")
    p.add_argument(
        "--known",
        default="generated",
        help="which sources count as known (--n_edits draws from "
        "those): generated, teacher_forced, top1_first_token, any",
    )
    p.add_argument("--max_facts", type=int, default=0, help="keep the first N facts (0: all)")
    p.add_argument(
        "--batch",
        action="store_true",
        help="also make all the requests one MEMIT edit (joint ripple, additivity against the single edits)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="make each edit, re-score the facts, restore; report how good the forecast was",
    )
    p.add_argument(
        "--epsilons",
        default="",
        help="with --validate: also score the facts under ε·ΔW for these ε "
        "(e.g. 0.1,0.3) for the first --epsilon_edits edits: how far the first order holds as ε → 0",
    )
    p.add_argument("--epsilon_edits", type=int, default=8)
    p.add_argument("--k", default="", help="projected forecasts: k_in x k_out per entry, e.g. 64x32,256x128")
    p.add_argument("--projection_seed", type=int, default=0)
    p.add_argument(
        "--cache_dir", default=None, help="projected-gradient caches (default: $LIT_COUPLING_CACHE/forecast)"
    )
    p.add_argument("--memit", default="auto", help="MEMIT hyperparameters: auto or a YAML file")
    p.add_argument("--layers", default=None, help="edit layers, overriding the hyperparameters")
    p.add_argument("--cov_corpus", default="hotpot", help="key-statistics corpus (as the ripple stage's)")
    p.add_argument("--cov_tokens", type=int, default=100_000)
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the edit draw and the context prefixes")
    p.add_argument("--batch_size", type=int, default=32, help="facts per forward/backward")
    p.add_argument("--top", type=int, default=10, help="facts per edit whose layers and tokens are explained")
    p.add_argument("--device", default="auto")
    p.add_argument("--output_dir", required=True)
    return p


# --- inputs ----------------------------------------------------------------------------------------------------------


def load_facts(
    tokenizer, bos, pieces_path: str | None, cases, max_facts: int, case_prompts: bool = False
) -> tuple[list[Fact], dict]:
    from lit_coupling.data.piece import load_pieces
    from lit_coupling.scoring import ClozeTokenError, encode_cloze

    facts: list[Fact] = []
    meta: dict = {}
    skipped = 0
    if pieces_path:
        pieces, meta = load_pieces(Path(pieces_path))
        for piece in pieces:  # re-encoded for this tokenizer: the file may have been made for another one
            try:
                p_ids, a_ids = encode_cloze(tokenizer, piece.prompt, piece.answer, bos)
            except ClozeTokenError:
                skipped += 1
                continue
            facts.append(Fact(piece.id, piece.kind, piece.prompt, piece.answer, p_ids, a_ids))
    for case in cases if case_prompts else ():
        try:
            p_ids, a_ids = encode_cloze(tokenizer, case.prompt, case.target_true, bos)
        except ClozeTokenError:
            skipped += 1
            continue
        facts.append(
            Fact(f"counterfact/{case.case_id}", "counterfact_prompt", case.prompt, case.target_true, p_ids, a_ids)
        )
    for case in cases:
        answer = case.neighborhood_true or case.target_true
        for i, prompt in enumerate(case.neighborhood_prompts):
            try:
                p_ids, a_ids = encode_cloze(tokenizer, prompt, answer, bos)
            except ClozeTokenError:
                skipped += 1
                continue
            facts.append(
                Fact(f"counterfact/{case.case_id}/n{i}", "counterfact_neighbourhood", prompt, answer, p_ids, a_ids)
            )
    if max_facts > 0:
        facts = facts[:max_facts]
    if not facts:
        raise UserError("no facts to forecast on: give --pieces and/or --counterfact")
    return facts, {"meta": meta, "skipped": skipped}


def normalised(text: str) -> str:
    """A prompt with its whitespace runs made one space: how an --edit prompt is matched to the stored facts."""
    return " ".join(text.split())


def own_facts(groups: Sequence[Sequence], facts: Sequence[Fact]) -> np.ndarray:
    """(edits, facts) bool: fact j is edit e's own fact, its target and not its ripple — a fact named by one of
    its requests (a piece's id, counterfact/<case id>) or asking the same prompt (whitespace aside: an --edit of a
    stored fact, or a neighbourhood prompt that repeats the case's own)."""
    index: dict[str, int] = {f.id: j for j, f in enumerate(facts)}
    by_prompt: dict[str, list[int]] = {}
    for j, f in enumerate(facts):
        by_prompt.setdefault(normalised(f.prompt), []).append(j)
    own = np.zeros((len(groups), len(facts)), dtype=bool)
    for e, group in enumerate(groups):
        for r in group:
            if r.source_id in index:
                own[e, index[r.source_id]] = True
            own[e, by_prompt.get(normalised(r.prompt), [])] = True
    return own


def plan_edits(args, model, tokenizer, bos, pad_id, cases, pieces_path, facts: Sequence[Fact] = ()) -> list:
    """The edit requests of --edit, --cases and --n_edits, in that order. An --edit whose prompt is a stored
    fact's (whitespace aside) is that fact's edit: it takes the fact's id as its source and the fact's answer as
    its true target (so the fact is left out as its own, and GradSim's source baselines apply)."""
    from lit_coupling.editing.requests import EditRequest, subject_span
    from lit_coupling.progress import Progress

    stored = {}
    for f in facts:
        stored.setdefault(normalised(f.prompt), f)  # the first of several with one prompt names the source
    requests: list[EditRequest] = []
    for text in args.edit:
        parts = [s.strip() for s in text.split("|")]
        if len(parts) != 3 or not all(parts):
            raise UserError(f"--edit {text!r}: write 'subject|prompt|new target'")
        subject, prompt, new = parts
        if subject_span(prompt, subject) is None:
            raise UserError(f"--edit {text!r}: the subject {subject!r} is not in the prompt")
        fact = stored.get(normalised(prompt))
        source, true = (fact.id, fact.answer) if fact else (f"edit/{len(requests)}", "")
        requests.append(EditRequest(len(requests), -1, source, prompt, subject, true, new))
    if args.cases:
        by_id = {c.case_id: c for c in cases}
        for case_id in (s.strip() for s in args.cases.split(",") if s.strip()):
            if case_id not in by_id:
                raise UserError(f"--cases: no case {case_id!r} in {args.counterfact}")
            c = by_id[case_id]
            kind, evidence = c.answer_type()
            requests.append(
                EditRequest(
                    len(requests),
                    -1,
                    f"counterfact/{c.case_id}",
                    c.prompt,
                    c.subject,
                    c.target_true,
                    c.target_new,
                    kind,
                    evidence,
                    c.probes(),
                )
            )
    if args.n_edits > 0:
        from lit_coupling.editing.requests import entities_for_source, plan_counterfact, plan_requests
        from lit_coupling.editing.ripple import score_clozes
        from lit_coupling.scoring import encode_cloze

        if cases:
            known = None
            if args.known != "any":
                items = [encode_cloze(tokenizer, c.prompt, c.target_true, bos) for c in cases]
                with Progress(len(items), "scoring the CounterFact sources", True, "case") as bar:
                    scores, _ = score_clozes(
                        model, tokenizer, items, [c.target_true for c in cases], args.batch_size, pad_id, progress=bar
                    )
                known = scores.known(args.known)
            plan = plan_counterfact(cases, args.n_edits, args.seed, known)
        else:
            from lit_coupling.data.piece import load_pieces
            from lit_coupling.editing.ripple import score_pieces

            if not pieces_path:
                raise UserError("--n_edits needs --pieces or --counterfact to draw from")
            pieces, meta = load_pieces(Path(pieces_path))
            known = None
            if args.known != "any":
                with Progress(len(pieces), "scoring the pieces to draw known sources", True, "piece") as bar:
                    known = score_pieces(model, tokenizer, pieces, args.batch_size, pad_id, bar).known(args.known)
            plan = plan_requests(
                pieces, args.n_edits, args.seed, known, entities_for_source(meta.get("source", {}).get("path"))
            )
        for r in plan.requests:
            r.edit_id = len(requests)
            requests.append(r)
    if not requests:
        raise UserError("no edit requested: give --edit, --cases or --n_edits")
    return requests


def memit_setup(args, adapter, tokenizer, bos, hotpot_path):
    """Hyperparameters, key-covariance solvers and context prefixes: what the ripple stage's MemitModule sets up."""
    from lit_coupling.editing.covariance import key_covariances, resolve_corpus, shrink
    from lit_coupling.editing.hparams import resolve_hparams
    from lit_coupling.editing.memit import CovarianceSolver, generate_prefixes

    hp = resolve_hparams(args.memit, adapter, args.layers)
    corpus = resolve_corpus(args.cov_corpus, hotpot_path)
    covs, metas = key_covariances(
        adapter, tokenizer, hp.layers, corpus, args.cov_tokens, args.stats_dir, args.model_path, bos, progress=True
    )
    solvers = {}
    for layer, c in covs.items():
        m = metas[layer]
        shrunk, _ = shrink(c, m["mean_fourth_power"], m["tokens"], hp.mom2_shrinkage)
        solvers[layer] = CovarianceSolver(shrunk.to(next(adapter.model.parameters()).device))
    prefixes = generate_prefixes(
        adapter.model, tokenizer, bos, hp.context_prefixes, hp.context_prefix_tokens, seed=args.seed
    )
    return hp, solvers, prefixes, corpus.name


# --- the run ---------------------------------------------------------------------------------------------------------


def validate(args) -> None:
    """Refuse a value that would fail deep inside the forecast, or be ignored, before any model is loaded."""
    from lit_coupling.editing.ripple import KNOWN_CRITERIA
    from lit_coupling.errors import bad_setting, check_choice, check_int

    for name, minimum in (
        ("n_edits", 0),
        ("max_facts", 0),
        ("epsilon_edits", 1),
        ("cov_tokens", 1),
        ("batch_size", 1),
        ("top", 0),
    ):
        check_int(name, getattr(args, name), minimum)
    check_choice("known", args.known, KNOWN_CRITERIA)
    parse_k(args.k)
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        raise bad_setting("epsilons", args.epsilons, "comma-separated numbers in (0, 1], e.g. 0.1,0.3") from None
    if any(not 0 < e <= 1 for e in epsilons):
        raise bad_setting("epsilons", args.epsilons, "comma-separated numbers in (0, 1], e.g. 0.1,0.3")
    if epsilons and not args.validate:
        raise bad_setting(
            "epsilons", args.epsilons, "--validate with it", "ε·ΔW is only scored when the edits are made"
        )
    for name in ("output_dir", "stats_dir", "cache_dir"):  # else found when first written: after minutes of work
        value = getattr(args, name, None)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise bad_setting(name, value, "a directory", "this is a file")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    validate(args)
    forecast(args)
    return 0


def forecast(args) -> dict:
    from lit_coupling.analysis.forecast_metrics import additivity, evaluate
    from lit_coupling.cache import cache_root
    from lit_coupling.data.counterfact import read_counterfact
    from lit_coupling.editing.covariance import model_fingerprint
    from lit_coupling.editing.forecast import (
        exact_forecast,
        flip_score,
        load_or_build_cache,
        packed_gradient_factors,
        predicted_flip,
    )
    from lit_coupling.editing.memit import apply_memit, optimise_targets
    from lit_coupling.editing.requests import kl_prompt, request_prompts
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.editing.snapshot import restored_after, state_checksum
    from lit_coupling.inject.embedded import ensure_embedded
    from lit_coupling.models.adapters import ModelAdapter, ensure_padding
    from lit_coupling.models.loading import load_model
    from lit_coupling.outputs import write_json
    from lit_coupling.progress import Progress, say
    from lit_coupling.scoring import encode_cloze

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ks = parse_k(args.k)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_embedded(args.model_path)  # an embedded name is trained on first use (as the run does)
    loaded = load_model(args.model_path, dtype="float32", device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    pad_id = ensure_padding(tokenizer)
    adapter = ModelAdapter(model)
    bos = list(adapter.bos_ids(tokenizer))
    cases = read_counterfact(args.counterfact) if args.counterfact else []
    facts, fact_info = load_facts(tokenizer, bos, args.pieces, cases, args.max_facts, args.case_prompts)
    hotpot_path = (fact_info["meta"].get("source") or {}).get("path")
    hp_adapter = ModelAdapter(model)
    hp, solvers, prefixes, corpus_name = memit_setup(args, hp_adapter, tokenizer, bos, hotpot_path)
    adapter = ModelAdapter(model, layers=hp.layers)
    requests = plan_edits(args, model, tokenizer, bos, pad_id, cases, args.pieces, facts)
    times["setup_s"] = time.perf_counter() - t0
    clozes = [(f.prompt_ids, f.answer_ids) for f in facts]
    answers = [f.answer for f in facts]
    say(f"forecast: {len(requests)} edit(s) over {len(facts)} facts, layers {hp.layers}")

    # ΔW of each edit (and of the joint batch) by the real code path, restored bit for bit after each
    groups = [[r] for r in requests]
    if args.batch and len(requests) > 1:
        groups.append(list(requests))
    names = [f"edit {g[0].edit_id}" if len(g) == 1 else f"batch of {len(g)}" for g in groups]
    own = own_facts(groups, facts)
    weights = {t.name: t.module.weight for t in (adapter.target(layer) for layer in hp.layers)}
    checksum_before = state_checksum(model)
    before = None
    if args.validate:
        start = time.perf_counter()
        with Progress(len(clozes), "scoring every fact before the edits", True, "fact") as bar:
            before, _ = score_clozes(
                model, tokenizer, clozes, answers, args.batch_size, pad_id, generate="none", progress=bar
            )
        times["score_before_s"] = time.perf_counter() - start
    # every request's target vector in one batched optimisation (the same vectors as one at a time: they depend
    # only on the unedited model); then each edit's layer updates on its own
    start = time.perf_counter()
    contexts = ["", *prefixes]
    vectors = optimise_targets(
        adapter,
        [request_prompts(tokenizer, r, contexts, bos, hp.fact_token) for r in requests],
        [kl_prompt(tokenizer, r.subject, bos, hp.fact_token) for r in requests],
        hp,
        pad_id,
        progress=True,
    )
    times["targets_s"] = time.perf_counter() - start
    # one batched optimisation for all the requests: its time is said once, not on every edit's line
    say(f"  target vectors of {len(requests)} request(s): {times['targets_s']:.1f}s")
    target_of = {r.edit_id: v for r, v in zip(requests, vectors)}
    updates, measured, flipped, edit_times, score_times = [], [], [], [], []
    for name, group in zip(names, groups):
        with restored_after(weights):
            start = time.perf_counter()
            result = apply_memit(
                adapter,
                tokenizer,
                group,
                hp,
                solvers,
                prefixes,
                bos,
                pad_id,
                targets=[target_of[r.edit_id] for r in group],
            )
            edit_times.append(time.perf_counter() - start)
            line = f"  {name}: ΔW computed in {edit_times[-1]:.1f}s"
            if args.validate:
                start = time.perf_counter()
                with Progress(len(clozes), f"{name}: scoring every fact after the edit", True, "fact") as bar:
                    after, _ = score_clozes(
                        model, tokenizer, clozes, answers, args.batch_size, pad_id, generate="none", progress=bar
                    )
                score_times.append(time.perf_counter() - start)
                measured.append(np.array(after.logp) - np.array(before.logp))
                flipped.append((np.array(before.rank) == 0) != (np.array(after.rank) == 0))
                # the re-scoring is most of an edit's time under --validate: the line's time includes it
                line = (
                    f"  {name}: {edit_times[-1] + score_times[-1]:.1f}s "
                    f"(ΔW {edit_times[-1]:.1f}s, re-scoring the facts {score_times[-1]:.1f}s)"
                )
        updates.append({layer: (u.float(), v.float()) for layer, (u, v) in result.updates.items()})
        say(line)
    checksum_after = state_checksum(model)
    if checksum_after != checksum_before:
        raise RuntimeError("the model's weights were not restored bit for bit after the edits")
    times["updates_s"] = float(sum(edit_times))
    times["update_s_per_group"] = edit_times
    if score_times:
        times["score_after_s_per_group"] = score_times

    # GradSim's view of each single edit at the edit layers: the source prompt's gradient with the true and the new
    # answer, as factors (the same ghost pass)
    singles = [g[0] for g in groups if len(g) == 1]
    source_true = [encode_cloze(tokenizer, r.prompt, r.target_true, bos) for r in singles if r.target_true]
    source_new = [encode_cloze(tokenizer, r.prompt, r.target_new, bos) for r in singles]
    with_true = len(source_true) == len(singles)
    n_sources = len(source_new) + (len(source_true) if with_true else 0)
    extra = []
    with Progress(n_sources, "gradients of the edited prompts (GradSim baselines)", True, "prompt") as bar:
        if with_true:
            extra += packed_gradient_factors(model, adapter, hp.layers, source_true, pad_id, bar)
        extra += packed_gradient_factors(model, adapter, hp.layers, source_new, pad_id, bar)

    start = time.perf_counter()
    label = f"exact forecast of {len(updates)} edit(s) and {len(extra)} baseline(s)"
    with Progress(len(clozes), label, True, "fact") as bar:
        exact = exact_forecast(model, adapter, updates + extra, clozes, pad_id, args.batch_size, progress=bar)
    times["exact_forecast_s"] = time.perf_counter() - start
    n_groups = len(groups)
    predicted = exact.total()[:n_groups].numpy()
    margin_after = (exact.margin[None] + exact.margin_total()[:n_groups]).numpy()
    flip_scores = flip_score(exact.margin[None].expand(n_groups, -1), exact.margin_total()[:n_groups]).numpy()
    flips_pred = predicted_flip(exact.margin[None].expand(n_groups, -1), exact.margin_total()[:n_groups]).numpy()
    norms = exact.norm_sq.sum(0).sqrt().numpy()  # ‖g_j‖ on the edit layers
    others: dict[str, np.ndarray] = {}
    n_single = len(singles)
    inner = exact.total()[n_groups:].numpy()
    if len(source_true) == n_single:
        g_true = inner[:n_single]
        true_norm = np.array(
            [np.sqrt(sum(float((u.T @ u * (v.T @ v)).sum()) for u, v in f.values())) for f in extra[:n_single]]
        )
        # editing lowers log P(true): a fact whose gradient is aligned with the source's should drop
        others["gradsim_edit_layers"] = -g_true / np.maximum(np.outer(true_norm, norms), 1e-30)
        others["inner_edit_layers"] = -g_true
        inner = inner[n_single:]
    others["new_target_inner"] = inner[:n_single]

    projected: dict[str, dict] = {}
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root() / "forecast"
    fingerprint = model_fingerprint(model)
    shapes = {layer: adapter.target(layer).shape for layer in hp.layers}
    built_caches: list = []
    for k_in, k_out in sorted(ks, key=lambda k: -k[0] * k[1]):
        start = time.perf_counter()
        # a smaller k from a larger cache of this run: its leading block, rescaled (ProjectedCache.restricted)
        parent = next((c for c in built_caches if c.k_in >= k_in and c.k_out >= k_out), None)
        if parent is not None:
            cache, path, found = parent.restricted(k_in, k_out), f"restricted from {parent.k_in}x{parent.k_out}", True
        else:
            with Progress(len(clozes), f"projected gradients {k_in}x{k_out} (cache)", True, "fact") as bar:
                cache, path, found = load_or_build_cache(
                    cache_dir,
                    fingerprint,
                    model,
                    adapter,
                    hp.layers,
                    clozes,
                    pad_id,
                    k_in,
                    k_out,
                    args.projection_seed,
                    args.batch_size,
                    progress=bar,
                )
            built_caches.append(cache)
        built = time.perf_counter() - start
        proj = cache.projections(shapes)
        start = time.perf_counter()
        deltas = [cache.forecast(u, proj) for u in updates]
        per_edit = (time.perf_counter() - start) / len(updates)
        projected[f"{k_in}x{k_out}"] = {
            "delta": np.stack([d.sum(0).numpy() for d, _ in deltas]),
            "flip_score": np.stack([flip_score(cache.margin, m.sum(0)).numpy() for _, m in deltas]),
            "cache": str(path),
            "cache_found": found,
            "cache_build_s": None if found else built,
            "k_in": k_in,
            "k_out": k_out,
            "forecast_s_per_edit": per_edit,
            "bytes_per_fact": cache.bytes_per_fact(),
        }
    say(
        f"  exact forecast {times['exact_forecast_s']:.1f}s"
        + "".join(f"; projected {k}: {v['forecast_s_per_edit'] * 1e3:.1f} ms/edit" for k, v in projected.items())
    )

    # --- what carries the damage: layers and prompt tokens of the top facts
    explained = []
    for e, name in enumerate(names):
        ripple = ~own[e]  # the edit's own facts are its target, not the damage it does
        order = [j for j in np.argsort(predicted[e], kind="stable") if ripple[j]][: args.top]
        tops = []
        for j in order:
            terms = exact.terms_of(e, int(j)).numpy()  # (T_j, L)
            ids = facts[j].prompt_ids + facts[j].answer_ids
            per_token = terms.sum(1)
            strongest = np.argsort(per_token, kind="stable")[:3]
            tops.append(
                {
                    "fact": facts[j].id,
                    "predicted_delta_logp": float(predicted[e, j]),
                    "by_layer": {str(layer): float(exact.delta[e, li, j]) for li, layer in enumerate(hp.layers)},
                    "tokens": [
                        {
                            "position": int(t),
                            "token": tokenizer.decode([ids[t]]),
                            "in": "prompt" if t < len(facts[j].prompt_ids) else "answer",
                            "delta_logp": float(per_token[t]),
                        }
                        for t in strongest
                    ],
                }
            )
        explained.append(
            {
                "edit": name,
                "top_facts": tops,
                "by_layer_total": {
                    str(layer): float(exact.delta[e, li][torch.from_numpy(ripple)].sum())
                    for li, layer in enumerate(hp.layers)
                },
            }
        )

    doc = {
        "format": "lit_coupling.forecast/1",
        "model": args.model_path,
        "layers": hp.layers,
        "corpus": corpus_name,
        "facts": len(facts),
        "fact_kinds": _counts(f.kind for f in facts),
        "edits": [
            {
                "name": n,
                "requests": [
                    {
                        "edit_id": r.edit_id,
                        "source": r.source_id,
                        "prompt": r.prompt,
                        "subject": r.subject,
                        "target_true": r.target_true,
                        "target_new": r.target_new,
                    }
                    for r in g
                ],
            }
            for n, g in zip(names, groups)
        ],
        "weights_restored": {
            "sha256_before": checksum_before,
            "sha256_after": checksum_after,
            "bit_identical": checksum_before == checksum_after,
        },
        "flip_definition": "margin m = logit(answer's first token) − logit(top other token before the edit) at the "
        "position predicting it; predicted after = m + first-order Δm; a flip: the sign changes "
        "(measured: the answer's first token enters or leaves rank 0)",
        "times": times,
        "explained": explained,
        "projected": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("delta", "flip_score")} for k, v in projected.items()
        },
    }
    if args.batch and len(requests) > 1:
        doc["additivity"] = {"sum_of_single_forecasts_vs_joint_forecast": additivity(predicted[:-1], predicted[-1])}
    if args.validate:
        meas, flips = np.stack(measured), np.stack(flipped)
        single = slice(0, n_single)
        # the edited fact itself (`own_facts`) is the edit's target, not its ripple: left out of every statistic
        meas = np.where(own, np.nan, meas)
        doc["validation_left_out"] = int(own[single].sum())
        methods = {"exact": (predicted[single], flip_scores[single])}
        for k, v in projected.items():
            methods[f"projected {k}"] = (v["delta"][single], v["flip_score"][single])
        for name, values in others.items():
            methods[name] = (values, None)
        validation = {}
        for name, (pred, score) in methods.items():
            score = None if score is None else np.where(own[single], np.nan, score)
            validation[name] = evaluate(
                pred, meas[single], score, flips[single] if score is not None else None, seed=args.seed
            )
        doc["validation"] = {"single_edits": validation, "measured_flips": int((flips & ~own)[single].sum())}
        if args.batch and len(requests) > 1:
            doc["additivity"].update(
                {
                    "joint_forecast_vs_joint_measured": evaluate(
                        predicted[-1:],
                        meas[-1:],
                        np.where(own[-1:], np.nan, flip_scores[-1:]),  # the edited facts left out, as above
                        flips[-1:],
                        seed=args.seed,
                    ),
                    "sum_of_single_forecasts_vs_joint_measured": additivity(predicted[:-1], meas[-1])
                    | evaluate(predicted[:-1].sum(0, keepdims=True), meas[-1:], seed=args.seed),
                    "sum_of_single_measured_vs_joint_measured": additivity(meas[:-1], meas[-1]),
                }
            )
        doc["validation"]["by_fact_kind"] = {
            kind: evaluate(predicted[single][:, idx], meas[single][:, idx], seed=args.seed)
            for kind in sorted({f.kind for f in facts})
            if len(idx := np.array([i for i, f in enumerate(facts) if f.kind == kind])) >= 3
        }
        doc["validation"]["by_layer"] = {
            str(layer): evaluate(exact.delta[single, li].numpy(), meas[single], seed=args.seed)
            for li, layer in enumerate(hp.layers)
        }
    if args.validate and args.epsilons:
        doc["second_order"] = scaled_edits(
            args,
            model,
            tokenizer,
            adapter,
            weights,
            clozes,
            answers,
            pad_id,
            before,
            updates[: min(n_single, args.epsilon_edits)],
            predicted,
            own,
            measured,
        )
    write_json(out_dir / "forecast.json", _plain(doc))
    # each edit's ΔW as factors, as the ripple stage's edit_updates.pt: ΔW_l = u vᵀ (out, in)
    torch.save(
        {
            "format": "lit_coupling.forecast_updates/1",
            "names": names,
            "layers": list(hp.layers),
            "updates": [{int(layer): {"u": u, "v": v} for layer, (u, v) in upd.items()} for upd in updates],
        },
        out_dir / "forecast_updates.pt",
    )
    _write_csv(
        out_dir / "forecast.csv",
        names,
        facts,
        predicted,
        margin_after,
        exact.margin.numpy(),
        flips_pred,
        projected,
        np.stack(measured) if measured else None,
        np.stack(flipped) if flipped else None,
        own,
    )
    _plot(out_dir / "forecast.png", names, predicted, np.stack(measured) if measured else None, own, n_single)
    say(f"forecast: wrote {out_dir / 'forecast.csv'}, forecast.json, forecast.png")
    return doc


def scaled_edits(
    args, model, tokenizer, adapter, weights, clozes, answers, pad_id, before, updates, predicted, own, measured
) -> dict:
    """Is the forecast's miss second order? Score the facts under ε·ΔW (ΔW = U Vᵀ added to the weights, restored
    after) and compare the measured Δ_ε with ε × the first-order forecast: their Spearman and the relative error
    ‖Δ_ε − ε·pred‖ / ‖Δ_ε‖ go to 1 and 0 as ε → 0 if the first order is right; ε = 1 is the real edit."""
    from lit_coupling.analysis.forecast_metrics import spearman
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.editing.snapshot import restored_after
    from lit_coupling.progress import Progress

    out = {}
    eps_list = [float(e) for e in args.epsilons.split(",") if e.strip()]
    # one re-scoring of the store per ε < 1 and edit (ε = 1 is the --validate scoring already made)
    bar = Progress(len(eps_list) * len(updates) * len(clozes), "second order: scoring under ε·ΔW", True, "fact")
    for eps in [*eps_list, 1.0]:
        rhos, errors = [], []
        for e, update in enumerate(updates):
            if eps == 1.0:
                delta = np.asarray(measured[e])
            else:
                with restored_after(weights):
                    for layer, (u, v) in update.items():
                        adapter.target(layer).add_(eps * (u.double() @ v.double().T))
                    after, _ = score_clozes(
                        model, tokenizer, clozes, answers, args.batch_size, pad_id, generate="none", progress=bar
                    )
                delta = np.array(after.logp) - np.array(before.logp)
            keep = ~own[e]
            pred = eps * predicted[e][keep]
            rhos.append(spearman(pred, delta[keep]))
            errors.append(float(np.linalg.norm(delta[keep] - pred) / max(np.linalg.norm(delta[keep]), 1e-30)))
        out[str(eps)] = {
            "edits": len(updates),
            "spearman_mean": float(np.nanmean(rhos)),
            "relative_error_mean": float(np.mean(errors)),
        }
    bar.close()
    return out


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _write_csv(path, names, facts, predicted, margin_after, margin, flips_pred, projected, measured, flipped, own):
    columns = [
        "edit",
        "rank",
        "fact",
        "kind",
        "prompt",
        "answer",
        "predicted_delta_logp",
        "margin_before",
        "predicted_margin_after",
        "predicted_flip",
        "own_fact",  # 1: the edit's own fact (`own_facts`), left out of forecast.json's statistics
        *[f"projected_{k}" for k in projected],
    ]
    if measured is not None:
        columns += ["measured_delta_logp", "measured_flip"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for e, name in enumerate(names):
            for rank, j in enumerate(np.argsort(predicted[e], kind="stable")):
                row = [
                    name,
                    rank + 1,
                    facts[j].id,
                    facts[j].kind,
                    facts[j].prompt,
                    facts[j].answer,
                    repr(float(predicted[e, j])),
                    repr(float(margin[j])),
                    repr(float(margin_after[e, j])),
                    int(flips_pred[e, j]),
                    int(own[e, j]),
                    *[repr(float(v["delta"][e, j])) for v in projected.values()],
                ]
                if measured is not None:
                    row += [repr(float(measured[e, j])), int(flipped[e, j])]
                writer.writerow(row)


# single edits drawn in a colour of their own: matplotlib's 10-colour cycle less its grey (C7), which the edits
# beyond these share
PLOT_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")


def plot_series(names, predicted, measured, own, n_single: int) -> list[dict]:
    """The series the forecast-vs-measured scatter draws, in drawing order: {label, colour, marker, x, y}.

    The first single edits get PLOT_COLOURS, any further ones one light grey series (drawn first, under the rest),
    and every joint edit (the groups after the n_single singles) black crosses drawn last, so a batch never shares
    a colour with a single edit or drops out of the legend. Each edit's own facts (`own`) are left out: their
    change is the edit itself, not its ripple, and they dwarf the scale."""
    keep = ~np.asarray(own, dtype=bool)

    def series(label: str, colour: str, marker: str, edits) -> dict:
        x, y = (np.concatenate([values[e][keep[e]] for e in edits]) for values in (predicted, measured))
        return {"label": label, "colour": colour, "marker": marker, "x": x, "y": y}

    out = []
    if n_single > len(PLOT_COLOURS):
        rest = range(len(PLOT_COLOURS), n_single)
        label = f"{names[rest[0]]} to {names[rest[-1]]}" if len(rest) > 1 else names[rest[0]]
        out.append(series(label, "0.65", "o", rest))
    out += [series(names[e], PLOT_COLOURS[e], "o", [e]) for e in range(min(n_single, len(PLOT_COLOURS)))]
    out += [series(names[e], "black", "x", [e]) for e in range(n_single, len(names))]
    return out


def _plot(path, names, predicted, measured, own, n_single: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if measured is not None:
        series = plot_series(names, predicted, measured, own, n_single)
        for s in series:
            ax.scatter(
                s["x"],
                s["y"],
                s=8 if s["marker"] == "o" else 14,
                alpha=0.6,
                c=s["colour"],
                marker=s["marker"],
                label=s["label"],
                linewidths=0.8,
            )
        both = np.concatenate([v for s in series for v in (s["x"], s["y"])])
        lo, hi = float(np.min(both)), float(np.max(both))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlabel("predicted Δlog P (exact first order)")
        ax.set_ylabel("measured Δlog P")
        ax.set_title("forecast vs the edit (each edit's own fact left out)")
        if len(series) > 1:
            ax.legend(fontsize=6, ncol=2)
    else:
        # the edit's own fact is its target, not its ripple: left out of the ranking as of the statistics
        candidates = np.flatnonzero(~np.asarray(own[0], dtype=bool))
        order = candidates[np.argsort(predicted[0][candidates], kind="stable")[:20]]
        ax.barh(range(len(order)), predicted[0][order])
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([str(j) for j in order], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(f"predicted Δlog P ({names[0]}): the 20 most damaged facts (its own left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
