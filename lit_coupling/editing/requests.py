"""Edit requests from knowledge pieces (subject, prompt, a seeded counterfactual answer), and their token layout.

The subject's last token is found by character offsets in the text actually fed to the model, then shifted by the BOS
ids put in front — so a LLaMA BOS never moves the position MEMIT reads keys from and writes to.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lit_coupling.data.answer_types import (
    TypedEntities,
    answer_type,
    entities_from_paragraphs,
    entities_from_truth,
    lexicon_type,
    same_type_candidates,
)
from lit_coupling.data.counterfact import CounterFactCase
from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.errors import UserError
from lit_coupling.scoring import cloze_text, encode_cloze, normalize_answer

SOURCE_KINDS = ("hop1", "hop2", "compare")  # single facts; the composed question is measured, never edited


@dataclass
class EditRequest:
    """Change the answer of one piece's prompt from `target_true` to `target_new`."""

    edit_id: int
    source_index: int  # position of the edited piece in knowledge_pieces.json; -1: a CounterFact case
    source_id: str
    prompt: str
    subject: str
    target_true: str
    target_new: str
    answer_type: str = ""  # the type both answers share (year, person, nationality, ...): answer_types.py
    type_evidence: str = ""  # how the type was decided (shape, lexicon, paragraph title, relation, ...)
    # A CounterFact case: its paraphrase and neighbourhood prompts (the standard metrics), None for a piece.
    counterfact: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RequestPlan:
    requests: list[EditRequest]
    eligible: int  # pieces that could have been edited
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count, for pieces that could not be
    sources: int = 0  # candidate sources (single-fact pieces, or CounterFact cases)
    known: int | None = None  # of them, known to the model before editing (None: not judged)
    unmatched: int = 0  # sources whose answer no same-type counterfactual could be found for (not edited)
    types: dict[str, int] = field(default_factory=dict)  # answer type → eligible sources of that type


def subject_span(prompt: str, subject: str) -> tuple[int, int] | None:
    """Character span of the subject's last occurrence in the prompt."""
    start = prompt.rfind(subject) if subject else -1
    return None if start < 0 else (start, start + len(subject))


def relation_template(piece: KnowledgePiece) -> str | None:
    """The piece's prompt with its subject cut out ("The author of {} is"): pieces sharing it share a relation."""
    span = subject_span(piece.prompt, piece.subject)
    return None if span is None else piece.prompt[: span[0]] + "{}" + piece.prompt[span[1] :]


def entities_for_source(path: str | Path | None) -> TypedEntities:
    """Typed entity names of the pieces' source: the synthetic world's truth when it has one, else the
    HotpotQA records' paragraphs (each title typed by its own text). Empty when the file is gone."""
    from lit_coupling.data.hotpotqa import normalize_record, parse_records
    from lit_coupling.data.world import load_truth

    if not path or not Path(path).is_file():
        return TypedEntities()
    truth = load_truth(path)
    if truth is not None:
        return entities_from_truth(truth)
    raw, _ = parse_records(path)
    paragraphs: dict[str, list[str]] = {}
    for i, record in enumerate(raw):
        context = normalize_record(record, i, path)["context"]
        for title, sentences in zip(context["title"], context["sentences"]):
            paragraphs.setdefault(title, list(sentences))
    return entities_from_paragraphs(paragraphs.items())


_FUNCTION_WORDS = frozenset(
    "a an the is was are were be been of in on at to for from by with as and or its his "
    "her their it he she they".split()
)


def names_a_relation(template: str) -> bool:
    """A template that says something besides its subject ("born in: {}", "The author of {} is"); "{} is a" is
    shared by facts of every kind and types nothing."""
    return any(w.lower() not in _FUNCTION_WORDS for w in re.findall(r"[A-Za-z]+", template))


NOT_KNOWN = "not known to the model before the edit"
NO_SAME_TYPE = "no counterfactual of the same type"


@dataclass
class Counterfactual:
    new: str
    kind: str
    evidence: str


def counterfactual_choices(
    pieces: Sequence[KnowledgePiece], entities: TypedEntities | None = None
) -> dict[int, tuple[list[str], str, str] | None]:
    """For each single-fact piece: (same-type candidates, type, evidence), or None when none could be found.

    The type comes from the answer itself (answer_types.answer_type); the candidates are the answers of pieces
    with the same relation template and type when there are any (CounterFact: the objects of the same relation),
    else every answer and entity name of the type in the data. An answer of no type is matched by its relation
    template alone (the synthetic worlds' relations, whose objects share a type); otherwise it is unmatched.
    """
    entities = entities or TypedEntities()
    typed = [answer_type(p.answer, p.prompt, entities) for p in pieces]
    by_template: dict[str, list[int]] = {}
    for index, piece in enumerate(pieces):
        template = relation_template(piece)
        if template is not None and piece.kind in SOURCE_KINDS:
            by_template.setdefault(template, []).append(index)
    answers_of_type: dict[str, list[str]] = {}
    for (kind, _), piece in zip(typed, pieces):
        if kind:
            answers_of_type.setdefault(kind, []).append(piece.answer)
    out: dict[int, tuple[list[str], str, str] | None] = {}
    for index, piece in enumerate(pieces):
        if piece.kind not in SOURCE_KINDS:
            continue
        template = relation_template(piece)
        if template is None:
            continue
        true = normalize_answer(piece.answer)
        kind, evidence = typed[index]
        relation = [j for j in by_template.get(template, []) if normalize_answer(pieces[j].answer) != true]
        if kind:
            # Same relation and same type: real prompts as short as "{} is a" are shared by unrelated facts.
            same = [pieces[j].answer for j in relation if typed[j][0] == kind]
            pool = same or same_type_candidates(kind, answers_of_type.get(kind, []), entities, piece.prompt)
            evidence += ", same relation" if same else ""
        elif relation and names_a_relation(template):
            # An untyped answer is matched by relation, but never with a typed one: no year for a city.
            kind, evidence = "relation", f"relation template {template!r}"
            pool = [pieces[j].answer for j in relation if typed[j][0] is None]
        else:
            out[index] = None
            continue
        choices = list(
            dict.fromkeys(with_article(piece.answer, a) for a in pool if normalize_answer(a) not in (true, ""))
        )
        out[index] = (choices, kind, evidence) if choices else None
    return out


