"""Measuring an edit: every piece scored before and after, the edit's own efficacy, generalisation and locality.

The JSON record of one edit and the flat (edit, piece) table are built here; `docs/outputs.md` describes both.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.requests import EditRequest
from lit_coupling.errors import UserError
from lit_coupling.progress import Progress
from lit_coupling.scoring import (
    CachedScores,
    PrefixReuse,
    collate_clozes,
    encode_cloze,
    generated_exact_match,
    greedy_continuations,
    normalize_answer,
    padded_batches,
    score_batch,
    supports_cached_scoring,
)

RIPPLE_FORMAT = "lit_coupling.ripple_experiments/1"
EXTRA_GENERATED_TOKENS = 2  # so "Paris" is not read as a match when the model goes on "…ian"

# How "the model knows the fact" is judged before any edit (MemitOptions.known): edit sources are drawn only from
# known facts, and the analysis puts its headline on known pieces.
KNOWN_CRITERIA = {
    "generated": "greedy decoding of the prompt reads as the answer (normalised, as HotpotQA's EM)",
    "teacher_forced": "every answer token is the model's top choice given the prompt and the answer so far",
    "top1_first_token": "the answer's first token is the model's top choice after the prompt",
    "any": "every fact counts as known (no filter: the behaviour before known facts were required)",
}


@dataclass
class PieceScores:
    logp: list[float]  # log P(true answer | prompt), every answer token
    tf_em: list[bool]  # every answer token is the argmax (teacher-forced)
    gen_em: list[bool]  # greedy decoding reads as the answer
    rank: list[int] = field(default_factory=list)  # tokens ranked above the answer's first token (0: top)
    # per item, what greedy decoding produced where the teacher-forced pass could not settle the match: (answer
    # tokens it followed, the tokens it went on with); None where settled. Drafts for the next scoring (not saved).
    drafts: list[tuple[int, list[int]] | None] = field(default_factory=list)
    decoded: int = 0  # items greedy decoding had to run for (neither the teacher-forced pass nor a draft settled)

    def known(self, criterion: str) -> list[bool]:
        """Per piece: does the model know it, by `criterion` (KNOWN_CRITERIA)."""
        if criterion == "generated":
            return list(self.gen_em)
        if criterion == "teacher_forced":
            return list(self.tf_em)
        if criterion == "top1_first_token":
            return [r == 0 for r in self.rank]
        if criterion == "any":
            return [True] * len(self.logp)
        raise UserError(f"unknown known-fact criterion {criterion!r}: choose one of {', '.join(KNOWN_CRITERIA)}")

    def to_dict(self) -> dict:
        return {"logp": self.logp, "tf_em": self.tf_em, "gen_em": self.gen_em, "rank": self.rank}


def may_still_match(tokenizer, ids: Sequence[int], answer: str) -> bool:
    """Can a greedy continuation that starts with `ids` still read as `answer` (`generated_exact_match`)?

    Its normalised text must be a prefix of the answer's; allowances: a last word that may be an unfinished
    article ("th" of "the", which normalisation drops once whole) and a character cut in its bytes.
    """
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    if "\ufffd" in text:
        return True
    got, want = normalize_answer(text), normalize_answer(answer)
    if want.startswith(got):
        return True
    words = got.split()
    return (
        bool(words)
        and any(a.startswith(words[-1]) for a in ("a", "an", "the"))
        and want.startswith(" ".join(words[:-1]))
    )


def greedy_decision(
    tokenizer, answer_ids: Sequence[int], greedy: Sequence[int], following: int, answer: str, eos_id: int | None
) -> bool | None:
    """Greedy answer match decided from one teacher-forced pass, or None when decoding must go on to tell.

    `greedy` holds the argmax after the prompt and after each answer prefix, `following` the argmax after the
    whole answer. While greedy decoding follows the answer its tokens are these argmaxes, so: where it leaves
    the answer, the text so far must still be able to read as the answer (`may_still_match`), else no match;
    where it follows the whole answer, the next token decides when it ends the text or opens a new word (a match)
    or glues letters to the last word ("Paris" + "ian": no match); glued punctuation needs more tokens.
    """
    for j, (want, got) in enumerate(zip(answer_ids, greedy)):
        if want != got:
            if got == eos_id:
                return generated_exact_match(tokenizer, list(answer_ids[:j]), answer)
            return None if may_still_match(tokenizer, [*answer_ids[:j], got], answer) else False
    if following == eos_id:
        return generated_exact_match(tokenizer, list(answer_ids), answer)
    base = tokenizer.decode(list(answer_ids), skip_special_tokens=True)
    full = tokenizer.decode([*answer_ids, following], skip_special_tokens=True)
    extra = full[len(base) :] if full.startswith(base) else None
    if extra is None or (extra and not extra[0].isspace() and not extra[0].isalnum()):
        return None
    return generated_exact_match(tokenizer, [*answer_ids, following], answer)


@torch.no_grad()
def score_clozes(
    model,
    tokenizer,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    answers: Sequence[str],
    batch_size: int,
    pad_id: int,
    generate: str = "needed",
    progress: Progress | None = None,
    reuse: PrefixReuse | None = None,
    drafts: Sequence[tuple[int, list[int]] | None] | None = None,
) -> tuple[PieceScores, list[str]]:
    """Teacher-forced and greedy scores of (prompt ids, answer ids) items, in their order; also the greedy texts.

    Batches are cut by length so they pad little (`scoring.padded_batches`: real HotpotQA pieces run from 5 to 45
    tokens). With `reuse` (`scoring.PrefixReuse`), the first call keeps each batch's states below the first
    edited block and every later call with the same items runs only the blocks from there up.

    The teacher-forced pass also gives greedy decoding's tokens while it follows the answer, which settle the greedy
    match of most items (`greedy_decision`); `generate` = needed decodes only the others (an item settled without
    decoding gets the text greedy decoding had reached), all decodes every item (texts for the report), none decodes
    nothing (gen_em then holds the settled items' answers and False elsewhere). Decoding goes on from the
    teacher-forced pass's KV cache (`CachedScores.continue_greedy`: the prompt is not run again) where the model
    allows it, and stops at the item's answer length + EXTRA_GENERATED_TOKENS.

    `drafts` (the `PieceScores.drafts` of an earlier scoring of the same items) are checked in the teacher-forced
    pass itself (`scoring.with_branches`): where greedy decoding leaves the answer at the same token and the model's
    argmax after every draft token is the draft's next token, decoding would produce the draft, and it is not run
    (speculative decoding's check, exact). After an edit most items' continuations are unchanged.
    """
    n = len(items)
    logp, tf_em, gen_em, texts, rank = [0.0] * n, [False] * n, [False] * n, [""] * n, [0] * n
    found: list[tuple[int, list[int]] | None] = [None] * n
    decoded = 0
    eos = tokenizer.eos_token_id
    cached = supports_cached_scoring(model)
    undecided: list[int] = []
    # A draft checked in the pass runs after its item's answer (all but its last token): batches are cut by the
    # length with it, or a row with a long draft pads its whole batch.
    branch = [None] * n
    if cached and drafts:
        branch = [(d[0], d[1][:-1]) if d and len(d[1]) > 1 else None for d in drafts]
    lengths = [len(p) + len(a) + (len(b[1]) if b else 0) for (p, a), b in zip(items, branch)]
    for rows in padded_batches(lengths, batch_size):
        chunk = [items[i] for i in rows]
        branches = [branch[i] for i in rows] if cached and drafts else None
        if cached:
            result = CachedScores(model, chunk, pad_id, reuse, ("clozes", n, tuple(rows)), branches)
            greedy, following, batch_rank = result.greedy, result.next, result.rank
            batch_logp, batch_tf = result.logp, result.tf_em
        else:
            scored = score_batch(model, collate_clozes(chunk, pad_id))
            greedy, following, batch_rank = scored["greedy"], scored["next"], scored["rank"]
            batch_logp, batch_tf = scored["logp"], scored["tf_em"]
        keep, first, max_new, pending, taken = [], [], [], [], []
        for k, i in enumerate(rows):
            logp[i], tf_em[i], rank[i] = batch_logp[k].item(), bool(batch_tf[k]), batch_rank[k]
            answer_ids = list(items[i][1])
            decided = greedy_decision(tokenizer, answer_ids, greedy[k], following[k], answers[i], eos)
            gen_em[i] = bool(decided)
            # How far greedy decoding follows the answer, and the token it picks there.
            j = next((j for j, (a, g) in enumerate(zip(answer_ids, greedy[k])) if a != g), len(answer_ids))
            keep.append(j)
            first.append(greedy[k][j] if j < len(answer_ids) else following[k])
            texts[i] = tokenizer.decode(answer_ids[:j] + [first[-1]], skip_special_tokens=True)
            wanted = generate == "all" or (generate == "needed" and decided is None)
            max_new.append(len(answer_ids) + EXTRA_GENERATED_TOKENS - j if wanted else 1)
            taken.append([])
            draft = drafts[i] if drafts and cached else None
            known = None
            if wanted and draft and draft[0] == j and draft[1][0] == first[-1]:
                # The argmax after each draft token, read in the pass (speculative decoding's check): greedy
                # decoding takes the draft up to the first token the argmax disagrees with, then that argmax.
                tokens, seen = draft[1], result.branch_argmax[k]
                m = next((b for b, t in enumerate(seen) if t != tokens[b + 1]), len(tokens) - 1)
                taken[-1], known = tokens[: m + 1], tokens[: m + 1] + seen[m : m + 1]
                if m + 1 < len(tokens) and known[-1] != eos and len(known) < max_new[-1]:
                    first[-1], known = known[-1], None  # decoding goes on after the tokens taken
            if known is not None:  # settled by the draft, without decoding
                ids = answer_ids[:j] + known[: max_new[-1]]
                gen_em[i] = generated_exact_match(tokenizer, ids, answers[i])
                texts[i], found[i] = tokenizer.decode(ids, skip_special_tokens=True), (j, known[: max_new[-1]])
            elif wanted:
                pending.append(k)
        decoded += len(pending)
        if pending and cached:  # decode on from the teacher-forced pass's cache
            # Only the pending rows decode: a row its draft settled would otherwise run every step for nothing.
            decoding = set(pending)
            continued = result.continue_greedy(
                keep,
                first,
                [m if k in decoding else 1 for k, m in enumerate(max_new)],
                eos,
                [len(t) for t in taken],
            )
            for k in pending:
                i = rows[k]
                tokens = taken[k] + continued[k]
                ids = list(items[i][1])[: keep[k]] + tokens
                gen_em[i] = generated_exact_match(tokenizer, ids, answers[i])
                texts[i], found[i] = tokenizer.decode(ids, skip_special_tokens=True), (keep[k], tokens)
        elif pending:
            undecided += [rows[k] for k in pending]
        if progress is not None:
            progress.update(len(rows))
    for start in range(0, len(undecided), batch_size):  # models without a reusable cache: decode again
        rows = undecided[start : start + batch_size]
        generated = greedy_continuations(
            model,
            [items[i][0] for i in rows],
            max(len(items[i][1]) for i in rows) + EXTRA_GENERATED_TOKENS,
            pad_id,
            eos,
        )
        for i, ids in zip(rows, generated):
            ids = ids[: len(items[i][1]) + EXTRA_GENERATED_TOKENS]  # as if decoded alone
            gen_em[i] = generated_exact_match(tokenizer, ids, answers[i])
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return PieceScores(logp, tf_em, gen_em, rank, found, decoded), texts


def score_pieces(
    model,
    tokenizer,
    pieces: Sequence[KnowledgePiece],
    batch_size: int,
    pad_id: int,
    progress: Progress | None = None,
    reuse: PrefixReuse | None = None,
    drafts: Sequence[tuple[int, list[int]] | None] | None = None,
) -> PieceScores:
    items = [(p.prompt_ids, p.answer_ids) for p in pieces]
    answers = [p.answer for p in pieces]
    return score_clozes(
        model, tokenizer, items, answers, batch_size, pad_id, progress=progress, reuse=reuse, drafts=drafts
    )[0]


def checked_drafts(model, tokenizer, pieces: Sequence[KnowledgePiece], baseline: PieceScores, pad_id: int, rows=16):
    """The baseline's drafts, if checking them in the teacher-forced pass works for this model: `rows` pieces with
    drafts scored again on the same (unedited) model, their drafts as branches, must give the same log P, greedy
    matches and continuations with no decoding (tree attention through a 4D mask is not assumed of every family).
    Else None: decoding then runs as without drafts."""
    picked = [i for i, d in enumerate(baseline.drafts) if d][:rows]
    if not picked or not supports_cached_scoring(model):
        return None
    sub = [pieces[i] for i in picked]
    try:
        again = score_pieces(model, tokenizer, sub, len(sub), pad_id, drafts=[baseline.drafts[i] for i in picked])
    except Exception:  # a family whose forward refuses a 4D mask or position ids
        return None
    same = all(abs(again.logp[k] - baseline.logp[i]) < 1e-4 for k, i in enumerate(picked))
    same = same and [again.gen_em[k] for k in range(len(picked))] == [baseline.gen_em[i] for i in picked]
    # every draft must hold to its end: one that broke is settled by the argmax at the break, without decoding
    same = same and again.drafts == [baseline.drafts[i] for i in picked]
    return baseline.drafts if same and again.decoded == 0 else None


def question_of(pieces: Sequence[KnowledgePiece], source: int) -> int | None:
    """The composed-question piece of the edited piece's chain."""
    chain = pieces[source].chain_id
    return next((i for i, p in enumerate(pieces) if p.chain_id == chain and p.kind == "question"), None)


@dataclass
class Probes:
    """The clozes an edit is judged on besides the pieces: its own prompt with the true and the new answer, the
    composed question with the new answer when the edited fact supplies the question's answer, and a CounterFact
    case's paraphrase and neighbourhood prompts, each with (true, new) answers."""

    items: list[tuple[list[int], list[int]]]
    answers: list[str]
    question: int | None  # piece index of the composed question
    question_follows: bool  # the edited fact's answer is the question's answer
    paraphrase: list[tuple[int, int]] = field(default_factory=list)  # (item of true, item of new) per prompt
    neighborhood: list[tuple[int, int]] = field(default_factory=list)


def _pair(tokenizer, prompts: Sequence[str], true: str, new: str, bos_ids, probes: Probes) -> list[tuple[int, int]]:
    pairs = []
    for prompt in prompts:
        for answer in (true, new):
            probes.items.append(encode_cloze(tokenizer, prompt, answer, bos_ids))
            probes.answers.append(answer)
        pairs.append((len(probes.items) - 2, len(probes.items) - 1))
    return pairs


def build_probes(tokenizer, request: EditRequest, pieces: Sequence[KnowledgePiece], bos_ids: Sequence[int]) -> Probes:
    prompt_ids, new_ids = encode_cloze(tokenizer, request.prompt, request.target_new, bos_ids)
    if request.source_index < 0:  # a CounterFact case: no piece, no chain
        true_item = encode_cloze(tokenizer, request.prompt, request.target_true, bos_ids)
        probes = Probes([true_item, (prompt_ids, new_ids)], [request.target_true, request.target_new], None, False)
        case = request.counterfact or {}
        probes.paraphrase = _pair(
            tokenizer, case.get("paraphrase_prompts", []), request.target_true, request.target_new, bos_ids, probes
        )
        probes.neighborhood = _pair(
            tokenizer,
            case.get("neighborhood_prompts", []),
            case.get("neighborhood_true") or request.target_true,
            request.target_new,
            bos_ids,
            probes,
        )
        return probes
    source = pieces[request.source_index]
    items = [(list(source.prompt_ids), list(source.answer_ids)), (prompt_ids, new_ids)]
    answers = [request.target_true, request.target_new]
    q = question_of(pieces, request.source_index)
    follows = q is not None and normalize_answer(pieces[q].answer) == normalize_answer(request.target_true)
    if follows:
        items.append(encode_cloze(tokenizer, pieces[q].prompt, request.target_new, bos_ids))
        answers.append(request.target_new)
    return Probes(items, answers, q, follows)


def counterfact_metrics(probes: Probes, scores: PieceScores) -> dict:
    """The standard metrics of Meng et al. (2022) from one set of probe scores (before or after the edit).

    efficacy_score: P(new) > P(true) on the rewrite prompt; efficacy_magnitude: P(new) − P(true) there;
    paraphrase_score: the fraction of paraphrase prompts with P(new) > P(true) (magnitude: mean difference);
    neighborhood_score: the fraction of neighbourhood prompts with P(true) > P(new) (magnitude: mean P(true) −
    P(new)). P is the probability of the whole answer (every token); None where a case has no such prompts.
    """
    p = [math.exp(x) for x in scores.logp]

    def score(pairs, new_wins: bool):
        if not pairs:
            return None, None
        wins = [(p[n] > p[t]) if new_wins else (p[t] > p[n]) for t, n in pairs]
        diffs = [(p[n] - p[t]) if new_wins else (p[t] - p[n]) for t, n in pairs]
        return sum(wins) / len(wins), float(np.mean(diffs))

    paraphrase, paraphrase_magnitude = score(probes.paraphrase, True)
    neighborhood, neighborhood_magnitude = score(probes.neighborhood, False)
    return {
        "efficacy_score": float(p[1] > p[0]),
        "efficacy_magnitude": p[1] - p[0],
        "paraphrase_score": paraphrase,
        "paraphrase_magnitude": paraphrase_magnitude,
        "paraphrase_n": len(probes.paraphrase),
        "neighborhood_score": neighborhood,
        "neighborhood_magnitude": neighborhood_magnitude,
        "neighborhood_n": len(probes.neighborhood),
    }


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _kept(before: Sequence[bool], after: Sequence[bool], idx: Sequence[int]) -> float | None:
    known = [i for i in idx if before[i]]
    return sum(bool(after[i]) for i in known) / len(known) if known else None


def _group(before: PieceScores, after: PieceScores, idx: Sequence[int]) -> dict:
    delta = [after.logp[i] - before.logp[i] for i in idx]
    return {
        "n": len(idx),
        "mean_delta_logp": _mean(delta),
        "mean_abs_delta_logp": _mean(map(abs, delta)),
        "tf_em_kept": _kept(before.tf_em, after.tf_em, idx),
        "gen_em_kept": _kept(before.gen_em, after.gen_em, idx),
    }


def _record_head(request: EditRequest) -> dict:
    """What every entry of ripple_experiments.json starts with: which edit, of which piece, asking what."""
    return {
        "edit_id": request.edit_id,
        "source_index": request.source_index,
        "source_piece": request.source_id,
        "request": {k: getattr(request, k) for k in ("prompt", "subject", "target_true", "target_new")},
        "answer_type": request.answer_type,
        "type_evidence": request.type_evidence,
    }


def experiment_record(
    request: EditRequest,
    pieces: Sequence[KnowledgePiece],
    before: PieceScores,
    after: PieceScores,
    probes: Probes,
    probe_before: PieceScores,
    probe_after: PieceScores,
    probe_texts: list[str],
    memit_info: dict,
    time_s: dict,
    known_before: bool | None = None,
) -> dict:
    """One edit's entry of ripple_experiments.json. `known_before`: the source was known to the model by the
    run's criterion (default: the piece's greedy answer match before the edit)."""
    i = request.source_index
    chain = pieces[i].chain_id if i >= 0 else None
    efficacy = {
        "logp_true_before": probe_before.logp[0],
        "logp_true_after": probe_after.logp[0],
        "logp_new_before": probe_before.logp[1],
        "logp_new_after": probe_after.logp[1],
        "success": probe_after.logp[1] > probe_after.logp[0],
        "generated": probe_texts[1],
        "generated_success": probe_after.gen_em[1],
        "known_before": bool(before.gen_em[i] if known_before is None else known_before),
    }
    generalisation = None
    if probes.question is not None:
        q = probes.question
        generalisation = {
            "piece": pieces[q].id,
            "index": q,
            "answer_follows_edit": probes.question_follows,
            "logp_true_before": before.logp[q],
            "logp_true_after": after.logp[q],
            "gen_em_true_before": before.gen_em[q],
            "gen_em_true_after": after.gen_em[q],
        }
        if probes.question_follows:  # the edited fact gives the question's answer: it should now say the new one
            generalisation.update(
                {
                    "logp_new_before": probe_before.logp[2],
                    "logp_new_after": probe_after.logp[2],
                    "success": probe_after.logp[2] > after.logp[q],
                    "generated": probe_texts[2],
                    "generated_success": probe_after.gen_em[2],
                }
            )
    same = [j for j, p in enumerate(pieces) if p.chain_id == chain and j != i]
    other = [j for j, p in enumerate(pieces) if p.chain_id != chain]
    return {
        **_record_head(request),
        "status": "ok",
        "error": None,
        "time_s": time_s,
        "efficacy": efficacy,
        "counterfact": {
            "before": counterfact_metrics(probes, probe_before),
            "after": counterfact_metrics(probes, probe_after),
        },
        "generalisation": generalisation,
        "locality": {"other_chains": _group(before, after, other), "same_chain": _group(before, after, same)},
        "memit": memit_info,
        "pieces": {
            "logp_before": before.logp,
            "logp_after": after.logp,
            "tf_em_before": before.tf_em,
            "tf_em_after": after.tf_em,
            "gen_em_before": before.gen_em,
            "gen_em_after": after.gen_em,
        },
    }


def failed_record(request: EditRequest, error: BaseException, time_s: dict) -> dict:
    return {
        **_record_head(request),
        "status": "error",
        "error": f"{type(error).__name__}: {error}",
        "time_s": time_s,
        "efficacy": None,
        "counterfact": None,
        "generalisation": None,
        "locality": None,
        "memit": None,
        "pieces": None,
    }


def summarise(records: Sequence[dict]) -> dict:
    """Rates over all edits (a failed edit counts as not successful) and means over the measured ones."""
    ok = [r for r in records if r["status"] == "ok"]
    n = len(records)

    def rate(values) -> float | None:
        values = list(values)
        return sum(map(bool, values)) / len(values) if values else None

    def after(key: str) -> float | None:
        return _mean(
            r["counterfact"]["after"][key]
            for r in ok
            if r.get("counterfact") and r["counterfact"]["after"][key] is not None
        )

    follows = [r["generalisation"] for r in ok if r["generalisation"] and r["generalisation"]["answer_follows_edit"]]
    types: dict[str, int] = {}
    for r in records:
        types[r.get("answer_type") or "untyped"] = types.get(r.get("answer_type") or "untyped", 0) + 1
    return {
        "edits": n,
        "ok": len(ok),
        "failed": n - len(ok),
        "efficacy_logp": rate([r["efficacy"]["success"] for r in ok] + [False] * (n - len(ok))),
        "efficacy_generated": rate([r["efficacy"]["generated_success"] for r in ok] + [False] * (n - len(ok))),
        "known_before": rate(r["efficacy"]["known_before"] for r in ok),
        "efficacy_score": after("efficacy_score"),
        "efficacy_magnitude": after("efficacy_magnitude"),
        "paraphrase_score": after("paraphrase_score"),
        "neighborhood_score": after("neighborhood_score"),
        "answer_types": types,
        "generalisation_generated": rate(g["generated_success"] for g in follows),
        "generalisation_n": len(follows),
        "locality_gen_em_kept": _mean(
            r["locality"]["other_chains"]["gen_em_kept"]
            for r in ok
            if r["locality"]["other_chains"]["gen_em_kept"] is not None
        ),
        "mean_time_edit_s": _mean(r["time_s"]["edit"] for r in ok),
        "mean_time_measure_s": _mean(r["time_s"]["measure"] for r in ok),
    }


def baseline_block(scores: PieceScores, criterion: str, plan_info: dict) -> dict:
    """ripple_experiments.json's `baseline`: every piece scored once before any edit (reused by every edit),
    which pieces the model knows by `criterion`, and how many edit sources were known."""
    known = scores.known(criterion)
    return {
        "criterion": criterion,
        "criterion_means": KNOWN_CRITERIA[criterion],
        **scores.to_dict(),
        "known": known,
        "n_pieces": len(known),
        "n_known": sum(known),
        "sources": {k: plan_info.get(k) for k in ("kind", "sources", "known", "unmatched", "types")},
    }


PAIR_COLUMNS = (
    "edit_id",
    "source_index",
    "source_piece",
    "piece_index",
    "piece_id",
    "kind",
    "chain_id",
    "same_chain",
    "is_source",
    "logp_before",
    "logp_after",
    "delta_logp",
    "rel_delta_logp",
    "tf_em_before",
    "tf_em_after",
    "gen_em_before",
    "gen_em_after",
)


def pair_rows(records: Sequence[dict], pieces: Sequence[KnowledgePiece]) -> list[dict]:
    """One row per (successfully measured edit, piece). rel_delta_logp = ΔlogP_j / ΔlogP_i, i the edited piece."""
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        s = r["pieces"]
        i = r["source_index"]
        if i >= 0:
            own = s["logp_after"][i] - s["logp_before"][i]
        else:  # a CounterFact edit: its own prompt's true answer
            own = r["efficacy"]["logp_true_after"] - r["efficacy"]["logp_true_before"]
        for j, piece in enumerate(pieces):
            delta = s["logp_after"][j] - s["logp_before"][j]
            rows.append(
                {
                    "edit_id": r["edit_id"],
                    "source_index": i,
                    "source_piece": r["source_piece"],
                    "piece_index": j,
                    "piece_id": piece.id,
                    "kind": piece.kind,
                    "chain_id": piece.chain_id,
                    "same_chain": i >= 0 and piece.chain_id == pieces[i].chain_id,
                    "is_source": j == i,
                    "logp_before": s["logp_before"][j],
                    "logp_after": s["logp_after"][j],
                    "delta_logp": delta,
                    "rel_delta_logp": delta / own if own != 0 else math.nan,
                    "tf_em_before": s["tf_em_before"][j],
                    "tf_em_after": s["tf_em_after"][j],
                    "gen_em_before": s["gen_em_before"][j],
                    "gen_em_after": s["gen_em_after"][j],
                }
            )
    return rows


def pairs_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PAIR_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (repr(v) if isinstance(v, float) else int(v) if isinstance(v, bool) else v) for k, v in row.items()}
        )
    return buffer.getvalue()
