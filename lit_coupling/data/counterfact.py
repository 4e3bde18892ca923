"""CounterFact (Meng et al., 2022) cases: a requested rewrite, its paraphrase prompts and neighbourhood prompts.

Two schemas are read:

- the original one (ROME repository, `counterfact.json`): `case_id`, `requested_rewrite` = {`prompt` with `{}`
  for the subject, `subject`, `relation_id`, `target_true`/`target_new` as {"str": ...}}, `paraphrase_prompts`,
  `neighborhood_prompts` (other subjects with the same relation and the same true object), ...;
- the flat one-rewrite-per-case schema EasyEdit uses (`../shared/data/counterfact/`): `case_id`, `prompt` (the
  subject written in it), `subject`, `ground_truth`, `target_new`, `rephrase_prompt`, `locality_prompt`,
  `locality_ground_truth`.

`parse_counterfact` is pure (records in, cases out); `read_counterfact` reads a file (JSON list or JSON Lines).
The standard metrics these cases give (efficacy, paraphrase and neighbourhood scores) are computed in
`lit_coupling.editing.ripple.counterfact_metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_coupling.errors import UserError

# Wikidata relations of CounterFact → the type their objects share (the rest are named by their id).
RELATION_TYPES = {
    "P103": "language",
    "P37": "language",
    "P364": "language",
    "P1412": "language",
    "P27": "country",
    "P17": "country",
    "P495": "country",
    "P19": "city",
    "P20": "city",
    "P159": "city",
    "P937": "city",
    "P36": "city",
    "P740": "city",
    "P190": "city",
    "P30": "continent",
    "P140": "religion",
    "P106": "occupation",
    "P101": "field of work",
    "P641": "sport",
    "P413": "position",
    "P39": "position",
    "P176": "company",
    "P178": "company",
    "P127": "company",
    "P108": "company",
    "P449": "network",
    "P264": "record label",
    "P136": "genre",
    "P1303": "instrument",
    "P463": "organisation",
    "P138": "person",
    "P1050": "condition",
}


class CounterFactDataError(UserError, ValueError):
    """A CounterFact file or record that cannot be read."""


@dataclass
class CounterFactCase:
    case_id: str
    prompt: str  # the subject written in it, the answer to follow ("The mother tongue of Danielle Darrieux is")
    subject: str
    target_true: str
    target_new: str
    relation_id: str = ""  # Wikidata id in the original schema ("" in the flat one)
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_true: str = ""  # the true answer of the neighbourhood prompts (the original: target_true)

    def answer_type(self) -> tuple[str, str]:
        """(type, evidence): the relation's object type, else the answer's shape or lexicon class."""
        if self.relation_id in RELATION_TYPES:
            return RELATION_TYPES[self.relation_id], f"CounterFact relation {self.relation_id}"
        kind = self._lexicon_type(self.target_true)
        if kind:
            return kind, "shape or lexicon of the true answer" + (
                " and of the new one" if self._lexicon_type(self.target_new) == kind else ""
            )
        if self.relation_id:
            return f"relation {self.relation_id}", "CounterFact relation (objects of one relation)"
        return "relation (CounterFact)", "CounterFact's target_new is an object of the same relation"

    def _lexicon_type(self, answer: str) -> str | None:
        from lit_coupling.data.answer_types import lexicon_type, shape_type

        return shape_type(answer) or lexicon_type(answer, self.prompt)

    def type_mismatch(self) -> bool:
        """CounterFact's new object is of another type than the true one, where the data's lexicons type both
        (the flat cases hold "Iran → Airbus", "Massachusetts → Dublin"): not a counterfactual of the same type."""
        true, new = self._lexicon_type(self.target_true), self._lexicon_type(self.target_new)
        return true is not None and new is not None and true != new

    def probes(self) -> dict:
        return {
            "case_id": self.case_id,
            "relation_id": self.relation_id,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "neighborhood_true": self.neighborhood_true,
        }


def _text(record: dict, key: str, where: str, value: Any = None) -> str:
    value = record.get(key) if value is None else value
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if not isinstance(value, str) or not value.strip():
        raise CounterFactDataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _prompts(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise CounterFactDataError(f"{where}: field {key!r} must be a string or a list of strings")
    return [v.strip() for v in values if v.strip()]


def parse_case(record: Any, index: int, path: str = "<records>") -> CounterFactCase:
    """One record of either schema → a case; a clear error naming the file, record and field otherwise."""
    where = f"{path}, record {index}"
    if not isinstance(record, dict):
        raise CounterFactDataError(f"{where}: a CounterFact case is a JSON object, got {type(record).__name__}")
    case_id = str(record.get("case_id", index))
    where = f"{path}, record {index} (case_id {case_id})"
    if "requested_rewrite" in record:  # the original schema
        rewrite = record["requested_rewrite"]
        if isinstance(rewrite, list):  # MQuAKE-style lists: the first rewrite
            rewrite = rewrite[0] if rewrite else None
        if not isinstance(rewrite, dict):
            raise CounterFactDataError(f"{where}: field 'requested_rewrite' must be an object")
        subject = _text(rewrite, "subject", where)
        template = _text(rewrite, "prompt", where)
        if "{}" not in template:
            raise CounterFactDataError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' for the subject")
        true = _text(rewrite, "target_true", where)
        return CounterFactCase(
            case_id,
            template.replace("{}", subject),
            subject,
            true,
            _text(rewrite, "target_new", where),
            str(rewrite.get("relation_id", "") or ""),
            _prompts(record.get("paraphrase_prompts"), "paraphrase_prompts", where),
            _prompts(record.get("neighborhood_prompts"), "neighborhood_prompts", where),
            true,
        )
    if "prompt" in record and "target_new" in record:  # the flat schema
        subject, prompt = _text(record, "subject", where), _text(record, "prompt", where)
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject)
        neighbours = _prompts(record.get("locality_prompt"), "locality_prompt", where)
        return CounterFactCase(
            case_id,
            prompt,
            subject,
            _text(record, "ground_truth", where),
            _text(record, "target_new", where),
            str(record.get("relation_id", "") or ""),
            _prompts(record.get("rephrase_prompt"), "rephrase_prompt", where),
            neighbours,
            _text(record, "locality_ground_truth", where) if neighbours else "",
        )
    raise CounterFactDataError(
        f"{where}: neither CounterFact schema: expected 'requested_rewrite' (the original) "
        f"or 'prompt' + 'target_new' (the flat one), found fields {sorted(record)[:8]}"
    )


def parse_counterfact(records: Sequence[Any], path: str = "<records>") -> list[CounterFactCase]:
    return [parse_case(record, i, path) for i, record in enumerate(records)]


def read_counterfact(path: str | Path, max_cases: int | None = None) -> list[CounterFactCase]:
    """The cases of a CounterFact file (a JSON list, or JSON Lines), the first `max_cases` when given."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CounterFactDataError(f"CounterFact file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise CounterFactDataError(f"{path}: neither a JSON list nor JSON Lines ({error})") from error
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise CounterFactDataError(f"{path}: holds no CounterFact cases")
    records = records if max_cases is None else records[:max_cases]
    return parse_counterfact(records, str(path))
