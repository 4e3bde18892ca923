"""HotpotQA records → knowledge pieces: prefix clozes, each hop with its own answer, skips counted by reason.

Text only: `tokenize_pieces` adds the exact token ids for one model's tokenizer. The rules (bridge hop order,
subject restoration, comparison values) are documented in docs/outputs.md under "How pieces are extracted".
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.scoring import ClozeTokenError, cloze_text, encode_cloze, normalize_answer

QUESTION_PROMPT = "Question: {question} Answer:"

# Skip reasons (the keys of `skipped` in knowledge_pieces.json).
NOT_TWO_PARAGRAPHS = "supporting facts do not name exactly two paragraphs"
MISSING_TITLE = "supporting fact points to a missing title"
MISSING_SENTENCE = "supporting fact points to a missing sentence"
EMPTY_SENTENCE = "empty supporting sentence"
YES_NO_BRIDGE = "bridge record with a yes/no answer"
ANSWER_IS_ENTITY = "the answer is a supporting paragraph's own entity (no bridge)"
ANSWER_NOT_FOUND = "answer span not found in either supporting paragraph"
BRIDGE_NOT_FOUND = "bridge entity not found in the hop-1 sentence"
HOP1_NO_SUBJECT = "no hop-1 subject before the bridge entity"
HOP2_NO_SUBJECT = "no bridge entity before the answer in the hop-2 sentence"
SAME_ANSWER = "both hops have the same answer"
NO_VALUE = "compared value not found in the supporting sentence"
NO_COMPARE_PIECE = "compared value not found in either supporting sentence"
NO_QUESTION_SUBJECT = "no entity of the chain found in the question"
UNKNOWN_TYPE = "record type is neither bridge nor comparison"
TOKEN_BOUNDARY = "answer does not start at a token boundary"
TOO_LONG = "longer than the model's context"

# A sentence that opens with one of these has lost its subject; the paragraph title restores it.
_PRONOUNS = {"He": "", "She": "", "It": "", "They": "", "His": "'s", "Her": "'s", "Its": "'s", "Their": "'s"}
_LEAD_PRONOUN = re.compile(r"^(?P<pron>He|She|It|They|His|Her|Its|Their)\b")
_CLAUSE_PRONOUN = re.compile(r"^[A-Z][^,]{0,40}, (?P<pron>he|she|it|they|his|her|its|their)\b")  # "As an adult, she"
# "The team played ..." — a definite description of the paragraph's own entity at the start of a sentence.
_REFERRING_NOUNS = (
    "team", "band", "group", "film", "movie", "song", "single", "album", "book", "novel", "series", "show",
    "game", "company", "firm", "university", "college", "school", "conference", "league", "club", "device",
    "software", "program", "programme", "aircraft", "building", "tower", "station", "airport", "church",
    "museum", "magazine", "newspaper", "county", "city", "town", "village", "statue", "monument",
    "painting", "opera", "palace", "castle", "cathedral", "temple", "bridge", "ship", "mansion", "memorial",
    "river", "lake", "park", "genus", "species", "party", "organization", "organisation", "network",
    "channel", "player", "artist", "singer", "actor", "actress", "writer", "author", "director"
)
_LEAD_DESCRIPTION = re.compile(r"^The (?P<noun>" + "|".join(_REFERRING_NOUNS) + r")\b")
# A subject phrase of a Wikipedia opening sentence: everything before "(", "is", "was", ... or a comma.
_OPENING_SUBJECT = re.compile(r"^(?P<subject>.+?)(?: \(| is\b| was\b| are\b| were\b|,| also known)")
_GLUE_BEFORE = tuple("([{\"'‘“/-")

_STOPWORDS = frozenset({
    "a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "from", "by", "with", "as", "is",
    "are", "was", "were", "be", "been", "being", "both", "same", "which", "who", "whom", "whose", "what",
    "when", "where", "why", "how", "did", "does", "do", "has", "have", "had", "that", "this", "these",
    "those", "than", "then", "more", "most", "less", "least", "other", "another", "either", "neither",
    "not", "no", "yes", "it", "its", "their", "his", "her", "they", "he", "she", "one", "two", "first",
    "last", "known", "based", "born", "formed", "founded", "made", "located", "used", "described", "called",
    "named", "considered", "released", "also", "older", "younger", "larger", "smaller", "higher", "lower",
    "earlier", "later", "bigger", "many", "much"
})

# Nationality adjectives: the compared value of "same nationality" / "both American" comparisons.
_DEMONYMS = frozenset({
    "American", "British", "English", "Scottish", "Welsh", "Irish", "Canadian", "Australian", "French",
    "German", "Italian", "Spanish", "Portuguese", "Dutch", "Belgian", "Swiss", "Austrian", "Danish",
    "Swedish", "Norwegian", "Finnish", "Icelandic", "Polish", "Czech", "Slovak", "Hungarian", "Russian",
    "Ukrainian", "Greek", "Turkish", "Israeli", "Egyptian", "Indian", "Pakistani", "Bangladeshi", "Chinese",
    "Japanese", "Korean", "Vietnamese", "Thai", "Filipino", "Indonesian", "Malaysian", "Mexican",
    "Brazilian", "Argentine", "Argentinian", "Chilean", "Colombian", "Peruvian", "Cuban", "Jamaican",
    "Nigerian", "Kenyan", "Ghanaian", "Iranian", "Iraqi", "Lebanese", "Romanian", "Bulgarian", "Serbian",
    "Croatian", "Soviet", "Persian", "Roman", "Ottoman", "Bengali", "Hindi", "Scandinavian", "African",
    "European", "Asian"
})
_YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")


@dataclass
class Skip:
    hotpot_id: str
    piece: str  # "record" when the whole record gave nothing, else the piece kind that was left out
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"hotpot_id": self.hotpot_id, "piece": self.piece, "reason": self.reason, "detail": self.detail}


@dataclass
class Extraction:
    pieces: list[KnowledgePiece] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    records: int = 0

    def counts(self) -> dict:
        kinds = Counter(p.kind for p in self.pieces)
        return {"records": self.records, "records_with_pieces": len({p.hotpot_id for p in self.pieces}),
                "pieces": len(self.pieces), "single_hop": sum(p.is_single_hop for p in self.pieces),
                "by_kind": {k: kinds[k] for k in ("hop1", "hop2", "compare", "question") if kinds[k]}}

    def skipped(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skips).most_common())


class _Skipped(Exception):
    def __init__(self, reason: str, detail: str = "", piece: str = "record"):
        super().__init__(reason)
        self.reason, self.detail, self.piece = reason, detail, piece


# --- text helpers -----------------------------------------------------------------------------------------------


def clean_title(title: str) -> str:
    """Paragraph title → entity name: HTML entities decoded, disambiguation dropped ("Winner (band)" → "Winner")."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", html.unescape(title)).strip()


