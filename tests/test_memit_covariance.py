"""Key statistics: what is accumulated, over exactly how many tokens, the cache, resuming a pass."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.editing.covariance import (
    Corpus,
    hotpot_paragraphs,
    key_covariances,
    resolve_corpus,
    token_batches,
)
from lit_coupling.errors import UserError
from lit_coupling.inject.tokenizer import train_bpe_tokenizer
from lit_coupling.models.adapters import ModelAdapter
from tests.tiny import TEXTS, tiny_config

DOCS = [f"{t} Number {i} follows." for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def setup():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, style="gpt2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok), layers=3)).eval()
    return ModelAdapter(model), tok


def corpus():
    return Corpus("docs", "fingerprint", lambda: iter(DOCS))


def test_second_moment_of_the_mlp_output_inputs_over_exactly_n_tokens(setup, tmp_path):
    adapter, tok = setup
    tokens = 500
    covs, metas = key_covariances(
        adapter, tok, [0, 2], corpus(), tokens, tmp_path, "m", max_length=16, batch_size=4, progress=False
    )
    # direct: run every window alone, take the first `tokens` keys in reading order
    keys = {0: [], 2: []}
    handles = [
        adapter.target(layer).module.register_forward_pre_hook(
            lambda m, a, layer=layer: keys[layer].append(a[0][0])
        )
        for layer in (0, 2)
    ]
    with torch.no_grad():
        for batch in token_batches(tok, DOCS, [], 16, 4):
            for ids in batch:
                adapter.model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    for layer in (0, 2):
        k = torch.cat(keys[layer])[:tokens].double()
        assert metas[layer]["tokens"] == tokens
        assert torch.allclose(covs[layer].double(), k.T @ k / tokens, rtol=1e-4, atol=1e-6)
        assert metas[layer]["mean_fourth_power"] == pytest.approx(
            float((k.pow(2).sum(1) ** 2).mean()), rel=1e-6
        )


def test_statistics_are_cached_by_model_layer_corpus_and_count(setup, tmp_path):
    adapter, tok = setup
    first, meta = key_covariances(adapter, tok, [1], corpus(), 300, tmp_path, "m", progress=False)
    assert not meta[1]["cached"]
    again, meta = key_covariances(
        adapter, tok, [1], corpus(), 300, tmp_path, "m", progress=False, compute=False
    )
    assert meta[1]["cached"] and torch.equal(first[1], again[1])
    with pytest.raises(FileNotFoundError):  # another token count is another entry
        key_covariances(adapter, tok, [1], corpus(), 301, tmp_path, "m", compute=False)
    with pytest.raises(FileNotFoundError):  # so is another corpus
        key_covariances(
            adapter, tok, [1], Corpus("docs", "other", lambda: iter(DOCS)), 300, tmp_path, "m", compute=False
        )
    with torch.no_grad():  # and another model (retrained weights, same name)
        adapter.target(0).module.weight[0, 0] += 1
    try:
        with pytest.raises(FileNotFoundError):
            key_covariances(adapter, tok, [1], corpus(), 300, tmp_path, "m", compute=False)
    finally:
        with torch.no_grad():
            adapter.target(0).module.weight[0, 0] -= 1


def test_an_interrupted_computation_resumes_where_it_stopped(setup, tmp_path):
    adapter, tok = setup

    def covariances(folder: str, **extra):
        return key_covariances(adapter, tok, [0, 1], corpus(), 800, tmp_path / folder, "m", max_length=16,
                               batch_size=4, progress=False, **extra)

    whole, _ = covariances("a")
    calls = {"n": 0}

    def crash(_module, _args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    handle = adapter.blocks[0].register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        covariances("b", checkpoint_every_s=0)
    handle.remove()
    assert list((tmp_path / "b").rglob("partial__*"))  # the checkpoint of the first 5 batches
    calls["n"] = 0
    handle = adapter.blocks[0].register_forward_pre_hook(lambda m, a: calls.update(n=calls["n"] + 1))
    try:
        resumed, _ = covariances("b")
    finally:
        handle.remove()
    total = sum(1 for _ in token_batches(tok, DOCS, [], 16, 4))
    assert calls["n"] < total - 4  # the first batches were not run again
    for layer in (0, 1):
        assert torch.equal(resumed[layer], whole[layer])  # bit for bit what one uninterrupted pass gives
    assert not list((tmp_path / "b").rglob("partial__*"))


def test_corpora(tmp_path):
    records = [
        {"_id": "a", "context": [["T", ["First sentence.", " Second one."]], ["U", ["Other."]]]},
        {
            "_id": "b",
            "context": {"title": ["T", "V"], "sentences": [["First sentence.", " Second one."], ["More."]]},
        },
    ]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(records))
    assert list(hotpot_paragraphs(path)) == ["First sentence. Second one.", "Other.", "More."]  # deduplicated
    assert list(resolve_corpus("hotpot", path).documents()) == list(hotpot_paragraphs(path))
    text = tmp_path / "wiki.txt"
    text.write_text("one doc\n\nanother doc\n")
    assert list(resolve_corpus(str(text)).documents()) == ["one doc", "another doc"]
    with pytest.raises(UserError, match="cov_corpus"):
        resolve_corpus("hotpot", None)
    with pytest.raises(UserError, match="not a file"):
        resolve_corpus(str(tmp_path / "missing.txt"))
