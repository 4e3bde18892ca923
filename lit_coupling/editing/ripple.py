"""Measuring an edit: every piece scored before and after, the edit's own efficacy, generalisation and
locality.

The JSON record of one edit and the flat (edit, piece) table are built here; `docs/outputs.md` describes both.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.requests import EditRequest
from lit_coupling.scoring import (
    collate_clozes,
    encode_cloze,
    generated_exact_match,
    greedy_continuations,
    normalize_answer,
    score_batch,
)

RIPPLE_FORMAT = "lit_coupling.ripple_experiments/1"
EXTRA_GENERATED_TOKENS = 2  # so "Paris" is not read as a match when the model goes on "…ian"


@dataclass
class PieceScores:
    logp: list[float]  # log P(true answer | prompt), every answer token
    tf_em: list[bool]  # every answer token is the argmax (teacher-forced)
    gen_em: list[bool]  # greedy decoding reads as the answer


@torch.no_grad()
def score_clozes(
    model,
    tokenizer,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    answers: Sequence[str],
    batch_size: int,
    pad_id: int,
) -> tuple[PieceScores, list[str]]:
    """Teacher-forced and greedy scores of (prompt ids, answer ids) items, in their order; also the greedy texts.

    Batches are drawn shortest prompt first: pieces of about the same length pad little (real HotpotQA pieces
    run from 5 to 45 GPT-2 tokens) and a batch decodes only as far as its own longest answer needs.
    """
    n = len(items)
    # Prompt length first (not the whole length, as GradSim's batches): greedy decoding left-pads the prompts.
    order = sorted(range(n), key=lambda i: (len(items[i][0]), len(items[i][1])))
    logp, tf_em, gen_em, texts = [0.0] * n, [False] * n, [False] * n, [""] * n
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        chunk = [items[i] for i in rows]
        result = score_batch(model, collate_clozes(chunk, pad_id))
        generated = greedy_continuations(
            model,
            [p for p, _ in chunk],
            max(len(a) for _, a in chunk) + EXTRA_GENERATED_TOKENS,
            pad_id,
            tokenizer.eos_token_id,
        )
        for i, lp, tf, ids in zip(rows, result["logp"].tolist(), result["tf_em"].tolist(), generated):
            logp[i], tf_em[i] = lp, tf
            gen_em[i] = generated_exact_match(tokenizer, ids, answers[i])
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return PieceScores(logp, tf_em, gen_em), texts


def score_pieces(
    model, tokenizer, pieces: Sequence[KnowledgePiece], batch_size: int, pad_id: int
) -> PieceScores:
    items = [(p.prompt_ids, p.answer_ids) for p in pieces]
    return score_clozes(model, tokenizer, items, [p.answer for p in pieces], batch_size, pad_id)[0]


def question_of(pieces: Sequence[KnowledgePiece], source: int) -> int | None:
    """The composed-question piece of the edited piece's chain."""
    chain = pieces[source].chain_id
    return next((i for i, p in enumerate(pieces) if p.chain_id == chain and p.kind == "question"), None)


@dataclass
class Probes:
    """The clozes an edit is judged on besides the pieces: its own prompt with the new answer, and the
    composed
    question with the new answer when the edited fact supplies the question's answer."""

    items: list[tuple[list[int], list[int]]]
    answers: list[str]
    question: int | None  # piece index of the composed question
    question_follows: bool  # the edited fact's answer is the question's answer


def build_probes(
    tokenizer, request: EditRequest, pieces: Sequence[KnowledgePiece], bos_ids: Sequence[int]
) -> Probes:
    source = pieces[request.source_index]
    prompt_ids, new_ids = encode_cloze(tokenizer, request.prompt, request.target_new, bos_ids)
    items = [(list(source.prompt_ids), list(source.answer_ids)), (prompt_ids, new_ids)]
    answers = [request.target_true, request.target_new]
    q = question_of(pieces, request.source_index)
    follows = q is not None and normalize_answer(pieces[q].answer) == normalize_answer(request.target_true)
    if follows:
        items.append(encode_cloze(tokenizer, pieces[q].prompt, request.target_new, bos_ids))
        answers.append(request.target_new)
    return Probes(items, answers, q, follows)


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
) -> dict:
    """One edit's entry of ripple_experiments.json."""
    i = request.source_index
    chain = pieces[i].chain_id
    efficacy = {
        "logp_true_before": probe_before.logp[0],
        "logp_true_after": probe_after.logp[0],
        "logp_new_before": probe_before.logp[1],
        "logp_new_after": probe_after.logp[1],
        "success": probe_after.logp[1] > probe_after.logp[0],
        "generated": probe_texts[1],
        "generated_success": probe_after.gen_em[1],
        "known_before": before.gen_em[i],
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
        if (
            probes.question_follows
        ):  # the edited fact gives the question's answer: it should now say the new one
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

    follows = [
        r["generalisation"] for r in ok if r["generalisation"] and r["generalisation"]["answer_follows_edit"]
    ]
    return {
        "edits": n,
        "ok": len(ok),
        "failed": n - len(ok),
        "efficacy_logp": rate([r["efficacy"]["success"] for r in ok] + [False] * (n - len(ok))),
        "efficacy_generated": rate(
            [r["efficacy"]["generated_success"] for r in ok] + [False] * (n - len(ok))
        ),
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
    """One row per (successfully measured edit, piece). rel_delta_logp = ΔlogP_j / ΔlogP_i, i the edited
    piece."""
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        s = r["pieces"]
        i = r["source_index"]
        own = s["logp_after"][i] - s["logp_before"][i]
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
                    "same_chain": piece.chain_id == pieces[i].chain_id,
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
            {
                k: (repr(v) if isinstance(v, float) else int(v) if isinstance(v, bool) else v)
                for k, v in row.items()
            }
        )
    return buffer.getvalue()
