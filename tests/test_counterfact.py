"""CounterFact cases (both schemas) and the standard metrics of Meng et al. (2022)."""

import json
import math
from pathlib import Path

import pytest

from lit_coupling.data.counterfact import CounterFactDataError, parse_counterfact, read_counterfact
from lit_coupling.editing.requests import EditRequest, plan_counterfact
from lit_coupling.editing.ripple import PieceScores, Probes, counterfact_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"
SAMPLE = SHARED / "counterfact-edit.sample200.json"

ORIGINAL = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
FLAT = {
    "case_id": 4,
    "prompt": "What is the twin city of Lyon? It is",
    "target_new": "Manila",
    "subject": "Lyon",
    "ground_truth": "Beirut",
    "rephrase_prompt": "People in Lyon's twin city speak the language of",
    "locality_prompt": "The twin city of Trieste is",
    "locality_ground_truth": "Beirut",
}


def test_both_schemas_give_the_same_fields():
    original, flat = parse_counterfact([ORIGINAL, FLAT], "cases.json")
    assert original.prompt == "The mother tongue of Danielle Darrieux is"
    assert (original.target_true, original.target_new, original.relation_id) == ("French", "English", "P103")
    assert len(original.paraphrase_prompts) == 2 and len(original.neighborhood_prompts) == 2
    assert original.neighborhood_true == "French"  # CounterFact's neighbours share the true object
    assert original.answer_type() == ("language", "CounterFact relation P103")
    assert (flat.case_id, flat.subject, flat.target_true, flat.target_new) == ("4", "Lyon", "Beirut", "Manila")
    assert flat.paraphrase_prompts == ["People in Lyon's twin city speak the language of"]
    assert flat.neighborhood_prompts == ["The twin city of Trieste is"] and flat.neighborhood_true == "Beirut"


@pytest.mark.parametrize(
    "record, message",
    [
        ({**FLAT, "target_new": ""}, "field 'target_new'"),
        ({"requested_rewrite": {**ORIGINAL["requested_rewrite"], "prompt": "The mother tongue is"}}, "has no '{}'"),
        ({"case_id": 9, "question": "?"}, "neither CounterFact schema"),
        ([1, 2], "JSON object"),
    ],
)
def test_a_bad_case_names_the_file_record_and_field(record, message):
    with pytest.raises(CounterFactDataError, match="cases.json, record 1") as error:
        parse_counterfact([FLAT, record], "cases.json")
    assert message in str(error.value)


def test_read_counterfact_reads_json_lines(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(ORIGINAL) + "\n" + json.dumps(FLAT) + "\n")
    assert [c.case_id for c in read_counterfact(path)] == ["0", "4"]
    with pytest.raises(CounterFactDataError, match="does not exist"):
        read_counterfact(tmp_path / "missing.json")


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/counterfact is absent")
def test_the_shared_sample_reads_whole():
    cases = read_counterfact(SAMPLE)
    assert len(cases) == 200
    assert all(c.subject in c.prompt and c.paraphrase_prompts and c.neighborhood_prompts for c in cases)
    assert cases[0].prompt == "The mother tongue of Danielle Darrieux is" and cases[0].target_true == "French"


def test_counterfact_metrics_follow_their_definitions():
    """Brute force: P = exp(logP of the whole answer); scores are fractions of prompts where the right one wins."""
    probes = Probes(
        items=[([0], [1])] * 8,
        answers=[""] * 8,
        question=None,
        question_follows=False,
        paraphrase=[(2, 3), (4, 5)],
        neighborhood=[(6, 7)],
    )
    logp = [
        math.log(0.2),
        math.log(0.5),  # rewrite: true 0.2, new 0.5
        math.log(0.1),
        math.log(0.3),
        math.log(0.4),
        math.log(0.05),  # paraphrases: new wins once
        math.log(0.6),
        math.log(0.1),
    ]  # neighbour: true wins
    m = counterfact_metrics(probes, PieceScores(logp, [False] * 8, [False] * 8))
    assert m["efficacy_score"] == 1.0 and m["efficacy_magnitude"] == pytest.approx(0.3)
    assert m["paraphrase_score"] == 0.5 and m["paraphrase_magnitude"] == pytest.approx((0.2 - 0.35) / 2)
    assert m["neighborhood_score"] == 1.0 and m["neighborhood_magnitude"] == pytest.approx(0.5)
    none = counterfact_metrics(
        Probes([([0], [1])] * 2, [""] * 2, None, False), PieceScores(logp[:2], [False] * 2, [False] * 2)
    )
    assert none["paraphrase_score"] is None and none["neighborhood_score"] is None


