"""Edit requests: sources drawn from known facts, counterfactuals of the answer's own type."""

from pathlib import Path

import pytest

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.answer_types import (
    TypedEntities,
    answer_type,
    entities_from_paragraphs,
    lexicon_type,
    paragraph_type,
    shape_type,
)
from lit_coupling.editing.requests import NO_SAME_TYPE, NOT_KNOWN, entities_for_source, plan_requests

HOTPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "hotpot_dev_distractor_v1.sample40.json"


def piece(i: int, prompt: str, answer: str, subject: str, kind: str = "hop1") -> KnowledgePiece:
    return KnowledgePiece(id=f"r{i}/{kind}", hotpot_id=f"r{i}", chain_id=f"r{i}", kind=kind, hop=1, prompt=prompt,
                          answer=answer, subject=subject)


PARAGRAPHS = [
    ("Ed Wood", ["Edward Davis Wood Jr. (October 10, 1924 – December 10, 1978) was an American filmmaker."]),
    ("Adriana Trigiani", ["Adriana Trigiani is an Italian American best-selling author of sixteen books."]),
    ("Big Stone Gap (film)", ["Big Stone Gap is a 2014 American drama romantic comedy film written by her."]),
    ("Winner (band)", ["Winner, often stylized as WINNER, is a South Korean boy group formed in 2013."]),
    ("Laleli Mosque", ["The Laleli Mosque is an 18th-century Ottoman imperial mosque located in Istanbul."]),
    ("Carlo Rovelli", ["Carlo Rovelli is an Italian theoretical physicist and writer.", "He has worked in Italy."]),
    ("List of songs written by Ravi", ["This is a list of songs composed by the singer Ravi."]),
]


def test_the_type_comes_from_shape_lexicon_or_the_paragraph_the_answer_titles():
    assert [shape_type(a) for a in ("1998", "July 16, 1966", "16 July 1966", "4,000", "3,677 seated")] == [
        "year", "date", "date", "number", None]
    assert lexicon_type("American", "Ed Wood was an") == "nationality"
    assert lexicon_type("French", "The mother tongue of Danielle Darrieux is") == "language"
    assert lexicon_type("Japan", "Buck-Tick is from") == "country"
    assert [paragraph_type(s) for _, s in PARAGRAPHS[:6]] == ["person", "person", "film", "band", "mosque",
                                                              "person"]
    entities = entities_from_paragraphs(PARAGRAPHS)
    assert answer_type("Adriana Trigiani", "directed by", entities) == ("person", "paragraph title")
    assert answer_type("Big Stone Gap", "based on", entities)[0] == "film"  # the disambiguation is dropped
    assert "List of songs written by Ravi" not in entities.names.get("person", [])
    assert answer_type("keyboard function keys", "controlled by the", entities) == (None, "")


def test_counterfactuals_are_of_the_same_type_and_untyped_answers_are_not_edited():
    entities = entities_from_paragraphs(PARAGRAPHS)
    pieces = [
        piece(0, "Kiss and Tell is a 1945 comedy film starring", "Ed Wood", "Kiss and Tell"),
        piece(1, "Big Stone Gap is a film directed by", "Adriana Trigiani", "Big Stone Gap"),
        piece(2, "Scott Derrickson is an", "American", "Scott Derrickson", "compare"),
        piece(3, "Hayden is a", "Canadian", "Hayden", "compare"),
        piece(4, "Wolf Alice have been a band since", "2012", "Wolf Alice", "compare"),
        piece(5, "Carlo Rovelli has worked in France since", "2000", "Carlo Rovelli", "hop2"),
        piece(6, "The remote was designed to interact with the", "keyboard function keys", "remote", "hop2"),
        piece(7, "Question: who? Answer:", "Ed Wood", "who", "question"),  # never a source
    ]
    plan = plan_requests(pieces, 10, seed=0, entities=entities)
    got = {r.source_id: (r.target_new, r.answer_type) for r in plan.requests}
    assert got["r0/hop1"][1] == got["r1/hop1"][1] == "person"
    assert got["r0/hop1"][0] in ("Adriana Trigiani", "Carlo Rovelli")  # a person, never the true answer
    assert got["r2/compare"][1] == got["r3/compare"][1] == "nationality"
    assert got["r2/compare"][0] != "American" and got["r3/compare"][0] != "Canadian"
    assert got["r4/compare"][1] == got["r5/hop2"][1] == "year"  # another year of the data ("2000", "2014", ...)
    assert got["r4/compare"][0] != "2012" and got["r5/hop2"][0] != "2000"
    assert "r6/hop2" not in got and plan.unmatched == 1 and plan.skipped == {NO_SAME_TYPE: 1}
    for r in plan.requests:
        assert answer_type(r.target_new, r.prompt, entities)[0] == r.answer_type


