"""MEMIT's pieces on small tensors and random tiny models: the update, the shortcut forward, keys, requests,
hparams."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.covariance import shrink
from lit_coupling.editing.hparams import (
    CONFIG_DIR,
    MemitHparams,
    derive_hparams,
    read_hparams_file,
    resolve_hparams,
    select_hparams,
    shipped_hparams,
)
from lit_coupling.editing.memit import (
    CovarianceSolver,
    PromptBatch,
    ResidualEditor,
    capture_at_subject,
    closed_form_update,
)
from lit_coupling.editing.requests import EditRequest, kl_prompt, plan_requests, request_prompts
from lit_coupling.errors import UserError
from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.models.adapters import ModelAdapter, TargetModule
from lit_coupling.scoring import normalize_answer
from tests.tiny import TEXTS, tiny_config


def random_problem(d_in=24, d_out=16, n=3, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(rank or 4 * d_in, d_in, generator=g, dtype=torch.float64)
    cov = samples.T @ samples / samples.shape[0]
    keys = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    residuals = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return cov, keys, residuals


def direct(cov, keys, residuals, lam):
    """The published formula, solved directly in float64 with numpy."""
    c, k, r = (t.numpy() for t in (cov, keys, residuals))
    return r @ np.linalg.solve(lam * c + k @ k.T, k).T


@pytest.mark.parametrize("layer_kind", ["conv1d", "linear"])
@pytest.mark.parametrize("rank", [None, 22])  # full rank (Cholesky + Woodbury) and singular C (direct solve)
def test_update_matches_the_closed_form(layer_kind, rank):
    cov, keys, residuals = random_problem(rank=rank)
    if rank is not None:  # λC + KKᵀ must stay invertible: let the keys fill C's null space
        null = torch.linalg.eigh(cov).eigenvectors[:, : 24 - rank]
        keys = keys + null @ torch.randn(24 - rank, 3, dtype=torch.float64)
    lam = 7.5
    torch.manual_seed(0)
    module = Conv1D(16, 24) if layer_kind == "conv1d" else nn.Linear(24, 16)
    target = TargetModule(0, "layer", module)
    before = target.weight().detach().double().clone()
    probe = torch.randn(5, 24)
    out_before = module(probe).detach()
    update = closed_form_update(residuals, keys, CovarianceSolver(cov), lam)
    target.add_(update)
    want = direct(cov, keys, residuals, lam)
    got = (target.weight().detach().double() - before).numpy()
    assert update.dtype == torch.float64
    assert np.allclose(update.numpy(), want, rtol=1e-9, atol=1e-10)
    assert np.allclose(got, want, atol=1e-5)  # the weight moved by exactly ΔW in its own float32
    # y = W x: the layer's outputs move by ΔW x whatever the storage orientation
    assert torch.allclose(
        module(probe).detach() - out_before, probe @ torch.tensor(want, dtype=torch.float32).T, atol=1e-4
    )


def test_update_is_well_conditioned_with_an_ill_conditioned_covariance():
    cov, keys, residuals = random_problem(d_in=32, n=2)
    vectors = torch.linalg.eigh(cov).eigenvectors
    cov = vectors @ torch.diag(torch.logspace(-8, 1.6, 32, dtype=torch.float64)) @ vectors.T  # 4e-8 … 41
    update = closed_form_update(residuals, keys, CovarianceSolver(cov), 100.0)
    assert np.allclose(update.numpy(), direct(cov, keys, residuals, 100.0), rtol=1e-6, atol=1e-8)


def test_shrinkage():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 16, dtype=torch.float64)  # a covariance far from a multiple of I
    few, many = (torch.randn(n, 16, generator=g, dtype=torch.float64) * scales for n in (20, 20000))
    alphas = []
    for x in (few, many):
        cov = x.T @ x / len(x)
        fourth = float((x.pow(2).sum(1) ** 2).mean())
        shrunk, alpha = shrink(cov, fourth, len(x))
        alphas.append(alpha)
        assert 0 <= alpha <= 1
        assert torch.allclose(torch.trace(shrunk), torch.trace(cov))  # the scale is kept
    assert alphas[0] > 10 * alphas[1]  # few samples: shrink; many: leave C as it is
    assert shrink(cov, 0.0, 1, "none") == (cov, 0.0)
    assert shrink(cov, 0.0, 1, "0.5")[1] == 0.5
    with pytest.raises(UserError, match="shrinkage"):
        shrink(cov, 0.0, 1, "2")


@pytest.fixture(scope="module")
def tokenizers():
    return {style: train_bpe_tokenizer(TEXTS, vocab_size=320, style=style) for style in ("gpt2", "llama")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_later_layers_shortcut_equals_the_full_model(family, tokenizers):
    tok = tokenizers["llama" if family == "llama" else "gpt2"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), layers=3)).eval()
    adapter = ModelAdapter(model)
    bos = adapter.bos_ids(tok)
    request = EditRequest(0, 0, "p", "Marie Curie was born in", "Marie Curie", "Warsaw", "Paris")
    prompts = request_prompts(tok, request, ["", "The Eiffel Tower stands in Paris. "], bos)
    batch = PromptBatch.of([*prompts, kl_prompt(tok, request.subject, bos)], tok.pad_token_id)
    rows, cols = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
    editor = ResidualEditor(adapter, batch, 1, (rows, cols))
    assert editor.shortcut
    delta = torch.randn(model.config.hidden_size) * 3
    assert torch.allclose(editor._shortcut_logits(delta), editor._full_logits(delta), atol=1e-4)
    assert not torch.allclose(editor._full_logits(delta), editor._full_logits(torch.zeros_like(delta)))


def test_llama_bos_does_not_shift_the_subject_position(tokenizers):
    tok = tokenizers["llama"]
    request = EditRequest(0, 0, "p", "The capital of France is", "France", "Paris", "Warsaw")
    prefix = "Marie Curie was born in Warsaw. "
    with_bos = request_prompts(tok, request, ["", prefix], [tok.bos_token_id])
    without = request_prompts(tok, request, ["", prefix], [])
    for a, b in zip(with_bos, without):
        assert a.prompt_ids[0] == tok.bos_token_id and a.prompt_ids[1:] == b.prompt_ids
        assert a.subject_index == b.subject_index + 1
        assert (
            tok.decode(a.prompt_ids[a.subject_index]).strip()
            == "France"[-len(tok.decode(a.prompt_ids[a.subject_index]).strip()) :]
        )  # the subject's last token
        assert tok.decode(a.prompt_ids[1 : a.subject_index + 1]).endswith("France")
    # and the keys read there are the subject's: the same vectors with and without the prefix's BOS shift
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), layers=2)).eval()
    adapter = ModelAdapter(model)
    keys, _ = capture_at_subject(adapter, PromptBatch.of(with_bos[:1], tok.pad_token_id), [0], 1)
    ids = torch.tensor([with_bos[0].prompt_ids])
    seen = {}
    handle = adapter.target(0).module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(input_ids=ids)
    handle.remove()
    stop = tok.decode(with_bos[0].prompt_ids[1:]).index("France") + len("France")
    last = len(tok("The capital of France is"[:stop], add_special_tokens=False)["input_ids"])  # BOS + subject
    assert torch.allclose(keys[0][0], seen["x"][0, last])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fact_tokens_read_keys_where_they_say(family, tokenizers):
    """subject_last / subject_first / subject_first_after_last: the position of every request prompt (behind a
    context prefix and a BOS or not) and of the KL prompt, and the keys captured there are that token's MLP input."""
    tok = tokenizers[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), layers=2)).eval()
    adapter = ModelAdapter(model)
    bos = adapter.bos_ids(tok)
    request = EditRequest(0, 0, "p", "The capital of France is", "France", "Paris", "Warsaw")
    prefix = "Marie Curie was born in Warsaw. "

    def text_upto(ids, index):  # the prompt's text up to and including token `index` (BOS left out)
        return tok.decode(ids[len(bos) : index + 1])

    seen_inputs = {}
    handle = adapter.target(0).module.register_forward_pre_hook(lambda m, a: seen_inputs.setdefault("x", a[0]))
    for fact_token in ("subject_last", "subject_first", "subject_first_after_last"):
        prompts = request_prompts(tok, request, ["", prefix], bos, fact_token)
        for context, p in zip(["", prefix], prompts):
            seen = text_upto(p.prompt_ids, p.fact_index)
            before = text_upto(p.prompt_ids, p.fact_index - 1)
            if fact_token == "subject_last":
                assert seen.endswith("France") and p.fact_index == p.subject_index
            elif fact_token == "subject_first":
                assert before.rstrip() == (context + "The capital of").rstrip()
                assert "France".startswith(seen[len(before) :].strip())
            else:  # the token after the subject: " is", here the prompt's last token
                assert before.endswith("France") and seen.endswith(" is")
                assert p.fact_index == p.subject_index + 1 == len(p.prompt_ids) - 1
        batch = PromptBatch.of(prompts, tok.pad_token_id)
        seen_inputs.clear()  # (capture_at_subject runs the model too)
        keys, _ = capture_at_subject(adapter, batch, [0], 1)
        for row, p in enumerate(prompts):
            seen_inputs.clear()
            model(input_ids=torch.tensor([p.prompt_ids]))
            assert torch.allclose(keys[0][row], seen_inputs["x"][0, p.fact_index], atol=1e-5)
    handle.remove()
    kl = kl_prompt(tok, "France", bos, "subject_first_after_last")  # "France is": read at " is"
    assert text_upto(kl.prompt_ids, kl.fact_index).endswith(" is") and kl.fact_index == kl.subject_index + 1
    # nothing after the subject in the prompt: the subject's last token, as the public implementation does
    tail = EditRequest(0, 0, "p", "The Eiffel Tower stands in Paris", "Paris", "France", "Poland")
    (p,) = request_prompts(tok, tail, [""], bos, "subject_first_after_last")
    assert p.fact_index == p.subject_index == len(p.prompt_ids) - 1


