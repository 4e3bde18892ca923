"""Real MEMIT edits on a tiny model that knows its facts: efficacy, bit-exact restore, the ripple files, CLI
and DDP."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_coupling.data.datamodule import EditRequestDataModule
from lit_coupling.data.piece import load_pieces
from lit_coupling.editing import memit as memit_module
from lit_coupling.editing.callbacks import RippleWriter
from lit_coupling.editing.covariance import key_covariances, resolve_corpus, shrink
from lit_coupling.editing.hparams import MemitHparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.editing.module import MemitModule
from lit_coupling.editing.options import MemitOptions
from lit_coupling.editing.requests import plan_requests
from lit_coupling.editing.ripple import build_probes, score_pieces
from lit_coupling.editing.snapshot import restored_after, state_checksum
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.loading import load_model
from lit_coupling.models.options import ModelOptions
from lit_coupling.outputs import EDIT_UPDATES, RIPPLE, RIPPLE_PAIRS
from lit_coupling.scoring import generated_exact_match, greedy_continuations
from lit_coupling.trainer import build_trainer
from tests.editing_world import WORLD_HPARAMS, make_run, train_world_model, world_hparams_file

ROOT = Path(__file__).resolve().parents[1]
EDITS = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-for-bit comparisons across processes need the same reduction order; one thread also avoids the
    oversubscription that makes a shared CPU crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("memit-world")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir = train_world_model(root / "model", "gpt2", steps=300, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    run = make_run(root / "pieces", model_dir)
    return {
        "model": model_dir,
        "pieces": run,
        "stats": root / "stats",
        "hparams": world_hparams_file(root / "hparams.yaml"),
        "root": root,
    }


def fresh_run(world, name: str) -> Path:
    """A run directory holding only the world's knowledge_pieces.json (its corpus file stays where it is)."""
    out = world["root"] / name
    out.mkdir()
    (out / "knowledge_pieces.json").write_text((world["pieces"] / "knowledge_pieces.json").read_text())
    return out


def module_and_data(world, out: Path, **kwargs):
    """The ripple stage's module and data; `kwargs` are MemitOptions fields."""
    memit = MemitOptions(hparams=str(world["hparams"]), stats_dir=str(world["stats"]), **kwargs)
    module = MemitModule(ModelOptions(model_path=str(world["model"])), memit)
    data = EditRequestDataModule(
        str(out / "knowledge_pieces.json"), max_experiments=EDITS, seed=0, batch_size_edits=memit.batch_size_edits
    )
    return module, data


def reference_checksum(world) -> str:
    return state_checksum(load_model(str(world["model"]), dtype="float32", device="cpu").model)


def test_scores_come_back_in_piece_order_whatever_the_batching(world):
    """Batches are drawn by length; every score must still land on its own piece."""
    loaded = load_model(str(world["model"]), dtype="float32", device="cpu")
    pieces, meta = load_pieces(world["pieces"])
    pieces = pieces[:24]
    assert len({len(p.prompt_ids) for p in pieces}) > 1  # the length order differs from the file order
    pad = meta["tokenizer"]["pad_id"]
    batched = score_pieces(loaded.model, loaded.tokenizer, pieces, 8, pad)
    for i, piece in enumerate(pieces):
        alone = score_pieces(loaded.model, loaded.tokenizer, [piece], 1, pad)
        assert batched.logp[i] == pytest.approx(alone.logp[0], abs=1e-5)  # fp32: other batch mates, other sums
        assert (batched.tf_em[i], batched.gen_em[i]) == (alone.tf_em[0], alone.gen_em[0])


