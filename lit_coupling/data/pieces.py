"""HotpotQA records → knowledge pieces: prefix clozes, each hop with its own answer, every drop counted by reason.

Text only: `tokenize_pieces` adds the exact token ids for one model's tokenizer. The rules (chain shapes, entity
names, subject restoration, the cloze-statement filter, comparison values) are documented in docs/pieces.md.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lit_coupling.data.hotpotqa import paragraph_text
from lit_coupling.data.piece import KnowledgePiece, piece_id
from lit_coupling.scoring import ClozeTokenError, cloze_text, encode_cloze, normalize_answer

QUESTION_PROMPT = "Question: {question} Answer:"

# Skip reasons (the keys of `skipped` in knowledge_pieces.json).
NOT_TWO_PARAGRAPHS = "supporting facts do not name exactly two paragraphs"
MISSING_TITLE = "supporting fact points to a missing title"
MISSING_SENTENCE = "supporting fact points to a missing sentence"
EMPTY_SENTENCE = "empty supporting sentence"
YES_NO_BRIDGE = "bridge record with a yes/no answer"
ANSWER_NOT_FOUND = "answer span not found in either supporting paragraph"
BRIDGE_NOT_FOUND = "bridge entity not found in the hop-1 sentence"
NO_OWN_FACT = "no fact of the entity the question names in its supporting sentences"
SAME_ANSWER = "both hops have the same answer"
NO_VALUE = "compared value not found in the supporting sentence"
NO_COMPARE_PIECE = "compared value not found in either supporting sentence"
NO_QUESTION_SUBJECT = "no entity of the chain found in the question"
UNKNOWN_TYPE = "record type is neither bridge nor comparison"
TOKEN_BOUNDARY = "answer does not start at a token boundary"
TOO_LONG = "longer than the model's context"

# Why a candidate cloze is not a statement a model can complete (the cloze-statement filter, `statement_problem`).
NO_PROMPT = "answer at the start of its sentence or inside a word"
NO_SUBJECT = "no subject in the prompt"
DANGLING_BRACKET = "prompt leaves a bracket open"
DANGLING_QUOTE = "prompt leaves a quote open"
DANGLING_PUNCT = "prompt ends with a comma, colon or dash"
NO_VERB = "no verb in the prompt"
ANSWER_IN_PROMPT = "the prompt already holds the answer"
CUTS_NAME = "the answer starts or stops inside a name"

# A sentence that opens with one of these has lost its subject; the paragraph title restores it.
_PRONOUNS = {"He": "", "She": "", "It": "", "They": "", "His": "'s", "Her": "'s", "Its": "'s", "Their": "'s"}
_LEAD_PRONOUN = re.compile(r"^(?P<pron>He|She|It|They|His|Her|Its|Their)\b")
_CLAUSE_PRONOUN = re.compile(
    r"^[A-Z][^,]{0,60}(?:, \d{4})?, (?P<pron>he|she|it|they|his|her|its|their)\b"
)  # "As an adult, she"
# "The team played ..." — a definite description of the paragraph's own entity at the start of a sentence.
_REFERRING_NOUNS = (
    "team",
    "band",
    "group",
    "film",
    "movie",
    "song",
    "single",
    "album",
    "book",
    "novel",
    "series",
    "show",
    "game",
    "company",
    "firm",
    "university",
    "college",
    "school",
    "conference",
    "league",
    "club",
    "device",
    "software",
    "program",
    "programme",
    "aircraft",
    "building",
    "tower",
    "station",
    "airport",
    "church",
    "museum",
    "magazine",
    "newspaper",
    "county",
    "city",
    "town",
    "village",
    "statue",
    "monument",
    "painting",
    "opera",
    "palace",
    "castle",
    "cathedral",
    "temple",
    "bridge",
    "ship",
    "mansion",
    "memorial",
    "river",
    "lake",
    "park",
    "genus",
    "species",
    "party",
    "organization",
    "organisation",
    "network",
    "channel",
    "player",
    "artist",
    "singer",
    "actor",
    "actress",
    "writer",
    "author",
    "director",
    "arena",
    "stadium",
    "mosque",
    "hotel",
    "restaurant",
    "brand",
    "airline",
    "state",
    "country",
    "district",
    "region",
    "island",
    "mountain",
    "municipality",
    "province",
    "festival",
    "tournament",
    "race",
    "award",
    "orchestra",
    "choir",
    "duo",
    "trio",
    "musical",
    "play",
    "episode",
    "sitcom",
    "franchise",
    "comic",
    "manga",
    "anime",
)
_NOUNS = "|".join(_REFERRING_NOUNS)
_LEAD_DESCRIPTION = re.compile(r"^The (?P<noun>" + _NOUNS + r")\b")
# The same description after a short opening clause: "As of the 2010 census, the county population was 9,984."
_CLAUSE_DESCRIPTION = re.compile(r"^[A-Z][^,]{0,60}(?:, \d{4})?, (?P<the>the) (?P<noun>" + _NOUNS + r")\b")
# The noun an opening sentence files its entity under ("Kiss and Tell is a 1945 American comedy film starring ..."
# → "film"): "The film ..." in a later sentence is the entity, whatever the noun (the list above is only the
# common ones).
_TYPE_NOUN = re.compile(
    r"\b(?:is|was|are|were) (?:a|an|the) (?:[\w'-]+ ){0,5}?(?P<noun>[a-z]+)"
    r"(?=[,.;]| (?:of|in|on|at|by|from|for|with|that|which|who|whose|based|located|"
    r"founded|formed|starring|written|directed|and|or|since|until)\b|$)"
)
# A subject phrase of a Wikipedia opening sentence: everything before "(", "is", "was", ... or a comma.
_OPENING_SUBJECT = re.compile(r"^(?P<subject>.+?)(?: \(| is\b| was\b| are\b| were\b|,| also known)")
# Other names an opening sentence gives its entity: `also known as X`, `often stylized as X`, `formerly X`.
_ALIAS = re.compile(
    r"\b(?:also known as|better known as|commonly known as|known as|often stylized as|stylized as|"
    r"nicknamed|formerly|or simply|officially|abbreviated(?: as| to)?|short for)\s+(?:the\s+)?"
    r"\"?(?P<alias>[A-Z0-9][^,;()\"]*?)\"?(?=\s*[,;()]|"
    r"\s+(?:is|was|are|were|and)\b|$)"
)
# Suffixes a title carries that running text often leaves out ("Manchester United F.C." → "Manchester United").
_NAME_SUFFIX = re.compile(r",? (?:F\.C\.|FC|A\.F\.C\.|Inc\.|Ltd\.?|Co\.|plc|L\.L\.C\.|LLC|S\.A\.)$")
# An opening sentence of a person: "Name (born 3 April 1959)". Life dates alone ("(1917 – 1922)") are not enough:
# wars, reigns and buildings have them too.
_PERSON_OPENING = re.compile(r"^[^()]+\([^()]*?\bborn\b")
_GLUE_BEFORE = tuple("([{\"'‘“/-")

_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "both",
        "same",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "why",
        "how",
        "did",
        "does",
        "do",
        "has",
        "have",
        "had",
        "that",
        "this",
        "these",
        "those",
        "than",
        "then",
        "more",
        "most",
        "less",
        "least",
        "other",
        "another",
        "either",
        "neither",
        "not",
        "no",
        "yes",
        "it",
        "its",
        "their",
        "his",
        "her",
        "they",
        "he",
        "she",
        "one",
        "two",
        "first",
        "last",
        "known",
        "based",
        "born",
        "formed",
        "founded",
        "made",
        "located",
        "used",
        "described",
        "called",
        "named",
        "considered",
        "released",
        "also",
        "older",
        "younger",
        "larger",
        "smaller",
        "higher",
        "lower",
        "earlier",
        "later",
        "bigger",
        "many",
        "much",
        "name",
        "year",
        "years",
        "type",
        "kind",
        "people",
        "person",
    }
)

# Nationality adjectives: the compared value of "same nationality" / "both American" comparisons.
_DEMONYMS = frozenset(
    {
        "American",
        "British",
        "English",
        "Scottish",
        "Welsh",
        "Irish",
        "Canadian",
        "Australian",
        "French",
        "German",
        "Italian",
        "Spanish",
        "Portuguese",
        "Dutch",
        "Belgian",
        "Swiss",
        "Austrian",
        "Danish",
        "Swedish",
        "Norwegian",
        "Finnish",
        "Icelandic",
        "Polish",
        "Czech",
        "Slovak",
        "Hungarian",
        "Russian",
        "Ukrainian",
        "Greek",
        "Turkish",
        "Israeli",
        "Egyptian",
        "Indian",
        "Pakistani",
        "Bangladeshi",
        "Chinese",
        "Japanese",
        "Korean",
        "Vietnamese",
        "Thai",
        "Filipino",
        "Indonesian",
        "Malaysian",
        "Mexican",
        "Brazilian",
        "Argentine",
        "Argentinian",
        "Chilean",
        "Colombian",
        "Peruvian",
        "Cuban",
        "Jamaican",
        "Nigerian",
        "Kenyan",
        "Ghanaian",
        "Iranian",
        "Iraqi",
        "Lebanese",
        "Romanian",
        "Bulgarian",
        "Serbian",
        "Croatian",
        "Soviet",
        "Persian",
        "Roman",
        "Ottoman",
        "Bengali",
        "Hindi",
        "Scandinavian",
        "African",
        "European",
        "Asian",
        "New Zealand",
        "South African",
        "South Korean",
        "North Korean",
        "Taiwanese",
    }
)
# Words that end a noun phrase: what may follow a common-noun value.
_PHRASE_ENDS = _STOPWORDS | {
    "since",
    "until",
    "after",
    "before",
    "during",
    "under",
    "over",
    "between",
    "into",
    "through",
    "but",
    "while",
    "whose",
    "including",
    "such",
    "about",
    "around",
    "near",
    "against",
    "among",
    "within",
    "without",
    "across",
    "toward",
    "towards",
    "upon",
    "via",
    "like",
}
_NAME = r"[A-Z0-9][\w'&.-]*(?: (?:of |the |de |del |la |and )?[A-Z0-9][\w'&.-]*)*"
_NAME_LIST = _NAME + r"(?:, " + _NAME + r")*"  # "Laleli, Fatih, Istanbul, Turkey"
# Questions about where someone or something is from: the only ones a nationality adjective answers.
_ASKS_NATIONALITY = re.compile(
    r"\b(?:nationality|nationalities|citizens?|from|country|countries|" + "|".join(sorted(_DEMONYMS)) + r")\b", re.I
)
_YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
# A date as Wikipedia writes it: "3 April 1959", "April 3, 1959", "April 1959" or "1959".
_DATE = rf"(?:\d{{1,2}} {_MONTH} \d{{3,4}}|{_MONTH} \d{{1,2}}, \d{{3,4}}|{_MONTH} \d{{3,4}}|\d{{3,4}})"
# The dates of a person's opening sentence: "Name (born DATE)", "Name (DATE – DATE)", also after a native
# spelling or a nickname inside the bracket ("(Bengali: ... ; born 3 April 1959)").
_LIFE_DATES = re.compile(
    rf"^(?P<subject>[^()]+?) \((?:[^()]*?[;,] )??(?:born |b\. )?(?P<date>{_DATE})\b"
    rf"(?:,? in (?P<place>[^()–;]+))?(?:\s*[–-]\s*(?:died )?(?P<death>{_DATE}))?[^()]*\)"
)
# Questions about age or time order: answered from the entities' dates.
_ASKS_DATE = re.compile(
    r"\b(?:older|oldest|younger|youngest|born first|born earlier|born later|born in the same year|"
    r"first|earlier|later|earliest|latest|when|what year|which year|same year|age)\b",
    re.I,
)
# Questions about an amount ("Which band had more members?"): answered from the entities' numbers.
_ASKS_QUANTITY = re.compile(
    r"\b(?:more|most|fewer|fewest|larger|largest|bigger|biggest|higher|highest|taller|"
    r"tallest|longer|longest|how many|how much|number of|population)\b",
    re.I,
)
_NUMBER = re.compile(
    r"(?<![\w.,-])(?:\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|one|two|three|four|five|six|seven|eight|"
    r"nine|ten|eleven|twelve)(?![\w-]|[.,]\d)",
    re.I,
)
# Verbs that make a prompt a statement wherever they stand: auxiliaries, present-tense forms, and past tenses that
# are never participles ("X became", "X wrote"). Participles alone ("a yalı located at", "a film starring") only
# make a noun phrase, so forms shared by past tense and participle ("made", "founded") count only right after the
# subject ("Smith founded the").
_FINITE_VERBS = frozenset(
    """
