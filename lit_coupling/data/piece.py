"""A knowledge piece: one cloze a causal LM can score, with everything needed to recompute its score.

`knowledge_pieces.json` holds a list of these (plus skip statistics); every later stage reads pieces through
`load_pieces` and scores them from their stored token ids, so the same tokens are scored everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lit_coupling.errors import UserError
from lit_coupling.outputs import read_json

PIECES_FORMAT = "lit_coupling.knowledge_pieces/1"

KINDS = ("hop1", "hop2", "question", "compare")  # bridge hops, the composed question, a comparison attribute


def piece_id(hotpot_id: str, kind: str, index: int | None = None) -> str:
    """hop1/hop2/question: "<_id>/<kind>"; the k-th comparison entity: "<_id>/compare<k>"."""
    return f"{hotpot_id}/{kind}" + ("" if index is None else str(index))


@dataclass
class KnowledgePiece:
    id: str  # unique: f"{hotpot_id}/{kind}" (+ an index for comparison entities)
    hotpot_id: str  # the `_id` of the HotpotQA record it came from
    chain_id: str  # pieces of one reasoning chain share it (the record id)
    kind: str  # one of KINDS
    hop: int  # 1 or 2 for single facts; 0 for the composed question
    prompt: str  # prefix cloze: the text before the answer (no trailing space); the answer comes last
    answer: str  # this piece's own answer (hop 1 of a bridge chain: the bridge entity)
    subject: str  # the entity MEMIT edits at: a span inside `prompt` (its last occurrence is used)
    source_title: str = ""  # the Wikipedia title of the supporting paragraph ("" for the question piece)
    source_sentence: str = ""  # the (subject-restored) supporting sentence; prompt+answer is a prefix of it
    record_type: str = ""  # HotpotQA `type`: bridge | comparison
    links: list[str] = field(default_factory=list)  # ids of the other pieces of the chain
    prompt_ids: list[int] = field(default_factory=list)  # exactly the tokens scored (BOS included if used)
    answer_ids: list[int] = field(default_factory=list)
    shape: str = ""  # how the chain was found: bridge | described | answer-entity | comparison ("" in old files)
    original_sentence: str = ""  # a restated piece's supporting sentence (source_sentence is the restatement)

    @property
    def is_single_hop(self) -> bool:
        return self.hop in (1, 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgePiece:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PiecesFileError(UserError, ValueError):
    """A file given as knowledge pieces is not one (a ValueError too, as the format check always raised)."""


def load_pieces(path: str | Path) -> tuple[list[KnowledgePiece], dict[str, Any]]:
    """Read `knowledge_pieces.json`: (pieces in file order, the rest of the document: source, counts, skips)."""
    path = Path(path)
    if path.is_dir():
        from lit_coupling.outputs import PIECES

        path = path / PIECES
    try:
        doc = read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PiecesFileError(f"{path}: not a knowledge_pieces file: it is not JSON ({error})") from None
    if not isinstance(doc, dict) or doc.get("format") != PIECES_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PiecesFileError(
            f"{path}: not a knowledge_pieces file (format {found!r}, expected {PIECES_FORMAT!r}): pass the "
            f"knowledge_pieces.json a run's pieces stage wrote, or its run directory"
        )
    pieces = [KnowledgePiece.from_dict(p) for p in doc["pieces"]]
    meta = {k: v for k, v in doc.items() if k != "pieces"}
    return pieces, meta
