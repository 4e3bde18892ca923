"""Mass editing (#19): B requests as one MEMIT edit against the naive float64 MEMIT of the parity test
(tests/naive_memit.py, batched as the paper's Algorithm 1), on tiny random models of two families; B = 1 against the
single-request path."""

import copy

import pytest
import torch

from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.memit import (
    CovarianceSolver,
    PrefixCachedEditor,
    PromptBatch,
    ResidualEditor,
    apply_memit,
    optimise_target,
    optimise_targets,
)
from lit_coupling.editing.requests import EditRequest, kl_prompt, request_prompts
from lit_coupling.models.adapters import ModelAdapter, bos_ids, ensure_padding
from tests.naive_memit import naive_covariance, naive_memit_batch
from tests.test_memit_parity import PREFIXES, relative

TOLERANCE = 1e-5
REQUESTS = [
    EditRequest(0, -1, "c0", "The capital of France is", "France", "Paris", "Warsaw"),
    EditRequest(1, -1, "c1", "Marie Curie was born in", "Marie Curie", "Warsaw", "Paris"),
    EditRequest(2, -1, "c2", "Arthur's Magazine was started in", "Arthur's Magazine", "1844", "Poland"),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setting(request, tmp_path_factory):
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = save_tiny_model(tmp_path_factory.mktemp(f"batch-{request.param}"), request.param, layers=4)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    pad = ensure_padding(tok)
    bos = bos_ids(model.config, tok)
    hp = MemitHparams(layers=[0, 1], v_num_grad_steps=8, mom2_update_weight=4.0, context_prefixes=len(PREFIXES))
    adapter = ModelAdapter(model, layers=hp.layers)
    rng = random.Random(0)
    sequences = [bos + [rng.randrange(3, len(tok)) for _ in range(16)] for _ in range(25)]
    covariances = {layer: naive_covariance(adapter, layer, sequences) for layer in hp.layers}
    solvers = {layer: CovarianceSolver(c) for layer, c in covariances.items()}
    rewrites = [request_prompts(tok, r, ["", *PREFIXES], bos, hp.fact_token) for r in REQUESTS]
    kls = [kl_prompt(tok, r.subject, bos, hp.fact_token) for r in REQUESTS]
    yield dict(
        model=model,
        tok=tok,
        pad=pad,
        bos=bos,
        hp=hp,
        solvers=solvers,
        covariances=covariances,
        rewrites=rewrites,
        kls=kls,
    )
    torch.set_num_threads(threads)


def _edit(s, requests):
    adapter = ModelAdapter(copy.deepcopy(s["model"]), layers=s["hp"].layers)
    before = {layer: adapter.target(layer).weight().detach().clone() for layer in s["hp"].layers}
    result = apply_memit(adapter, s["tok"], requests, s["hp"], s["solvers"], PREFIXES, s["bos"], s["pad"])
    deltas = {layer: adapter.target(layer).weight().detach() - before[layer] for layer in s["hp"].layers}
    return result, deltas


def test_a_batch_is_one_memit_edit_as_the_naive_float64_one(setting):
    s = setting
    fast, deltas = _edit(s, REQUESTS)
    naive_adapter = ModelAdapter(copy.deepcopy(s["model"]), layers=s["hp"].layers)
    naive = naive_memit_batch(naive_adapter, s["rewrites"], s["kls"], s["hp"], s["covariances"])
    z = torch.stack([t.z for t in fast.targets], 1)
    assert relative(z, naive.z) <= TOLERANCE
    for layer in s["hp"].layers:
        assert naive.deltas[layer].norm() > 0
        assert relative(deltas[layer], naive.deltas[layer]) <= TOLERANCE, layer
        # the update is rank B and its factors (the forecast's input) rebuild it
        u, v = fast.updates[layer]
        assert u.shape[1] == len(REQUESTS)
        assert relative(u @ v.T, naive.deltas[layer]) <= TOLERANCE
        assert torch.linalg.matrix_rank(naive.deltas[layer]).item() == len(REQUESTS)


def test_a_batch_is_not_the_sum_of_its_single_edits(setting):
    """The joint solve shares λC + K Kᵀ: the batch's ΔW differs from the sum of single-edit ΔWs (else batching
    would be trivial), while each request's target vector is its own."""
    s = setting
    joint, joint_deltas = _edit(s, REQUESTS)
    singles = [_edit(s, [r]) for r in REQUESTS]
    for i, (single, _) in enumerate(singles):
        assert relative(joint.targets[i].z, single.targets[0].z) <= TOLERANCE
    layer = s["hp"].layers[0]
    summed = sum(d[layer] for _, d in singles)
    assert relative(summed, joint_deltas[layer]) > 1e-3


def test_batched_target_vectors_equal_the_single_request_ones(setting):
    """optimise_targets runs B requests' rows in one forward per step; each δ gets its own Adam, early stop and
    clamp: the same target vectors as B separate optimisations. B = 1 takes the single-request path itself."""
    s = setting
    adapter = ModelAdapter(copy.deepcopy(s["model"]), layers=s["hp"].layers)
    batched = optimise_targets(adapter, s["rewrites"], s["kls"], s["hp"], s["pad"])
    for rewrite, kl, got in zip(s["rewrites"], s["kls"], batched):
        want = optimise_target(adapter, rewrite, kl, s["hp"], s["pad"])
        assert got.steps == want.steps
        assert relative(got.z, want.z) <= TOLERANCE
        assert got.nll == pytest.approx(want.nll, rel=1e-6, abs=1e-9)
    one = optimise_targets(adapter, s["rewrites"][:1], s["kls"][:1], s["hp"], s["pad"])[0]
    alone = optimise_target(adapter, s["rewrites"][0], s["kls"][0], s["hp"], s["pad"])
    assert torch.equal(one.z, alone.z)


def test_early_stop_is_per_request(setting):
    """A request that reaches the loss floor stops there while the others go on, as if optimised alone."""
    s = setting
    from dataclasses import replace

    adapter = ModelAdapter(copy.deepcopy(s["model"]), layers=s["hp"].layers)
    singles = [optimise_target(adapter, rw, kl, s["hp"], s["pad"]) for rw, kl in zip(s["rewrites"], s["kls"])]
    # a floor between the requests' final losses: some stop early, some do not
    losses = sorted(t.nll for t in singles)
    hp = replace(s["hp"], early_stop_loss=(losses[0] + losses[-1]) / 2 + 1e-3, v_num_grad_steps=12)
    want = [optimise_target(adapter, rw, kl, hp, s["pad"]) for rw, kl in zip(s["rewrites"], s["kls"])]
    got = optimise_targets(adapter, s["rewrites"], s["kls"], hp, s["pad"])
    assert len({t.steps for t in want}) > 1
    for g, w in zip(got, want):
        assert g.steps == w.steps
        assert relative(g.z, w.z) <= TOLERANCE


def test_prefix_cached_logits_equal_the_full_model(setting):
    """The tokens before each row's fact token run once as a KV cache; each step's logits (any per-row δ) equal
    the later-layers editor's, which runs every token."""
    s = setting
    prompts = [p for rw, kl in zip(s["rewrites"], s["kls"]) for p in (*rw, kl)]
    batch = PromptBatch.of(prompts, s["pad"])
    target = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
    adapter = ModelAdapter(s["model"], layers=s["hp"].layers)
    cached = PrefixCachedEditor(adapter, batch, 1, target)
    plain = ResidualEditor(adapter, batch, 1, target)
    assert cached.ok
    assert int(cached.width_p) > 1 and cached.suffix_ids.shape[1] < batch.input_ids.shape[1]
    delta = torch.randn(len(prompts), adapter.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(cached.logits(delta), plain.logits(delta), rtol=1e-9, atol=1e-9)
    assert torch.allclose(cached.logits(delta[0]), plain.logits(delta[0]), rtol=1e-9, atol=1e-9)


def test_rows_grouped_by_suffix_length_give_the_same_logits(setting, monkeypatch):
    """GroupedEditor: rows of about the same suffix length share a PrefixCachedEditor; the logits (any per-row δ) and
    the hidden states at the fact tokens are those of the later-layers editor over the whole batch."""
    from lit_coupling.editing.memit import GroupedEditor

    s = setting
    prompts = [p for rw, kl in zip(s["rewrites"], s["kls"]) for p in (*rw, kl)]
    batch = PromptBatch.of(prompts, s["pad"])
    target = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
    adapter = ModelAdapter(s["model"], layers=s["hp"].layers)
    monkeypatch.setattr(GroupedEditor, "GROUP_OVERHEAD", 0)  # a group per suffix length
    grouped = GroupedEditor(adapter, batch, 1, target)
    plain = ResidualEditor(adapter, batch, 1, target)
    suffixes = set((batch.attention_mask.sum(1) - batch.fact_index).tolist())
    assert grouped.ok and len(grouped.groups) == len(suffixes) > 1
    delta = torch.randn(len(prompts), adapter.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(grouped.logits(delta), plain.logits(delta), rtol=1e-9, atol=1e-9)
    assert torch.allclose(grouped.fact_hidden, plain.fact_hidden, rtol=1e-12, atol=1e-12)
