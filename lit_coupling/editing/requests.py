"""Edit requests from knowledge pieces (subject, prompt, a seeded counterfactual answer), and their token
layout.

The subject's last token is found by character offsets in the text actually fed to the model, then shifted by
the
BOS ids put in front — so a LLaMA BOS never moves the position MEMIT reads keys from and writes to.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.errors import UserError
from lit_coupling.scoring import cloze_text, encode_cloze, normalize_answer

SOURCE_KINDS = ("hop1", "hop2", "compare")  # single facts; the composed question is measured, never edited


@dataclass
class EditRequest:
    """Change the answer of one piece's prompt from `target_true` to `target_new`."""

    edit_id: int
    source_index: int  # position of the edited piece in knowledge_pieces.json
    source_id: str
    prompt: str
    subject: str
    target_true: str
    target_new: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RequestPlan:
    requests: list[EditRequest]
    eligible: int  # pieces that could have been edited
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count, for pieces that could not be


def subject_span(prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of the subject's last occurrence in the prompt."""
    start = prompt.rfind(subject) if subject else -1
    return None if start < 0 else (start, start + len(subject))


def relation_template(piece: KnowledgePiece) -> str | None:
    """The piece's prompt with its subject cut out ("The author of {} is"): pieces sharing it share a
    relation."""
    span = subject_span(piece.prompt, piece.subject)
    return None if span is None else piece.prompt[: span[0]] + "{}" + piece.prompt[span[1] :]


def plan_requests(pieces: Sequence[KnowledgePiece], max_experiments: int, seed: int = 0) -> RequestPlan:
    """`max_experiments` single-fact pieces, drawn seeded, each with a counterfactual answer.

    The new answer is drawn from the answers of pieces with the same relation template when there are any (so
    an
    author is replaced by an author, as in CounterFact), else from the answers of pieces of the same kind;
    never
    one that normalises to the true answer. Sources are a seeded shuffle of the eligible pieces, so a smaller
    `max_experiments` edits a prefix of what a larger one edits; each counterfactual is drawn from a generator
    seeded by (seed, piece id), so it does not depend on which other pieces are edited.
    """
    answers: dict[tuple[str, str | None], list[str]] = {}
    for piece in pieces:
        for key in ((piece.kind, None), (piece.kind, relation_template(piece))):
            answers.setdefault(key, [])
            if piece.answer not in answers[key]:
                answers[key].append(piece.answer)
    skipped: Counter[str] = Counter()
    eligible: list[tuple[int, str]] = []
    for index, piece in enumerate(pieces):
        if piece.kind not in SOURCE_KINDS:
            continue
        template = relation_template(piece)
        if template is None:
            skipped["subject not in prompt"] += 1
            continue
        true = normalize_answer(piece.answer)
        choices = []
        for key in ((piece.kind, template), (piece.kind, None)):
            choices = [a for a in answers[key] if normalize_answer(a) not in (true, "")]
            if choices:
                break
        if not choices:
            skipped["no other answer of the same kind"] += 1
            continue
        eligible.append((index, random.Random(f"{seed}:{piece.id}").choice(choices)))
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    requests = []
    for edit_id, k in enumerate(order[: max(0, max_experiments)]):
        index, new = eligible[k]
        piece = pieces[index]
        requests.append(EditRequest(edit_id, index, piece.id, piece.prompt, piece.subject, piece.answer, new))
    return RequestPlan(requests, len(eligible), dict(skipped))


# Where MEMIT reads keys and writes the target vector, relative to the subject (the public implementation's
# `fact_token` strategies): its last token (the published setting), its first token, or the first token after it
# (the subject's last token when nothing follows it in the prompt).
FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last")


@dataclass
class TokenizedPrompt:
    """A prompt (context prefix + request prompt) followed by an answer, where the subject ends, and the fact token."""

    prompt_ids: list[int]
    answer_ids: list[int]
    subject_index: int  # position (BOS included) of the subject's last token
    fact_index: int  # the fact token's position
    subject_first: int | None = None  # position of its first token, when asked for


def fact_token_index(subject_first: int | None, subject_last: int, prompt_length: int, fact_token: str) -> int:
    """Position of the fact token given the subject's first and last token and the prompt's length (in tokens)."""
    if fact_token == "subject_last":
        return subject_last
    if fact_token == "subject_first":
        if subject_first is None:
            raise ValueError("subject_first needs the subject's first token")
        return subject_first
    if fact_token == "subject_first_after_last":
        return subject_last + 1 if subject_last + 1 < prompt_length else subject_last
    check_fact_token(fact_token)
    raise AssertionError(fact_token)  # every name check_fact_token accepts is handled above


def check_fact_token(fact_token: str) -> None:
    if fact_token not in FACT_TOKENS:
        raise UserError(f"unknown MEMIT fact_token {fact_token!r}: choose one of {', '.join(FACT_TOKENS)}")


def tokenize_with_subject(
    tokenizer,
    prompt: str,
    subject_end: int,
    answer: str,
    bos_ids: Sequence[int] = (),
    subject_start: int | None = None,
    fact_token: str = "subject_last",
) -> TokenizedPrompt:
    """Joint tokenisation (as every score is computed) plus the index of the token holding char `subject_end −
    1`
    (and, given `subject_start`, of the token holding that char), and the `fact_token` position."""
    prompt_ids, answer_ids = encode_cloze(tokenizer, prompt, answer, bos_ids)
    text = cloze_text(prompt, answer)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

        def token_at(char: int) -> int:
            return next(i for i, (start, end) in enumerate(offsets) if end > char and end > start)
    else:  # no offsets: a character sits in the last token of the text up to and including it

        def token_at(char: int) -> int:
            return len(tokenizer.encode(text[: char + 1], add_special_tokens=False)) - 1

    index = token_at(subject_end - 1) + len(bos_ids)
    if index >= len(prompt_ids):
        raise UserError(f"the subject ends inside the answer of {prompt!r} + {answer!r}")
    first = None if subject_start is None else token_at(subject_start) + len(bos_ids)
    fact = fact_token_index(first, index, len(prompt_ids), fact_token)
    return TokenizedPrompt(prompt_ids, answer_ids, index, fact, first)


def request_prompts(
    tokenizer,
    request: EditRequest,
    prefixes: Sequence[str],
    bos_ids: Sequence[int] = (),
    fact_token: str = "subject_last",
) -> list[TokenizedPrompt]:
    """The request prompt under each context prefix ("" first), each followed by the new answer."""
    span = subject_span(request.prompt, request.subject)
    if span is None:
        raise UserError(
            f"edit {request.edit_id}: subject {request.subject!r} is not in prompt {request.prompt!r}"
        )
    return [
        tokenize_with_subject(
            tokenizer,
            prefix + request.prompt,
            len(prefix) + span[1],
            request.target_new,
            bos_ids,
            len(prefix) + span[0],
            fact_token,
        )
        for prefix in prefixes
    ]


def kl_prompt(
    tokenizer, subject: str, bos_ids: Sequence[int] = (), fact_token: str = "subject_last"
) -> TokenizedPrompt:
    """ "{subject} is a": the prompt whose next-token distribution the edit should leave alone (read at its fact
    token, as in the public implementation)."""
    return tokenize_with_subject(tokenizer, f"{subject} is", len(subject), "a", bos_ids, 0, fact_token)