def test_edits_take_on_a_model_that_knows_the_facts(world):
    loaded = load_model(str(world["model"]), dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    hp = MemitHparams(**{**WORLD_HPARAMS, "layers": [0, 1]})
    adapter = ModelAdapter(model, layers=hp.layers)
    bos, pad = adapter.bos_ids(tok), tok.pad_token_id
    pieces, meta = load_pieces(world["pieces"])
    covs, metas = key_covariances(
        adapter,
        tok,
        hp.layers,
        resolve_corpus("hotpot", meta["source"]["path"]),
        100_000,
        world["stats"],
        str(world["model"]),
        bos,
        progress=False,
    )
    solvers = {
        layer: CovarianceSolver(shrink(c, metas[layer]["mean_fourth_power"], metas[layer]["tokens"])[0])
        for layer, c in covs.items()
    }
    prefixes = generate_prefixes(model, tok, bos, seed=0)
    requests = plan_requests(pieces, 8, seed=0).requests
    before = state_checksum(model)

    def generated(request) -> bool:
        probes = build_probes(tok, request, pieces, bos)
        out = greedy_continuations(model, [probes.items[1][0]], len(probes.items[1][1]) + 2, pad, tok.eos_token_id)
        return generated_exact_match(tok, out[0], request.target_new)

    weights = {layer: adapter.target(layer).module.weight for layer in hp.layers}
    assert not any(generated(r) for r in requests)  # the model says the true answers before
    took = 0
    for request in requests:
        with restored_after(weights):
            result = apply_memit(adapter, tok, [request], hp, solvers, prefixes, bos, pad)
            took += generated(request)
            assert all(n > 0 for n in result.delta_norms.values())
    assert took >= 5, f"only {took}/8 edits made the model generate the new answer"
    # several requests in one batch edit
    batch = requests[:3]
    with restored_after(weights):
        apply_memit(adapter, tok, batch, hp, solvers, prefixes, bos, pad)
        assert sum(map(generated, batch)) >= 2
    assert state_checksum(model) == before


def test_the_experiment_loop_leaves_every_weight_as_it_was_and_writes_the_ripple(world):
    out = fresh_run(world, "loop")
    module, data = module_and_data(world, out)
    writer = RippleWriter(str(out))
    build_trainer(device="cpu", callbacks=[writer], enable_progress_bar=False).predict(
        module, datamodule=data, return_predictions=False
    )
    assert state_checksum(module.lm) == reference_checksum(world)

    doc = json.loads((out / RIPPLE).read_text())
    pieces, _ = load_pieces(out)
    n = len(pieces)
    assert doc["format"] == "lit_coupling.ripple_experiments/1"
    assert doc["piece_ids"] == [p.id for p in pieces]
    assert doc["hparams"]["layers"] == [0, 1] and doc["hparams"]["source"].startswith("measured")
    assert [e["edit_id"] for e in doc["experiments"]] == list(range(EDITS))
    fresh = score_pieces(
        load_model(str(world["model"]), dtype="float32", device="cpu").model,
        module.tokenizer,
        pieces,
        32,
        module.pad_id,
    )
    for e in doc["experiments"]:
        assert e["status"] == "ok"
        s = e["pieces"]
        assert all(len(v) == n for v in s.values())
        assert s["logp_before"] == pytest.approx(fresh.logp, abs=1e-9) and s["gen_em_before"] == fresh.gen_em
        i = e["source_index"]
        assert s["logp_after"][i] < s["logp_before"][i]  # the edited fact's true answer lost probability
        assert e["efficacy"]["logp_new_after"] > e["efficacy"]["logp_new_before"]
        assert e["locality"]["other_chains"]["n"] + e["locality"]["same_chain"]["n"] == n - 1
        assert e["generalisation"]["piece"].endswith("/question")
    assert doc["summary"]["edits"] == EDITS and doc["summary"]["efficacy_generated"] >= 0.5
    # Every piece scored once before editing; sources drawn from the facts the model knows, typed counterfactuals
    baseline = doc["baseline"]
    assert baseline["criterion"] == "generated" and baseline["known"] == fresh.gen_em
    assert baseline["logp"] == doc["experiments"][0]["pieces"]["logp_before"]
    assert baseline["n_known"] == sum(fresh.gen_em) and doc["requests"]["known"] <= doc["requests"]["sources"]
    for e in doc["experiments"]:
        assert baseline["known"][e["source_index"]] and e["efficacy"]["known_before"]
        # cities: typed by the lexicon of cities (data/answer_types.py) or by the shared relation
        assert e["answer_type"] == "country" or e["answer_type"] == "relation" or e["answer_type"] == "city"
    with open(out / RIPPLE_PAIRS) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == EDITS * n
    source_rows = [r for r in rows if r["is_source"] == "1"]
    assert len(source_rows) == EDITS and all(float(r["rel_delta_logp"]) == 1.0 for r in source_rows)


def failing_update(fail_on_call: int):
    """closed_form_update raising on its n-th call: an edit that fails after its first layer was written."""
    real = memit_module.closed_form_update
    calls = {"n": 0}

    def update(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise RuntimeError("injected failure half way through an edit")
        return real(*args, **kwargs)

    return update


@pytest.mark.parametrize("on_edit_error", ["record", "raise"])
def test_an_edit_that_fails_half_way_leaves_every_weight_as_it_was(world, monkeypatch, on_edit_error):
    out = fresh_run(world, f"fail-{on_edit_error}")
    monkeypatch.setattr(memit_module, "closed_form_update", failing_update(fail_on_call=4))  # edit 1, layer 1
    module, data = module_and_data(world, out, on_edit_error=on_edit_error)
    writer = RippleWriter(str(out))
    trainer = build_trainer(device="cpu", callbacks=[writer], enable_progress_bar=False)
    if on_edit_error == "raise":
        with pytest.raises(RuntimeError, match="injected failure"):
            trainer.predict(module, datamodule=data, return_predictions=False)
        assert not (out / RIPPLE).exists()
    else:
        trainer.predict(module, datamodule=data, return_predictions=False)
        doc = json.loads((out / RIPPLE).read_text())
        statuses = [e["status"] for e in doc["experiments"]]
        assert statuses == ["ok", "error", "ok", "ok"] and "injected" in doc["experiments"][1]["error"]
        assert doc["summary"]["failed"] == 1
    assert state_checksum(module.lm) == reference_checksum(world)


@pytest.fixture(scope="module")
def single_process_run(world):
    """The ripple stage of `lit-coupling run`, in this process."""
    from lit_coupling.pipeline.run import RunConfig
    from lit_coupling.pipeline.stages import ripple_stage

    out = fresh_run(world, "single")
    cfg = RunConfig(model_path=str(world["model"]), max_experiments=EDITS, device="cpu", output_dir=str(out))
    cfg.memit.hparams, cfg.memit.stats_dir, cfg.memit.progress = (
        str(world["hparams"]),
        str(world["stats"]),
        False,
    )
    torch.set_num_threads(1)
    result = ripple_stage(cfg, out)
    assert (
        # issue 13: each edit's ΔW factors too (edit_updates.pt)
        sorted(Path(f).name for f in result.files) == [EDIT_UPDATES, RIPPLE, RIPPLE_PAIRS]
        and "4 edits" in result.summary
    )
    return out


def comparable(out: Path) -> tuple[dict, str]:
    doc = json.loads((out / RIPPLE).read_text())
    for e in doc["experiments"]:
        e.pop("time_s")
    doc["summary"] = {k: v for k, v in doc["summary"].items() if not k.startswith("mean_time")}
    for layer in doc["covariance"]["layers"].values():
        layer.pop("cached")
    return doc["experiments"], (out / RIPPLE_PAIRS).read_text()


def test_lightning_cli_predict_with_a_shipped_config(world, single_process_run, tmp_path):
    from lit_coupling.cli import lightning_main

    config = yaml.safe_load((ROOT / "configs" / "memit" / "gpt2.yaml").read_text())
    out = fresh_run(world, "cli")
    config["trainer"].update(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path))
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(out)
    init = config["model"]["init_args"]
    init["model"].update(model_path=str(world["model"]))
    init["memit"].update(stats_dir=str(world["stats"]), hparams={**init["memit"]["hparams"], **WORLD_HPARAMS})
    config["data"]["init_args"].update(pieces_path=str(out / "knowledge_pieces.json"), max_experiments=EDITS)
    path = tmp_path / "memit.yaml"
    path.write_text(yaml.safe_dump(config))
    lightning_main(["predict", "--config", str(path)])
    assert comparable(out) == comparable(single_process_run)


@pytest.mark.multiprocess
def test_ddp_with_two_processes_gives_the_same_ripple_table(world, single_process_run):
    out = fresh_run(world, "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_coupling",
            "run",
            "--stages",
            "ripple",
            "--model_path",
            str(world["model"]),
            "--output_dir",
            str(out),
            "--max_experiments",
            str(EDITS),
            "--device",
            "cpu",
            "--memit.hparams",
            str(world["hparams"]),
            "--memit.stats_dir",
            str(world["stats"]),
            "--memit.progress",
            "false",
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert comparable(out) == comparable(single_process_run)


def test_greedy_match_from_the_teacher_forced_pass_equals_decoding_every_piece(world):
    """score_clozes decodes only the items one teacher-forced pass cannot settle; the greedy answer match must
    equal decoding every item (answer length + EXTRA_GENERATED_TOKENS) — on the true answers, which the model
    knows, and on wrong ones (a neighbour's answer, a truncated and an extended answer)."""
    from lit_coupling.editing.ripple import EXTRA_GENERATED_TOKENS, score_clozes
    from lit_coupling.scoring import encode_cloze

    loaded = load_model(str(world["model"]), dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    pieces, meta = load_pieces(world["pieces"])
    bos = meta["tokenizer"]["bos_ids"]
    items, answers = [], []
    for k, piece in enumerate(pieces[:30]):
        other = pieces[(k + 3) % len(pieces)].answer
        for answer in (piece.answer, other, piece.answer[:2], piece.answer + " Hill"):
            items.append(encode_cloze(tok, piece.prompt, answer, bos))
            answers.append(answer)
    pad = meta["tokenizer"]["pad_id"]
    fast, _ = score_clozes(model, tok, items, answers, 16, pad)
    slow = []
    for (prompt, answer_ids), answer in zip(items, answers):
        ids = greedy_continuations(model, [prompt], len(answer_ids) + EXTRA_GENERATED_TOKENS, pad, tok.eos_token_id)
        slow.append(generated_exact_match(tok, ids[0], answer))
    assert fast.gen_em == slow
    assert 0 < sum(slow) < len(slow)  # both outcomes are exercised
    assert all(r == 0 for r, tf in zip(fast.rank, fast.tf_em) if tf)


def test_traced_layers_are_chosen_on_unedited_known_facts_and_recorded(world):
    """`--memit.layers traced`: the band is the best window of the recorded per-layer effects, the trace ran on
    known facts none of which is edited, the edits use that band, and the weights come back."""
    from lit_coupling.editing.tracing import TRACE_FACTS, TraceFact, best_band, mlp_indirect_effects

    out = fresh_run(world, "traced")
    module, data = module_and_data(world, out, layers="traced")
    build_trainer(device="cpu", callbacks=[RippleWriter(str(out))], enable_progress_bar=False).predict(
        module, datamodule=data, return_predictions=False
    )
    assert state_checksum(module.lm) == reference_checksum(world)
    doc = json.loads((out / RIPPLE).read_text())
    choice = doc["layer_choice"]
    pieces, meta = load_pieces(out)
    by_id = {p.id: p for p in pieces}
    edited = {e["source_piece"] for e in doc["experiments"]}
    traced = choice["facts_traced"]
    assert 0 < len(traced) <= TRACE_FACTS and not edited & set(traced)
    known = dict(zip(doc["piece_ids"], doc["baseline"]["known"]))
    assert all(known[i] and by_id[i].is_single_hop for i in traced)
    assert choice["scaled_layers"] == [0, 1] and choice["width"] == 2 and choice["facts"] >= 3
    band, means = best_band(choice["indirect_effect"], 2)
    assert choice["layers"] == band and doc["hparams"]["layers"] == band and choice["window_means"] == means
    assert "chosen by causal tracing" in doc["hparams"]["source"]
    assert all(e["status"] == "ok" for e in doc["experiments"])
    # The record is the trace: recomputed on the recorded facts, the same effects.
    loaded = load_model(str(world["model"]), dtype="float32", device="cpu")
    again = mlp_indirect_effects(
        ModelAdapter(loaded.model),
        loaded.tokenizer,
        [TraceFact(i, by_id[i].prompt, by_id[i].subject, by_id[i].answer) for i in traced],
        meta["tokenizer"]["bos_ids"],
        meta["tokenizer"]["pad_id"],
        fact_token=WORLD_HPARAMS.get("fact_token", "subject_last"),
        seed=0,
    )
    assert again["effects"] == pytest.approx(choice["indirect_effect"], abs=1e-6)