is are was were am has have had do does did can could will would shall should may might must
became becomes began begins won wins wrote writes grew grows took takes gave gives saw sees meets leaves builds sells
sang sings ran runs buys brings came comes went goes gets finds tells teaches fights drew draws stands flew flies
keeps lies loses means pays puts reads rode rides rose rises says sets sits spoke speaks threw throws wore wears
features stars plays contains consists represents competes follows serves hosts includes owns marries dies lives
works remains holds leads makes gives becomes
""".split()
)
_PAST_OR_PARTICIPLE = frozenset(
    """
made built sold led held found told taught thought left kept lost paid put read set sat said spent struck hung lay
meant bought brought got shot met fought stood
""".split()
)
_WORD = re.compile(r"[A-Za-z]+")


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
    rejected: Counter = field(default_factory=Counter)  # candidate clozes the statement filter dropped, by reason
    bridge_records: int = 0  # records of type bridge (the denominator of `bridge_two_hops`)

    def counts(self) -> dict:
        kinds = Counter(p.kind for p in self.pieces)
        chains: dict[str, set[str]] = {}
        for p in self.pieces:
            chains.setdefault(p.chain_id, set()).add(p.kind)
        two_hops = sum({"hop1", "hop2"} <= k for k in chains.values())
        one_hop = sum(len({"hop1", "hop2"} & k) == 1 for k in chains.values())
        return {
            "records": self.records,
            "records_with_pieces": len({p.hotpot_id for p in self.pieces}),
            "pieces": len(self.pieces),
            "single_hop": sum(p.is_single_hop for p in self.pieces),
            "by_kind": {k: kinds[k] for k in ("hop1", "hop2", "compare", "question") if kinds[k]},
            "bridge_records": self.bridge_records,
            "bridge_two_hops": two_hops,
            "bridge_one_hop": one_hop,
        }

    def skipped(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skips).most_common())

    def rejected_candidates(self) -> dict[str, int]:
        return dict(self.rejected.most_common())


class _Skipped(Exception):
    def __init__(self, reason: str, detail: str = "", piece: str = "record"):
        super().__init__(reason)
        self.reason, self.detail, self.piece = reason, detail, piece


# --- text helpers -----------------------------------------------------------------------------------------------


def clean_title(title: str) -> str:
    """Paragraph title → entity name: HTML entities decoded, disambiguation dropped ("Winner (band)" → "Winner")."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", html.unescape(title)).strip()


def _opening_subject(opening: str) -> str:
    m = _OPENING_SUBJECT.match(" ".join(opening.split()))
    return m.group("subject").strip(" \"'") if m else ""


def _restored_entity(title: str, opening: str) -> str:
    """How a restored sentence names the paragraph's entity: as the opening sentence writes it when that is the
    title with "The " before it ("The Eiffel Tower") or without a comma disambiguation ("Brown County" for
    "Brown County, Kansas"), else the cleaned title."""
    entity = clean_title(title)
    opening = " ".join(opening.split())
    if opening.startswith("The " + entity):
        return "The " + entity
    subject = _opening_subject(opening)
    if subject and "," in entity and entity.startswith(subject + ","):
        return subject
    return entity