_ARTICLE = re.compile(r"^(a|an|the) ", re.I)


_NAMES_WITHOUT_ARTICLE = ("city", "country", "US state", "place", "nationality", "language")


def with_article(true: str, new: str) -> str:
    """The new answer written as the true one is: "a genus" → "a tree", "an" before a vowel, "the" kept ("the Big
    East"). A place name or nationality the lexicons know never borrows one ("the United States" → "France", not
    "the France"): where such a name takes "the", the candidate carries it itself."""
    found = _ARTICLE.match(true)
    if not found or _ARTICLE.match(new) or lexicon_type(new) in _NAMES_WITHOUT_ARTICLE:
        return new
    article = found.group(1)
    if article.lower() in ("a", "an"):
        article = "an" if new[:1].lower() in "aeiou" else "a"
        article = article.capitalize() if found.group(1)[0].isupper() else article
    return f"{article} {new}"


def plan_requests(
    pieces: Sequence[KnowledgePiece],
    max_experiments: int,
    seed: int = 0,
    known: Sequence[bool] | None = None,
    entities: TypedEntities | None = None,
) -> RequestPlan:
    """`max_experiments` single-fact pieces, drawn seeded, each with a counterfactual answer of its own type.

    Only pieces the model knows are drawn when `known` (one flag per piece) is given. The new answer is drawn
    from the same-type candidates of `counterfactual_choices` (never one that normalises to the true answer);
    pieces without any are not edited and counted as unmatched. Sources are a seeded shuffle of the eligible
    pieces, so a smaller `max_experiments` edits a prefix of what a larger one edits; each counterfactual is
    drawn from a generator seeded by (seed, piece id), so it does not depend on which other pieces are edited.
    """
    choices = counterfactual_choices(pieces, entities)
    skipped: Counter[str] = Counter()
    eligible: list[tuple[int, Counterfactual]] = []
    sources = n_known = unmatched = 0
    types: Counter[str] = Counter()
    for index, piece in enumerate(pieces):
        if piece.kind not in SOURCE_KINDS:
            continue
        sources += 1
        is_known = known is None or bool(known[index])
        n_known += is_known
        if relation_template(piece) is None:
            skipped["subject not in prompt"] += 1
            continue
        choice = choices.get(index)
        if choice is None:
            unmatched += 1
            skipped[NO_SAME_TYPE] += 1
            continue
        if not is_known:
            skipped[NOT_KNOWN] += 1
            continue
        pool, kind, evidence = choice
        new = random.Random(f"{seed}:{piece.id}").choice(pool)
        eligible.append((index, Counterfactual(new, kind, evidence)))
        types[kind] += 1
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    requests = []
    for edit_id, k in enumerate(order[: max(0, max_experiments)]):
        index, cf = eligible[k]
        piece = pieces[index]
        requests.append(
            EditRequest(
                edit_id, index, piece.id, piece.prompt, piece.subject, piece.answer, cf.new, cf.kind, cf.evidence
            )
        )
    return RequestPlan(
        requests, len(eligible), dict(skipped), sources, None if known is None else n_known, unmatched, dict(types)
    )


def plan_counterfact(
    cases: Sequence[CounterFactCase], max_experiments: int, seed: int = 0, known: Sequence[bool] | None = None
) -> RequestPlan:
    """CounterFact's requested rewrites as edits (its own counterfactual targets, of its relation's type), drawn
    seeded from the cases the model knows (`known`, one flag per case) like `plan_requests`. A case whose new
    object is of another type than its true one (`CounterFactCase.type_mismatch`) is not edited: counted as
    unmatched."""
    skipped: Counter[str] = Counter()
    eligible, types = [], Counter()
    unmatched = 0  # cases whose new object is of another type than the true one (CounterFactCase.type_mismatch)
    for index, case in enumerate(cases):
        if subject_span(case.prompt, case.subject) is None:
            skipped["subject not in prompt"] += 1
            continue
        if case.type_mismatch():
            unmatched += 1
            skipped[NO_SAME_TYPE] += 1
            continue
        if known is not None and not known[index]:
            skipped[NOT_KNOWN] += 1
            continue
        eligible.append(index)
        types[case.answer_type()[0]] += 1
    order = list(range(len(eligible)))
    random.Random(seed).shuffle(order)
    requests = []
    for edit_id, k in enumerate(order[: max(0, max_experiments)]):
        case = cases[eligible[k]]
        kind, evidence = case.answer_type()
        requests.append(
            EditRequest(
                edit_id,
                -1,
                f"counterfact/{case.case_id}",
                case.prompt,
                case.subject,
                case.target_true,
                case.target_new,
                kind,
                evidence,
                case.probes(),
            )
        )
    n_known = None if known is None else sum(map(bool, known))
    return RequestPlan(requests, len(eligible), dict(skipped), len(cases), n_known, unmatched, dict(types))


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
    """Joint tokenisation (as every score is computed) plus the index of the token holding char `subject_end − 1` (and,
    given `subject_start`, of the token holding that char), and the `fact_token` position."""
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
        raise UserError(f"edit {request.edit_id}: subject {request.subject!r} is not in prompt {request.prompt!r}")
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
