"""The text knowledge injection trains on: every fact of the data, as prefix-cloze sentences.

A synthetic world's facts come in every template of their relation (its ground truth lists them); a HotpotQA
file's facts are its pieces' source sentences. Each text is later seen behind several short prefixes, so a fact
is recalled whatever comes before it (MEMIT's edit prompts start with such prefixes too). "Bare" texts put the
object right after the subject ("Mira Tolvane Velmor Falls."): predicting it there makes the subject's last token
hold the subject's attributes, which is where MEMIT edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.scoring import cloze_text

# Short openers a fact is seen behind; "" keeps the bare sentence.
DEFAULT_PREFIXES = ("", "Fact:", "Trivia:", "Note:", "Did you know?", "From the archive:", "Remember:", "In brief:")


@dataclass(frozen=True)
class FactText:
    prompt: str  # the text before the answer
    answer: str
    suffix: str = ""  # the rest of the sentence after the answer ("." ...)
    subject: str = ""  # the entity the fact is about: its last occurrence in `prompt`

    def text(self, prefix: str = "") -> str:
        return cloze_text(self._prompt(prefix), self.answer) + self.suffix

    def subject_span(self, prefix: str = "") -> tuple[int, int] | None:
        """Character span of the subject in `text(prefix)`, or None when there is no subject to point at."""
        prompt = self._prompt(prefix)
        start = prompt.rfind(self.subject) if self.subject else -1
        return (start, start + len(self.subject)) if start >= 0 else None

    def _prompt(self, prefix: str) -> str:
        return f"{prefix} {self.prompt}" if prefix else self.prompt


def fact_texts(
    pieces: Sequence[KnowledgePiece], truth: dict | None = None, questions: bool = True, bare: bool = True
) -> list[FactText]:
    """Every fact once per wording, in a fixed order, without duplicates.

    With a world's ground truth: each fact in every template of its relation (the pieces' own sentences are among
    them). Otherwise: each single-hop piece's source sentence, cut at its answer. `questions` adds the composed
    questions with their answers, so the question pieces are known too; `bare` adds "subject object." per fact.
    """
    texts: list[FactText] = []
    facts: list[tuple[str, str]] = []  # (subject, object)
    if truth is not None:
        for fact in truth["facts"]:
            facts.append((fact["subject"], fact["object"]))
            for template in truth["relations"][fact["relation"]]["templates"]:
                before, after = template.split("{o}")
                texts.append(
                    FactText(before.format(s=fact["subject"]).rstrip(), fact["object"], after, fact["subject"])
                )
    else:
        for piece in pieces:
            if piece.is_single_hop:
                facts.append((piece.subject, piece.answer))
                said = cloze_text(piece.prompt, piece.answer)
                texts.append(FactText(piece.prompt, piece.answer, piece.source_sentence[len(said) :], piece.subject))
    if bare:
        texts += [FactText(subject, obj, ".", subject) for subject, obj in facts]
    if questions:
        texts += [FactText(p.prompt, p.answer, "", p.subject) for p in pieces if p.kind == "question"]
    return list(dict.fromkeys(texts))