def restore_subject(sentence: str, title: str, opening: str = "") -> str:
    """Put the paragraph's entity back into a sentence that refers to it by a pronoun or "The <noun>" opening.

    Only when the sentence does not name the entity already: "She was born in X" → "Mira Tolvane was born in X",
    "As an adult, she was named ..." → "As an adult, Shirley Temple was named ...", "Its members ..." →
    "Wolf Alice's members ...", "The team played ..." → "Lewiston Maineiacs played ...", "As of the 2010 census,
    the county population was ..." → "As of the 2010 census, Brown County population was ...".
    """
    sentence = " ".join(sentence.split())
    entity = _restored_entity(title, opening)
    if not entity or _find_ci(sentence, entity) is not None:
        return sentence
    m = _LEAD_PRONOUN.match(sentence) or _CLAUSE_PRONOUN.match(sentence)
    if m:
        pron = m.group("pron")
        if m.start("pron") > 0 and entity.startswith("The "):
            entity = "the" + entity[3:]
        return sentence[: m.start("pron")] + entity + _PRONOUNS[pron.capitalize()] + sentence[m.end("pron") :]
    m = _LEAD_DESCRIPTION.match(sentence)
    if m:
        return entity + sentence[m.end() :]
    kind = _TYPE_NOUN.search(" ".join(opening.split()))
    if kind and sentence.startswith(f"The {kind.group('noun')} "):
        return entity + sentence[len("The " + kind.group("noun")) :]
    m = _CLAUSE_DESCRIPTION.match(sentence) or (
        kind
        and re.match(r"^[A-Z][^,]{0,60}(?:, \d{4})?, (?P<the>the) (?P<noun>" + kind.group("noun") + r")\b", sentence)
    )
    if m:
        if entity.startswith("The "):
            entity = "the" + entity[3:]
        return sentence[: m.start("the")] + entity + sentence[m.end("noun") :]
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
    gap = sentence[len(prompt) : start]
    if gap == " " or (gap == "" and prompt.endswith(_GLUE_BEFORE)):
        return prompt
    return None


def _is_person(opening: str, text: str = "") -> bool:
    """A person's paragraph: "born" in its opening bracket, or "he"/"she"/"his" in its text."""
    return bool(_PERSON_OPENING.match(" ".join(opening.split())) or re.search(r"\b(?:[Hh]e|[Ss]he|[Hh]is)\b", text))


def entity_names(
    title: str, opening_sentence: str = "", family_name: bool = True, person: bool | None = None
) -> list[str]:
    """Ways a paragraph's entity is written, longest forms first:

    the cleaned and the full title; the subject of its opening sentence when it shares a word with the title
    ("Richard Nixon" → "Richard Milhous Nixon"); the aliases the opening sentence gives ("often stylized as
    WINNER"); shorter forms running text uses: without "The", without a club/company suffix ("Manchester United"),
    without a comma disambiguation ("Brown County") or a subtitle ("Star Wars"); and a person's family name ("the
    Nixon administration"). Longer forms in the text are taken whole where the name is found (`whole_name`).
    """
    opening = " ".join(opening_sentence.split())
    clean = clean_title(title)
    names = [clean, html.unescape(title).strip()]
    subject = _opening_subject(opening)
    words = {w.lower() for w in re.findall(r"\w+", clean) if len(w) > 2}
    if subject and len(subject) <= 60 and words & {w.lower() for w in re.findall(r"\w+", subject)}:
        names.append(subject)
    names += [m.group("alias").strip() for m in _ALIAS.finditer(opening) if len(m.group("alias").split()) <= 6]
    names += _bracket_aliases(opening, words)
    shorter = []
    for name in names:
        shorter += [
            name[4:] if name.startswith("The ") else "",
            _NAME_SUFFIX.sub("", name),
            name.split(",")[0],
            name.split(": ")[0],
        ]  # "Star Wars: Episode IV" → "Star Wars"
    names += shorter
    family = clean.split()
    person = _is_person(opening) if person is None else person
    if family_name and person and len(family) >= 2 and family[-1][:1].isupper() and len(family[-1]) > 3:
        names.append(family[-1])  # last: a family name alone is the weakest evidence
    return [n for n in dict.fromkeys(n.strip() for n in names) if n and len(n) > 1]


def _bracket_aliases(opening: str, title_words: set[str]) -> list[str]:
    """Names the opening bracket gives its entity: "Columbia University (Columbia; officially ...)" → "Columbia",
    "Tunnels & Trolls (abbreviated "T&T")" is `_ALIAS`'s. A bracket item is a name when it is capitalised, at most
    six words, no date, no gloss ("Turkish: ...", "IATA: GRR") and shares a word with the title."""
    m = re.match(r"^[^()]{1,80}?\((?P<inside>[^()]*)\)", opening)
    if not m:
        return []
    out = []
    for item in re.split(r"[;,]", m.group("inside")):
        item = item.strip(" \"'“”")
        if not item[:1].isupper() or ":" in item or _YEAR.search(item) or len(item.split()) > 6:
            continue
        words = {w.lower() for w in re.findall(r"\w+", item) if len(w) > 2}
        if words & title_words:
            out.append(item)
    return out


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
    runs = capitalised_phrases(text)
    return max(runs, key=len) if runs else None


def capitalised_phrases(text: str) -> list[str]:
    """Runs of capitalised words (with "of", "the", "and" ... inside) after the first word: the entities a question
    names, longest first."""
    runs = re.findall(r"(?:[A-Z][\w'&.-]*(?: (?:of|the|and|de|von|van)?\s?[A-Z][\w'&.-]*)*)", text)
    runs = [r.strip(" .") for r in runs if r.strip() and not text.startswith(r)]
    return sorted(dict.fromkeys(r for r in runs if r), key=len, reverse=True)


# --- the cloze-statement filter ---------------------------------------------------------------------------------


def statement_problem(prompt: str, subject: str | None) -> str | None:
    """Why `prompt` (with `subject` found in it) does not read as a statement a model can complete, or None.

    A prefix cut anywhere in a sentence is not always a statement: "Pirate's Cove (in" → "German" asks the model
    to continue a bracket, "X, starring" has no verb, and a prompt without its subject gives MEMIT nothing to edit.
    """
    if not subject or subject not in prompt:
        return NO_SUBJECT
    # Open brackets and quotes: the answer would sit inside an aside or a title, not complete the statement.
    if prompt.count("(") > prompt.count(")") or prompt.count("[") > prompt.count("]"):
        return DANGLING_BRACKET
    if prompt.count('"') % 2 or prompt.count("“") > prompt.count("”") or prompt.endswith(("'", "‘")):
        return DANGLING_QUOTE
    # A comma, colon or dash at the end starts a list item or an apposition, not the statement's object.
    if prompt.rstrip().endswith((",", ";", ":", "–", "—", "-")):
        return DANGLING_PUNCT
    # A statement needs a verb outside the subject: "X is a", "X was founded by", "X competes in the".
    i = prompt.rfind(subject)
    words = _WORD.findall(prompt[:i] + " " + prompt[i + len(subject) :])
    if not any(w in _FINITE_VERBS for w in words) and not _clause_verb(prompt[i + len(subject) :]):
        return NO_VERB
    return None


def _clause_verb(after_subject: str) -> bool:
    """A past tense or present-tense verb in the subject's own clause: before any comma or bracket (after one, an
    "-ed" word starts an apposition: "X, a yalı located at") and not after an article ("a noted author").
    "Smith founded", "Egeberg's other roles included", "The team competes"."""
    clause, *rest = re.split(r"[,;:()]", after_subject, maxsplit=1)
    relative = re.match(r"\s*(?:who|which|that)\s+(.*)", rest[0]) if rest and not clause.strip() else None
    if relative:  # "Alex Ferguson, who managed" → "Manchester United": the bridge in a relative clause
        clause = re.split(r"[,;:()]", relative.group(1), maxsplit=1)[0]
    words = _WORD.findall(clause)
    for k, w in enumerate(words):
        if not w.islower() or len(w) < 3 or (k and words[k - 1].lower() in ("a", "an", "the")):
            continue
        if w in _PAST_OR_PARTICIPLE or w.endswith("ed"):
            return True
        if k == 0 and w.endswith("s") and not w.endswith("ss"):  # "X competes in the"
            return True
    return False


# --- one record -------------------------------------------------------------------------------------------------