def restore_subject(sentence: str, title: str, opening: str = "") -> str:
    """Put the paragraph's entity back into a sentence that refers to it by a pronoun or "The <noun>" opening.

    Only when the sentence does not name the entity already: "She was born in X" → "Mira Tolvane was born in X",
    "As an adult, she was named ..." → "As an adult, Shirley Temple was named ...", "Its members ..." →
    "Wolf Alice's members ...", "The team played ..." → "Lewiston Maineiacs played ...".
    """
    sentence = " ".join(sentence.split())
    entity = clean_title(title)
    if opening.startswith("The " + entity):  # as the paragraph itself writes it: "The Eiffel Tower"
        entity = "The " + entity
    if not entity or _find_ci(sentence, entity) is not None:
        return sentence
    m = _LEAD_PRONOUN.match(sentence) or _CLAUSE_PRONOUN.match(sentence)
    if m:
        pron = m.group("pron")
        if m.start("pron") > 0 and entity.startswith("The "):
            entity = "the" + entity[3:]
        return sentence[: m.start("pron")] + entity + _PRONOUNS[pron.capitalize()] + sentence[m.end("pron"):]
    m = _LEAD_DESCRIPTION.match(sentence)
    if m:
        return entity + sentence[m.end():]
    return sentence


def _find_ci(text: str, needle: str, start: int = 0) -> int | None:
    i = text.lower().find(needle.lower(), start)
    return None if i < 0 else i