def test_counterfact_edits_are_drawn_from_known_cases_only():
    cases = parse_counterfact([{**FLAT, "case_id": i} for i in range(6)])
    known = [True, False, True, False, True, True]
    plan = plan_counterfact(cases, 10, seed=0, known=known)
    assert sorted(r.source_id for r in plan.requests) == [
        "counterfact/0",
        "counterfact/2",
        "counterfact/4",
        "counterfact/5",
    ]
    assert plan.known == 4 and plan.sources == 6 and plan.skipped == {"not known to the model before the edit": 2}
    request = plan.requests[0]
    assert isinstance(request, EditRequest) and request.source_index == -1
    assert request.counterfact["neighborhood_prompts"] == ["The twin city of Trieste is"]
    assert [r.source_id for r in plan_counterfact(cases, 2, seed=0, known=known).requests] == [
        r.source_id for r in plan.requests[:2]
    ]  # a smaller run edits a prefix


def test_a_counterfactual_of_another_type_is_not_edited_and_counted():
    """CounterFact's flat cases hold new objects of another type ("Iran → Airbus"): such a case is counted as
    unmatched and not edited; a typed case keeps its type, the same for the true and the new object."""
    from lit_coupling.data.answer_types import lexicon_type
    from lit_coupling.data.counterfact import CounterFactCase
    from lit_coupling.editing.requests import NO_SAME_TYPE

    cases = [
        CounterFactCase("0", "Toyota Prius is produced by", "Toyota Prius", "Iran", "Airbus"),
        CounterFactCase("1", "Mark Fuller plays the", "Mark Fuller", "piano", "trumpet"),
        CounterFactCase("2", "Danielle Darrieux's mother tongue is", "Danielle Darrieux", "French", "English"),
        CounterFactCase("3", "Gap Inc was born in", "Gap Inc", "Gap", "Montgomery"),
    ]
    plan = plan_counterfact(cases, 10, seed=0)
    assert plan.unmatched == 1 and plan.skipped == {NO_SAME_TYPE: 1}
    got = {r.source_id: r.answer_type for r in plan.requests}
    # "Gap" is in no lexicon: the case is typed by its relation (CounterFact's new object is of the same relation)
    assert got == {
        "counterfact/1": "instrument",
        "counterfact/2": "language",
        "counterfact/3": "relation (CounterFact)",
    }
    for r in plan.requests:
        new = lexicon_type(r.target_new, r.prompt)
        assert new is None or new == r.answer_type or r.answer_type.startswith("relation")


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/counterfact is absent")
def test_the_shared_sample_is_mostly_typed_and_its_edits_keep_their_type():
    from lit_coupling.data.answer_types import lexicon_type, shape_type

    cases = read_counterfact(SAMPLE)
    plan = plan_counterfact(cases, 200, seed=0)
    assert plan.unmatched + len(plan.requests) == len(cases)
    typed = [r for r in plan.requests if not r.answer_type.startswith("relation")]
    assert len(typed) >= 0.8 * len(plan.requests)
    for r in typed:
        kind = shape_type(r.target_new) or lexicon_type(r.target_new, r.prompt)
        assert kind in (None, r.answer_type), (r.target_true, r.target_new, r.answer_type)