@dataclass
class _Paragraph:
    title: str
    opening: str  # its first sentence, for the entity's full name and aliases
    sentences: list[tuple[int, str]]  # (sent_id, subject-restored supporting sentence)
    text: str = ""  # the whole paragraph
    others: list[tuple[int, str]] = field(default_factory=list)  # its other sentences, restored (`_Search.wide`)
    names: list[str] = field(default_factory=list)
    person: bool = False
    event: bool = False  # a war, a reign, a tour: its opening-bracket dates are a beginning and an end

    def __post_init__(self):
        self.person = _is_person(self.opening, self.text)  # for family names and life dates ("Trigiani has ...")
        kind = _TYPE_NOUN.search(" ".join(self.opening.split()))
        self.event = not self.person and bool(kind) and kind.group("noun") in _EVENT_NOUNS
        self.names = entity_names(self.title, self.opening, person=self.person)


@dataclass
class _Cloze:
    prompt: str
    answer: str  # as the sentence writes it
    subject: str
    sentence: str  # the (restored or restated) sentence: prompt + answer is a prefix of it
    original: str = ""  # the supporting sentence a restated cloze comes from ("" when cut from `sentence`)


def _check(sentence: str, i: int, j: int, subjects: Sequence[str]) -> tuple[_Cloze | None, str | None]:
    """(the prefix cloze of sentence[i:j], None) when it reads as a statement, else (None, why not)."""
    prompt = _prompt_before(sentence, i)
    if prompt is None:
        return None, NO_PROMPT
    # The subject is never the answer itself ("... the highest elevation in Lawrence" about "Lawrence").
    own = normalize_answer(sentence[i:j])
    subject = find_subject(prompt, [n for n in subjects if normalize_answer(n) != own])
    problem = statement_problem(prompt, subject)
    # A prompt that already names its answer asks the model to copy, not to recall.
    problem = problem or (ANSWER_IN_PROMPT if find_spans(prompt, sentence[i:j]) else None)
    problem = problem or (CUTS_NAME if _cuts_name(sentence, i, j) else None)
    return (None, problem) if problem else (_Cloze(prompt, sentence[i:j], subject, sentence), None)


_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’"}
_COPULA = re.compile(r"^(?:\s*\([^()]*\))?\s+(?P<verb>is|was|are|were) (?P<predicate>[^,;()\"]+?)(?=[,;(]|\.$|$)")
_LIST_HEAD = re.compile(r"^(?P<head>.*\b[a-z]+) (?P<items>" + r"[\"“]?[A-Z][^,;()]*(?:, [\"“]?[A-Z][^,;()]*)*" + r"),$")
# An answer that is the doer of a simple past ("Ada Kestrel directed Blue Hour in 1999."): its verb and object.
_IRREGULAR_PARTICIPLES = {
    "wrote": "written",
    "co-wrote": "co-written",
    "drew": "drawn",
    "sang": "sung",
    "began": "begun",
    "took": "taken",
    "gave": "given",
    "made": "made",
    "built": "built",
    "led": "led",
    "won": "won",
    "saw": "seen",
    "chose": "chosen",
    "bought": "bought",
    "sold": "sold",
    "held": "held",
    "shot": "shot",
    "found": "found",
    "taught": "taught",
    "spoke": "spoken",
    "broke": "broken",
    "wore": "worn",
    "flew": "flown",
    "grew": "grown",
    "threw": "thrown",
    "beat": "beaten",
    "sent": "sent",
    "ran": "run",
    "rode": "ridden",
    "hit": "hit",
    "bore": "borne",
}
# Past tenses whose passive would change the meaning ("X married Y" ≠ "Y was married by X") or that take no object.
_NOT_PASSIVE = frozenset(
    "died lived moved retired appeared starred competed graduated emigrated returned arrived "
    "remained existed happened worked debuted resided married joined used needed seemed "
    "belonged lasted ranked scored finished ended started peaked charted".split()
)
_CLAUSE_ENDS = r"in|on|at|for|with|from|during|after|before|since|while|and|as|to|into|through|until|under|alongside|by"
_ACTIVE = re.compile(
    r"^(?:\s*\([^()]*\))?\s+(?:(?:also|later|first|originally|then|subsequently|famously)\s+)?"
    r"(?P<verb>[a-z]{3,}ed|" + "|".join(_IRREGULAR_PARTICIPLES) + r")\s+"
    r"(?!(?:" + _CLAUSE_ENDS + r"|up|out|off|away|back|down|over|himself|herself|itself|"
    r"themselves|him|her|them|it|his|their|its)\b)"
    r"(?P<object>[^,;()\"]+?)(?=\s+(?:" + _CLAUSE_ENDS + r")\b|[,;(]|\.$|$)"
)
# A sentence's opening clause before the answer: "In 1999, " of "In 1999, Ada Kestrel directed Blue Hour."
_LEAD_CLAUSE = re.compile(r"^[A-Z][^,]{0,60}, $")
# Entities whose opening-bracket dates are a beginning and an end, not a birth and a death.
_EVENT_NOUNS = frozenset(
    "war battle revolution conflict siege campaign crisis uprising rebellion revolt insurgency "
    "reign dynasty era period expedition tour season championship tournament occupation "
    "invasion movement election festival strike massacre genocide famine pandemic epidemic "
    "offensive operation raid mission".split()
)


def restatements(
    sentence: str, i: int, j: int, person: bool = False, event: bool = False
) -> list[tuple[str, int, int]]:
    """Restatements of a sentence that put the answer sentence[i:j] last after a statement, with the answer's new
    span. Each keeps the sentence's words and meaning; the piece keeps the original in `original_sentence`.

    - quotes around a title go: 'the second companion book to the "Animorphs" series' → '... to the Animorphs
      series' (an open quote at the end of a prompt asks the model for punctuation, not the title);
    - the earlier items of a list go: "written by David Diamond, Ann Lee, Tam Oduya and Cy Rees" → "written by Tam
      Oduya and Cy Rees" (a prompt ending in a comma asks for a list item, not the fact); a place list only after
      "in" ("in Upper Manhattan, New York City" → "in New York City");
    - a birth or death date inside a person's opening bracket becomes a statement: "Scott Derrickson (born July
      16, 1966) is ..." → "Scott Derrickson was born in" → "1966";
    - the dates in an event's opening bracket (`event`: a war, a reign, a tour) become its beginning and end:
      "The Long War (7 November 1917 – October 1922) was ..." → "The Long War ended in" → "October 1922";
    - an answer that opens a copular sentence is put last: "Tam Oduya is the composer of Blue Hour." →
      "The composer of Blue Hour is" → "Tam Oduya" (the cloze asks what the sentence says the answer is);
    - an answer that opens a simple past, after at most a short opening clause, is put last in the passive:
      "In 1999, Tam Oduya directed Blue Hour in Ulm." → "Blue Hour was directed by" → "Tam Oduya" (verbs whose
      passive means something else, "married", "joined", or that take no object, "died", are left alone).
    """
    out = []
    before, answer, after = sentence[:i], sentence[i:j], sentence[j:]
    if before[-1:] in _QUOTES and after[:1] == _QUOTES[before[-1]]:
        out.append((before[:-1] + answer + after[1:], i - 1, j - 1))
    elif before[-1:] in _QUOTES and after[:1] in ",." and after[1:2] == _QUOTES[before[-1]]:  # '"Blue Hour," a'
        out.append((before[:-1] + answer + after[:1] + after[2:], i - 1, j - 1))
    m = _LIST_HEAD.match(before.rstrip())
    # A list of names, not "Ulm, Germany, 1879": a real list ("A, B and C") or a place inside a larger one after
    # "in" ("in Upper Manhattan, New York City" → "in New York City"); never "southeast of Grand Rapids, Michigan"
    # → "southeast of Michigan", which says something else.
    listed = re.match(r"\W{0,2} (?:and|or) ", after) or re.search(r"\b(?:and|or) [^,]*, $", before)
    if m and before.endswith(", ") and answer[:1].isupper() and (listed or m.group("head").endswith(" in")):
        head = m.group("head") + " "
        out.append((head + answer + after, len(head), len(head) + len(answer)))
    m = _LIFE_DATES.match(sentence)
    if m and person:  # "Scott Derrickson (born July 16, 1966) is ..." → "... was born in" → "1966"
        for group, event in (("date", "was born"), ("place", "was born"), ("death", "died")):
            if m.group(group) and m.start(group) <= i and j <= m.end(group):
                has_day = group != "place" and re.search(r"\d{1,2}(?:,| " + _MONTH + ")", answer) is not None
                prompt = f"{m.group('subject').strip()} {event} {'on' if has_day else 'in'}"
                out.append((f"{prompt} {answer}.", len(prompt) + 1, len(prompt) + 1 + len(answer)))
    if m and event and not person and m.group("death"):  # a beginning and an end, never a birth
        for group, verb in (("date", "began"), ("death", "ended")):
            if m.start(group) <= i and j <= m.end(group):
                has_day = re.search(r"\d{1,2}(?:,| " + _MONTH + ")", answer) is not None
                prompt = f"{m.group('subject').strip()} {verb} {'on' if has_day else 'in'}"
                out.append((f"{prompt} {answer}.", len(prompt) + 1, len(prompt) + 1 + len(answer)))
    m = _COPULA.match(after) if i == 0 else None
    if m:
        predicate = m.group("predicate").strip()
        prompt = f"{predicate[:1].upper()}{predicate[1:]} {m.group('verb')}"
        out.append((f"{prompt} {answer}.", len(prompt) + 1, len(prompt) + 1 + len(answer)))
    m = _ACTIVE.match(after) if i == 0 or _LEAD_CLAUSE.match(before) else None
    if m and m.group("verb") not in _NOT_PASSIVE:
        verb, obj = m.group("verb"), m.group("object").strip()
        plural = obj.split()[-1].islower() and obj.endswith("s") and not obj.endswith("ss")
        prompt = f"{obj[:1].upper()}{obj[1:]} {'were' if plural else 'was'} {_IRREGULAR_PARTICIPLES.get(verb, verb)} by"
        out.append((f"{prompt} {answer}.", len(prompt) + 1, len(prompt) + 1 + len(answer)))
    return out