def test_sources_are_drawn_only_from_known_facts():
    pieces = [piece(i, f"born in: P{i}", city, f"P{i}") for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima"])]
    plan = plan_requests(pieces, 10, seed=0, known=[True, False, True, False])
    assert sorted(r.source_index for r in plan.requests) == [0, 2]
    assert plan.known == 2 and plan.sources == 4 and plan.skipped == {NOT_KNOWN: 2}
    assert all(r.answer_type == "relation" for r in plan.requests)  # typed by the shared relation template
    assert plan_requests(pieces, 10, seed=0).known is None  # no judgement: every source


@pytest.mark.skipif(not HOTPOT.exists(), reason="../shared/data/hotpotqa is absent")
def test_real_hotpotqa_records_get_same_type_counterfactuals():
    from lit_coupling.data.hotpotqa import read_hotpotqa
    from lit_coupling.data.pieces import extract_pieces

    pieces = extract_pieces(read_hotpotqa(HOTPOT)).pieces
    entities = entities_for_source(HOTPOT)
    plan = plan_requests(pieces, 100, seed=0, entities=entities)
    assert len(plan.requests) >= 10 and plan.unmatched > 0
    assert plan.eligible + plan.unmatched + sum(v for k, v in plan.skipped.items() if k != NO_SAME_TYPE) == plan.sources
    for r in plan.requests:
        kind = r.answer_type
        assert kind in ("person", "nationality", "country", "year", "date", "language") or kind in entities.names
        assert answer_type(r.target_new, r.prompt, entities)[0] == kind, (r.target_true, r.target_new, kind)
        assert r.target_new in entities.names.get(kind, []) or r.target_new in [p.answer for p in pieces]
    by_true = {r.target_true: r.target_new for r in plan.requests}
    assert by_true.get("Shirley Temple", "Ed Wood") in entities.names["person"]


def test_the_synthetic_world_types_from_its_truth(tmp_path):
    from lit_coupling.data.hotpotqa import read_hotpotqa
    from lit_coupling.data.pieces import extract_pieces
    from lit_coupling.data.world import WorldSpec, load_truth, write_world

    world, _ = write_world(WorldSpec(chains=30, seed=1), tmp_path / "world.json")
    pieces = extract_pieces(read_hotpotqa(world)).pieces
    truth = {e["name"]: e["type"] for e in load_truth(world)["entities"]}
    plan = plan_requests(pieces, 100, seed=0, entities=entities_for_source(world))
    assert len(plan.requests) >= 30 and plan.unmatched == 0
    for r in plan.requests:
        want = "year" if r.target_true.isdigit() else truth[r.target_true]
        assert r.answer_type == want and ("year" if r.target_new.isdigit() else truth[r.target_new]) == want


def test_no_entities_means_relation_or_shape_only():
    pieces = [piece(0, "X was founded in", "1901", "X"), piece(1, "Y is run by", "Anna", "Y")]
    plan = plan_requests(pieces, 10, seed=0, entities=TypedEntities())
    assert plan.requests == [] or all(r.answer_type == "year" for r in plan.requests)
    assert plan.unmatched == 2  # one year has no other year; "Anna" has no type and no shared relation
