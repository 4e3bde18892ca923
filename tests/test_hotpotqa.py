"""Reading HotpotQA: the three layouts, --max_samples, and clear errors on bad input."""

import json

import pytest

from lit_coupling.data.hotpotqa import (
    HotpotDataError,
    context_paragraphs,
    normalize_record,
    open_hotpot_data,
    read_hotpotqa,
    source_kind,
)
from lit_coupling.data.pieces import extract_pieces

RECORD = {
    "_id": "r1",
    "question": "Where was the author of Hamlet born?",
    "answer": "Stratford-upon-Avon",
    "supporting_facts": [["Hamlet", 0], ["William Shakespeare", 1]],
    "context": [
        ["Hamlet", ["Hamlet is a tragedy written by William Shakespeare."]],
        [
            "William Shakespeare",
            ["William Shakespeare was an English playwright.", " He was born in Stratford-upon-Avon in 1564."],
        ],
    ],
    "type": "bridge",
    "level": "easy",
}


def hub_schema(record: dict) -> dict:
    """The reshaped schema of the `datasets` hub copy."""
    return {
        "id": record["_id"],
        "question": record["question"],
        "answer": record["answer"],
        "type": record["type"],
        "level": record["level"],
        "supporting_facts": {
            "title": [t for t, _ in record["supporting_facts"]],
            "sent_id": [i for _, i in record["supporting_facts"]],
        },
        "context": {"title": [t for t, _ in record["context"]], "sentences": [s for _, s in record["context"]]},
    }


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_the_three_layouts_read_the_same(tmp_path):
    second = dict(RECORD, _id="r2")
    original = write(tmp_path / "a.json", json.dumps([RECORD, second]))
    lines = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in (RECORD, second)) + "\n")
    hub = write(tmp_path / "hub.json", json.dumps([hub_schema(RECORD), hub_schema(second)]))
    datasets = [read_hotpotqa(p) for p in (original, lines, hub)]
    assert [source_kind(d) for d in datasets] == ["hotpotqa-json", "hotpotqa-jsonl", "hotpotqa-hub"]
    assert all(type(d).__name__ == "Dataset" for d in datasets)
    assert datasets[0].to_list() == datasets[1].to_list() == datasets[2].to_list()
    assert [p.to_dict() for p in extract_pieces(datasets[0]).pieces] == [
        p.to_dict() for p in extract_pieces(datasets[2]).pieces
    ]


def test_max_samples_takes_the_first_records(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([dict(RECORD, _id=f"r{i}") for i in range(5)]))
    assert read_hotpotqa(path, max_samples=2)["id"] == ["r0", "r1"]
    with pytest.raises(HotpotDataError, match="at least 1"):
        read_hotpotqa(path, max_samples=0)


def test_malformed_json_names_line_and_column(tmp_path):
    text = json.dumps([RECORD], indent=1).replace('"answer"', '"answer" "oops"', 1)
    path = write(tmp_path / "bad.json", text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "oops" in row)
    with pytest.raises(HotpotDataError) as error:
        read_hotpotqa(path)
    assert str(path) in str(error.value) and f"line {line}" in str(error.value) and "column" in str(error.value)


def test_malformed_json_lines_name_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", json.dumps(RECORD) + "\n" + json.dumps(RECORD)[:-5] + "\n")
    with pytest.raises(HotpotDataError, match=r"line 2, column \d+"):
        read_hotpotqa(path)


def test_a_missing_field_names_file_record_id_and_field(tmp_path):
    broken = {k: v for k, v in RECORD.items() if k != "answer"}
    path = write(tmp_path / "a.json", json.dumps([RECORD, dict(broken, _id="x7")]))
    with pytest.raises(HotpotDataError) as error:
        read_hotpotqa(path)
    message = str(error.value)
    assert str(path) in message and "record 1" in message and "'x7'" in message and "'answer'" in message


def test_a_mistyped_supporting_fact_is_named(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([dict(RECORD, supporting_facts=[["Hamlet", 0], ["Hamlet", "one"]])]))
    with pytest.raises(HotpotDataError, match=r"record 0 \(_id 'r1'\), field 'supporting_facts\[1\]'"):
        read_hotpotqa(path)


def test_an_empty_file_is_refused(tmp_path):
    for content in ("", "  \n"):
        with pytest.raises(HotpotDataError, match="is empty"):
            read_hotpotqa(write(tmp_path / "empty.json", content))
    with pytest.raises(HotpotDataError, match="holds no records"):
        read_hotpotqa(write(tmp_path / "none.json", "[]"))


def test_a_wrong_encoding_is_refused_with_the_offset(tmp_path):
    latin1 = json.dumps([dict(RECORD, question="Où est né l'auteur d'Hamlet ?")], ensure_ascii=False).encode("latin-1")
    with pytest.raises(HotpotDataError, match=r"not UTF-8 text \(byte 0xf9 at offset \d+"):
        read_hotpotqa(write(tmp_path / "latin1.json", latin1))
    utf16 = json.dumps([RECORD]).encode("utf-16")
    with pytest.raises(HotpotDataError, match="UTF-16"):
        read_hotpotqa(write(tmp_path / "utf16.json", utf16))


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps([RECORD]).encode())
    assert read_hotpotqa(path)["id"] == ["r1"]


def test_nothing_is_written_when_reading_fails(tmp_path):
    from lit_coupling.data.build import build_pieces

    bad = write(tmp_path / "bad.json", "[{")
    with pytest.raises(HotpotDataError):
        build_pieces(str(bad), "unused-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_normalize_record_keeps_dangling_supporting_facts():
    record = normalize_record(dict(RECORD, supporting_facts=[["Nowhere", 0]]), 0, "x.json")
    assert record["supporting_facts"] == {"title": ["Nowhere"], "sent_id": [0]}


def test_context_paragraphs_are_distinct_paragraph_texts(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([RECORD, dict(RECORD, _id="r2")]))
    paragraphs = context_paragraphs(read_hotpotqa(path))
    assert paragraphs == [
        "Hamlet is a tragedy written by William Shakespeare.",
        "William Shakespeare was an English playwright. He was born in Stratford-upon-Avon in 1564.",
    ]


def test_named_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_COUPLING_CACHE", str(tmp_path))
    dataset, source = open_hotpot_data("real-sample")
    assert source["kind"] == "real-sample" and len(dataset) >= 30
    dataset, source = open_hotpot_data(None, max_samples=5)
    assert source["kind"] == "synthetic-world" and source["truth"].endswith(".truth.json") and len(dataset) == 5
