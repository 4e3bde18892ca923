import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.scoring import (
    ClozeTokenError,
    answer_logprobs,
    cloze_text,
    collate_clozes,
    encode_cloze,
    generated_exact_match,
    greedy_continuations,
    normalize_answer,
    score_batch,
)
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
    items = [
        encode_cloze(tok, "The capital of France is", "Paris"),
        encode_cloze(tok, "Arthur's Magazine was started in", "1844 and more"),
        encode_cloze(tok, "Warsaw is the capital of", "Poland"),
    ]
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
        opt.zero_grad()
        loss.backward()
        opt.step()
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
    items = [
        encode_cloze(tok, "The capital of France is", "Paris"),
        encode_cloze(tok, "Arthur's Magazine was started in the year", "1844 and more"),
        encode_cloze(tok, "Warsaw is", "the capital of Poland"),
    ]
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


def _reuse_items(tok):
    clozes = [
        ("The capital of France is", "Paris"),
        ("Arthur's Magazine was started in the year", "1844 and more"),
        ("Warsaw is", "the capital of Poland"),
        ("Marie Curie was born in", "Warsaw"),
        ("The Eiffel Tower stands in", "Paris"),
        ("First for Women is a", "magazine"),
        ("The capital of", "France is Paris"),
        ("Marie Curie was", "born in Warsaw"),
    ]
    return [encode_cloze(tok, p, a) for p, a in clozes], [a for _, a in clozes]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("start", [0, 2])
def test_rescoring_from_the_first_edited_block_equals_a_full_forward(tok, family, start):
    """PrefixReuse: after an edit of blocks `start`.. (random changes to their MLP output weights), re-scoring
    from the kept states below `start` gives what scoring with the whole model gives (log P, EM, ranks, greedy
    texts decoded on from the split KV cache), and it really ran from block `start`."""
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.scoring import prefix_reuse

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), layers=4)).eval()
    adapter = ModelAdapter(model)
    items, answers = _reuse_items(tok)
    reuse = prefix_reuse(model, adapter, start)
    assert reuse is not None
    pad = tok.pad_token_id
    before, before_texts = score_clozes(model, tok, items, answers, 3, pad, generate="all", reuse=reuse)
    full_before, full_texts = score_clozes(model, tok, items, answers, 3, pad, generate="all")
    assert reuse.usable and reuse.reruns == 0
    assert before.tf_em == full_before.tf_em and before_texts == full_texts
    torch.manual_seed(3)
    for round_ in range(2):  # two edits in turn, the weights restored in between
        saved = {}
        with torch.no_grad():
            for layer in range(start, 4):
                weight = adapter.target(layer).module.weight
                saved[layer] = weight.clone()
                weight.add_(torch.randn_like(weight) * weight.std() * 3)
        after, texts = score_clozes(model, tok, items, answers, 3, pad, generate="all", reuse=reuse)
        assert reuse.reruns == 3 * (round_ + 1)  # every batch re-run from block `start`, none whole
        want, want_texts = score_clozes(model, tok, items, answers, 3, pad, generate="all")
        assert max(abs(a - b) for a, b in zip(after.logp, want.logp)) < 1e-4
        assert after.tf_em == want.tf_em and after.gen_em == want.gen_em and after.rank == want.rank
        assert texts == want_texts
        assert max(abs(a - b) for a, b in zip(after.logp, before.logp)) > 1e-3  # the edit did change scores
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.target(layer).module.weight.copy_(weight)


def test_rescoring_takes_the_states_again_when_a_lower_block_changes(tok):
    """Kept states below the first edited block are dropped when a weight there changes (its version counter)."""
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.scoring import prefix_reuse

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), layers=4)).eval()
    adapter = ModelAdapter(model)
    items, answers = _reuse_items(tok)
    reuse = prefix_reuse(model, adapter, 2)
    score_clozes(model, tok, items, answers, 4, tok.pad_token_id, reuse=reuse)
    with torch.no_grad():
        adapter.target(0).module.weight.mul_(3.0)
    got, _ = score_clozes(model, tok, items, answers, 4, tok.pad_token_id, reuse=reuse)
    want, _ = score_clozes(model, tok, items, answers, 4, tok.pad_token_id)
    assert reuse.reruns == 0
    assert max(abs(a - b) for a, b in zip(got.logp, want.logp)) < 1e-5