def _at_word_boundaries(text: str, i: int, j: int) -> bool:
    before_ok = i == 0 or text[i - 1].isspace() or text[i - 1] in _GLUE_BEFORE
    after_ok = j == len(text) or not text[j].isalnum()
    return before_ok and after_ok


def find_spans(text: str, needle: str) -> list[tuple[int, int]]:
    """Every occurrence of `needle` in `text` at word boundaries: exact-case matches first, then any case."""
    needle = needle.strip()
    if not needle:
        return []
    spans: list[tuple[int, int]] = []
    for haystack, target in ((text, needle), (text.lower(), needle.lower())):
        start = 0
        while (i := haystack.find(target, start)) >= 0:
            j = i + len(target)
            if _at_word_boundaries(text, i, j) and (i, j) not in spans:
                spans.append((i, j))
            start = i + 1
    return spans


def _prompt_before(sentence: str, start: int) -> str | None:
    """The prefix-cloze prompt for an answer starting at `start`, if prompt + answer reads as the sentence does."""
    prompt = sentence[:start].rstrip()
    if not prompt:
        return None
    gap = sentence[len(prompt):start]
    if gap == " " or (gap == "" and prompt.endswith(_GLUE_BEFORE)):
        return prompt
    return None


def entity_names(title: str, opening_sentence: str = "") -> list[str]:
    """Ways a paragraph's entity is written: cleaned title, full title, and the subject of its opening sentence
    when it shares a word with the title ("Richard Nixon" → "Richard Milhous Nixon")."""
    names = [clean_title(title), html.unescape(title).strip()]
    m = _OPENING_SUBJECT.match(" ".join(opening_sentence.split()))
    if m:
        subject = m.group("subject").strip(" \"'")
        words = {w.lower() for w in re.findall(r"\w+", clean_title(title)) if len(w) > 2}
        if subject and len(subject) <= 60 and words & {w.lower() for w in re.findall(r"\w+", subject)}:
            names.append(subject)
    return [n for n in dict.fromkeys(names) if n]


def find_subject(prompt: str, names: Sequence[str]) -> str | None:
    """The first of `names` that occurs in `prompt`, as the prompt writes it (MEMIT edits at its last token)."""
    for name in names:
        spans = find_spans(prompt, name)
        if spans:
            i, j = spans[-1]
            return prompt[i:j]
    return None


def capitalised_phrase(text: str) -> str | None:
    """The longest run of capitalised words after the first word: a fallback entity for a question."""
    runs = re.findall(r"(?:[A-Z][\w'&.-]*(?: (?:of|the|and|de|von|van)?\s?[A-Z][\w'&.-]*)*)", text)
    runs = [r.strip() for r in runs if r.strip() and not text.startswith(r)]
    return max(runs, key=len) if runs else None


# --- one record -------------------------------------------------------------------------------------------------


@dataclass
class _Paragraph:
    title: str
    opening: str  # its first sentence, for the entity's full name
    sentences: list[tuple[int, str]]  # (sent_id, subject-restored supporting sentence)

    @property
    def names(self) -> list[str]:
        return entity_names(self.title, self.opening)