def piece(i, kind, answer, chain="c"):
    return KnowledgePiece(
        id=f"{chain}{i}/{kind}",
        hotpot_id=f"{chain}{i}",
        chain_id=f"{chain}{i}",
        kind=kind,
        hop={"hop1": 1, "hop2": 2, "question": 0}[kind],
        prompt=f"Subject {i} relates to",
        answer=answer,
        subject=f"Subject {i}",
        prompt_ids=[1],
        answer_ids=[2],
    )


def test_counterfactuals_are_seeded_of_the_same_kind_and_never_true():
    answers1 = ["Paris", "Rome", "the Rome", "Oslo", "Lima"]
    pieces = (
        [piece(i, "hop1", a) for i, a in enumerate(answers1)]
        + [piece(i, "hop2", a) for i, a in enumerate(["1844", "1901", "1844"])]
        + [piece(9, "question", "X")]
    )
    plan = plan_requests(pieces, 50, seed=3)
    assert len(plan.requests) == plan.eligible == 8  # every single-hop piece; questions are never edited
    for r in plan.requests:
        source = pieces[r.source_index]
        assert normalize_answer(r.target_new) != normalize_answer(source.answer)  # "the Rome" is Rome
        kind_answers = {p.answer for p in pieces if p.kind == source.kind}
        assert r.target_new in kind_answers
    again = plan_requests(pieces, 50, seed=3)
    assert [r.to_dict() for r in again.requests] == [r.to_dict() for r in plan.requests]
    first3 = plan_requests(pieces, 3, seed=3).requests
    assert [r.to_dict() for r in first3] == [r.to_dict() for r in plan.requests[:3]]  # a prefix of the larger plan
    other_seed = plan_requests(pieces, 50, seed=4).requests
    assert [r.source_index for r in other_seed] != [r.source_index for r in plan.requests]


