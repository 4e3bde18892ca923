"""Edit requests: sources drawn from known facts, counterfactuals of the answer's own type."""

from pathlib import Path

import pytest

from lit_coupling.data.answer_types import (
    TypedEntities,
    answer_type,
    entities_from_paragraphs,
    lexicon_type,
    paragraph_type,
    shape_type,
)
from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.requests import (
    NO_SAME_TYPE,
    NOT_KNOWN,
    entities_for_source,
    plan_requests,
    with_article,
)
from lit_coupling.scoring import normalize_answer

HOTPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "hotpot_dev_distractor_v1.sample40.json"


def piece(i: int, prompt: str, answer: str, subject: str, kind: str = "hop1") -> KnowledgePiece:
    return KnowledgePiece(
        id=f"r{i}/{kind}",
        hotpot_id=f"r{i}",
        chain_id=f"r{i}",
        kind=kind,
        hop=1,
        prompt=prompt,
        answer=answer,
        subject=subject,
    )


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
        "year",
        "date",
        "date",
        "number",
        None,
    ]
    assert lexicon_type("American", "Ed Wood was an") == "nationality"
    assert lexicon_type("French", "The mother tongue of Danielle Darrieux is") == "language"
    assert lexicon_type("Japan", "Buck-Tick is from") == "country"
    assert [paragraph_type(s) for _, s in PARAGRAPHS[:6]] == ["person", "person", "film", "band", "mosque", "person"]
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
    # Towns no lexicon holds (Paris, Rome, ... are typed "city" by the lexicon): untyped, matched by relation.
    towns = ["Quarnby", "Tellisford", "Ossington", "Lathbury"]
    pieces = [piece(i, f"born in: P{i}", town, f"P{i}") for i, town in enumerate(towns)]
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
        parts = r.target_new.split(" ", 1)  # "a species": a whole name written with the true answer's article
        whole = parts[1] if len(parts) == 2 and with_article(r.target_true, parts[1]) == r.target_new else None
        assert (
            r.target_new in entities.names.get(kind, [])
            or r.target_new in [p.answer for p in pieces]
            or (whole in entities.names.get(kind, []))
        )
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


def test_occupations_places_class_nouns_numbers_and_surnames_are_typed_and_matched():
    """The types real HotpotQA answers need besides names, years and nationalities, each with candidates of its
    own type from the data (never the true answer, never another type)."""
    paragraphs = PARAGRAPHS + [
        ("David Weissman", ["David Weissman is a screenwriter and director.", "He lives in Brooklyn, New York."]),
        ("Brown County", ["Brown County is a county in Kansas. Its population was 9,984 in October 2010."]),
        ("Index Magazine", ["Index Magazine was a New York City-based magazine founded in 1996 by 2,000 people."]),
        (
            "Richard Nixon",
            [
                "Richard Nixon (January 9, 1913 – April 22, 1994) was an American politician.",
                "He was born in Yorba Linda, California in January 1913, a consultant's son.",
            ],
        ),
    ]
    entities = entities_from_paragraphs(paragraphs)
    assert paragraph_type(paragraphs[-2][1]) == "magazine"  # "City-based" does not make it a city
    cases = {
        "screenwriter": "occupation",
        "opera composer": "occupation",
        "American industrialist": "occupation",
        "series": "kind of work",
        "band": "kind of organisation",
        "genus": "kind of taxon",
        "New York City": "city",
        "Kansas": "US state",
        "Greenwich Village, New York City": "place",
        "Laleli, Fatih, Istanbul, Turkey": "place",
        "9,984": "number",
        "October 1922": "month",
        "Nixon": "surname",
    }
    for answer, kind in cases.items():
        assert answer_type(answer, "X is a", entities)[0] == kind, answer
    for answer in ("a genus", "organizations", "the headquarters", "World War II"):
        assert answer_type(answer, "X is a", entities)[0] is None, answer
    assert "Brooklyn, New York" in entities.names["place"] and "Yorba Linda, California" in entities.names["place"]
    assert "9,984" in entities.names["number"] and "October 2010" in entities.names["month"]
    assert {"screenwriter", "politician", "consultant"} <= set(entities.names["occupation"])
    pieces = [
        piece(0, "David Weissman is a", "screenwriter", "David Weissman", "hop2"),
        piece(1, "He is a former management", "consultant", "He", "hop2"),
        piece(2, "Brown County population was", "9,984", "Brown County", "hop2"),
        piece(3, "He is based in", "Greenwich Village, New York City", "He", "hop2"),
        piece(4, "It was in the department during the", "Nixon", "It", "hop1"),
        piece(5, "Animorphs is a science fantasy", "series", "Animorphs", "hop2"),
    ]
    plan = plan_requests(pieces, 10, seed=0, entities=entities)
    assert plan.unmatched == 0 and len(plan.requests) == len(pieces)
    for r in plan.requests:
        assert normalize_answer(r.target_new) != normalize_answer(r.target_true)
        assert (
            answer_type(r.target_new, r.prompt, entities)[0]
            == r.answer_type
            == answer_type(r.target_true, r.prompt, entities)[0]
        ), (r.target_true, r.target_new)


def test_a_counterfactual_is_written_with_the_true_answers_article():
    assert with_article("a genus", "tree") == "a tree" and with_article("a genus", "insect") == "an insect"
    assert with_article("the North Atlantic Conference", "Big East") == "the Big East"
    assert with_article("genus", "tree") == "tree" and with_article("a genus", "a tree") == "a tree"
    entities = entities_from_paragraphs(PARAGRAPHS + [("Quercus", ["Quercus is a genus of tree and shrub species."])])
    pieces = [piece(0, "Quercus is", "a genus", "Quercus", "hop2")]
    plan = plan_requests(pieces, 10, seed=0, entities=entities)
    assert len(plan.requests) == 1 and plan.requests[0].target_new.startswith(("a ", "an "))
    assert answer_type(plan.requests[0].target_new, "Quercus is", entities)[0] == plan.requests[0].answer_type
