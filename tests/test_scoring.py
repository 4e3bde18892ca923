import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.scoring import (ClozeTokenError, answer_logprobs, cloze_text, collate_clozes, encode_cloze,
                                  generated_exact_match, greedy_continuations, normalize_answer, score_batch)
from tests.tiny import TEXTS, tiny_config


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=320, style="llama")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).eval()


def test_cloze_text_keeps_the_source_spacing():
    assert cloze_text("The capital of France is", "Paris") == "The capital of France is Paris"
    assert cloze_text('He wrote "', "Hamlet") == 'He wrote "Hamlet'
    assert cloze_text("", "Paris") == "Paris"


def test_joint_tokenisation_splits_at_the_answer(tok):
    prompt, answer = "Marie Curie was born in", "Warsaw"
    p_ids, a_ids = encode_cloze(tok, prompt, answer, bos_ids=[tok.bos_token_id])
    assert p_ids[0] == tok.bos_token_id
    assert tok.decode(p_ids[1:]) == prompt
    assert tok.decode(a_ids) == " " + answer  # the space belongs to the answer's first token
    assert p_ids[1:] + a_ids == tok(cloze_text(prompt, answer), add_special_tokens=False)["input_ids"]
    # a multi-token answer: every token is kept
    _, long_ids = encode_cloze(tok, "It is", "Arthur's Magazine First")
    assert tok.decode(long_ids) == " Arthur's Magazine First" and len(long_ids) > 1


def test_bad_clozes_are_refused(tok):
    with pytest.raises(ClozeTokenError, match="empty answer"):
        encode_cloze(tok, "The capital is", "  ")
    with pytest.raises(ClozeTokenError, match="empty prompt"):
        encode_cloze(tok, "", "Paris")


def test_answer_logprob_is_the_sum_over_every_answer_token(tok, model):
    items = [encode_cloze(tok, "The capital of France is", "Paris"),
             encode_cloze(tok, "Arthur's Magazine was started in", "1844 and more"),
             encode_cloze(tok, "Warsaw is the capital of", "Poland")]
    batch = collate_clozes(items, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = answer_logprobs(logits, batch["input_ids"], batch["answer_mask"])
    for row, (p, a) in enumerate(items):
        full = torch.log_softmax(logits[row].double(), -1)
        want = sum(full[len(p) + i - 1, t] for i, t in enumerate(a))
        assert abs(got[row].item() - want.item()) < 1e-5


def test_scores_do_not_depend_on_padding_or_batch_mates(tok, model):
    a = encode_cloze(tok, "The capital of France is", "Paris")
    b = encode_cloze(tok, "Arthur's Magazine was started in the year", "1844")
    alone = score_batch(model, collate_clozes([a], tok.pad_token_id))["logp"]
    together = score_batch(model, collate_clozes([a, b], tok.pad_token_id))["logp"]
    assert abs(alone[0].item() - together[0].item()) < 1e-5


def test_teacher_forced_and_generated_exact_match_agree_on_a_learnt_fact(tok):
    """Train a tiny model on one sentence until it knows it: both exact-match measures must say so."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok)))
    p, a = encode_cloze(tok, "Marie Curie was born in", "Warsaw")
    batch = collate_clozes([(p, a)], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(input_ids=batch["input_ids"]).logits
        loss = -answer_logprobs(logits, batch["input_ids"], batch["answer_mask"]).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    assert score_batch(model, batch)["tf_em"].item()
    generated = greedy_continuations(model, [p], max_new_tokens=len(a), pad_id=tok.pad_token_id)[0]
    assert generated == a
    assert generated_exact_match(tok, generated, "Warsaw")
    assert not generated_exact_match(tok, generated, "Paris")


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_scores_and_greedy_continuation_equal_brute_force(tok, family):
    """One left-padded teacher-forced pass (CachedScores) gives the full-logits scores, ranks and greedy tokens, and
    decoding on from its KV cache at any answer position gives what HF greedy decoding from scratch gives."""
    from lit_coupling.scoring import CachedScores, supports_cached_scoring

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok))).eval()
    assert supports_cached_scoring(model)
    items = [encode_cloze(tok, "The capital of France is", "Paris"),
             encode_cloze(tok, "Arthur's Magazine was started in the year", "1844 and more"),
             encode_cloze(tok, "Warsaw is", "the capital of Poland")]
    cached = CachedScores(model, items, tok.pad_token_id)
    batch = collate_clozes(items, tok.pad_token_id)
    assert torch.allclose(cached.logp, score_batch(model, batch)["logp"], atol=1e-5)
    with torch.no_grad():
        for row, (p, a) in enumerate(items):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
            steps = [logits[len(p) + k - 1] for k in range(len(a))]
            assert cached.greedy[row] == [int(s.argmax()) for s in steps]
            assert cached.next[row] == int(logits[len(p) + len(a) - 1].argmax())
            assert cached.rank[row] == int((steps[0] > steps[0][a[0]]).sum())
            assert bool(cached.tf_em[row]) == (cached.greedy[row] == a)
    keep = [0, 2, len(items[2][1])]  # from the prompt, inside the answer, after the whole answer
    first = [cached.greedy[0][0], items[1][1][2], cached.next[2]]
    got = cached.continue_greedy(keep, first, [4, 4, 4], eos_id=None)
    for row, (p, a) in enumerate(items):
        context = list(p) + list(a[: keep[row]]) + [first[row]]
        want = greedy_continuations(model, [context], 3, tok.pad_token_id)[0]
        assert got[row] == [first[row]] + want