def _supporting_paragraphs(record: dict) -> list[_Paragraph]:
    context = dict(zip(record["context"]["title"], record["context"]["sentences"]))
    by_title: dict[str, _Paragraph] = {}
    for title, sent_id in zip(record["supporting_facts"]["title"], record["supporting_facts"]["sent_id"]):
        if title not in context:
            raise _Skipped(MISSING_TITLE, f"{title!r} is not a context paragraph")
        sentences = context[title]
        if sent_id >= len(sentences):
            raise _Skipped(MISSING_SENTENCE, f"{title!r} has {len(sentences)} sentences, fact names {sent_id}")
        text = sentences[sent_id].strip()
        if not text:
            raise _Skipped(EMPTY_SENTENCE, f"{title!r} sentence {sent_id}")
        paragraph = by_title.setdefault(title, _Paragraph(title, sentences[0] if sentences else "", []))
        paragraph.sentences.append((sent_id, restore_subject(text, title, paragraph.opening)))
    if len(by_title) != 2:
        raise _Skipped(NOT_TWO_PARAGRAPHS, f"{len(by_title)} paragraph(s)")
    return list(by_title.values())


def _cloze_in(paragraph: _Paragraph, answers: Sequence[str], subject_names: Sequence[str]):
    """The first supporting sentence giving a clean prefix cloze of one of `answers` with a subject in its prompt:
    (prompt, answer as written, subject, sentence) or None."""
    for _, sentence in paragraph.sentences:
        for answer in answers:
            for i, j in find_spans(sentence, answer):
                prompt = _prompt_before(sentence, i)
                subject = prompt and find_subject(prompt, subject_names)
                if subject:
                    return prompt, sentence[i:j], subject, sentence
    return None


def _contains(paragraph: _Paragraph, text: str) -> bool:
    return any(find_spans(s, text) for _, s in paragraph.sentences)


def _is_own_entity(paragraph: _Paragraph, answer: str) -> bool:
    """The answer names the paragraph's own entity: its title, or how its opening sentence begins."""
    want = normalize_answer(answer)
    return bool(want) and (want in {normalize_answer(n) for n in paragraph.names}
                           or normalize_answer(paragraph.opening).startswith(want + " "))


def piece_id(hotpot_id: str, kind: str, index: int | None = None) -> str:
    """hop1/hop2/question: "<_id>/<kind>"; the k-th comparison entity: "<_id>/compare<k>"."""
    return f"{hotpot_id}/{kind}" + ("" if index is None else str(index))


def _piece(record: dict, kind: str, hop: int, prompt: str, answer: str, subject: str, title: str = "",
           sentence: str = "", index: int | None = None) -> KnowledgePiece:
    return KnowledgePiece(id=piece_id(record["id"], kind, index), hotpot_id=record["id"], chain_id=record["id"],
                          kind=kind, hop=hop, prompt=prompt, answer=answer, subject=subject,
                          source_title=html.unescape(title), source_sentence=sentence, record_type=record["type"])


def _question_piece(record: dict, subject_names: Sequence[str]) -> KnowledgePiece:
    question = " ".join(record["question"].split())
    prompt = QUESTION_PROMPT.format(question=question)
    subject = find_subject(prompt, subject_names) or capitalised_phrase(question)
    if not subject:
        raise _Skipped(NO_QUESTION_SUBJECT, question, piece="question")
    return _piece(record, "question", 0, prompt, " ".join(record["answer"].split()), subject)


