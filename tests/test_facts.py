"""The fit side of the data: fact texts, seeded batches, the subject-locality mask."""

import pytest
import torch

from lit_coupling.data.datamodule import FactCollator, FactsDataModule, subject_locality_mask
from lit_coupling.data.facts import FactText, fact_texts
from lit_coupling.data.hotpotqa import read_hotpotqa, real_sample_file
from lit_coupling.data.pieces import extract_pieces
from lit_coupling.data.world import RELATIONS, load_truth
from lit_coupling.data.world import main as make_world
from lit_coupling.inject.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts") / "world.json"
    make_world(["--chains", "12", "--seed", "4", "--out", str(out)])
    return out


def test_a_world_gives_every_fact_in_every_template(small_world):
    truth = load_truth(small_world)
    pieces = extract_pieces(read_hotpotqa(small_world)).pieces
    texts = fact_texts(pieces, truth, questions=False, bare=False)
    want = {p for f in truth["facts"] for p in f["paraphrases"]}
    assert {t.text() for t in texts} == want
    assert len(texts) == sum(len(RELATIONS[f["relation"]].templates) for f in truth["facts"])
    with_extras = fact_texts(pieces, truth, questions=True, bare=True)
    assert {t.text() for t in with_extras} - want == {f"{f['subject']} {f['object']}." for f in truth["facts"]} | {
        f"{p.prompt} {p.answer}" for p in pieces if p.kind == "question"
    }


def test_a_hotpotqa_file_gives_its_source_sentences():
    pieces = extract_pieces(read_hotpotqa(real_sample_file())).pieces
    texts = fact_texts(pieces, truth=None, questions=False, bare=False)
    assert {t.text() for t in texts} == {p.source_sentence for p in pieces if p.is_single_hop}


def test_fact_text_prefix_and_subject_span():
    fact = FactText("The birthplace of Mira Tolvane is", "Velmor Falls", ".", "Mira Tolvane")
    assert fact.text("Note:") == "Note: The birthplace of Mira Tolvane is Velmor Falls."
    start, end = fact.subject_span("Note:")
    assert fact.text("Note:")[start:end] == "Mira Tolvane"
    assert FactText("It is", "x").subject_span() is None


def connected(world, seed: int, **kwargs) -> FactsDataModule:
    data = FactsDataModule(hotpot_data=str(world), batch_size=8, seed=seed, **kwargs)
    tokenizer = train_bpe_tokenizer(data.corpus(), 400, style="llama")
    data.connect(tokenizer, [tokenizer.bos_token_id])
    return data


def test_batches_are_deterministic_under_a_seed(small_world):
    first = [b["input_ids"] for b in connected(small_world, seed=1).train_dataloader()]
    again = [b["input_ids"] for b in connected(small_world, seed=1).train_dataloader()]
    other = [b["input_ids"] for b in connected(small_world, seed=2).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))


def test_examples_cover_every_text_behind_every_prefix(small_world):
    data = connected(small_world, seed=0, prefixes=["", "Fact:"])
    assert len(data.examples) == 2 * len(data.facts)
    tokenizer = data.tokenizer
    ids, span = data.examples[1]  # the first text behind "Fact:"
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == data.facts[0].text("Fact:")
    assert tokenizer.decode(ids[span[0] : span[1] + 1]).strip() == data.facts[0].subject
    batch = next(iter(data.train_dataloader()))
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == -100).all() and (batch["labels"][~padding] >= 0).all()
    # the pieces recall is measured on carry this tokenizer's ids, BOS first
    assert data.pieces and all(p.prompt_ids[0] == tokenizer.bos_token_id for p in data.pieces)


def test_subject_locality_mask():
    # sequence of 7 tokens, subject at positions 1..3, one padding position
    mask = subject_locality_mask([6], [(1, 3)], width=7)[0, 0]
    causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    assert not (mask & ~causal).any()
    assert not mask[:, 6].any()  # padding is never attended
    assert mask[3, 1] and mask[3, 2] and mask[3, 3]  # the subject's last token gathers the name
    assert not mask[4, 1] and not mask[4, 2] and mask[4, 3]  # later tokens see it only through its last token
    assert not mask[5, 1] and mask[5, 4] and mask[5, 0]


def test_the_locality_batch_runs_through_both_families(small_world, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = connected(small_world, seed=0, subject_locality=True)
    batch = FactCollator(data.tokenizer.pad_token_id, subject_locality=True)([data.examples[i] for i in range(4)])
    assert batch["attention_mask"].dim() == 4
    for family in ("gpt2", "llama"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family))
        ids = batch["input_ids"].clamp(max=model.config.vocab_size - 1)
        loss = model(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"].clamp(max=model.config.vocab_size - 1),
        ).loss
        assert torch.isfinite(loss)