def test_counterfactuals_keep_the_relation_when_other_pieces_share_it():
    facts = [
        ("The author of {} is", "Saga", ["Ann", "Bob", "Cyd"]),
        ("{} lies in", "Vale", ["Paris", "Rome"]),
    ]
    pieces = []
    for template, stem, answers in facts:
        for i, answer in enumerate(answers):
            p = piece(len(pieces), "hop1", answer)
            p.subject = f"{stem}{i}"
            p.prompt = template.format(p.subject)
            pieces.append(p)
    for seed in range(5):
        for r in plan_requests(pieces, 10, seed).requests:
            authors = r.target_true in ("Ann", "Bob", "Cyd")
            assert (r.target_new in ("Ann", "Bob", "Cyd")) == authors  # an author for an author, a city for a city


def test_shipped_hyperparameters():
    sets = shipped_hparams()
    published = {name: hp for name, hp in sets.items() if hp.source.startswith("published")}
    assert {"gpt2-xl", "gpt-j-6b", "llama-2-7b"} <= set(published)
    assert sets["gpt2-xl"].layers == [13, 14, 15, 16, 17] and sets["gpt2-xl"].mom2_update_weight == 20000
    assert sets["llama-2-7b"].v_weight_decay == 1e-3 and sets["llama-2-7b"].clamp_norm_factor == 4
    for name, hp in sets.items():  # every set says where it comes from; derived files are what the rule gives
        assert hp.source.startswith(("published", "derived", "measured")), name
        if hp.source.startswith("derived from"):
            origin = hp.source.split()[2]
            again = derive_hparams(sets[origin], origin, hp.model_type, hp.d_model, hp.num_layers, hp.key_dim)
            assert again == hp, name
    assert read_hparams_file(CONFIG_DIR / "gpt2-xl.yaml") == sets["gpt2-xl"]