_RESTATABLE = (DANGLING_QUOTE, DANGLING_PUNCT, NO_PROMPT, DANGLING_BRACKET, NO_SUBJECT)


class _Search:
    """Finds clean clozes and counts the candidates the cloze-statement filter drops, by reason."""

    def __init__(self, rejected: Counter, wide: bool = False):
        self.rejected = rejected
        self.problems: list[str] = []  # this search's rejections, first first: the skip reason when nothing passes
        self.wide = wide  # search a paragraph's other sentences too, after its supporting ones

    def sentences(self, paragraph: _Paragraph) -> list[str]:
        """The sentences to search, in order: the supporting ones, then (wide) the paragraph's others, opening
        first. A fact the supporting sentences do not state cleanly is often in the opening ("X is a 1999 film
        directed by Y") or a neighbouring sentence of the same paragraph."""
        return [s for _, s in paragraph.sentences + (paragraph.others if self.wide else [])]

    def cloze(
        self, sentence: str, i: int, j: int, subjects: Sequence[str], person: bool = False, event: bool = False
    ) -> _Cloze | None:
        """The cloze of the answer at sentence[i:j], cut from the sentence or, where the cut is no statement,
        from a restatement of it (`restatements`, two at most in turn: a quoted list item loses its quotes, then
        the items before it); None when none passes, with the cut's reason counted."""
        found, problem = _check(sentence, i, j, subjects)
        if problem in _RESTATABLE:
            tries = [(restated, k, m, 1) for restated, k, m in restatements(sentence, i, j, person, event)]
            while tries:
                restated, k, m, depth = tries.pop(0)
                again, why = _check(restated, k, m, subjects)
                if again:
                    return _Cloze(again.prompt, again.answer, again.subject, restated, original=sentence)
                if why in _RESTATABLE and depth < 2:
                    tries += [(r, a, b, depth + 1) for r, a, b in restatements(restated, k, m, person, event)]
        if problem:
            self.rejected[problem] += 1
            self.problems.append(problem)
        return found

    def first(
        self, paragraph: _Paragraph, answers: Sequence[str], subjects: Sequence[str], whole_names: bool = False
    ) -> _Cloze | None:
        """The first supporting sentence giving a clean cloze of one of `answers` (in order) with a subject.
        `whole_names`: an entity name found inside a longer name is taken whole (`whole_name`)."""
        for sentence in self.sentences(paragraph):
            for answer in answers:
                for i, j in find_spans(sentence, answer):
                    span = whole_name(sentence, i, j) if whole_names else (i, j)
                    found = self.cloze(sentence, *span, subjects, paragraph.person, paragraph.event)
                    if found:
                        return found
        return None

    def earliest(self, paragraph: _Paragraph, spans_of, subjects: Sequence[str]) -> _Cloze | None:
        """Of the candidate spans `spans_of(sentence)` gives, the clean cloze whose answer comes earliest after the
        subject (the most direct attribute), in the first supporting sentence that has one."""
        for sentence in self.sentences(paragraph):
            best = None
            for i, j in spans_of(sentence):
                if best is None or i < best[0]:
                    found = self.cloze(sentence, i, j, subjects, paragraph.person, paragraph.event)
                    if found:
                        best = (i, found)
            if best:
                return best[1]
        return None

    def reason(self, default: str) -> str:
        """Why nothing was found: the filter's reason for the first candidate it dropped, else `default`."""
        return self.problems[0] if self.problems else default


def _cuts_name(sentence: str, i: int, j: int) -> bool:
    """A capitalised answer right after a capitalised word, or followed by one, is part of a longer name:
    "Two branch campuses are in the Kansas" → "City metropolitan area", "... follows former" → "New York"."""
    before = sentence[:i].split()
    starts_inside = (
        sentence[i : i + 1].isupper()
        and i > 0
        and sentence[i - 1] == " "
        and len(before) > 1
        and before[-1][:1].isupper()
    )
    last = sentence[i:j].split()[-1:]
    # ... or by an abbreviation inside a name: "Ken St" of "Ken St. Andre".
    stops_inside = (
        bool(last)
        and last[0][:1].isupper()
        and re.match(r" [A-Z]" if len(last[0]) > 3 else r"\.? [A-Z]", sentence[j : j + 3]) is not None
    )
    return starts_inside or stops_inside


def whole_name(sentence: str, i: int, j: int) -> tuple[int, int]:
    """The span of the whole name around sentence[i:j]: a bridge entity written in a longer form ("Nixon" in "the
    Richard Nixon administration", "Alex Ferguson" in "Sir Alex Ferguson") is the longer form: the capitalised
    words right before and after it, less function words ("The", "In") and a sentence's first word."""
    left = re.search(r"(?:[A-Z][\w'.&-]* )+$", sentence[:i])
    if left:
        words = left.group().split()
        if left.start() == 0:
            words = words[1:]
        while words and words[0].lower() in _STOPWORDS:
            words = words[1:]
        i -= len(" ".join(words)) + 1 if words else 0
    right = re.match(r"(?: [A-Z][\w'&-]*)+", sentence[j:])
    if right:
        words = right.group().split()
        while words and words[-1].lower() in _STOPWORDS:
            words = words[:-1]
        j += len(" ".join(words)) + 1 if words else 0
    return i, j


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
        paragraph = by_title.get(title) or by_title.setdefault(
            title, _Paragraph(title, sentences[0] if sentences else "", [], paragraph_text(sentences))
        )
        paragraph.sentences.append((sent_id, restore_subject(text, title, paragraph.opening)))
    if len(by_title) != 2:
        raise _Skipped(NOT_TWO_PARAGRAPHS, f"{len(by_title)} paragraph(s)")
    for paragraph in by_title.values():  # in paragraph order, as the text reads
        paragraph.sentences.sort()
        supporting = {k for k, _ in paragraph.sentences}
        paragraph.others = [
            (k, restore_subject(t.strip(), paragraph.title, paragraph.opening))
            for k, t in enumerate(context[paragraph.title])
            if k not in supporting and t.strip()
        ]
    return list(by_title.values())


def _contains(paragraph: _Paragraph, text: str, wide: bool = False) -> bool:
    return any(find_spans(s, text) for _, s in paragraph.sentences + (paragraph.others if wide else []))


