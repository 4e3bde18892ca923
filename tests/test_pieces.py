"""Knowledge pieces: prefix clozes, each hop with its own answer, subjects inside prompts, skips with reasons."""

import json

import pytest

from lit_coupling.data.hotpotqa import read_hotpotqa, real_sample_file
from lit_coupling.data.pieces import (
    BRIDGE_NOT_FOUND,
    MISSING_SENTENCE,
    MISSING_TITLE,
    QUESTION_PROMPT,
    TOO_LONG,
    check_piece_text,
    extract_pieces,
    record_pieces,
    restore_subject,
    tokenize_pieces,
)
from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.scoring import cloze_text
from tests.conftest import shared_path

SAMPLE40 = ("data", "hotpotqa", "hotpot_dev_distractor_v1.sample40.json")


def record(**changes) -> dict:
    base = {"id": "r1", "question": "In which city was the author of Hamlet born?", "answer": "Stratford-upon-Avon",
            "type": "bridge", "level": "easy",
            "supporting_facts": {"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 1]},
            "context": {"title": ["Hamlet", "William Shakespeare"],
                        "sentences": [["Hamlet is a tragedy written by William Shakespeare."],
                                      ["William Shakespeare was an English playwright.",
                                       " He was born in Stratford-upon-Avon in 1564."]]}}
    return {**base, **changes}


def test_a_bridge_chain_gives_two_hops_with_their_own_answers_and_the_question():
    pieces, skips = record_pieces(record())
    assert not skips
    hop1, hop2, question = pieces
    assert (hop1.kind, hop1.hop, hop1.prompt, hop1.answer, hop1.subject) == \
           ("hop1", 1, "Hamlet is a tragedy written by", "William Shakespeare", "Hamlet")
    # "He was born in ..." lost its subject: restored from the paragraph title
    assert (hop2.kind, hop2.hop, hop2.prompt, hop2.answer, hop2.subject) == \
           ("hop2", 2, "William Shakespeare was born in", "Stratford-upon-Avon", "William Shakespeare")
    assert hop2.source_sentence == "William Shakespeare was born in Stratford-upon-Avon in 1564."
    assert question.kind == "question" and question.hop == 0 and question.answer == "Stratford-upon-Avon"
    assert question.prompt == QUESTION_PROMPT.format(question="In which city was the author of Hamlet born?")
    assert question.subject == "Hamlet"
    assert hop1.links == [hop2.id, question.id] and question.links == [hop1.id, hop2.id]


def test_pieces_longer_than_the_model_context_are_skipped_with_their_chain():
    """The question piece over the limit takes its chain with it (the hops alone would lose their question)."""
    from transformers import GPT2Config

    from lit_coupling.data.stage import CONTEXT_RESERVE, piece_token_limit

    pieces = extract_pieces([record()])
    tokenizer = train_bpe_tokenizer([cloze_text(p.prompt, p.answer) for p in pieces.pieces], 400)
    lengths = {p.kind: len(tokenizer(cloze_text(p.prompt, p.answer))["input_ids"]) for p in pieces.pieces}
    assert lengths["question"] > max(lengths["hop1"], lengths["hop2"])
    kept = tokenize_pieces(extract_pieces([record()]), tokenizer, bos_ids=[], max_tokens=lengths["question"])
    assert len(kept.pieces) == 3 and not kept.skips
    result = tokenize_pieces(pieces, tokenizer, bos_ids=[], max_tokens=lengths["question"] - 1)
    assert not result.pieces and result.skipped() == {TOO_LONG: 1} and result.skips[0].piece == "record"
    assert piece_token_limit(GPT2Config(n_positions=64)) == 64 - CONTEXT_RESERVE


def test_dangling_supporting_facts_are_skipped_with_a_reason_not_an_error():
    missing_title = record(supporting_facts={"title": ["Hamlet", "Nobody"], "sent_id": [0, 0]})
    missing_sentence = record(supporting_facts={"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 9]})
    result = extract_pieces([missing_title, missing_sentence, record(id="ok")])
    assert [s.reason for s in result.skips] == [MISSING_TITLE, MISSING_SENTENCE]
    assert result.skipped() == {MISSING_TITLE: 1, MISSING_SENTENCE: 1}
    assert {p.hotpot_id for p in result.pieces} == {"ok"}
    assert result.counts()["records"] == 3 and result.counts()["records_with_pieces"] == 1


def test_no_vague_fallback_when_the_bridge_is_not_in_the_sentence():
    context = {"title": ["Hamlet", "William Shakespeare"],
               "sentences": [["Hamlet is a famous tragedy."],
                             ["William Shakespeare was born in Stratford-upon-Avon."]]}
    facts = {"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 0]}
    pieces, skips = record_pieces(record(context=context, supporting_facts=facts))
    assert pieces == [] and [s.reason for s in skips] == [BRIDGE_NOT_FOUND]


@pytest.mark.parametrize("sentence, title, restored", [
    ("She was born in Warsaw.", "Marie Curie", "Marie Curie was born in Warsaw."),
    ("Its members are four.", "Wolf Alice", "Wolf Alice's members are four."),
    ("As an adult, she was named ambassador.", "Shirley Temple", "As an adult, Shirley Temple was named ambassador."),
    ("The team played its home games at the Colisée.", "Lewiston Maineiacs (hockey)",
     "Lewiston Maineiacs played its home games at the Colisée."),
    ("He met Marie Curie.", "Marie Curie", "He met Marie Curie."),  # already names the entity: left alone
    ("Paris is large.", "Marie Curie", "Paris is large."),
])
def test_subject_restoration(sentence, title, restored):
    assert restore_subject(sentence, title) == restored


def test_the_shipped_real_sample_gives_clean_pieces_for_every_record():
    dataset = read_hotpotqa(real_sample_file())
    result = extract_pieces(dataset)
    assert len(dataset) >= 30 and result.skips == []
    assert result.counts()["records_with_pieces"] == len(dataset)
    assert {"hop1", "hop2", "compare", "question"} <= {p.kind for p in result.pieces}
    for piece in result.pieces:
        check_piece_text(piece)


def test_comparison_pieces_find_the_compared_value():
    dataset = read_hotpotqa(real_sample_file())
    by_id = {p.id: p for p in extract_pieces(dataset).pieces}
    nationality = [p for p in by_id.values() if p.kind == "compare" and p.source_title == "Jane Austen"]
    assert [(p.prompt, p.answer) for p in nationality] == [("Jane Austen was an", "English")]


@pytest.fixture(scope="module")
def sample40():
    return read_hotpotqa(shared_path(*SAMPLE40))


def test_sample40_bridge_hops_have_different_answers(sample40):
    pieces = extract_pieces(sample40).pieces
    chains: dict[str, dict] = {}
    for piece in pieces:
        chains.setdefault(piece.chain_id, {})[piece.kind] = piece
    bridges = [c for c in chains.values() if "hop1" in c]
    assert len(bridges) >= 10
    for chain in bridges:
        assert chain["hop1"].answer != chain["hop2"].answer
        assert chain["hop2"].answer == " ".join(chain["question"].answer.split())
        # hop 2 is about the bridge entity hop 1 answers with
        assert chain["hop2"].subject in chain["hop2"].prompt


def test_sample40_prompt_plus_answer_is_a_prefix_of_the_source_sentence(sample40):
    result = extract_pieces(sample40)
    for piece in result.pieces:
        check_piece_text(piece)
        if piece.is_single_hop:
            assert piece.source_sentence.startswith(cloze_text(piece.prompt, piece.answer))
            assert piece.prompt and piece.subject in piece.prompt
    assert sum(result.skipped().values()) == len(result.skips) > 0  # real data: some records give no clean piece


def test_sample40_token_ids_decode_back_with_the_real_gpt2_tokenizer(sample40):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", "gpt2"))
    result = tokenize_pieces(extract_pieces(sample40), tokenizer, bos_ids=[])
    assert result.pieces
    for piece in result.pieces:
        assert tokenizer.decode(piece.prompt_ids) == piece.prompt
        assert tokenizer.decode(piece.answer_ids) == cloze_text(piece.prompt, piece.answer)[len(piece.prompt):]


def test_sample40_token_ids_decode_back_with_a_llama_style_tokenizer_and_bos(sample40):
    pieces = extract_pieces(sample40)
    tokenizer = train_bpe_tokenizer([cloze_text(p.prompt, p.answer) for p in pieces.pieces], 600, style="llama")
    result = tokenize_pieces(pieces, tokenizer, bos_ids=[tokenizer.bos_token_id])
    for piece in result.pieces:
        assert piece.prompt_ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(piece.prompt_ids[1:] + piece.answer_ids) == cloze_text(piece.prompt, piece.answer)


def test_sample40_counts(sample40):
    """The figures quoted in the issue note: pieces by kind and skips by reason."""
    result = extract_pieces(sample40)
    counts = result.counts()
    assert counts["records"] == 40
    assert counts["pieces"] == sum(counts["by_kind"].values())
    assert counts["by_kind"]["question"] == counts["records_with_pieces"]
    print(json.dumps({"counts": counts, "skipped": result.skipped()}, indent=1))