def bridge_pieces(record: dict) -> list[KnowledgePiece]:
    """hop 1 (answer: the bridge entity), hop 2 (answer: the final answer) and the composed question.

    The hop-2 paragraph is the one whose supporting sentence holds the answer; the bridge entity is its title,
    found in the other (hop-1) paragraph. A chain gives all three pieces or none.
    """
    answer = " ".join(record["answer"].split())
    if normalize_answer(answer) in ("yes", "no"):
        raise _Skipped(YES_NO_BRIDGE, answer)
    paragraphs = _supporting_paragraphs(record)
    for paragraph in paragraphs:  # "Who was known as Aladin and ...?" describes one entity twice: no chain
        if _is_own_entity(paragraph, answer):
            raise _Skipped(ANSWER_IS_ENTITY, f"{answer!r} is the entity of {paragraph.title!r}")
    holding = [p for p in paragraphs if _contains(p, answer)]
    if len(holding) == 2:  # the answer is in both: the hop-2 paragraph is the one the other mentions
        holding = [p for p, other in (paragraphs, paragraphs[::-1])
                   if any(_contains(other, n) for n in p.names)] or holding
    if not holding:
        raise _Skipped(ANSWER_NOT_FOUND, f"{answer!r} is in neither supporting paragraph")
    second = holding[0]
    first = paragraphs[1] if second is paragraphs[0] else paragraphs[0]
    hop1 = _cloze_in(first, second.names, first.names)
    if hop1 is None:
        found = any(_contains(first, name) for name in second.names)
        raise _Skipped(HOP1_NO_SUBJECT if found else BRIDGE_NOT_FOUND,
                       f"{clean_title(second.title)!r} in {first.title!r}")
    hop2 = _cloze_in(second, [answer], [hop1[1], *second.names])
    if hop2 is None:
        raise _Skipped(HOP2_NO_SUBJECT, f"{answer!r} in {second.title!r}")
    if normalize_answer(hop1[1]) == normalize_answer(hop2[1]):
        raise _Skipped(SAME_ANSWER, hop1[1])
    pieces = [_piece(record, "hop1", 1, hop1[0], hop1[1], hop1[2], first.title, hop1[3]),
              _piece(record, "hop2", 2, hop2[0], hop2[1], hop2[2], second.title, hop2[3])]
    return pieces + [_question_piece(record, [hop1[2], hop2[2], *first.names, *second.names])]


def _value_candidates(question: str, entity_words: set[str]) -> list[str]:
    """Phrases of the question that may name the compared property (longest first), e.g. "opera composer"."""
    words = re.findall(r"[\w'-]+", question)
    # Participles ("completed", "located") name the comparison, never its value.
    content = [w for w in words if w.lower() not in _STOPWORDS and w.lower() not in entity_words
               and not (w.islower() and w.endswith("ed"))]
    phrases = []
    for n in (3, 2, 1):
        for i in range(len(words) - n + 1):
            gram = words[i:i + n]
            if all(w in content for w in gram):
                phrase = " ".join(gram)
                phrases += [phrase, phrase[:-1]] if phrase.endswith("s") and len(phrase) > 4 else [phrase]
    return list(dict.fromkeys(phrases))


def _compared_value(paragraph: _Paragraph, question: str, entity_words: set[str]):
    """(prompt, value, subject, sentence) for the property a comparison asks about, most specific first:
    a value the question names ("American", "Michigan"), a nationality, any other word of the question
    ("genus", "band"), a year."""
    phrases = _value_candidates(question, entity_words)
    years = list(dict.fromkeys(m.group() for _, s in paragraph.sentences for m in _YEAR.finditer(s)))
    tiers = ([p for p in phrases if p[0].isupper()], sorted(_DEMONYMS), [p for p in phrases if not p[0].isupper()],
             years)
    for tier, values in enumerate(tiers):
        found = _earliest_cloze(paragraph, values, nationality=tier == 1)
        if found:
            return found
    return None


def _earliest_cloze(paragraph: _Paragraph, values: Sequence[str], nationality: bool = False):
    """Among `values`, the clean cloze whose value comes earliest after the subject (the most direct attribute).

    A nationality must stand as an adjective: not glued after "(" ("(Turkish: ...") and not the start of a
    proper name ("Indian Ocean").
    """
    best = None
    for _, sentence in paragraph.sentences:
        for value in values:
            for i, j in find_spans(sentence, value):
                if nationality and (sentence[i - 1:i] != " " or re.match(r" [A-Z]", sentence[j:j + 2])):
                    continue
                prompt = _prompt_before(sentence, i)
                subject = prompt and find_subject(prompt, paragraph.names)
                if subject and (best is None or i < best[0]):
                    best = (i, (prompt, sentence[i:j], subject, sentence))
        if best:
            return best[1]
    return None


