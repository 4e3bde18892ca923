"""The fast MEMIT (`lit_coupling.editing.memit`) against a naive float64 one written from the paper's equations
(tests/naive_memit.py), stage by stage, on tiny random models of two families: keys, target vectors, residuals
and ΔW agree to 1e-5 relative."""

import copy
import random
import time

import pytest
import torch

from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.memit import (
    CovarianceSolver,
    PromptBatch,
    _mean_keys,
    apply_memit,
    capture_at_subject,
)
from lit_coupling.editing.requests import EditRequest, kl_prompt, request_prompts
from lit_coupling.models.adapters import ModelAdapter, bos_ids, ensure_padding
from tests.naive_memit import naive_covariance, naive_key, naive_memit

TOLERANCE = 1e-5
PREFIXES = ["Marie Curie was born in Warsaw. ", "The Eiffel Tower stands. "]
REQUEST = EditRequest(0, -1, "c0", "The capital of France is", "France", "Paris", "Warsaw")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setting(request, tmp_path_factory):
    """A tiny random model of the family, its prompts and covariances, and one edit made by each implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    # 4 blocks, edits at 0-1: the last edit layer must have blocks after it, or δ cannot reach the answer
    directory = save_tiny_model(tmp_path_factory.mktemp(f"parity-{request.param}"), request.param, layers=4)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    pad = ensure_padding(tok)
    bos = bos_ids(model.config, tok)
    # the published optimisation settings, fewer steps (each naive step is 4 whole forwards and a backward)
    hp = MemitHparams(layers=[0, 1], v_num_grad_steps=10, mom2_update_weight=4.0, context_prefixes=len(PREFIXES))
    adapter = ModelAdapter(model, layers=hp.layers)
    rng = random.Random(0)  # random token sequences: C from 400 keys for 64-128 key dimensions, well conditioned
    sequences = [bos + [rng.randrange(3, len(tok)) for _ in range(16)] for _ in range(25)]
    covariances = {layer: naive_covariance(adapter, layer, sequences) for layer in hp.layers}
    prompts = request_prompts(tok, REQUEST, ["", *PREFIXES], bos, hp.fact_token)
    kl = kl_prompt(tok, REQUEST.subject, bos, hp.fact_token)

    fast_adapter = ModelAdapter(copy.deepcopy(model), layers=hp.layers)
    naive_adapter = ModelAdapter(copy.deepcopy(model), layers=hp.layers)
    before = {layer: fast_adapter.target(layer).weight().detach().clone() for layer in hp.layers}
    solvers = {layer: CovarianceSolver(c) for layer, c in covariances.items()}
    start = time.perf_counter()
    fast = apply_memit(fast_adapter, tok, [REQUEST], hp, solvers, PREFIXES, bos, pad)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_memit(naive_adapter, prompts, kl, hp, covariances)
    naive_s = time.perf_counter() - start
    print(f"\n{request.param}: one edit, fast {fast_s:.3f} s, naive {naive_s:.3f} s ({naive_s / fast_s:.1f}x)")
    yield dict(
        model=model,
        adapter=adapter,
        pad=pad,
        hp=hp,
        prompts=prompts,
        kl=kl,
        fast=fast,
        naive=naive,
        fast_adapter=fast_adapter,
        naive_adapter=naive_adapter,
        before=before,
    )
    torch.set_num_threads(threads)


def test_keys(setting):
    """Keys of the unedited model at each edit layer (bare prompt and prefixes, averaged as published)."""
    s = setting
    batch = PromptBatch.of(s["prompts"], s["pad"])
    for layer in s["hp"].layers:
        keys, _ = capture_at_subject(s["adapter"], batch, [layer], s["hp"].layers[-1])
        fast = _mean_keys(keys[layer], 1, len(s["prompts"]))[:, 0]
        naive = naive_key(s["model"], s["adapter"].target(layer).module, s["prompts"])
        assert relative(fast, naive) <= TOLERANCE


def test_target_vector(setting):
    fast, naive = setting["fast"].targets[0], setting["naive"]
    assert fast.steps == naive.steps == setting["hp"].v_num_grad_steps
    assert relative(fast.z, naive.z) <= TOLERANCE
    assert fast.delta_norm > 0.1 * fast.h_norm  # the optimisation moved h: not a trivially equal zero δ


def test_residuals(setting):
    for layer in setting["hp"].layers:
        naive = setting["naive"].residuals[layer].norm().item()
        assert setting["fast"].residual_norms[layer] == pytest.approx(naive, rel=TOLERANCE)
    # the first layer's update moved what the second sees
    first, second = setting["hp"].layers
    assert relative(setting["naive"].residuals[second], setting["naive"].residuals[first]) > 1e-3


def test_updates(setting):
    s = setting
    for layer in s["hp"].layers:
        fast_delta = s["fast_adapter"].target(layer).weight().detach() - s["before"][layer]
        assert s["naive"].deltas[layer].norm() > 0
        assert relative(fast_delta, s["naive"].deltas[layer]) <= TOLERANCE, layer
        assert (
            relative(s["fast_adapter"].target(layer).weight(), s["naive_adapter"].target(layer).weight()) <= TOLERANCE
        )
