"""`lit-coupling run --stages pieces`: knowledge_pieces.json, tokenised for the run's model."""

import json

import pytest

from lit_coupling.data.piece import PIECES_FORMAT, load_pieces
from lit_coupling.errors import UserError
from lit_coupling.outputs import PIECES
from lit_coupling.pipeline.run import main as run_main
from lit_coupling.scoring import cloze_text
from tests.conftest import shared_path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_pieces_stage_writes_knowledge_pieces(tmp_path, tiny_model_dir, family):
    model = tiny_model_dir(family)
    assert (
        run_main(
            [
                "--stages",
                "pieces",
                "--hotpot_data",
                "real-sample",
                "--model_path",
                str(model),
                "--output_dir",
                str(tmp_path),
                "--logger",
                "none",
            ]
        )
        == 0
    )
    pieces, meta = load_pieces(tmp_path)
    assert meta["format"] == PIECES_FORMAT and meta["source"]["kind"] == "real-sample"
    assert meta["model"]["family"] == family and meta["counts"]["pieces"] == len(pieces)
    assert meta["skipped"] == {} and meta["skipped_records"] == []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bos = [tokenizer.bos_token_id] if family == "llama" else []
    assert meta["tokenizer"]["bos_ids"] == bos and meta["tokenizer"]["pad_id"] is not None
    for piece in pieces:
        assert piece.prompt_ids[: len(bos)] == bos
        assert tokenizer.decode(piece.prompt_ids[len(bos) :] + piece.answer_ids) == cloze_text(
            piece.prompt, piece.answer
        )


def test_sample40_through_the_stage_counts_its_skips(tmp_path, tiny_model_dir, capsys):
    data = shared_path("data", "hotpotqa", "hotpot_dev_distractor_v1.sample40.json")
    assert (
        run_main(
            [
                "--stages",
                "pieces",
                "--hotpot_data",
                str(data),
                "--model_path",
                str(tiny_model_dir("gpt2")),
                "--max_samples",
                "20",
                "--output_dir",
                str(tmp_path),
                "--logger",
                "none",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / PIECES).read_text())
    assert doc["source"]["records_read"] == 20 and doc["source"]["max_samples"] == 20
    assert sum(doc["skipped"].values()) == len(doc["skipped_records"]) > 0
    assert doc["counts"]["records"] == 20
    # the counts by reason are kept in the file and printed as a table (issue 14)
    assert sum(doc["rejected_candidates"].values()) > 0 and doc["counts"]["bridge_records"] == 14
    printed = capsys.readouterr().out
    assert f"records with at least one piece: {doc['counts']['records_with_pieces']}/20" in printed
    for reason in doc["skipped"]:
        assert reason in printed


def test_without_hotpot_data_the_default_world_is_used(tmp_path, tiny_model_dir):
    from lit_coupling.data.build import build_pieces

    doc = build_pieces(None, str(tiny_model_dir("gpt2")), max_samples=10)
    assert doc["source"]["kind"] == "synthetic-world" and doc["source"]["truth"].endswith(".truth.json")
    assert doc["counts"]["by_kind"] == {"hop1": 10, "hop2": 10, "question": 10}


def test_only_rank_zero_writes(tmp_path, tiny_model_dir, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_coupling.pipeline.run import RunConfig
    from lit_coupling.pipeline.stages import pieces_stage

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    result = pieces_stage(RunConfig(hotpot_data="real-sample", model_path=str(tiny_model_dir("gpt2"))), tmp_path)
    assert result.files == [str(tmp_path / PIECES)] and not (tmp_path / PIECES).exists()


def test_a_file_without_any_clean_piece_is_an_error(tmp_path, tiny_model_dir):
    from lit_coupling.data.build import build_pieces

    record = {
        "_id": "a",
        "question": "Is it?",
        "answer": "yes",
        "type": "bridge",
        "level": "easy",
        "supporting_facts": [["A", 0], ["B", 0]],
        "context": [["A", ["A is a thing."]], ["B", ["B too."]]],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(
        UserError,
        match=r"no knowledge piece could be extracted from 1 records \(bridge record with a yes/no answer: 1\)",
    ):
        build_pieces(str(path), str(tiny_model_dir("gpt2")))
    assert (
        run_main(
            [
                "--stages",
                "pieces",
                "--hotpot_data",
                str(path),
                "--model_path",
                str(tiny_model_dir("gpt2")),
                "--output_dir",
                str(tmp_path / "out"),
                "--logger",
                "none",
            ]
        )
        == 2
    )
    assert not (tmp_path / "out" / PIECES).exists()
