"""Causal tracing of the MLP: the batched trace against one plain patched forward per layer, a tiny model whose only
working MLP is known, and the band choice against every window."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.requests import subject_span, tokenize_with_subject
from lit_coupling.editing.tracing import TraceFact, best_band, causal_trace, mlp_indirect_effects, trace_band
from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.scoring import answer_logprobs, collate_clozes
from tests.tiny import TEXTS, tiny_config

FACTS = [
    TraceFact("f0", "The capital of France is", "France", "Paris"),
    TraceFact("f1", "Marie Curie was born in", "Marie Curie", "Warsaw"),
    TraceFact("f2", "The Eiffel Tower stands in", "Eiffel Tower", "Paris"),
    TraceFact("f3", "Warsaw is the capital of", "Warsaw", "Poland"),
    TraceFact("f4", "Arthur's Magazine was started in", "Arthur's Magazine", "1844"),
    TraceFact("f5", "First for Women is a", "First for Women", "magazine"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320, style="llama")


def tiny_llama(tokenizer, layers=4, seed=0):
    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), layers=layers, width=32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    model.requires_grad_(False)
    return model, ModelAdapter(model)


def brute_force_effects(adapter, tokenizer, fact, bos, pad_id, samples, sigma, generator):
    """One plain forward per layer (torch's own hooks, nothing shared with the code under test): the clean MLP
    outputs from a clean run, then each layer's output at the subject's last token put back into a noisy run."""
    model, embed = adapter.model, adapter.embedding
    start, end = subject_span(fact.prompt, fact.subject)
    tp = tokenize_with_subject(tokenizer, fact.prompt, end, fact.answer, bos, start, "subject_last")
    noise = (
        torch.randn(samples, tp.subject_index + 1 - tp.subject_first, embed.weight.shape[1], generator=generator)
        * sigma
    )
    batch = collate_clozes([(tp.prompt_ids, tp.answer_ids)] * samples, pad_id)
    mlps = [adapter.target(layer).module for layer in range(adapter.num_layers)]

    def p_answer(logits, rows):
        return answer_logprobs(logits, batch["input_ids"][:rows], batch["answer_mask"][:rows]).exp()

    clean = {}
    handles = [
        m.register_forward_hook(lambda _m, _a, out, layer=layer: clean.__setitem__(layer, out[0].clone()))
        for layer, m in enumerate(mlps)
    ]
    p_clean = p_answer(model(input_ids=batch["input_ids"][:1]).logits, 1)[0].item()
    for h in handles:
        h.remove()

    def noisy(_m, _a, out):
        out = out.clone()
        out[:, tp.subject_first : tp.subject_index + 1] += noise
        return out

    def run(layer=None):
        handles = [embed.register_forward_hook(noisy)]
        if layer is not None:

            def put_back(_m, _a, out):
                out = out.clone()
                out[:, tp.subject_index] = clean[layer][tp.subject_index]
                return out

            handles.append(mlps[layer].register_forward_hook(put_back))
        p = p_answer(model(input_ids=batch["input_ids"]).logits, samples).mean().item()
        for h in handles:
            h.remove()
        return p

    p_corrupt = run()
    return p_clean, p_corrupt, [run(layer) - p_corrupt for layer in range(adapter.num_layers)]


def test_batched_mlp_trace_equals_a_patched_forward_per_layer(tokenizer):
    model, adapter = tiny_llama(tokenizer)
    bos, pad_id = adapter.bos_ids(tokenizer), tokenizer.pad_token_id
    samples = 3
    # max_rows 7: two layers per forward (and a last chunk of one layer in another test below), not one
    got = mlp_indirect_effects(adapter, tokenizer, FACTS, bos, pad_id, samples=samples, seed=5, max_rows=7)
    generator = torch.Generator().manual_seed(5)
    sigma = 3.0 * adapter.embedding.weight.float().std().item()
    want, hurt = {}, []
    for fact in FACTS:
        p_clean, p_corrupt, effects = brute_force_effects(
            adapter, tokenizer, fact, bos, pad_id, samples, sigma, generator
        )
        if p_clean > p_corrupt:
            want[fact.id] = effects
            hurt.append((p_clean, p_corrupt))
    assert want, "the noise hurt no fact: nothing was compared"
    assert sorted(got["per_fact"]) == sorted(want)
    for fact_id, effects in want.items():
        np.testing.assert_allclose(got["per_fact"][fact_id], effects, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["effects"], np.mean(list(want.values()), axis=0), rtol=1e-9, atol=1e-12)
    assert got["facts"] == len(want)
    assert got["left_out"]["corruption does not lower P(answer)"] == len(FACTS) - len(want)
    assert got["p_clean"] == pytest.approx(np.mean([c for c, _ in hurt]))
    assert got["p_corrupt"] == pytest.approx(np.mean([c for _, c in hurt]))


def test_the_mlp_trace_is_causal_traces_mlp_row(tokenizer):
    """The batched trace and the older one-restoration-per-forward `causal_trace` agree on the same draws."""
    model, adapter = tiny_llama(tokenizer, layers=3, seed=1)
    bos, pad_id = adapter.bos_ids(tokenizer), tokenizer.pad_token_id
    pieces = [
        KnowledgePiece(
            id=f.id,
            hotpot_id=f.id,
            chain_id=f.id,
            kind="hop1",
            hop=1,
            prompt=f.prompt,
            answer=f.answer,
            subject=f.subject,
        )
        for f in FACTS
    ]
    old = causal_trace(adapter, tokenizer, pieces, bos, pad_id, samples=4, seed=2)
    new = mlp_indirect_effects(adapter, tokenizer, FACTS, bos, pad_id, samples=4, seed=2, max_rows=8)
    assert old["pieces"] == new["facts"] > 0
    np.testing.assert_allclose(new["effects"], old["mlp"], rtol=1e-7, atol=1e-10)
    assert new["p_clean"] == pytest.approx(old["p_clean"]) and new["p_corrupt"] == pytest.approx(old["p_corrupt"])


def test_only_the_working_mlp_has_an_effect_and_the_band_holds_it(tokenizer):
    """A planted answer: every MLP but layer 3's writes exactly zero, so restoring any other changes nothing (an
    effect of exactly 0), and layer 3's output is scaled up until it dominates the residual stream. The subject ends
    each prompt, so the answer is read from the state layer 3 writes at the subject's last token: restoring it
    there gives back most of P(answer). The band must hold layer 3."""
    model, adapter = tiny_llama(tokenizer, layers=6, seed=3)
    planted = 3
    with torch.no_grad():
        for layer in range(6):
            weight = adapter.target(layer).module.weight
            weight.mul_(50.0) if layer == planted else weight.zero_()
    bos, pad_id = adapter.bos_ids(tokenizer), tokenizer.pad_token_id
    words = sorted({w.strip(".'s") for text in TEXTS for w in text.split()} - {""})
    facts = []
    for i, (prompt, subject) in enumerate(
        [
            ("The capital of France", "France"),
            ("Marie Curie was born in Warsaw", "Warsaw"),
            ("The Eiffel Tower", "Eiffel Tower"),
            ("Warsaw is the capital of Poland", "Poland"),
            ("First for Women", "First for Women"),
        ]
    ):
        items = [tokenize_with_subject(tokenizer, prompt, len(prompt), w, bos) for w in words]
        logits = model(
            **{
                k: v
                for k, v in collate_clozes([(t.prompt_ids, t.answer_ids) for t in items], pad_id).items()
                if k in ("input_ids", "attention_mask")
            }
        )
        batch = collate_clozes([(t.prompt_ids, t.answer_ids) for t in items], pad_id)
        p = answer_logprobs(logits.logits, batch["input_ids"], batch["answer_mask"])
        facts.append(TraceFact(f"p{i}", prompt, subject, words[int(p.argmax())]))  # the likeliest word
    trace = mlp_indirect_effects(adapter, tokenizer, facts, bos, pad_id, samples=4, seed=0)
    assert trace["facts"] >= 3
    effects = trace["effects"]
    assert all(effects[layer] == 0.0 for layer in range(6) if layer != planted)
    assert effects[planted] > 0
    record = trace_band(adapter, tokenizer, facts, bos, pad_id, width=2, scaled=[0, 1], samples=4)
    assert record["layers"] == [2, 3]  # both windows holding layer 3 tie: the lower one
    assert record["band_effect"] == pytest.approx(effects[planted] / 2)
    assert record["scaled_effect"] == 0.0
    assert record["indirect_effect"] == pytest.approx(effects)
    assert record["facts_traced"] == [f.id for f in facts] and "layers 2-3" in record["reason"]
    # A trace that too few facts inform keeps the scaled band and says why.
    few = trace_band(adapter, tokenizer, facts[:2], bos, pad_id, width=2, scaled=[0, 1], samples=4)
    assert few["layers"] is None and "scaled band is kept" in few["reason"]


def test_best_band_is_the_best_window_of_every_window():
    rng = np.random.default_rng(0)
    for _ in range(50):
        effects = rng.normal(size=int(rng.integers(1, 12))).tolist()
        width = int(rng.integers(1, 8))
        band, means = best_band(effects, width)
        w = min(width, len(effects))
        windows = [np.mean(effects[i : i + w]) for i in range(len(effects) - w + 1)]
        np.testing.assert_allclose(means, windows)
        assert band == list(range(int(np.argmax(windows)), int(np.argmax(windows)) + w))
    assert best_band([0.0, 1.0, 1.0, 0.0], 1)[0] == [1]  # a tie: the lower window


def test_the_report_says_which_band_was_chosen_and_why():
    from lit_coupling.analysis.report import layer_choice_text

    choice = {
        "layers": [2, 3],
        "scaled_layers": [1, 2],
        "indirect_effect": [0.0, 0.01, 0.2, 0.3],
        "facts": 7,
        "p_clean": 0.5,
        "p_corrupt": 0.1,
        "band_effect": 0.25,
        "scaled_effect": 0.105,
    }
    text = layer_choice_text(choice)
    assert "2–3 (the hyperparameters' band: 1–2)" in text and "over 7 known, unedited facts" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[-1].rstrip(" |") for row in rows] == ["", "set's own", "chosen", "chosen"]
    kept = layer_choice_text({**choice, "layers": None, "reason": "only 1 traced fact(s) lost P(answer)"})
    assert "kept the hyperparameters' band 1–2: only 1 traced fact(s)" in kept