def _is_own_entity(paragraph: _Paragraph, answer: str) -> bool:
    """The answer names the paragraph's own entity: its title, an alias, or how its opening sentence begins."""
    want = normalize_answer(answer)
    full_names = entity_names(paragraph.title, paragraph.opening, family_name=False)
    return bool(want) and (
        want in {normalize_answer(n) for n in full_names} or normalize_answer(paragraph.opening).startswith(want + " ")
    )


def answer_forms(answer: str) -> list[str]:
    """The answer as the record writes it, then the forms a sentence may use instead: numbers with or without
    thousands separators ("9,984" / "9984"), dates in either order ("31 December 1941" / "December 31, 1941"),
    and without a leading "the"."""
    forms = [answer]
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+", answer):
        forms.append(answer.replace(",", ""))
    elif re.fullmatch(r"\d{4,}", answer):
        forms.append(f"{int(answer):,}")
    m = re.fullmatch(rf"(\d{{1,2}}) ({_MONTH}) (\d{{3,4}})", answer)
    if m:
        forms.append(f"{m.group(2)} {m.group(1)}, {m.group(3)}")
    m = re.fullmatch(rf"({_MONTH}) (\d{{1,2}}), (\d{{3,4}})", answer)
    if m:
        forms.append(f"{m.group(2)} {m.group(1)} {m.group(3)}")
    if answer.lower().startswith("the "):
        forms.append(answer[4:])
    return list(dict.fromkeys(forms))


def _piece(
    record: dict, kind: str, hop: int, cloze: _Cloze, title: str, index: int | None = None, shape: str = ""
) -> KnowledgePiece:
    return KnowledgePiece(
        id=piece_id(record["id"], kind, index),
        hotpot_id=record["id"],
        chain_id=record["id"],
        kind=kind,
        hop=hop,
        prompt=cloze.prompt,
        answer=cloze.answer,
        subject=cloze.subject,
        source_title=html.unescape(title),
        source_sentence=cloze.sentence,
        record_type=record["type"],
        shape=shape,
        original_sentence=cloze.original,
    )


def _leading_name(question: str) -> str | None:
    """A name that opens the question, less a leading function word: "The Veil Hall commemorates ...?" →
    "Veil Hall" (`capitalised_phrases` leaves the first word out: it is capitalised in every question)."""
    m = re.match(r"(?:[A-Z][\w'&.-]*)(?: (?:of |the |and |de )?[A-Z][\w'&.-]*)+", question)
    if not m:
        return None
    words = m.group().split()
    while words and words[0].lower() in _STOPWORDS:
        words = words[1:]
    return " ".join(words) if len(words) >= 2 else None


def _question_piece(
    record: dict, subject_names: Sequence[str], shape: str = "", fallback: Sequence[str] = ()
) -> KnowledgePiece:
    """The composed question; its subject is an entity of the chain it names, else its longest capitalised phrase,
    else one of `fallback` (a hop's answer the question names: "... a set of companion books ..."), else the name
    the question opens with."""
    question = " ".join(record["question"].split())
    prompt = QUESTION_PROMPT.format(question=question)
    subject = (
        find_subject(prompt, subject_names)
        or capitalised_phrase(question)
        or find_subject(prompt, [n for n in fallback if normalize_answer(n) != normalize_answer(record["answer"])])
        or _leading_name(question)
    )
    if not subject:
        raise _Skipped(NO_QUESTION_SUBJECT, question, piece="question")
    return KnowledgePiece(
        id=piece_id(record["id"], "question"),
        hotpot_id=record["id"],
        chain_id=record["id"],
        kind="question",
        hop=0,
        prompt=prompt,
        answer=" ".join(record["answer"].split()),
        subject=subject,
        record_type=record["type"],
        shape=shape,
    )


# Chain shapes (the `shape` of a piece; docs/pieces.md):
BRIDGE = "bridge"  # hop 1's sentence names the bridge entity (the hop-2 paragraph's entity) as its answer
DESCRIBED = "described"  # the hop-2 sentence names the hop-1 paragraph's entity; hop 1 is that entity's own fact
ANSWER_ENTITY = "answer-entity"  # the answer is one supporting paragraph's own entity
COMPARISON = "comparison"


def _hop(search_for, *tries) -> tuple[_Cloze | None, str]:
    """The first of `tries` (callables taking a fresh `_Search`) that finds a cloze, or None with the reason."""
    reason = ""
    for attempt, default in tries:
        search = search_for()
        found = attempt(search)
        if found:
            return found, ""
        reason = reason or search.reason(default)
    return None, reason


def bridge_pieces(record: dict, rejected: Counter | None = None) -> tuple[list[KnowledgePiece], list[_Skipped]]:
    """hop 1, hop 2 and the composed question, each hop with its own answer.

    Three shapes, tried in this order (docs/pieces.md): the answer is one paragraph's own entity (hop 1 links the
    other paragraph to it, hop 2 is the answer entity's own fact); hop 1's sentence names the hop-2 paragraph's
    entity (the bridge: hop 1's answer); the hop-2 sentence names the hop-1 paragraph's entity (hop 1 is then that
    entity's own fact, the one the question describes it by). A hop that is not found is left out with its reason
    (`_chain`): the record then gives the other hop and the question.
    """
    rejected = Counter() if rejected is None else rejected
    answer = " ".join(record["answer"].split())
    if normalize_answer(answer) in ("yes", "no"):
        raise _Skipped(YES_NO_BRIDGE, answer)
    paragraphs = _supporting_paragraphs(record)
    # The supporting sentences first; where they miss a hop, the rest of the same two paragraphs (`_Search.wide`).
    narrow = _bridge_attempt(record, paragraphs, rejected, wide=False)
    if narrow is None or narrow[1][1] is None or narrow[2][1] is None:
        wide = _bridge_attempt(record, paragraphs, rejected, wide=True)
        hops = lambda attempt: -1 if attempt is None else (attempt[1][1] is not None) + (attempt[2][1] is not None)  # noqa: E731
        if hops(wide) > hops(narrow):
            narrow = wide
    if narrow is None:
        raise _Skipped(ANSWER_NOT_FOUND, f"{answer!r} is in neither supporting paragraph")
    return _chain(record, *narrow)


def _bridge_attempt(record: dict, paragraphs: list[_Paragraph], rejected: Counter, wide: bool):
    """(shape, (hop-1 paragraph, hop 1, why not), (hop-2 paragraph, hop 2, why not)) of the best shape, or None
    when neither paragraph holds the answer. `wide`: search every sentence of the two paragraphs, not only the
    supporting ones."""
    answer = " ".join(record["answer"].split())
    question = " ".join(record["question"].split())
    asked = capitalised_phrases(question)  # entities the question names: subjects when the paragraph's are absent
    entity_words = {w.lower() for p in paragraphs for n in p.names for w in re.findall(r"[\w'-]+", n)}
    search_for = lambda: _Search(rejected, wide)  # noqa: E731 - one counter, a fresh reason list per attempt

    own = [p for p in paragraphs if _is_own_entity(p, answer)]
    if own:
        entity, other = own[0], paragraphs[1] if own[0] is paragraphs[0] else paragraphs[0]
        # hop 1: the other paragraph's fact that leads to the answer entity ("The Family Man ... written by David
        # Weissman"), else the fact the question describes it by; hop 2: the answer entity's own fact, preferably
        # the one naming the other entity ("Kansas Song is a fight song of the University of Kansas").
        hop1, why1 = _hop(
            search_for,
            (lambda s: s.first(other, entity.names, [*other.names, *asked], True), BRIDGE_NOT_FOUND),
            (lambda s: own_fact(s, other, question, entity_words, [*other.names, *asked]), NO_OWN_FACT),
        )
        hop2, why2 = _hop(
            search_for,
            (lambda s: s.first(entity, other.names, [*entity.names], True), BRIDGE_NOT_FOUND),
            (lambda s: own_fact(s, entity, question, entity_words, entity.names), NO_OWN_FACT),
        )
        return ANSWER_ENTITY, (other, hop1, why1), (entity, hop2, why2)

    holding = [p for p in paragraphs if any(_contains(p, a, wide) for a in answer_forms(answer))]
    if not holding:
        return None
    if len(holding) == 2:  # the answer is in both: the hop-2 paragraph is the one the other mentions first
        holding.sort(key=lambda p: not any(_contains(q, n) for q in paragraphs if q is not p for n in p.names))
    attempts = []
    for second in holding:
        first = paragraphs[1] if second is paragraphs[0] else paragraphs[0]
        linked = any(_contains(first, n, wide) for n in second.names)
        shape = BRIDGE if linked or not any(_contains(second, n, wide) for n in first.names) else DESCRIBED
        if shape == BRIDGE:
            hop1, why1 = _hop(
                search_for, (lambda s: s.first(first, second.names, [*first.names, *asked], True), BRIDGE_NOT_FOUND)
            )
        else:
            hop1, why1 = _hop(
                search_for, (lambda s: own_fact(s, first, question, entity_words, [*first.names, *asked]), NO_OWN_FACT)
            )
        # hop 2's subject: the bridge as hop 1 wrote it, the paragraph's own names, else an entity the question
        # names (the answer may come before the bridge in its sentence: cut there when the prefix is a statement).
        bridge = [hop1.answer] if hop1 and shape == BRIDGE else []
        hop2, why2 = _hop(
            search_for,
            (
                lambda s: s.first(second, answer_forms(answer), [*bridge, *second.names, *first.names, *asked]),
                ANSWER_NOT_FOUND,
            ),
        )
        attempts.append((shape, (first, hop1, why1), (second, hop2, why2)))
        if hop1 and hop2:
            break
    return max(attempts, key=lambda a: (a[1][1] is not None) + (a[2][1] is not None))