def test_padded_batches_cut_by_length():
    from lit_coupling.scoring import padded_batches

    lengths = [5, 40, 6, 41, 5, 39, 7, 42]
    batches = padded_batches(lengths, 128, overhead=10)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[5, 5, 6, 7], [39, 40, 41, 42]]
    assert all(len(b) <= 3 for b in padded_batches(lengths, 3))
    assert padded_batches([], 4) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_branches_leave_the_answer_scores_unchanged_and_read_the_argmax_after_each_branch_token(tok, family):
    """Tree attention (`with_branches`): a branch after a row's prompt + answer changes none of the row's scores,
    and the argmax after each branch token is the one of a plain forward of prompt + kept answer + branch so far."""
    from lit_coupling.scoring import CachedScores

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok))).eval()
    items, _ = _reuse_items(tok)
    plain = CachedScores(model, items, tok.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    branches = []
    for row, (_, answer) in enumerate(items):
        keep = row % (len(answer) + 1)  # from the prompt, inside the answer, after the whole answer
        tokens = torch.randint(3, len(tok), (1 + row % 3,), generator=generator).tolist()
        branches.append(None if row == 2 else (keep, tokens))
    tree = CachedScores(model, items, tok.pad_token_id, branches=branches)
    assert torch.allclose(tree.logp, plain.logp, atol=1e-5)
    assert tree.greedy == plain.greedy and tree.next == plain.next and tree.rank == plain.rank
    with torch.no_grad():
        for row, branch in enumerate(branches):
            if branch is None:
                assert tree.branch_argmax[row] == []
                continue
            keep, tokens = branch
            prompt, answer = items[row]
            context = [*prompt, *answer[:keep], *tokens]
            logits = model(input_ids=torch.tensor([context])).logits[0]
            want = logits[len(prompt) + keep : len(context)].argmax(-1).tolist()
            assert tree.branch_argmax[row] == want


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checked_drafts_give_what_decoding_gives_after_an_edit(tok, family):
    """After an edit, the before-edit greedy continuations (drafts) checked in the re-scoring pass give the texts and
    matches decoding gives, decoding only the rows whose continuation changed — a wrong draft is decoded, not
    trusted."""
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.models.hooks import Hooks
    from lit_coupling.scoring import padded_batches, prefix_reuse

    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), layers=4)).eval()
    adapter = ModelAdapter(model)
    items, answers = _reuse_items(tok)
    pad = tok.pad_token_id
    reuse = prefix_reuse(model, adapter, 2)
    before, before_texts = score_clozes(model, tok, items, answers, 4, pad, generate="all", reuse=reuse)
    assert before.decoded == len(items) and all(before.drafts)
    again, _ = score_clozes(model, tok, items, answers, 4, pad, generate="all", reuse=reuse, drafts=before.drafts)
    assert again.decoded == 0  # the same model: every draft holds
    drafts = list(before.drafts)
    keep, tokens = drafts[1]
    drafts[1] = (keep, [tokens[0], *[(t + 1) % len(tok) for t in tokens[1:]]])  # a draft wrong from its 2nd token
    keep, tokens = drafts[3]
    assert len(tokens) > 2
    drafts[3] = (keep, [*tokens[:-1], (tokens[-1] + 1) % len(tok)])  # wrong at its last token only
    decoding_rows, padded = [], 0  # the rows of every one-token (decoding) forward; the teacher-forced area

    def count(_module, args, kwargs):  # on block 2: the re-scoring passes run from there, decoding runs it too
        nonlocal padded
        rows, width = (args[0] if args else kwargs["hidden_states"]).shape[:2]
        if width == 1:
            decoding_rows.append(rows)
        else:
            padded += rows * width

    with Hooks(
        pre=[(adapter.blocks[2], count)], pre_kwargs=True
    ):  # unedited: only the wrong draft's row is decoded, alone
        once, texts = score_clozes(model, tok, items, answers, 4, pad, generate="all", reuse=reuse, drafts=drafts)
    # The draft wrong at its last token is settled by the argmax there (all its other tokens checked); the one
    # wrong from its second token decodes on after its first token and that argmax, alone.
    assert once.decoded == 1 and decoding_rows and set(decoding_rows) == {1}
    assert len(decoding_rows) < len(drafts[1][1]) - 1 and texts == before_texts and once.drafts == before.drafts
    # Rows are batched by their length with their draft (the drafts lengthen rows unevenly): the least padding.
    with_drafts = [len(p) + len(a) + len(d[1]) - 1 for (p, a), d in zip(items, drafts)]
    assert padded == sum(len(rows) * max(with_drafts[i] for i in rows) for rows in padded_batches(with_drafts, 4))
    with torch.no_grad():
        adapter.target(2).module.weight.add_(torch.randn_like(adapter.target(2).module.weight) * 0.05)
    got, got_texts = score_clozes(model, tok, items, answers, 4, pad, generate="all", reuse=reuse, drafts=drafts)
    want, want_texts = score_clozes(model, tok, items, answers, 4, pad, generate="all")
    assert got_texts == want_texts and got.gen_em == want.gen_em and got.tf_em == want.tf_em
    assert max(abs(a - b) for a, b in zip(got.logp, want.logp)) < 1e-4
    assert 1 <= got.decoded < len(items)  # the wrong draft (at least) decoded, the ones that held not