def test_shipped_sets_are_package_data_and_configs_link_to_them():
    """An installed (non-editable) copy has them; configs/memit/*.yaml are relative links to the same files."""
    from pathlib import Path

    import lit_coupling

    package = Path(lit_coupling.__file__).resolve().parent
    assert CONFIG_DIR.resolve().parent.parent == package and CONFIG_DIR.name == "memit"
    links = sorted((package.parent / "configs" / "memit").glob("*.yaml"))
    assert [p.name for p in links] == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    for link in links:
        assert link.is_symlink() and not Path(link.readlink()).is_absolute(), link
        assert link.resolve() == (CONFIG_DIR / link.name).resolve()


def test_auto_picks_the_measured_sets_for_the_embedded_tiny_models():
    """tiny-gpt2 (gpt2, 128, 4 blocks, 512-dim keys) and tiny-llama (llama, 128, 4, 344): edited at the token after
    the subject, where they recall (docs/benchmarks.md, "Where the facts live")."""
    for shape in (("gpt2", 128, 4, 512), ("llama", 128, 4, 344)):
        hp = select_hparams(*shape)
        assert hp.source.startswith("derived by measurement"), shape
        assert hp.fact_token == "subject_first_after_last" and hp.layers == [0, 1]


def test_auto_hparams_pick_by_shape_and_scale_lambda_with_key_dimension():
    assert select_hparams("gpt2", 1600, 48, 6400).source.startswith("published")
    small = select_hparams("gpt2", 768, 12, 3072)
    assert small.layers == [3, 4] and small.mom2_update_weight == pytest.approx(20000 * 3072 / 6400)
    odd = select_hparams("mistral", 64, 4, 128, family="mistral")  # no set of its own: derived from LLaMA-2-7B
    assert odd.source.startswith("derived from llama-2-7b") and odd.mom2_update_weight == pytest.approx(
        15000 * 128 / 11008, abs=0.1
    )
    torch.manual_seed(0)
    adapter = ModelAdapter(AutoModelForCausalLM.from_config(tiny_config("gpt2", 100, layers=4)))
    hp = resolve_hparams("auto", adapter, "1,2")
    assert hp.layers == [1, 2] and "overridden" in hp.source
    assert resolve_hparams(MemitHparams(layers=[-1]), adapter).layers == [3]


def test_published_sets_use_no_shrinkage_and_deviations_name_every_departure():
    from lit_coupling.editing.hparams import PAPER, deviations

    sets = shipped_hparams()
    for name, hp in sets.items():
        assert str(hp.mom2_shrinkage) == "none", name  # the published algorithm, in every shipped set
    for name in PAPER:
        assert deviations(sets[name]) == [], name  # a PUBLISHED set is the paper's, value for value
        for key, value in PAPER[name].items():
            assert getattr(sets[name], key) == value, (name, key)
    shrunk = replace(sets["gpt2-xl"], mom2_shrinkage="ledoit-wolf")
    assert any(d.startswith("mom2_shrinkage = 'ledoit-wolf'") for d in deviations(shrunk))
    moved = replace(sets["llama-2-7b"], layers=[5, 6], source=sets["llama-2-7b"].source + "; layers overridden")
    assert any(d.startswith("layers = [5, 6]") for d in deviations(moved))
    tiny = deviations(sets["tiny-gpt2"], {"corpus": "world-text:w.json", "tokens": 100000, "texts": 7790})
    assert any("not published" in d for d in tiny) and any("fact_token" in d for d in tiny)
    assert any("100000 tokens (7790 texts)" in d and "counts texts" in d for d in tiny)
    derived = deviations(sets["gpt2"])
    assert len(derived) == 1 and "derived from gpt2-xl" in derived[0]