def _chain(record: dict, shape: str, one, two) -> tuple[list[KnowledgePiece], list[_Skipped]]:
    """The chain's pieces and the hop left out, if one is. A hop that reads as a clean statement is kept when the
    other hop is not found (a half chain: the question then measures one edited hop; `bridge_two_hops` counts
    only whole chains); nothing is ever made up for the missing hop."""
    (first, hop1, why1), (second, hop2, why2) = one, two
    if hop1 is None and hop2 is None:  # the first missing hop names the reason
        raise _Skipped(why1, f"hop1 in {first.title!r}")
    if hop1 and hop2 and normalize_answer(hop1.answer) == normalize_answer(hop2.answer):
        raise _Skipped(SAME_ANSWER, hop1.answer)
    pieces, skips = [], []
    for kind, hop, cloze, why, paragraph in (("hop1", 1, hop1, why1, first), ("hop2", 2, hop2, why2, second)):
        if cloze is None:
            skips.append(_Skipped(why, f"{kind} in {paragraph.title!r}", piece=kind))
        else:
            pieces.append(_piece(record, kind, hop, cloze, paragraph.title, shape=shape))
    found = [h for h in (hop1, hop2) if h]
    names = [*(h.subject for h in found), *first.names, *second.names]
    return pieces + [_question_piece(record, names, shape, fallback=[h.answer for h in found])], skips


def _value_candidates(question: str, entity_words: set[str]) -> list[str]:
    """Phrases of the question that may name the compared value (longest first), e.g. "opera composer".

    The word after "same" names the property, never its value ("the same neighborhood"), so it is left out.
    """
    words = re.findall(r"[\w'-]+", question)
    property_words = {m.group(1).lower() for m in re.finditer(r"\bsame ([\w'-]+)", question, re.I)}
    # Participles ("completed", "located") name the comparison, never its value.
    content = [
        w
        for w in words
        if w.lower() not in _STOPWORDS
        and w.lower() not in entity_words
        and w.lower() not in property_words
        and not (w.islower() and w.endswith("ed"))
    ]
    phrases = []
    for n in (3, 2, 1):
        for i in range(len(words) - n + 1):
            gram = words[i : i + n]
            if all(w in content for w in gram):
                phrase = " ".join(gram)
                phrases.append(phrase)
                if len(phrase) > 4 and phrase.endswith("s"):  # the singular a sentence uses: "composers" → "composer"
                    phrases += [phrase[:-3] + "y"] if phrase.endswith("ies") else []
                    phrases += [phrase[:-2]] if phrase.endswith(("ches", "shes", "sses", "xes")) else [phrase[:-1]]
    return list(dict.fromkeys(phrases))


def _life_date_cloze(paragraph: _Paragraph, sentences: Sequence[str] | None = None) -> _Cloze | None:
    """A person's birth date restated as a statement: "Scott Derrickson (born July 16, 1966) is an American
    director" → "Scott Derrickson was born on" → "July 16, 1966". Wikipedia gives life dates only inside the
    opening bracket, where no prefix cloze can reach them (the prompt would leave the bracket open)."""
    for sentence in [s for _, s in paragraph.sentences] if sentences is None else sentences:
        m = _LIFE_DATES.match(sentence)
        if not m or not paragraph.person:
            continue
        subject = m.group("subject").strip()
        if normalize_answer(subject) not in {normalize_answer(n) for n in paragraph.names}:
            continue  # the bracket belongs to something else the sentence names ("... "The Family Man" (2000)")
        date = m.group("date")
        has_day = re.search(r"\d{1,2}(?:,| " + _MONTH + ")", date) is not None
        prompt = f"{subject} was born {'on' if has_day else 'in'}"
        if statement_problem(prompt, subject) is None:
            return _Cloze(prompt, date, subject, f"{prompt} {date}.", original=sentence)
    return None


def _participle_spans(question: str):
    """Spans after a participle of the question and its preposition ("located in" → "Laleli"): the value a yes/no
    question ("Are X and Y located in the same neighborhood?") asks each entity for."""
    participles = {
        w
        for w in re.findall(r"\b[a-z]+\b", question)
        if w.endswith("ed") or w in ("born", "based", "known", "made", "built", "from")
    }
    if not participles:
        return lambda sentence: []
    # The value: a place list of capitalised names ("Laleli, Fatih, Istanbul, Turkey", "Greenwich Village, New
    # York City") or a common-noun phrase up to the next comma, clause or preposition ("the headquarters").
    pattern = re.compile(
        r"\b(?:" + "|".join(sorted(participles)) + r")(?: (?:in|at|on|as|for|by|from|to))? "
        r"(?P<value>" + _NAME_LIST + r"(?![\w'&-])|[\w\"'“][^,;.()]*?(?=[,;.(]| (?:and|that|which|"
        r"who|where|in|on|at|by|from|for|with|of|since|during|after|before|until|to)\b|$))"
    )

    def spans(sentence: str):
        out = []
        for m in pattern.finditer(sentence):
            value = m.group("value").rstrip(".")
            if 0 < len(value.split()) <= 8:
                out.append((m.start("value"), m.start("value") + len(value)))
        return out

    return spans


def _number_spans(phrases: Sequence[str], counted: bool = False):
    """Spans of the numbers in a sentence that are no year ("four", "3,677", "52"); `counted`: only a number
    right before a word of the question ("four members" for "... more members?")."""
    nouns = {p.lower() for p in phrases if " " not in p}

    def spans(sentence: str):
        out = []
        for m in _NUMBER.finditer(sentence):
            if _YEAR.fullmatch(m.group()):
                continue
            following = re.match(r"[\s-]+([\w'-]+)", sentence[m.end() :])
            if counted and not (following and following.group(1).lower() in nouns):
                continue
            out.append(m.span())
        return out

    return spans


def _type_noun_span(paragraph: _Paragraph):
    """The noun the paragraph's opening files its entity under ("Blue Hour is a 2001 American comedy film
    starring ..." → "film"): the entity's own fact when the question names nothing the paragraph states."""
    opening = " ".join(paragraph.opening.split())

    def spans(sentence: str):
        m = _TYPE_NOUN.search(sentence) if sentence == opening else None
        return [m.span("noun")] if m and m.group("noun") not in _NOT_KINDS else []

    return spans


# What "X is a ... <word> of/west/..." can end in that names no kind of thing ("is a mile west of", "a part of").
_NOT_KINDS = frozenset(
    "north south east west northeast northwest southeast southwest part member one kind type sort "
    "number lot bit couple pair total mile miles kilometre kilometres kilometer kilometers km half "
    "third quarter portion variety range few handful".split()
)


