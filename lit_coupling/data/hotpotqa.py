"""Read HotpotQA — the original JSON list, JSON Lines, or the hub copy's reshaped schema — into a `datasets.Dataset`.

Records are checked one by one; a bad file fails with a message naming the file, the record and the field.
Every record comes out in the hub schema (Arrow cannot hold the original's mixed [title, index] pairs):

    {"id", "question", "answer", "type", "level",
     "supporting_facts": {"title": [...], "sent_id": [...]}, "context": {"title": [...], "sentences": [[...]]}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_coupling.errors import UserError

REQUIRED = ("question", "answer", "supporting_facts", "context", "type")

# Byte-order marks of encodings that are not UTF-8: named in the error, since decoding them as UTF-8 gives noise.
_FOREIGN_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32-LE",
    b"\x00\x00\xfe\xff": "UTF-32-BE",
    b"\xff\xfe": "UTF-16-LE",
    b"\xfe\xff": "UTF-16-BE",
}


class HotpotDataError(UserError, ValueError):
    """A HotpotQA file that cannot be read; the message names the file, the record and the field."""


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise HotpotDataError(f"{path}: the file is empty (expected a JSON list of HotpotQA records)")
    for bom, name in _FOREIGN_BOMS.items():
        if data.startswith(bom):
            raise HotpotDataError(
                f"{path}: the file is {name} text; HotpotQA files are UTF-8. "
                f"Convert it first, e.g. iconv -f {name} -t UTF-8 {path.name} > fixed.json"
            )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise HotpotDataError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}, "
            f"line {line}); HotpotQA files are UTF-8. Convert it first, e.g. "
            f"iconv -f latin1 -t UTF-8 {path.name} > fixed.json"
        ) from None


def _parse_json_lines(path: Path, text: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise HotpotDataError(
                f"{path}: line {number}, column {error.colno}: not valid JSON ({error.msg})"
            ) from None
    return records


def parse_records(path: str | Path) -> tuple[list[Any], str]:
    """The raw records of a JSON list or JSON Lines file, and which of the two it was."""
    path = Path(path)
    if not path.exists():
        raise HotpotDataError(f"{path}: no such file")
    if path.is_dir():
        raise HotpotDataError(f"{path} is a directory; pass the HotpotQA JSON or JSON Lines file itself")
    text = _decode(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(path, text), "jsonl"
        raise HotpotDataError(
            f"{path}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None
    if isinstance(doc, dict):  # a JSON Lines file of one record
        return [doc], "jsonl"
    if not isinstance(doc, list):
        raise HotpotDataError(f"{path}: expected a JSON list of HotpotQA records, found a {type(doc).__name__}")
    return doc, "json"


class _Record:
    """Field access that names file, record and field when something is missing or mistyped."""

    def __init__(self, raw: Any, index: int, path: Path):
        self.raw, self.index, self.path = raw, index, path
        if not isinstance(raw, dict):
            raise self.error(None, f"expected a JSON object, found a {type(raw).__name__}")
        self.id = raw.get("_id", raw.get("id"))

    def error(self, field: str | None, problem: str) -> HotpotDataError:
        where = f"record {self.index}" + (f" (_id {self.id!r})" if getattr(self, "id", None) else "")
        return HotpotDataError(f"{self.path}: {where}" + (f", field {field!r}" if field else "") + f": {problem}")

    def get(self, field: str, kind: type | tuple[type, ...]) -> Any:
        if field not in self.raw:
            raise self.error(field, "missing")
        value = self.raw[field]
        if not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(field, f"expected {names}, found {type(value).__name__} {_short(value)}")
        return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _pairs(record: _Record, field: str, second: str, check) -> tuple[list[str], list[Any]]:
    """[[title, x], ...] (original schema) or {"title": [...], second: [...]} (hub schema) → two lists."""
    value = record.get(field, (list, dict))
    if isinstance(value, dict):
        if "title" not in value or second not in value:
            raise record.error(field, f"expected keys 'title' and {second!r} (hub schema), found {sorted(value)}")
        titles, seconds = value["title"], value[second]
        if not isinstance(titles, list) or not isinstance(seconds, list) or len(titles) != len(seconds):
            raise record.error(field, f"'title' and {second!r} must be lists of the same length")
        items = list(zip(titles, seconds))
    else:
        items = value
    out_titles, out_seconds = [], []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and check(item[1])):
            raise record.error(
                f"{field}[{i}]",
                f"expected [title, {second}], found {_short(list(item) if isinstance(item, tuple) else item)}",
            )
        out_titles.append(item[0])
        out_seconds.append(item[1])
    return out_titles, out_seconds


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_sentences(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def normalize_record(raw: Any, index: int, path: str | Path) -> dict[str, Any]:
    """One record, checked, in the hub schema. Dangling supporting facts are kept: extraction skips them."""
    record = _Record(raw, index, Path(path))
    if record.id is None:
        raise record.error("_id", "missing")
    if not isinstance(record.id, str) or not record.id:
        raise record.error("_id", f"expected a non-empty string, found {_short(record.id)}")
    for field in REQUIRED:
        record.get(field, (str, list, dict))  # presence first, so a missing field is named before a mistyped one
    question, answer, kind = (record.get(f, str) for f in ("question", "answer", "type"))
    level = raw.get("level", "")
    sf_titles, sf_ids = _pairs(record, "supporting_facts", "sent_id", _is_index)
    ctx_titles, ctx_sentences = _pairs(record, "context", "sentences", _is_sentences)
    return {
        "id": record.id,
        "question": question,
        "answer": answer,
        "type": kind,
        "level": level if isinstance(level, str) else str(level),
        "supporting_facts": {"title": sf_titles, "sent_id": sf_ids},
        "context": {"title": ctx_titles, "sentences": ctx_sentences},
    }


def read_hotpotqa(path: str | Path, max_samples: int | None = None):
    """A `datasets.Dataset` of the first `max_samples` records (all when None), in the hub schema."""
    import datasets

    path = Path(path)
    raw, layout = parse_records(path)
    if not raw:
        raise HotpotDataError(f"{path}: holds no records")
    if max_samples is not None:
        if max_samples < 1:
            raise HotpotDataError(f"--max_samples must be at least 1, got {max_samples}")
        raw = raw[:max_samples]
    records = [normalize_record(r, i, path) for i, r in enumerate(raw)]
    hub = all(isinstance(r.get("context"), dict) for r in raw)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "type": datasets.Value("string"),
            "level": datasets.Value("string"),
            "supporting_facts": {
                "title": datasets.Sequence(datasets.Value("string")),
                "sent_id": datasets.Sequence(datasets.Value("int64")),
            },
            "context": {
                "title": datasets.Sequence(datasets.Value("string")),
                "sentences": datasets.Sequence(datasets.Sequence(datasets.Value("string"))),
            },
        }
    )
    dataset = datasets.Dataset.from_list(records, features=features)
    dataset.info.description = "hotpotqa-hub" if hub else f"hotpotqa-{layout}"  # what `source_kind` reports
    return dataset


def source_kind(dataset) -> str:
    """hotpotqa-json | hotpotqa-jsonl | hotpotqa-hub: the layout `read_hotpotqa` found."""
    return dataset.info.description or "hotpotqa-json"


def paragraph_text(sentences) -> str:
    """A context paragraph's text: its sentences stripped and joined by one space (HotpotQA keeps the spaces
    inconsistently: some sentences start with one, the synthetic world's do not)."""
    return " ".join(s.strip() for s in sentences if s.strip())


