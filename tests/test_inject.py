"""Knowledge injection: `fit` teaches a tiny model its world and saves it like a hub model; embedded names."""

import threading
from itertools import pairwise

import pytest
import torch
import yaml

from lit_coupling.cache import model_complete
from lit_coupling.data.build import build_pieces
from lit_coupling.inject import embedded
from lit_coupling.inject.callbacks import greedy_recall
from lit_coupling.inject.module import warmup_then_decay
from lit_coupling.models import embedded as embedded_names
from lit_coupling.models.loading import load_model
from lit_coupling.outputs import read_json


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fit_teaches_the_facts_and_saves_a_hub_style_model(trained_tiny_model, family):
    model_dir, world = trained_tiny_model(family)
    assert {"config.json", "model.safetensors", "tokenizer.json", "injection.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    loaded = load_model(str(model_dir), device="cpu")
    assert loaded.model.config.model_type == family
    report = read_json(model_dir / "injection.json")
    assert report["recall"]["recall"] >= 0.97 and report["steps"] < 1200  # stopped at its target, not at max_steps
    assert [row["step"] for row in report["recall_history"]] == sorted(row["step"] for row in report["recall_history"])
    # Recall measured again from scratch, through the pieces stage's own tokenisation, agrees.
    doc = build_pieces(str(world), str(model_dir))
    from lit_coupling.data.piece import KnowledgePiece

    pieces = [KnowledgePiece.from_dict(p) for p in doc["pieces"] if p["hop"] in (1, 2)]
    hits = greedy_recall(loaded.model, loaded.tokenizer, pieces)
    assert sum(hits) / len(hits) == pytest.approx(report["recall"]["recall"])
    if family == "llama":
        assert doc["tokenizer"]["bos_ids"] == [loaded.tokenizer.bos_token_id]


def learning_rates(total: int, warmup: int, floor: float, steps: int) -> list[float]:
    """The factor of the peak learning rate at each optimiser step under `warmup_then_decay`."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = warmup_then_decay(optimizer, total, warmup, floor)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        schedule.step()
    return factors


def test_learning_rate_warms_up_then_decays_to_its_floor():
    factors = learning_rates(total=100, warmup=10, floor=0.1, steps=120)
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(factors[9:]))
    assert factors[100] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    # the schedule, step by step: warm-up (k + 1)/w, then a straight line from 1 at step w to the floor at `total`
    want = [(k + 1) / 10 if k < 10 else max(0.1, 1 - 0.9 * (k - 10) / 90) for k in range(120)]
    assert factors == pytest.approx(want, rel=1e-12)
    assert learning_rates(total=10, warmup=0, floor=0.2, steps=12) == pytest.approx(
        [max(0.2, 1 - 0.8 * k / 10) for k in range(12)], rel=1e-12
    )


@pytest.mark.slow
def test_fit_fine_tunes_an_existing_model_with_its_own_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_coupling.cli import lightning_main

    source = tiny_model_dir("gpt2")
    lightning_main(
        [
            "fit",
            "--config",
            str(embedded.embedded_config("tiny-gpt2")),
            "--data.hotpot_data",
            "real-sample",
            "--model.model_path",
            str(source),
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    before = AutoModelForCausalLM.from_pretrained(source).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab()
        == AutoTokenizer.from_pretrained(source).get_vocab()
    )
    assert read_json(tmp_path / "model" / "injection.json")["module"]["model_path"] == str(source)


def test_only_embedded_names_resolve():
    assert embedded.ensure_embedded("gpt2") is None and embedded.ensure_embedded("/some/dir") is None


def test_naming_an_embedded_model_never_trains_it(tmp_path, monkeypatch):
    """Resolving `tiny-gpt2` (loading, the manifest's model identity) only finds the cached copy; training is
    `ensure_embedded`'s, which the run, check-model and predict call first."""
    from lit_coupling.models.loading import ModelLoadError, resolve_model_path
    from lit_coupling.pipeline.manifest import model_identity

    def no_training(*args):
        raise AssertionError("resolving a name trained a model")

    monkeypatch.setenv("LIT_COUPLING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "train_embedded", no_training)
    for resolve in (resolve_model_path, model_identity):
        with pytest.raises(ModelLoadError, match="tiny-gpt2 has not been trained on this machine yet"):
            resolve("tiny-gpt2")
    assert not any((tmp_path / "cache" / "models").iterdir())
    target = embedded_names.embedded_dir("tiny-gpt2")
    target.mkdir(parents=True)
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / file).write_text("{}")
    assert resolve_model_path("tiny-gpt2") == str(target) and resolve_model_path("gpt2") == "gpt2"
    assert embedded.ensure_embedded("tiny-gpt2") == target  # cached: nothing to train


def test_load_model_resolves_the_model_path_once(tiny_model_dir, monkeypatch):
    """From the name to the weights, config and tokenizer: one resolution, every file read from what it returned."""
    from lit_coupling.models import loading

    calls, real = [], loading.resolve_model_path
    monkeypatch.setattr(loading, "resolve_model_path", lambda path: calls.append(path) or real(path))
    model_dir = str(tiny_model_dir("gpt2"))
    loaded = loading.load_model(model_dir, device="cpu")
    assert calls == [model_dir] and loaded.resolved_path == model_dir and loaded.tokenizer is not None


@pytest.fixture
def quick_embedded_config(tmp_path, monkeypatch):
    """The embedded tiny-gpt2 config, shrunk to a few steps on a small world (the real one trains for minutes)."""
    from lit_coupling.data.world import main as make_world

    world = tmp_path / "world.json"
    make_world(["--chains", "6", "--seed", "2", "--out", str(world)])
    config = yaml.safe_load(embedded.embedded_config("tiny-gpt2").read_text())
    config["data"]["init_args"]["hotpot_data"] = str(world)
    config["trainer"]["max_steps"] = 3
    config["trainer"]["logger"] = False
    path = tmp_path / "tiny-gpt2.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(embedded, "embedded_config", lambda name: path)  # what trains
    monkeypatch.setattr(embedded_names, "embedded_config", lambda name: path)  # what the cache key hashes
    return path


@pytest.mark.slow
def test_an_embedded_model_is_trained_on_first_use_then_reused(quick_embedded_config, monkeypatch):
    first = embedded.ensure_embedded("tiny-gpt2")
    assert first.parent.name == "models" and model_complete(first)
    assert load_model("tiny-gpt2", device="cpu").resolved_path == str(first)  # the name works as a model path

    def no_training(*args):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(embedded, "train_embedded", no_training)
    assert embedded.ensure_embedded("tiny-gpt2") == first
    # A changed training config is another model.
    quick_embedded_config.write_text(quick_embedded_config.read_text().replace("lr: 0.003", "lr: 0.002"))
    with pytest.raises(AssertionError, match="reused"):
        embedded.ensure_embedded("tiny-gpt2")


def test_concurrent_first_uses_train_once(tmp_path, monkeypatch):
    """Two processes asking at once: the file lock lets one train, the other then finds the finished model."""
    calls = []
    started = threading.Event()

    def slow_training(name, target):  # stands in for the minutes-long training: writes the files a model has
        calls.append(name)
        started.set()
        threading.Event().wait(0.5)
        target.mkdir(parents=True)
        for file in ("config.json", "model.safetensors", "tokenizer.json"):
            (target / file).write_text("{}")
        return target

    monkeypatch.setattr(embedded, "train_embedded", slow_training)
    monkeypatch.setattr(embedded_names, "cache_key", lambda name: "k")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded.ensure_embedded("tiny-llama"))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["tiny-llama"] and len(set(results)) == 1 and model_complete(results[0])