def comparison_pieces(record: dict) -> tuple[list[KnowledgePiece], list[_Skipped]]:
    """A `compare` piece per entity whose compared value is in its supporting sentence, plus the question."""
    paragraphs = _supporting_paragraphs(record)
    entity_words = {w.lower() for p in paragraphs for w in re.findall(r"[\w'-]+", clean_title(p.title))}
    pieces, skips = [], []
    for k, paragraph in enumerate(paragraphs, start=1):
        found = _compared_value(paragraph, record["question"], entity_words)
        if found is None:
            skips.append(_Skipped(NO_VALUE, clean_title(paragraph.title), piece=f"compare{k}"))
            continue
        prompt, value, subject, sentence = found
        pieces.append(_piece(record, "compare", 1, prompt, value, subject, paragraph.title, sentence, k))
    if not pieces:
        raise _Skipped(NO_COMPARE_PIECE, " / ".join(clean_title(p.title) for p in paragraphs))
    question = _question_piece(record, [p.subject for p in pieces] + [n for p in paragraphs for n in p.names])
    return pieces + [question], skips


def record_pieces(record: dict) -> tuple[list[KnowledgePiece], list[Skip]]:
    """The pieces of one record (hub schema, see `hotpotqa.normalize_record`) and what was skipped, with why."""
    skips: list[_Skipped] = []
    try:
        if record["type"] == "bridge":
            pieces = bridge_pieces(record)
        elif record["type"] == "comparison":
            pieces, skips = comparison_pieces(record)
        else:
            raise _Skipped(UNKNOWN_TYPE, repr(record["type"]))
    except _Skipped as skipped:
        pieces, skips = [], [skipped]
    chain = [p.id for p in pieces]
    for piece in pieces:
        piece.links = [other for other in chain if other != piece.id]
    return pieces, [Skip(record["id"], s.piece, s.reason, s.detail) for s in skips]


def extract_pieces(records: Iterable[dict]) -> Extraction:
    """Pieces of every record, in record order (a chain's pieces together: hops, compares, then the question)."""
    result = Extraction()
    for record in records:
        pieces, skips = record_pieces(record)
        result.pieces += pieces
        result.skips += skips
        result.records += 1
    return result


def tokenize_pieces(extraction: Extraction, tokenizer, bos_ids: Sequence[int],
                    max_tokens: int | None = None) -> Extraction:
    """Attach joint token ids (`scoring.encode_cloze`) to every piece; a piece that cannot be tokenised cleanly,
    or whose prompt + answer is longer than `max_tokens`, is skipped with its reason. A bridge chain goes whole
    (its question would lose a hop), a comparison loses only that piece."""
    failed: dict[str, Skip] = {}

    def fail(piece: KnowledgePiece, reason: str, detail: str) -> None:
        whole = piece.record_type == "bridge" or piece.kind == "question"
        failed.setdefault(piece.id if not whole else piece.chain_id,
                          Skip(piece.hotpot_id, "record" if whole else piece.kind, reason, detail))

    for piece in extraction.pieces:
        try:
            piece.prompt_ids, piece.answer_ids = encode_cloze(tokenizer, piece.prompt, piece.answer, bos_ids)
        except ClozeTokenError as error:
            fail(piece, TOKEN_BOUNDARY, str(error))
            continue
        length = len(piece.prompt_ids) + len(piece.answer_ids)
        if max_tokens is not None and length > max_tokens:
            fail(piece, TOO_LONG, f"{piece.id}: {length} tokens, at most {max_tokens}")
    if not failed:
        return extraction
    kept = [p for p in extraction.pieces if p.id not in failed and p.chain_id not in failed]
    kept_ids = {p.id for p in kept}
    for piece in kept:
        piece.links = [i for i in piece.links if i in kept_ids]
    return Extraction(kept, extraction.skips + list(failed.values()), extraction.records)


def check_piece_text(piece: KnowledgePiece) -> None:
    """The invariants every single-fact piece keeps (tests and the world generator assert them)."""
    if piece.is_single_hop and not piece.source_sentence.startswith(cloze_text(piece.prompt, piece.answer)):
        raise AssertionError(f"{piece.id}: prompt + answer is not a prefix of its source sentence")
    if piece.subject not in piece.prompt:
        raise AssertionError(f"{piece.id}: subject {piece.subject!r} is not in the prompt")
