"""Knowledge pieces: prefix clozes, each hop with its own answer, subjects inside prompts, skips with reasons."""

import json
from collections import Counter

import pytest

from lit_coupling.data.hotpotqa import read_hotpotqa, real_sample_file
from lit_coupling.data.pieces import (
    ANSWER_ENTITY,
    ANSWER_NOT_FOUND,
    BRIDGE_NOT_FOUND,
    DANGLING_BRACKET,
    DANGLING_PUNCT,
    DANGLING_QUOTE,
    DESCRIBED,
    MISSING_SENTENCE,
    MISSING_TITLE,
    NO_PROMPT,
    NO_SUBJECT,
    NO_VERB,
    QUESTION_PROMPT,
    TOO_LONG,
    _Search,
    answer_forms,
    check_piece_text,
    entity_names,
    extract_pieces,
    piece_defects,
    record_pieces,
    restatements,
    restore_subject,
    statement_problem,
    tokenize_pieces,
)
from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.scoring import cloze_text, normalize_answer
from tests.conftest import shared_path

SAMPLE40 = ("data", "hotpotqa", "hotpot_dev_distractor_v1.sample40.json")


def record(**changes) -> dict:
    base = {
        "id": "r1",
        "question": "In which city was the author of Hamlet born?",
        "answer": "Stratford-upon-Avon",
        "type": "bridge",
        "level": "easy",
        "supporting_facts": {"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 1]},
        "context": {
            "title": ["Hamlet", "William Shakespeare"],
            "sentences": [
                ["Hamlet is a tragedy written by William Shakespeare."],
                ["William Shakespeare was an English playwright.", " He was born in Stratford-upon-Avon in 1564."],
            ],
        },
    }
    return {**base, **changes}


def test_a_bridge_chain_gives_two_hops_with_their_own_answers_and_the_question():
    pieces, skips = record_pieces(record())
    assert not skips
    hop1, hop2, question = pieces
    assert (hop1.kind, hop1.hop, hop1.prompt, hop1.answer, hop1.subject) == (
        "hop1",
        1,
        "Hamlet is a tragedy written by",
        "William Shakespeare",
        "Hamlet",
    )
    # "He was born in ..." lost its subject: restored from the paragraph title
    assert (hop2.kind, hop2.hop, hop2.prompt, hop2.answer, hop2.subject) == (
        "hop2",
        2,
        "William Shakespeare was born in",
        "Stratford-upon-Avon",
        "William Shakespeare",
    )
    assert hop2.source_sentence == "William Shakespeare was born in Stratford-upon-Avon in 1564."
    assert question.kind == "question" and question.hop == 0 and question.answer == "Stratford-upon-Avon"
    assert question.prompt == QUESTION_PROMPT.format(question="In which city was the author of Hamlet born?")
    assert question.subject == "Hamlet"
    assert hop1.links == [hop2.id, question.id] and question.links == [hop1.id, hop2.id]


def test_pieces_longer_than_the_model_context_are_skipped_with_their_chain():
    """The question piece over the limit takes its chain with it (the hops alone would lose their question)."""
    from transformers import GPT2Config

    from lit_coupling.data.build import CONTEXT_RESERVE, piece_token_limit

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
    """Hop 1 is not stated anywhere: nothing is made up for it ("Based on the fact ..."), it is dropped with its
    reason, and the chain does not count as one with both hops. Hop 2 is a clean fact of its own, so the record
    keeps it and its question (a half chain; issue 14 counts it as a record giving a piece)."""
    context = {
        "title": ["Hamlet", "William Shakespeare"],
        "sentences": [["Hamlet is a famous tragedy."], ["William Shakespeare was born in Stratford-upon-Avon."]],
    }
    facts = {"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 0]}
    pieces, skips = record_pieces(record(context=context, supporting_facts=facts))
    assert [(s.piece, s.reason) for s in skips] == [("hop1", BRIDGE_NOT_FOUND)]
    assert [p.kind for p in pieces] == ["hop2", "question"]
    hop2 = pieces[0]
    assert (hop2.prompt, hop2.answer, hop2.subject) == (
        "William Shakespeare was born in",
        "Stratford-upon-Avon",
        "William Shakespeare",
    )
    assert hop2.source_sentence == "William Shakespeare was born in Stratford-upon-Avon." and piece_defects(hop2) == []
    assert not any("Based on" in p.prompt or "Hamlet" in p.prompt for p in pieces if p.kind != "question")
    counts = extract_pieces([record(context=context, supporting_facts=facts)]).counts()
    assert (counts["bridge_two_hops"], counts["bridge_one_hop"], counts["records_with_pieces"]) == (0, 1, 1)
    # neither hop stated: the record gives nothing, as before
    context["sentences"][1] = ["William Shakespeare was a playwright."]
    pieces, skips = record_pieces(record(context=context, supporting_facts=facts))
    assert pieces == [] and [s.reason for s in skips] == [ANSWER_NOT_FOUND]


@pytest.mark.parametrize(
    "sentence, title, restored",
    [
        ("She was born in Warsaw.", "Marie Curie", "Marie Curie was born in Warsaw."),
        ("Its members are four.", "Wolf Alice", "Wolf Alice's members are four."),
        (
            "As an adult, she was named ambassador.",
            "Shirley Temple",
            "As an adult, Shirley Temple was named ambassador.",
        ),
        (
            "The team played its home games at the Colisée.",
            "Lewiston Maineiacs (hockey)",
            "Lewiston Maineiacs played its home games at the Colisée.",
        ),
        ("He met Marie Curie.", "Marie Curie", "He met Marie Curie."),  # already names the entity: left alone
        ("Paris is large.", "Marie Curie", "Paris is large."),
    ],
)
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
    bridges = [c for c in chains.values() if {"hop1", "hop2"} <= c.keys()]  # half chains have one answer only
    assert len(bridges) >= 10
    for chain in bridges:
        assert chain["hop1"].answer != chain["hop2"].answer
        answer = " ".join(chain["question"].answer.split())
        if chain["hop2"].shape == ANSWER_ENTITY:  # hop 2 is the answer entity's own fact (issue 14)
            record_ = next(r for r in sample40 if r["id"] == chain["hop2"].hotpot_id)
            context = dict(zip(record_["context"]["title"], record_["context"]["sentences"]))
            opening = context[chain["hop2"].source_title][0]
            names = {normalize_answer(n) for n in entity_names(chain["hop2"].source_title, opening)}
            assert normalize_answer(answer) in names or normalize_answer(opening).startswith(normalize_answer(answer))
        else:
            assert chain["hop2"].answer == answer
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
        assert tokenizer.decode(piece.answer_ids) == cloze_text(piece.prompt, piece.answer)[len(piece.prompt) :]


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


# --- issue 14: the shapes of real bridge questions, the statement filter, comparisons, drops by reason -----------


def two_paragraphs(
    question: str,
    answer: str,
    first: tuple[str, list[str], int],
    second: tuple[str, list[str], int],
    kind: str = "bridge",
) -> dict:
    """A record of two supporting paragraphs (title, sentences, supporting sentence index)."""
    return {
        "id": "t",
        "question": question,
        "answer": answer,
        "type": kind,
        "level": "hard",
        "supporting_facts": {"title": [first[0], second[0]], "sent_id": [first[2], second[2]]},
        "context": {"title": [first[0], second[0]], "sentences": [first[1], second[1]]},
    }


def by_kind(record_: dict):
    pieces, skips = record_pieces(record_)
    return {p.kind + ("" if p.kind != "compare" else p.id[-1]): p for p in pieces}, skips


def test_the_answer_entity_shape_links_the_other_paragraph_to_it_and_keeps_its_own_fact():
    """The answer is a paragraph's title: hop 1 is the other paragraph's sentence naming it, hop 2 the answer
    entity's own fact the question describes it by; each hop has its own answer."""
    pieces, skips = by_kind(
        two_paragraphs(
            "Which screenwriter co-wrote a film starring Nora Vell?",
            "Tam Oduya",
            ("Tam Oduya", ["Tam Oduya is a screenwriter and director."], 0),
            ("Glass Harbor", ["Glass Harbor is a 2001 film starring Nora Vell, written by Tam Oduya."], 0),
        )
    )
    assert not skips
    assert (pieces["hop1"].prompt, pieces["hop1"].answer, pieces["hop1"].subject) == (
        "Glass Harbor is a 2001 film starring Nora Vell, written by",
        "Tam Oduya",
        "Glass Harbor",
    )
    assert (pieces["hop2"].prompt, pieces["hop2"].answer) == ("Tam Oduya is a", "screenwriter")
    assert pieces["hop1"].shape == pieces["hop2"].shape == ANSWER_ENTITY
    assert pieces["question"].answer == "Tam Oduya"


@pytest.mark.parametrize(
    "title, opening, written",
    [
        ("Winner (band)", "Winner, often stylized as WINNER, is a boy group formed by Yoon Entertainment.", "WINNER"),
        ("The Pale Riders", "The Pale Riders is a boy group formed by Yoon Entertainment.", "Pale Riders"),
        ("Dunmore Rovers F.C.", "Dunmore Rovers F.C. is a club formed by Yoon Entertainment.", "Dunmore Rovers"),
        ("Brill County, Ohio", "Brill County is a county formed by Yoon Entertainment.", "Brill County"),
        ("Ada Kestrel", "Ada Kestrel (born 3 May 1950) was formed by Yoon Entertainment.", "Kestrel"),
    ],
)
def test_the_bridge_entity_is_found_by_a_shorter_or_longer_form_of_its_title(title, opening, written):
    pieces, skips = by_kind(
        two_paragraphs(
            "Who formed the act of the album Blue Hour?",
            "Yoon Entertainment",
            ("Blue Hour", [f"Blue Hour is the debut album of {written}."], 0),
            (title, [opening], 0),
        )
    )
    assert not skips and pieces["hop1"].answer == written
    assert (pieces["hop2"].answer, pieces["hop2"].prompt.endswith("formed by")) == ("Yoon Entertainment", True)


def test_a_bridge_in_a_relative_clause_after_the_hop1_subject():
    pieces, skips = by_kind(
        two_paragraphs(
            "Where was the manager who signed Col Brea born?",
            "Ardlow",
            ("Col Brea", ["Col Brea, who was signed by Fergus Lane, played for Dunmore Rovers."], 0),
            ("Fergus Lane", ["Fergus Lane is a manager.", "He was born in Ardlow."], 1),
        )
    )
    assert not skips
    assert (pieces["hop1"].prompt, pieces["hop1"].answer) == ("Col Brea, who was signed by", "Fergus Lane")
    assert pieces["hop2"].prompt == "Fergus Lane was born in"


def test_an_answer_before_the_bridge_is_cut_only_where_the_prefix_is_a_statement():
    """ "Oh Dear" is a song released in 1999 on the soundtrack to Last Days": hop 2 is cut at the answer, about the
    song; the hop-1 paragraph (named after the answer) gives the fact the question describes it by."""
    statement = two_paragraphs(
        "In what year was a song released for the film starring Vic Mara?",
        "1999",
        ("Last Days", ["Last Days is a film starring Vic Mara."], 0),
        ("Oh Dear", ['"Oh Dear" is a song released in 1999 on the soundtrack to the film Last Days.'], 0),
    )
    pieces, skips = by_kind(statement)
    assert not skips and pieces["hop2"].shape == DESCRIBED
    assert (pieces["hop2"].prompt, pieces["hop2"].subject) == ('"Oh Dear" is a song released in', "Oh Dear")
    assert (pieces["hop1"].prompt, pieces["hop1"].answer) == ("Last Days is a film starring", "Vic Mara")
    aside = two_paragraphs(
        statement["question"],
        "1999",
        ("Last Days", ["Last Days is a film starring Vic Mara."], 0),
        ("Oh Dear", ['"Oh Dear" (a song, 1999) is on the soundtrack to the film Last Days.'], 0),
    )
    pieces, skips = by_kind(aside)
    # the cut inside the bracket is never a piece; hop 1 stands on its own (a half chain)
    assert "hop2" not in pieces and [(s.piece, s.reason) for s in skips] == [("hop2", DANGLING_BRACKET)]
    assert set(pieces) == {"hop1", "question"} and pieces["hop1"].answer == "Vic Mara"


@pytest.mark.parametrize(
    "prompt, subject, problem",
    [
        ("Pirate's Cove (in", "Pirate's Cove", DANGLING_BRACKET),
        ('Blue Hour is the second companion book to the "', "Blue Hour", DANGLING_QUOTE),
        ("Ada Kestrel was born in Ulm,", "Ada Kestrel", DANGLING_PUNCT),
        ("Last Days, starring", "Last Days", NO_VERB),
        ("The Esma Mansion, a yali located at", "The Esma Mansion", NO_VERB),  # a participle alone: an apposition
        ("It was born in", "Ada Kestrel", NO_SUBJECT),
        ("Ada Kestrel was born in", "Ada Kestrel", None),
        ("The team competes in the", "The team", None),
        ("Ada Kestrel's other roles included", "Ada Kestrel", None),
        ("Fergus Lane, who managed", "Fergus Lane", None),
    ],
)
def test_the_cloze_statement_filter(prompt, subject, problem):
    assert statement_problem(prompt, subject) == problem


def test_every_dropped_candidate_and_piece_is_counted_by_reason():
    record_ = two_paragraphs(
        "In which city was the sculptor of The Veil born?",
        "Ulm",
        ("The Veil", ["The Veil (by Ada Kestrel) is a statue.", "The Veil is a statue made by Ada Kestrel."], 1),
        ("Ada Kestrel", ["Ada Kestrel (born in Ulm) was a sculptor.", "She was born in Ulm."], 1),
    )
    record_["supporting_facts"] = {
        "title": ["The Veil", "The Veil", "Ada Kestrel", "Ada Kestrel"],
        "sent_id": [0, 1, 0, 1],
    }
    result = extract_pieces([record_])
    assert not result.skips and [p.answer for p in result.pieces[:2]] == ["Ada Kestrel", "Ulm"]
    # turned down: "The Veil (by" → "Ada Kestrel", "The Veil (by Ada" → "Kestrel" (her family name), "(born in"
    assert result.rejected_candidates() == {DANGLING_BRACKET: 3}
    assert extract_pieces([record_, dict(record_, id="u", answer="Bonn")]).skipped() == {ANSWER_NOT_FOUND: 1}


def test_an_answer_inside_a_name_or_already_in_the_prompt_is_no_cloze():
    pieces, skips = by_kind(
        two_paragraphs(
            "Where is the university of the band Slow Tide?",
            "Kansas",
            ("Slow Tide", ["Slow Tide is a band formed at the University of Kansas."], 0),
            ("University of Kansas", ["The University of Kansas is a university in Kansas City."], 0),
        )
    )
    assert "hop2" not in pieces and [s.piece for s in skips] == ["hop2"]  # "Kansas" of "Kansas City": no cloze
    assert set(pieces) == {"hop1", "question"}  # hop 1 ("... formed at the" → "University of Kansas") stays
    pieces, _ = by_kind(
        two_paragraphs(
            "What is the campus of the university of Slow Tide on?",
            "Mount Oread",
            ("Slow Tide", ["Slow Tide is a band formed at Kestrel University."], 0),
            ("Kestrel University", ["Kestrel University is on Mount Oread, the highest point of Mount Oread."], 0),
        )
    )
    assert pieces["hop2"].prompt == "Kestrel University is on"


def test_numbers_and_dates_are_matched_in_either_form():
    assert answer_forms("9,984") == ["9,984", "9984"]
    assert answer_forms("31 December 1941") == ["31 December 1941", "December 31, 1941"]
    pieces, skips = by_kind(
        two_paragraphs(
            "How many people live in the county of Brill Lake?",
            "9,984",
            ("Brill Lake", ["Brill Lake is a lake in Brill County."], 0),
            (
                "Brill County",
                ["Brill County is a county.", "As of the 2010 census, the county population was 9984."],
                1,
            ),
        )
    )
    assert not skips and (pieces["hop2"].prompt, pieces["hop2"].answer) == (
        "As of the 2010 census, Brill County population was",
        "9984",
    )  # "the county" restored


def test_comparisons_find_each_entitys_own_value_in_any_supporting_sentence():
    located = two_paragraphs(
        "Are the Tulip Mosque and Vell Mansion located in the same neighborhood?",
        "no",
        ("Tulip Mosque", ["Tulip Mosque is a mosque.", "It is located in Laleli, Fatih, Istanbul."], 1),
        ("Vell Mansion", ["Vell Mansion is a mansion located in Ortakoy."], 0),
        kind="comparison",
    )
    pieces, skips = by_kind(located)
    assert not skips
    assert (pieces["compare1"].prompt, pieces["compare1"].answer) == (
        "Tulip Mosque is located in",
        "Laleli, Fatih, Istanbul",
    )
    assert (pieces["compare2"].prompt, pieces["compare2"].answer) == ("Vell Mansion is a mansion located in", "Ortakoy")
    both = two_paragraphs(
        "Are Ada Kestrel and Tom Brill both opera composers?",
        "yes",
        ("Ada Kestrel", ["Ada Kestrel was an Italian opera composer."], 0),
        ("Tom Brill", ["Tom Brill was a French composer, best known for Mignon."], 0),
        kind="comparison",
    )
    pieces, _ = by_kind(both)
    assert [(p.prompt, p.answer) for k, p in sorted(pieces.items()) if k != "question"] == [
        ("Ada Kestrel was an Italian", "opera composer"),
        ("Tom Brill was a French", "composer"),
    ]


def test_life_dates_in_the_opening_bracket_are_restated_as_a_birth_statement():
    pieces, skips = by_kind(
        two_paragraphs(
            "Who is older, Ada Kestrel or Tom Brill?",
            "Tom Brill",
            ("Ada Kestrel", ["Ada Kestrel (born July 16, 1966) is an American director."], 0),
            ("Tom Brill", ["Thomas Brill (10 October 1924 – 10 December 1978) was a writer.", "He wrote plays."], 0),
            kind="comparison",
        )
    )
    assert not skips
    first, second = pieces["compare1"], pieces["compare2"]
    assert (first.prompt, first.answer, first.source_sentence) == (
        "Ada Kestrel was born on",
        "July 16, 1966",
        "Ada Kestrel was born on July 16, 1966.",
    )
    assert first.original_sentence == "Ada Kestrel (born July 16, 1966) is an American director."
    assert (second.prompt, second.answer) == ("Thomas Brill was born on", "10 October 1924")
    for piece in (first, second):
        assert piece_defects(piece) == []


def test_knowledge_pieces_json_keeps_the_counts_and_the_stage_prints_them(capsys):
    from lit_coupling.data.build import drop_table, pieces_document

    class Tokenizer:
        name_or_path, pad_token_id = "t", 0

    extraction = extract_pieces([record(), record(id="x", answer="Bonn")])
    doc = pieces_document(extraction, {}, {}, Tokenizer(), [], 0)
    assert doc["skipped"] == {ANSWER_NOT_FOUND: 1} and "rejected_candidates" in doc
    assert doc["counts"]["bridge_records"] == 2 and doc["counts"]["bridge_two_hops"] == 1
    table = drop_table(doc)
    assert "records with at least one piece: 1/2 (50%)" in table and "bridge chains with both hops: 1/2" in table
    assert ANSWER_NOT_FOUND in table.splitlines()[3]


@pytest.mark.parametrize(
    "sentence, answer, restated, prompt",
    [
        (
            'Blue Hour is the second book of the "Slow Tide" series.',
            "Slow Tide",
            "Blue Hour is the second book of the Slow Tide series.",
            "Blue Hour is the second book of the",
        ),
        (
            "Glass Harbor is a film written by Ann Lee, Bo Vance, Tam Oduya and Cy Rees.",
            "Tam Oduya",
            "Glass Harbor is a film written by Tam Oduya and Cy Rees.",
            "Glass Harbor is a film written by",
        ),
        (
            "Tam Oduya is the composer of Blue Hour.",
            "Tam Oduya",
            "The composer of Blue Hour is Tam Oduya.",
            "The composer of Blue Hour is",
        ),
        (
            "Ada Kestrel (born 3 May 1950 in Ulm) was a sculptor.",
            "1950",
            "Ada Kestrel was born in 1950.",
            "Ada Kestrel was born in",
        ),
        (
            "Ada Kestrel (born 3 May 1950 in Ulm) was a sculptor.",
            "Ulm",
            "Ada Kestrel was born in Ulm.",
            "Ada Kestrel was born in",
        ),
        (
            "Ada Kestrel (3 May 1950 – 9 June 2001) was a sculptor.",
            "9 June 2001",
            "Ada Kestrel died on 9 June 2001.",
            "Ada Kestrel died on",
        ),
    ],
)
def test_a_cut_that_is_no_statement_is_restated_with_the_answer_last(sentence, answer, restated, prompt):
    """Quotes around a title, earlier list items, a copula with the answer first, a date in the opening bracket."""
    search = _Search(Counter())
    i = sentence.index(answer)
    cloze = search.cloze(sentence, i, i + len(answer), ["Blue Hour", "Glass Harbor", "Ada Kestrel"], person=True)
    assert (cloze.sentence, cloze.prompt, cloze.answer, cloze.original) == (restated, prompt, answer, sentence)
    assert search.rejected == Counter()  # a restated cloze is kept, not dropped


def test_life_dates_are_restated_only_for_a_person():
    """A war has life dates too: "(1917 – 1922)" says nothing about anyone being born or dying."""
    sentence = "The Long War (7 November 1917 – October 1922) was a war."
    i = sentence.index("October 1922")
    assert restatements(sentence, i, i + 12, person=False) == []
    assert restatements(sentence, i, i + 12, person=True) == [("The Long War died in October 1922.", 21, 33)]


def test_a_later_sentence_naming_the_entity_by_its_kind_or_family_name_is_about_it():
    """ "The arena ..." (the opening files the entity under "arena"), "Kestrel wrote ..." (a person: "she")."""
    opening = "Colisee Hall is a multi-purpose arena in Lewiston."
    assert restore_subject("The arena opened in 1958.", "Colisee Hall", opening) == "Colisee Hall opened in 1958."
    assert (
        restore_subject("In May 1960, the arena opened.", "Colisee Hall", "Colisee Hall is an arena.")
        == "In May 1960, Colisee Hall opened."
    )
    pieces, skips = by_kind(
        two_paragraphs(
            "Where does the author of Blue Hour live?",
            "Ardlow",
            ("Blue Hour", ["Blue Hour is a novel by Ada Kestrel."], 0),
            (
                "Ada Kestrel",
                ["Ada Kestrel is a novelist.", "Kestrel has lived in Ardlow since 1990.", "She writes."],
                1,
            ),
        )
    )
    assert not skips and (pieces["hop2"].prompt, pieces["hop2"].subject) == ("Kestrel has lived in", "Kestrel")


def test_a_bridge_written_in_a_longer_form_is_taken_whole():
    pieces, skips = by_kind(
        two_paragraphs(
            "In what years did the president in office during the Veil Act serve?",
            "1969 until 1974",
            ("Veil Act", ["The Veil Act was signed during the Richard Nixon administration."], 0),
            ("Nixon", ["Nixon was the 37th President of the United States from 1969 until 1974."], 0),
        )
    )
    assert not skips and pieces["hop1"].answer == "Richard Nixon"


def test_a_plural_in_the_question_matches_the_singular_in_the_sentence():
    pieces, skips = by_kind(
        two_paragraphs(
            "Are Blue Hour and Slow Tide both documentaries?",
            "yes",
            ("Blue Hour", ["Blue Hour is a 2001 documentary about whales."], 0),
            ("Slow Tide", ["Slow Tide was a documentary about rivers."], 0),
            kind="comparison",
        )
    )
    assert not skips and {p.answer for p in pieces.values() if p.kind == "compare"} == {"documentary"}


SAMPLE40_DEV, SAMPLE40_HELD_OUT = range(0, 20), range(20, 40)
# The figures measured on the held-out records 20-39 (docs/pieces.md), kept here as a floor against regressions:
# bridge chains with both hops, records with a piece. Issue 14 asks for 60% and 80%; both parts reach them.
HELD_OUT_FLOOR = {"dev": (13 / 14, 20 / 20), "held-out": (9 / 14, 19 / 20), "all": (22 / 28, 39 / 40)}


@pytest.mark.parametrize(
    "part, name",
    [(SAMPLE40_DEV, "dev"), (SAMPLE40_HELD_OUT, "held-out"), (range(0, 40), "all")],
    ids=["dev", "held-out", "all"],
)
def test_sample40_figures_and_no_defects(sample40, part, name):
    """With the real GPT-2 tokenizer: bridge chains with both hops (each its own answer), records with a piece,
    and no defective piece (answer tokens decode to the answer, prompt + answer in its source sentence, subject in
    the prompt, a statement)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", "gpt2"))
    result = tokenize_pieces(extract_pieces(sample40.select(part)), tokenizer, bos_ids=[])
    counts = result.counts()
    both_hops, any_piece = HELD_OUT_FLOOR[name]
    assert counts["bridge_two_hops"] >= both_hops * counts["bridge_records"] - 1e-9
    assert counts["records_with_pieces"] >= any_piece * counts["records"] - 1e-9
    assert [d for p in result.pieces for d in piece_defects(p, tokenizer)] == []
    for piece in result.pieces:
        assert "Based on" not in piece.prompt
        if piece.kind in ("hop1", "hop2"):
            assert piece.answer != piece.subject and piece.prompt.rstrip()[-1:] not in ",;:("


# --- issue 14, second round: half chains, the rest of a paragraph, more restatements, numbers, bracket names ---


def test_the_rest_of_the_paragraph_is_searched_only_where_the_supporting_sentences_fail():
    """A hop the supporting sentences do not state cleanly is looked for in the rest of its paragraph (the
    opening first); where they do, the rest is never read."""
    supporting_only = two_paragraphs(
        "Who directed the film Vic Mara reviewed?",
        "Ada Kestrel",
        ("Vic Mara", ["Vic Mara reviewed Blue Hour in 1990.", "Vic Mara is a critic who reviewed Last Days."], 1),
        ("Last Days", ["Last Days is a 1999 film.", "It was directed by Ada Kestrel."], 1),
    )
    pieces, skips = by_kind(supporting_only)
    assert not skips and pieces["hop1"].source_sentence == "Vic Mara is a critic who reviewed Last Days."
    opening_only = two_paragraphs(
        "Who directed the film Vic Mara reviewed?",
        "Ada Kestrel",
        ("Vic Mara", ["Vic Mara is a critic who reviewed Last Days.", "Vic Mara was born in Ulm."], 1),
        ("Last Days", ["Last Days is a 1999 film.", "It was directed by Ada Kestrel."], 1),
    )
    pieces, skips = by_kind(opening_only)
    assert not skips and (pieces["hop1"].prompt, pieces["hop1"].answer) == (
        "Vic Mara is a critic who reviewed",
        "Last Days",
    )
    assert pieces["hop2"].prompt == "Last Days was directed by"


@pytest.mark.parametrize(
    "sentence, answer, restated, prompt",
    [
        (
            "In 1999, Tam Oduya directed Blue Hour in Ulm.",
            "Tam Oduya",
            "Blue Hour was directed by Tam Oduya.",
            "Blue Hour was directed by",
        ),
        (
            "Tam Oduya (born 1950) founded Blue Hour Records, a label.",
            "Tam Oduya",
            "Blue Hour Records was founded by Tam Oduya.",
            "Blue Hour Records was founded by",
        ),
        (
            "Tam Oduya wrote the Blue Hour songs.",
            "Tam Oduya",
            "The Blue Hour songs were written by Tam Oduya.",
            "The Blue Hour songs were written by",
        ),
        (
            'Blue Hour stars "Ann Lee", "Tam Oduya" and "Cy Rees".',
            "Tam Oduya",
            'Blue Hour stars Tam Oduya and "Cy Rees".',
            "Blue Hour stars",
        ),
        (
            'Blue Hour is best known for "Tam Oduya," a song.',
            "Tam Oduya",
            "Blue Hour is best known for Tam Oduya, a song.",
            "Blue Hour is best known for",
        ),
    ],
)
def test_an_answer_first_in_the_active_or_quoted_in_a_list_is_restated_with_the_answer_last(
    sentence, answer, restated, prompt
):
    """The doer of a simple past goes last in the passive; a quoted list item loses its quotes, then the items
    before it (two restatements in turn); a title quoted American-style ("Title," a ...) loses its quotes."""
    search = _Search(Counter())
    i = sentence.index(answer)
    cloze = search.cloze(sentence, i, i + len(answer), ["Blue Hour", "Blue Hour Records", "The Blue Hour songs"])
    assert (cloze.sentence, cloze.prompt, cloze.answer, cloze.original) == (restated, prompt, answer, sentence)
    assert check_piece_text_ok(cloze)


def check_piece_text_ok(cloze) -> bool:
    """The restated cloze keeps the invariants of a piece: answer and subject in the original sentence."""
    from lit_coupling.data.piece import KnowledgePiece

    piece = KnowledgePiece(
        id="x/hop1",
        hotpot_id="x",
        chain_id="x",
        kind="hop1",
        hop=1,
        prompt=cloze.prompt,
        answer=cloze.answer,
        subject=cloze.subject,
        source_title="x",
        source_sentence=cloze.sentence,
        record_type="bridge",
        original_sentence=cloze.original,
    )
    return piece_defects(piece) == []


@pytest.mark.parametrize(
    "sentence",
    [
        "Tam Oduya married Blue Hour.",  # "Blue Hour was married by" means an officiant
        "Tam Oduya died in Blue Hour.",  # no object
        "Tam Oduya joined Blue Hour in 1990.",
        "Tam Oduya, a singer, directed Blue Hour.",  # an apposition between: not a simple past right after the answer
    ],
)
def test_no_passive_where_it_would_change_the_meaning(sentence):
    search = _Search(Counter())
    assert search.cloze(sentence, 0, len("Tam Oduya"), ["Blue Hour"]) is None
    assert search.problems == [NO_PROMPT]


def test_an_events_bracket_dates_are_its_beginning_and_end_never_a_birth():
    sentence = "The Long War (7 November 1917 – October 1922) was a war in the north."
    i = sentence.index("October 1922")
    assert restatements(sentence, i, i + 12, person=False, event=True) == [
        ("The Long War ended in October 1922.", 22, 34)
    ]
    i = sentence.index("7 November 1917")
    assert restatements(sentence, i, i + 15, event=True) == [("The Long War began on 7 November 1917.", 22, 37)]
    pieces, skips = by_kind(
        two_paragraphs(
            "When did the war that defeated the Blue Army end?",
            "October 1922",
            ("Blue Army", ["The Blue Army was destroyed in the course of the Long War."], 0),
            ("Long War", ["The Long War (7 November 1917 – October 1922) was a war in the north."], 0),
        )
    )
    assert not skips and (pieces["hop2"].prompt, pieces["hop2"].answer) == ("The Long War ended in", "October 1922")
    assert pieces["hop1"].answer == "Long War"
    # a band's dates are no war's: not an event, nothing restated
    pieces, skips = by_kind(
        two_paragraphs(
            "When did the band that Vic Mara joined split up?",
            "1990",
            ("Vic Mara", ["Vic Mara joined the band Slow Tide."], 0),
            ("Slow Tide", ["Slow Tide (1980 – 1990) was a band from Ulm."], 0),
        )
    )
    assert "hop2" not in pieces and [s.reason for s in skips] == [DANGLING_BRACKET]


@pytest.mark.parametrize(
    "title, opening, alias",
    [
        (
            "Kestrel University",
            "Kestrel University (Kestrel; officially the University of Ulm) is a college.",
            "Kestrel",
        ),
        ("Tunnels & Trolls", 'Tunnels & Trolls (abbreviated "T&T") is a game.', "T&T"),
        ("Dunmore Arena", "Dunmore Arena (officially Dunmore Rovers Arena) is an arena.", "Dunmore Rovers Arena"),
    ],
)
def test_names_the_opening_bracket_gives_are_aliases(title, opening, alias):
    assert alias in entity_names(title, opening)
    assert "Turkish" not in " ".join(entity_names("Tulip Mosque", 'Tulip Mosque (Turkish: "Lale Camii") is a mosque.'))
    pieces, skips = by_kind(
        two_paragraphs(
            "Where is the venue of the game Blue Hour played at?",
            "Ulm",
            ("Blue Hour", [f"Blue Hour is a game played at {alias}."], 0),
            (title, [opening, "It is in Ulm."], 1),
        )
    )
    assert not skips and pieces["hop1"].answer == alias and pieces["hop2"].prompt.endswith("is in")


def test_a_question_about_an_amount_compares_each_entitys_number():
    pieces, skips = by_kind(
        two_paragraphs(
            "Which band had more members, Slow Tide or Blue Hour?",
            "Slow Tide",
            ("Slow Tide", ["Slow Tide is a rock band from Ulm.", "The band had five members in 1990."], 1),
            ("Blue Hour", ["Blue Hour was a band of 3 members from Bonn, formed in 1985."], 0),
            kind="comparison",
        )
    )
    assert not skips
    assert (pieces["compare1"].prompt, pieces["compare1"].answer) == ("Slow Tide had", "five")
    assert (pieces["compare2"].prompt, pieces["compare2"].answer) == ("Blue Hour was a band of", "3")


def test_a_question_that_opens_with_its_entity_gives_the_question_its_subject():
    pieces, skips = by_kind(
        two_paragraphs(
            "The Veil Hal Memorial commemorates the fallen of which war?",
            "Long War",
            ("Veil Hall Memorial", ["Veil Hall Memorial commemorates the fallen of the Long War."], 0),
            ("Long War", ["The Long War was a war in the north."], 0),
        )
    )
    assert pieces["question"].subject == "Veil Hal Memorial" and "hop1" in pieces


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ("Blue Hour is a film by “", DANGLING_QUOTE),
        ("Blue Hour is a film [by", DANGLING_BRACKET),
        ("Blue Hour is a film by Ann Lee —", DANGLING_PUNCT),
        ("Blue Hour was written by:", DANGLING_PUNCT),
        ("Blue Hour was written by Ann Lee;", DANGLING_PUNCT),
        ("Blue Hour, a film by", NO_VERB),
    ],
)
def test_the_statement_filter_refuses_dangling_prompts(prompt, problem):
    assert statement_problem(prompt, "Blue Hour") == problem
    from lit_coupling.data.piece import KnowledgePiece

    piece = KnowledgePiece(
        id="x/hop1",
        hotpot_id="x",
        chain_id="x",
        kind="hop1",
        hop=1,
        prompt=prompt,
        answer="Tam Oduya",
        subject="Blue Hour",
        source_title="x",
        source_sentence=f"{prompt} Tam Oduya.",
        record_type="bridge",
    )
    assert any(problem in d for d in piece_defects(piece))  # and the benchmark counts it as a defect


def test_the_last_resort_own_fact_is_the_kind_of_thing_the_opening_says_the_entity_is():
    """Neither the supporting sentence nor the question gives hop 2 a fact of the answer entity: the opening's
    "is a ... <kind>" does ("World War II was the deadliest military" → "conflict"), never a direction or a part."""

    def chain(opening: str):
        return by_kind(
            two_paragraphs(
                "The Veil Hall Memorial commemorates the fallen of which war?",
                "Long War",
                ("Veil Hall Memorial", ["Veil Hall Memorial commemorates the fallen of the Long War."], 0),
                ("Long War", [opening, "It had many casualties."], 1),
            )
        )

    pieces, skips = chain("The Long War was the deadliest military conflict in history.")
    assert not skips and (pieces["hop2"].prompt, pieces["hop2"].answer) == (
        "The Long War was the deadliest military",
        "conflict",
    )
    for opening in ("The Long War is a mile west of Ulm.", "The Long War was a part of the Great War."):
        pieces, skips = chain(opening)
        assert "hop2" not in pieces and [s.piece for s in skips] == ["hop2"]


def test_the_stage_table_counts_half_chains_apart_from_whole_ones():
    from lit_coupling.data.build import drop_table, pieces_document

    class Tokenizer:
        name_or_path, pad_token_id = "t", 0

    half = record(
        id="h",
        context={
            "title": ["Hamlet", "William Shakespeare"],
            "sentences": [["Hamlet is a famous tragedy."], ["William Shakespeare was born in Stratford-upon-Avon."]],
        },
        supporting_facts={"title": ["Hamlet", "William Shakespeare"], "sent_id": [0, 0]},
    )
    doc = pieces_document(extract_pieces([record(), half]), {}, {}, Tokenizer(), [], 0)
    assert (doc["counts"]["bridge_two_hops"], doc["counts"]["bridge_one_hop"]) == (1, 1)
    assert doc["skipped"] == {BRIDGE_NOT_FOUND: 1} and doc["skipped_records"][0]["piece"] == "hop1"
    table = drop_table(doc)
    assert "records with at least one piece: 2/2 (100%)" in table
    assert "bridge chains with both hops: 1/2 (50%) (one hop only: 1)" in table
    assert BRIDGE_NOT_FOUND in table.splitlines()[3] and table.splitlines()[3].split()[-2:] == ["0", "1"]


@pytest.mark.parametrize(
    "sentence, answer, prompt",
    [
        ("Port Vell is an airport 13 mi southeast of Ulm Falls, Bavaria.", "Bavaria", None),  # "southeast of Bavaria"
        ("Port Vell is a university in Upper Ulm, Bavaria, often cited.", "Bavaria", "Port Vell is a university in"),
        ("Port Vell was flown by Bo Vance, Ann Lee and Cy Rees.", "Ann Lee", "Port Vell was flown by"),
        ("Port Vell hosted Ann Lee, Bo Vance, Cy Rees.", "Cy Rees", None),  # no "and": a list or an apposition?
    ],
)
def test_a_list_item_is_restated_only_where_dropping_the_items_before_it_keeps_the_meaning(sentence, answer, prompt):
    search = _Search(Counter())
    i = sentence.index(answer)
    cloze = search.cloze(sentence, i, i + len(answer), ["Port Vell"])
    assert (cloze.prompt if cloze else None) == prompt