def context_paragraphs(dataset) -> list[str]:
    """Every distinct context paragraph (its sentences joined), in first-seen order: Wikipedia-style text.

    The default corpus of MEMIT's key covariance statistics, and part of the text the tiny models' tokenizer
    is trained on.
    """
    seen: dict[tuple[str, str], None] = {}
    for context in dataset["context"]:
        for title, sentences in zip(context["title"], context["sentences"]):
            text = paragraph_text(sentences)
            if text:
                seen.setdefault((title, text), None)
    return [text for _, text in seen]


# Names a user can pass instead of a file: the embedded defaults (nothing downloaded).
SYNTHETIC_WORLD = "synthetic-world"
REAL_SAMPLE = "real-sample"


def real_sample_file() -> Path:
    """The hand-written real-world sample shipped with the package (our own sentences, HotpotQA schema)."""
    return Path(__file__).resolve().parents[1] / "resources" / "real_sample.json"


def resolve_hotpot_data(spec: str | Path | None) -> tuple[Path, str | None]:
    """(file, kind) for --hotpot_data: None or 'synthetic-world' → the default world, 'real-sample' → the shipped
    sample, anything else → that file (its kind is found when it is read)."""
    if spec is None or str(spec) == SYNTHETIC_WORLD:
        from lit_coupling.data.world import default_world_file

        return default_world_file(), "synthetic-world"
    if str(spec) == REAL_SAMPLE:
        return real_sample_file(), "real-sample"
    return Path(spec).expanduser(), None


def open_hotpot_data(spec: str | Path | None, max_samples: int | None = None):
    """(dataset, source description) for --hotpot_data; the description goes into knowledge_pieces.json."""
    from lit_coupling.data.world import load_truth, truth_path
    from lit_coupling.outputs import sha256_file

    path, kind = resolve_hotpot_data(spec)
    dataset = read_hotpotqa(path, max_samples)
    truth = load_truth(path)
    source = {
        "path": str(path),
        "sha256": sha256_file(path),
        "kind": kind or ("synthetic-world" if truth else source_kind(dataset)),
        "records_read": len(dataset),
        "max_samples": max_samples,
    }
    if truth:
        source["truth"] = str(truth_path(path))
    return dataset, source