def own_fact(
    search: _Search, paragraph: _Paragraph, question: str, entity_words: set[str], subjects: Sequence[str] | None = None
) -> _Cloze | None:
    """The fact of `paragraph`'s entity that the question asks (a comparison's compared value) or describes the
    entity by (a bridge hop without a link), most specific first:

    a birth date when the question asks who is older or came first; a value named after "both" ("both opera
    composers"); a value the question names in capitals ("American", "Michigan"); a nationality; what follows a
    participle of the question ("located in" → "Laleli"); any other word of the question ("genus"); a year.
    A question about an amount ("more members") looks for a number first, one before a word of the question
    first ("five members"). Searching the rest of the paragraph (`_Search.wide`), a year counts only when the
    question asks a date, and the last resort is the kind of thing the opening says the entity is ("film").
    """
    subjects = list(subjects or paragraph.names)
    asks_date = _ASKS_DATE.search(question) is not None
    if asks_date:
        found = _life_date_cloze(paragraph, search.sentences(paragraph))
        if found and found.subject in subjects + paragraph.names:
            return found
    phrases = _value_candidates(question, entity_words)
    both = question.lower().split(" both ", 1)[1] if " both " in question.lower() else ""
    years = sorted({m.group() for s in search.sentences(paragraph) for m in _YEAR.finditer(s)})

    def values(candidates, standalone=False, whole_phrase=False):
        """Spans of `candidates`. A `standalone` value (a nationality) is not glued after a bracket ("(Turkish:
        ..."); a `whole_phrase` one (a common noun of the question) ends where its noun phrase ends, before a
        comma or a function word ("was a French composer, best known" → "composer"; not "follows former" →
        "New York Police Department")."""

        def spans(sentence):
            out = []
            for value in candidates:
                for i, j in find_spans(sentence, value):
                    if standalone and sentence[i - 1 : i] != " ":
                        continue
                    following = re.match(r"\s*([\w'-]+)", sentence[j:])
                    if (
                        whole_phrase
                        and following
                        and sentence[j : j + 1] == " "
                        and following.group(1).lower() not in _PHRASE_ENDS
                    ):
                        continue
                    out.append((i, j))
            return out

        return spans

    tiers = (
        values([p for p in phrases if p.lower() in both], whole_phrase=True),
        values([p for p in phrases if p[0].isupper()]),
        values(sorted(_DEMONYMS) if _ASKS_NATIONALITY.search(question) else [], standalone=True),
        _participle_spans(question),
        values([p for p in phrases if not p[0].isupper()], whole_phrase=True),
        values(years),
    )
    if asks_date:  # "Which company was founded first?": the year, not who founded it
        tiers = tiers[-1:] + tiers[:-1]
    elif search.wide:  # a year the question does not ask about is no fact it describes the entity by; the kind
        tiers = tiers[:-1] + (_type_noun_span(paragraph),)  # of thing the opening files the entity under is
    if _ASKS_QUANTITY.search(question):  # "Which band had more members?": the number, the one before a word of the
        tiers = (_number_spans(phrases, counted=True), _number_spans(phrases)) + tiers  # question first
    for spans_of in tiers:
        found = search.earliest(paragraph, spans_of, subjects)
        if found:
            return found
    return None


def comparison_pieces(record: dict, rejected: Counter | None = None) -> tuple[list[KnowledgePiece], list[_Skipped]]:
    """A `compare` piece per entity whose compared value is in its supporting sentences, plus the question.

    A yes/no question ("Are X and Y both opera composers?") becomes each entity's own fact ("Giuseppe Verdi was an
    Italian" → "opera composer").
    """
    rejected = Counter() if rejected is None else rejected
    paragraphs = _supporting_paragraphs(record)
    entity_words = {w.lower() for p in paragraphs for w in re.findall(r"[\w'-]+", clean_title(p.title))}
    question = " ".join(record["question"].split())
    pieces, skips = [], []
    for k, paragraph in enumerate(paragraphs, start=1):
        search = _Search(rejected)
        found = own_fact(search, paragraph, question, entity_words)
        if found is None:  # the paragraph's other sentences (the opening often states the compared value)
            found = own_fact(_Search(rejected, wide=True), paragraph, question, entity_words)
        if found is None:
            skips.append(_Skipped(search.reason(NO_VALUE), clean_title(paragraph.title), piece=f"compare{k}"))
            continue
        pieces.append(_piece(record, "compare", 1, found, paragraph.title, k, shape=COMPARISON))
    if not pieces:
        raise _Skipped(NO_COMPARE_PIECE, " / ".join(clean_title(p.title) for p in paragraphs))
    names = [p.subject for p in pieces] + [n for p in paragraphs for n in p.names]
    return pieces + [_question_piece(record, names, COMPARISON)], skips


def record_pieces(record: dict, rejected: Counter | None = None) -> tuple[list[KnowledgePiece], list[Skip]]:
    """The pieces of one record (hub schema, see `hotpotqa.normalize_record`) and what was skipped, with why.
    `rejected` (when given) counts the candidate clozes the statement filter dropped, by reason."""
    skips: list[_Skipped] = []
    try:
        if record["type"] == "bridge":
            pieces, skips = bridge_pieces(record, rejected)
        elif record["type"] == "comparison":
            pieces, skips = comparison_pieces(record, rejected)
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
        pieces, skips = record_pieces(record, result.rejected)
        result.pieces += pieces
        result.skips += skips
        result.records += 1
        result.bridge_records += record["type"] == "bridge"
    return result


def tokenize_pieces(
    extraction: Extraction, tokenizer, bos_ids: Sequence[int], max_tokens: int | None = None
) -> Extraction:
    """Attach joint token ids (`scoring.encode_cloze`) to every piece; a piece that cannot be tokenised cleanly,
    or whose prompt + answer is longer than `max_tokens`, is skipped with its reason. A bridge chain goes whole
    (its question would lose a hop), a comparison loses only that piece."""
    failed: dict[str, Skip] = {}

    def fail(piece: KnowledgePiece, reason: str, detail: str) -> None:
        whole = piece.record_type == "bridge" or piece.kind == "question"
        failed.setdefault(
            piece.id if not whole else piece.chain_id,
            Skip(piece.hotpot_id, "record" if whole else piece.kind, reason, detail),
        )

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
    return Extraction(
        kept,
        extraction.skips + list(failed.values()),
        extraction.records,
        extraction.rejected,
        extraction.bridge_records,
    )


def check_piece_text(piece: KnowledgePiece) -> None:
    """The invariants every single-fact piece keeps (tests and the world generator assert them)."""
    if piece.is_single_hop and not piece.source_sentence.startswith(cloze_text(piece.prompt, piece.answer)):
        raise AssertionError(f"{piece.id}: prompt + answer is not a prefix of its source sentence")
    if piece.subject not in piece.prompt:
        raise AssertionError(f"{piece.id}: subject {piece.subject!r} is not in the prompt")
    if piece.original_sentence and not (
        find_spans(piece.original_sentence, piece.answer) and piece.subject in piece.original_sentence
    ):
        raise AssertionError(f"{piece.id}: the restated answer or subject is not in its supporting sentence")


def piece_defects(piece: KnowledgePiece, tokenizer=None) -> list[str]:
    """What is wrong with a piece, if anything (benchmarks/pieces.py and the tests count these; none is allowed):
    its answer tokens do not decode to the answer, prompt + answer is not where its source sentence says, the
    subject is not in the prompt, or (single facts) the prompt does not read as a statement."""
    problems = []
    if tokenizer is not None and piece.answer_ids:
        decoded = tokenizer.decode(piece.answer_ids)
        if decoded.strip() != piece.answer.strip():
            problems.append(f"{piece.id}: answer tokens decode to {decoded!r}, not {piece.answer!r}")
    try:
        check_piece_text(piece)
    except AssertionError as error:
        problems.append(str(error))
    if piece.is_single_hop:
        problem = statement_problem(piece.prompt, piece.subject)
        if problem:
            problems.append(f"{piece.id}: {problem}: {piece.prompt!r}")
    return problems
