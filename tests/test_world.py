"""The synthetic 2-hop world: HotpotQA schema, seeded, typed, relation-first sentences, names whose first word is
their own, and a truthful sidecar."""

import json
from collections import Counter

import pytest

from lit_coupling.data.hotpotqa import read_hotpotqa
from lit_coupling.data.pieces import extract_pieces
from lit_coupling.data.world import (
    RELATIONS,
    WorldSpec,
    generate_world,
    load_truth,
    main,
    truth_path,
    world_records,
)


@pytest.fixture(scope="module")
def world_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "world.json"
    assert main(["--chains", "60", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_make_world_writes_hotpotqa_records_and_the_truth_sidecar(world_file):
    records = json.loads(world_file.read_text())
    assert len(records) == 60 and truth_path(world_file).exists()
    for record in records:
        assert set(record) == {"_id", "question", "answer", "supporting_facts", "context", "type", "level"}
        assert record["type"] == "bridge" and len(record["context"]) == 2 + WorldSpec().distractors
        titles = [title for title, _ in record["context"]]
        assert all(title in titles for title, _ in record["supporting_facts"])
    assert len(read_hotpotqa(world_file)) == 60  # the reader takes it like any HotpotQA file


def test_the_world_is_seeded(tmp_path):
    main(["--chains", "20", "--seed", "1", "--out", str(tmp_path / "a.json")])
    main(["--chains", "20", "--seed", "1", "--out", str(tmp_path / "b.json")])
    main(["--chains", "20", "--seed", "2", "--out", str(tmp_path / "c.json")])
    a, b, c = ((tmp_path / f"{n}.json").read_bytes() for n in "abc")
    assert a == b and a != c
    assert (tmp_path / "a.truth.json").read_bytes() == (tmp_path / "b.truth.json").read_bytes()


def test_relations_entities_and_templates():
    assert len(RELATIONS) >= 6 and all(len(r.templates) >= 2 for r in RELATIONS.values())
    for relation in RELATIONS.values():  # prefix clozes: the object is the last thing of every template
        assert all(t.rstrip(".").endswith("{o}") and "{s}" in t for t in relation.templates)
        # Relation first, subject last, one word between subject and object: MEMIT edits the tiny models at that
        # word (the token after the subject), which has seen both relation and subject.
        assert all(
            not t.startswith("{s}") and len(t.split("{s}")[1].split("{o}")[0].split()) == 1 for t in relation.templates
        )
    world = generate_world(WorldSpec(chains=200))
    types = Counter(e.type for e in world.entities.values())
    assert {"person", "city", "company", "university", "work", "country"} <= set(types)


def test_first_words_identify_entities_and_later_words_are_shared():
    """A name's first token carries it (a new answer's later tokens follow from its first); the rest is shared."""
    world = generate_world(WorldSpec(chains=200))
    named = [e.name.split() for e in world.entities.values() if e.type != "country"]
    assert all(len(name) == 2 for name in named)
    firsts = Counter(name[0] for name in named)
    assert max(firsts.values()) == 1
    lasts = Counter(name[-1] for name in named)
    assert sum(lasts[name[-1]] for name in named) / len(named) >= 4  # last words are widely shared


def test_every_chain_gives_its_pieces_and_they_match_the_truth(world_file):
    truth = load_truth(world_file)
    result = extract_pieces(read_hotpotqa(world_file))
    assert result.skips == [] and result.counts()["by_kind"] == {"hop1": 60, "hop2": 60, "question": 60}
    pieces = {p.id: p for p in result.pieces}
    facts = {f["id"]: f for f in truth["facts"]}
    for chain in truth["chains"]:
        hop1, hop2, question = (pieces[chain["pieces"][k]] for k in ("hop1", "hop2", "question"))
        assert (hop1.subject, hop1.answer) == (chain["head"], chain["bridge"])
        assert (hop2.subject, hop2.answer) == (chain["bridge"], chain["answer"])
        assert question.answer == chain["answer"] and chain["head"] in question.prompt
        assert hop1.source_sentence in facts[chain["hop1"]]["paraphrases"]
        assert hop2.source_sentence in facts[chain["hop2"]]["paraphrases"]


def test_shared_entities_name_pieces_that_really_share_them(world_file):
    truth = load_truth(world_file)
    pieces = {p.id: p for p in extract_pieces(read_hotpotqa(world_file)).pieces}
    assert truth["shared_entities"]
    for entity, links in truth["shared_entities"].items():
        for piece_id in links["subject_of"]:
            assert entity in pieces[piece_id].prompt
        for piece_id in links["answer_of"]:
            assert pieces[piece_id].answer == entity
    bridges = Counter(c["bridge"] for c in truth["chains"])
    assert max(bridges.values()) >= 2  # some chains pass through the same bridge entity


def test_every_sentence_names_its_subject_right_before_the_object():
    """Paragraph sentences are the facts' templates as they are: "... of {subject} is {object}." (no pronouns)."""
    world = generate_world(WorldSpec(chains=100, seed=5))
    records = world_records(world)
    facts = {(f.subject, f.sentence()): f for f in world.facts}
    for record in records:
        for title, sentences in record["context"]:
            for sentence in sentences:
                fact = facts[(title, sentence)]
                assert sentence.endswith(f"{fact.subject} is {fact.object}.")
