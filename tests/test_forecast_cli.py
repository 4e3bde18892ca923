"""`lit-coupling forecast` end to end on a tiny model that knows its facts (#19): ΔW by the ripple stage's code
path with the weights restored bit for bit; the written forecast against brute force (full per-fact gradients,
the explicit ΔW it saved), the identity projection against exact, --validate's measured Δlog P against scoring the
model with that ΔW applied, and the batch's joint edit."""

import csv
import json

import pytest
import torch

from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.forecast_cli import forecast, parse_k, parser
from lit_coupling.editing.ripple import score_clozes
from lit_coupling.editing.snapshot import restored_after, state_checksum
from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter, ensure_padding
from lit_coupling.models.loading import load_model
from lit_coupling.scoring import encode_cloze
from tests.test_memit_ripple import one_thread, world  # noqa: F401


def test_k_specs():
    assert parse_k("64x32, 8X4") == [(64, 32), (8, 4)] and parse_k("") == []
    with pytest.raises(UserError):
        parse_k("64")


@pytest.fixture(scope="module")
def forecast_run(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("forecast")
    args = parser().parse_args(
        [
            "--model_path",
            str(world["model"]),
            "--pieces",
            str(world["pieces"]),
            "--n_edits",
            "2",
            "--batch",
            "--validate",
            "--epsilons",
            "0.05",
            "--k",
            "8x8,4096x4096",
            "--memit",
            str(world["hparams"]),
            "--stats_dir",
            str(world["stats"]),
            "--cache_dir",
            str(out / "cache"),
            "--max_facts",
            "40",
            "--top",
            "3",
            "--output_dir",
            str(out),
        ]
    )
    doc = forecast(args)
    with open(out / "forecast.csv") as f:
        rows = list(csv.DictReader(f))
    return out, doc, rows


def test_files_and_bit_identical_weights(forecast_run, world):  # noqa: F811
    out, doc, rows = forecast_run
    assert {p.name for p in out.iterdir()} >= {"forecast.csv", "forecast.json", "forecast.png", "forecast_updates.pt"}
    assert doc["weights_restored"]["bit_identical"]
    fresh = load_model(str(world["model"]), dtype="float32", device="cpu").model
    assert doc["weights_restored"]["sha256_after"] == state_checksum(fresh)
    names = [e["name"] for e in doc["edits"]]
    assert names == ["edit 0", "edit 1", "batch of 2"]
    assert len(rows) == 3 * doc["facts"]
    # ranked by predicted Δlog P within each edit; layers and tokens of the top facts explained
    for name in names:
        mine = [float(r["predicted_delta_logp"]) for r in rows if r["edit"] == name]
        assert mine == sorted(mine)
    top = doc["explained"][0]["top_facts"][0]
    assert sum(top["by_layer"].values()) == pytest.approx(top["predicted_delta_logp"], rel=1e-6)
    assert len(top["tokens"]) == 3
    json.dumps(doc)  # plain JSON


def _brute_change(model, adapter, prompt, answer, updates):
    """Σ_l ⟨∇_W_l log P, ΔW_l⟩ from full gradients of one unpadded sequence and the explicit ΔW."""
    total = 0.0
    for layer, factors in updates.items():
        target = adapter.target(layer)
        weight = target.module.weight
        weight.requires_grad_(True)
        ids = torch.tensor([list(prompt) + list(answer)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        value = sum(logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1]))
        (g,) = torch.autograd.grad(value, [weight])
        weight.requires_grad_(False)
        g = g.T if target.transposed else g
        total += float((g.double() * (factors["u"].double() @ factors["v"].double().T)).sum())
    return total


def test_forecast_equals_brute_force_and_validation_measures_the_edit(forecast_run, world):  # noqa: F811
    out, doc, rows = forecast_run
    saved = torch.load(out / "forecast_updates.pt", weights_only=True)
    loaded = load_model(str(world["model"]), dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    pad = ensure_padding(tok)
    adapter = ModelAdapter(model, layers=saved["layers"])
    bos = adapter.bos_ids(tok)
    pieces, _ = load_pieces(world["pieces"])
    by_id = {p.id: p for p in pieces}
    for e, name in enumerate(saved["names"]):
        mine = [r for r in rows if r["edit"] == name]
        for r in mine[:2] + mine[-1:]:  # the two most damaged and the most helped
            piece = by_id[r["fact"]]
            clozes = encode_cloze(tok, piece.prompt, piece.answer, bos)
            want = _brute_change(model, adapter, *clozes, saved["updates"][e])
            assert float(r["predicted_delta_logp"]) == pytest.approx(want, rel=1e-3, abs=1e-6)
            # k ≥ every dimension: the projection is the identity, the projected forecast the exact one
            assert float(r["projected_4096x4096"]) == pytest.approx(want, rel=1e-3, abs=1e-6)
        # measured: the store scored with this ΔW added, minus before
        facts = [by_id[r["fact"]] for r in mine]
        items = [encode_cloze(tok, p.prompt, p.answer, bos) for p in facts]
        before, _ = score_clozes(model, tok, items, [p.answer for p in facts], 16, pad, generate="none")
        with restored_after({t.name: t.module.weight for t in adapter.targets.values()}):
            for layer, f in saved["updates"][e].items():
                adapter.target(layer).add_(f["u"].double() @ f["v"].double().T)
            after, _ = score_clozes(model, tok, items, [p.answer for p in facts], 16, pad, generate="none")
        for r, b, a in zip(mine, before.logp, after.logp):
            assert float(r["measured_delta_logp"]) == pytest.approx(a - b, abs=2e-3)
    v = doc["validation"]["single_edits"]
    assert set(v) >= {"exact", "projected 8x8", "projected 4096x4096", "gradsim_edit_layers", "new_target_inner"}
    assert v["exact"]["edits"] == 2 and v["exact"]["facts"] == doc["facts"]
    assert v["exact"]["spearman"]["value"] == pytest.approx(v["projected 4096x4096"]["spearman"]["value"], abs=1e-3)
    assert set(doc["additivity"]) == {
        "sum_of_single_forecasts_vs_joint_forecast",
        "joint_forecast_vs_joint_measured",
        "sum_of_single_forecasts_vs_joint_measured",
        "sum_of_single_measured_vs_joint_measured",
    }


def test_second_order_check(forecast_run):
    """Under ε·ΔW the measured change approaches ε × the first-order forecast as ε → 0."""
    _, doc, _ = forecast_run
    second = doc["second_order"]
    assert set(second) == {"0.05", "1.0"} and second["0.05"]["edits"] == 2
    assert second["0.05"]["relative_error_mean"] < second["1.0"]["relative_error_mean"]
    assert second["0.05"]["spearman_mean"] > 0.9


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--n_edits", "-2"], "--n_edits"),
        (["--batch_size", "0"], "--batch_size"),
        (["--top", "-1"], "--top"),
        (["--epsilons", "abc", "--validate"], "--epsilons"),
        (["--epsilons", "0.1"], "--epsilons"),  # without --validate it would be ignored
        (["--k", "0x5"], "--k"),
        (["--known", "maybe"], "--known"),
    ],
)
def test_wrong_values_are_refused_before_any_model_is_loaded(tmp_path, flags, named):
    from lit_coupling.editing.forecast_cli import validate
    from lit_coupling.errors import UserError

    args = parser().parse_args(["--model_path", "tiny-gpt2", "--output_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(UserError, match=named):
        validate(args)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_knowledge_pieces_is_named_in_a_user_error(tmp_path):
    from lit_coupling.errors import UserError

    for text in ("root:x:0:0", '{"format": "something else"}', "[1, 2]"):
        path = tmp_path / "pieces.json"
        path.write_text(text)
        with pytest.raises(UserError, match="not a knowledge_pieces file"):
            load_pieces(path)
