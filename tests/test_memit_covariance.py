"""Key statistics: what is accumulated, over exactly how many tokens, the cache, resuming a pass."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.editing.covariance import (
    Corpus,
    hotpot_paragraphs,
    key_covariances,
    length_batches,
    resolve_corpus,
    token_windows,
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
        adapter.target(layer).module.register_forward_pre_hook(lambda m, a, layer=layer: keys[layer].append(a[0][0]))
        for layer in (0, 2)
    ]
    with torch.no_grad():
        for ids in token_windows(tok, DOCS, [], 16):  # reading order
            adapter.model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    for layer in (0, 2):
        k = torch.cat(keys[layer])[:tokens].double()
        assert metas[layer]["tokens"] == tokens
        assert torch.allclose(covs[layer].double(), k.T @ k / tokens, rtol=1e-4, atol=1e-6)
        assert metas[layer]["mean_fourth_power"] == pytest.approx(float((k.pow(2).sum(1) ** 2).mean()), rel=1e-6)


def test_statistics_are_cached_by_model_layer_corpus_and_count(setup, tmp_path):
    adapter, tok = setup
    first, meta = key_covariances(adapter, tok, [1], corpus(), 300, tmp_path, "m", progress=False)
    assert not meta[1]["cached"]
    again, meta = key_covariances(adapter, tok, [1], corpus(), 300, tmp_path, "m", progress=False, compute=False)
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
        return key_covariances(
            adapter,
            tok,
            [0, 1],
            corpus(),
            800,
            tmp_path / folder,
            "m",
            max_length=16,
            batch_size=4,
            progress=False,
            **extra,
        )

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
    total = len(length_batches(token_windows(tok, DOCS, [], 16), 4 * 16))
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


def test_texts_are_counted_beside_tokens(setup, tmp_path):
    """cov_tokens counts tokens; the reference's mom2_n_samples counts texts: both are recorded."""
    from lit_coupling.editing.covariance import texts_read

    adapter, tok = setup
    _, metas = key_covariances(
        adapter, tok, [0], corpus(), 200, tmp_path, "m", max_length=16, batch_size=4, progress=False
    )
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    expected = next(i + 1 for i in range(len(DOCS)) if sum(lengths[: i + 1]) >= 200)
    assert metas[0]["texts"] == expected
    assert texts_read([(0, 10), (0, 6), (1, 10), (2, 4)], 17) == 2
    assert texts_read([(0, 10)], 50) == 1 and texts_read([], 5) == 0


def test_short_texts_share_a_batch_by_padded_area():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, style="gpt2")
    windows = token_windows(tok, TEXTS[:40], [], 64)
    assert windows == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:40]]
    batches = length_batches(windows, 4 * 64)
    assert all(len(b) * max(map(len, b)) <= 4 * 64 for b in batches)
    assert max(map(len, batches)) > 4  # more than batch_size short windows in one batch
    assert sorted(w for b in batches for w in b) == sorted(windows)  # every window once
    # sorted by length: the padded area is less than in reading order, batches of the same rows and area
    padded = sum(len(b) * max(map(len, b)) for b in batches)
    in_order, row = 0, []
    for w in windows:
        if row and (len(row) + 1) * max(map(len, row + [w])) > 4 * 64:
            in_order += len(row) * max(map(len, row))
            row = []
        row.append(w)
    in_order += len(row) * max(map(len, row))
    assert padded < in_order


def test_windows_stop_at_exactly_the_tokens_asked_for():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, style="gpt2")
    seen: list = []
    windows = token_windows(tok, DOCS, [0], 16, tokens=101, windows=seen)
    assert sum(map(len, windows)) == 101 and all(w[0] == 0 and len(w) <= 16 for w in windows)
    assert [n for _, n in seen] == list(map(len, windows))
    whole = token_windows(tok, DOCS, [0], 16)
    assert windows[:-1] == whole[: len(windows) - 1] and whole[len(windows) - 1][: len(windows[-1])] == windows[-1]


def test_condition_number_and_tokens_per_dimension():
    from lit_coupling.editing.covariance import MIN_TOKENS_PER_DIM, covariance_quality, covariance_totals

    torch.manual_seed(0)
    scales = torch.tensor([1.0, 2.0, 4.0, 8.0])
    keys = torch.randn(4000, 4, dtype=torch.float64) * scales
    c = keys.T @ keys / len(keys)
    q = covariance_quality(c, 4000, 300)
    eig = torch.linalg.eigvalsh(c)
    assert q["condition_number"] == pytest.approx(float(eig[-1] / eig[0]))
    assert 40 < q["condition_number"] < 90  # ≈ (8/1)² = 64: the scales' spread, squared
    assert q["tokens_per_dim"] == 1000 and q["texts"] == 300 and q["well_estimated"]
    with pytest.warns(UserWarning, match="per dimension"):
        few = covariance_quality(c, int(MIN_TOKENS_PER_DIM * 4) - 1)
    assert not few["well_estimated"]
    singular = keys[:2].T @ keys[:2]  # rank 2 in 4 dimensions
    with pytest.warns(UserWarning, match="singular"):
        assert covariance_quality(singular, 4000)["condition_number"] is None
    totals = covariance_totals({"0": q, "1": few})
    assert totals["min_tokens_per_dim"] == few["tokens_per_dim"] and totals["texts"] == 300


def test_a_synthetic_world_gives_endless_text_of_its_kind(tmp_path):
    import itertools

    from lit_coupling.data.world import WorldSpec, generate_world, write_world

    world_file, _ = write_world(WorldSpec(chains=5, seed=3), tmp_path / "w.json")
    corpus = resolve_corpus("hotpot", world_file)
    assert corpus.name == "world-text:w.json"
    texts = list(itertools.islice(corpus.documents(), 3000))
    world = generate_world(WorldSpec(chains=5, seed=3))
    own = {s for f in world.facts for s in f.paraphrases()}
    first_round = len(own) * 8  # every fact, template and training prefix
    assert {t.split(": ")[-1].split("? ")[-1] for t in texts[:first_round]} == own
    assert len(set(texts)) > first_round  # then further worlds (seeds 4, 5, ...), as long as asked
    assert list(itertools.islice(corpus.documents(), 50)) == texts[:50]  # seeded
    # any other HotpotQA file stays its context paragraphs
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"_id": "a", "context": [["T", ["One.", " Two."]]]}]))
    assert list(resolve_corpus("hotpot", plain).documents()) == ["One. Two."]
