"""`lit-coupling forecast` end to end on a tiny model that knows its facts (#19): ΔW by the ripple stage's code
path with the weights restored bit for bit; the written forecast against brute force (full per-fact gradients,
the explicit ΔW it saved), the identity projection against exact, --validate's measured Δlog P against scoring the
model with that ΔW applied, and the batch's joint edit."""

import contextlib
import csv
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_coupling.data.piece import load_pieces
from lit_coupling.editing.forecast_cli import Fact, _plot, forecast, own_facts, parse_k, parser, plot_series
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


def world_args(built: dict, out, *flags):
    """forecast's arguments on the test world: its model, pieces (the first 40 as facts), MEMIT set and statistics."""
    paths = ["--model_path", str(built["model"]), "--pieces", str(built["pieces"]), "--memit", str(built["hparams"])]
    common = ["--stats_dir", str(built["stats"]), "--max_facts", "40", "--output_dir", str(out)]
    return parser().parse_args([*paths, *common, *flags])


@pytest.fixture(scope="module")
def forecast_run(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("forecast")
    args = world_args(
        world,
        out,
        "--n_edits",
        "2",
        "--batch",
        "--validate",
        "--epsilons",
        "0.05",
        "--k",
        "8x8,4096x4096",
        "--cache_dir",
        str(out / "cache"),
        "--top",
        "3",
    )
    log = io.StringIO()  # what the user sees on stderr: the progress lines (no terminal: plain lines) and says
    with contextlib.redirect_stderr(log):
        doc = forecast(args)
    with open(out / "forecast.csv") as f:
        rows = list(csv.DictReader(f))
    return out, doc, rows, log.getvalue()


def test_files_and_bit_identical_weights(forecast_run, world):  # noqa: F811
    out, doc, rows, _ = forecast_run
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
    # the damage explained is the ripple: an edit's own fact (its target) is never among its top facts
    own = {r["fact"] for r in rows if r["edit"] == "edit 0" and r["own_fact"] == "1"}
    assert own and not own & {t["fact"] for t in doc["explained"][0]["top_facts"]}
    ripple = [float(r["predicted_delta_logp"]) for r in rows if r["edit"] == "edit 0" and r["own_fact"] != "1"]
    assert sum(doc["explained"][0]["by_layer_total"].values()) == pytest.approx(sum(ripple), rel=1e-5, abs=1e-6)
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
    out, doc, rows, _ = forecast_run
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
    # the edited facts themselves (the source piece, and any piece asking the same prompt: the world repeats a
    # chain's hop 2 in other chains) are left out of every statistic: flip counts, AUROCs and the L2 norms included
    prompts = {e["name"]: {" ".join(r["prompt"].split()) for r in e["requests"]} for e in doc["edits"]}
    sources = {e["name"]: {r["source"] for r in e["requests"]} for e in doc["edits"]}
    own = {
        (r["edit"], r["fact"])
        for r in rows
        if r["fact"] in sources[r["edit"]] or " ".join(r["prompt"].split()) in prompts[r["edit"]]
    }
    assert own == {(r["edit"], r["fact"]) for r in rows if r["own_fact"] == "1"}
    assert doc["validation_left_out"] == sum(name != "batch of 2" for name, _ in own) >= 2

    def flips(name):
        return sum(int(float(r["measured_flip"])) for r in rows if r["edit"] == name and (name, r["fact"]) not in own)

    assert doc["validation"]["measured_flips"] == v["exact"]["flips"] == flips("edit 0") + flips("edit 1")
    assert doc["additivity"]["joint_forecast_vs_joint_measured"]["flips"] == flips("batch of 2")
    for key in ("sum_of_single_forecasts_vs_joint_measured", "sum_of_single_measured_vs_joint_measured"):
        assert doc["additivity"][key]["relative_l2"] is not None


def test_second_order_check(forecast_run):
    """Under ε·ΔW the measured change approaches ε × the first-order forecast as ε → 0."""
    _, doc, _, _ = forecast_run
    second = doc["second_order"]
    assert set(second) == {"0.05", "1.0"} and second["0.05"]["edits"] == 2
    assert second["0.05"]["relative_error_mean"] < second["1.0"]["relative_error_mean"]
    assert second["0.05"]["spearman_mean"] > 0.9


def test_every_long_step_shows_progress_and_each_edit_line_counts_its_re_scoring(forecast_run):
    """Each pass over the store (scoring before, re-scoring after each edit, the exact forecast, building the
    projected cache, the ε re-scorings) reports progress with an ETA; the target vectors' time is said once."""
    _, doc, _, log = forecast_run
    n = doc["facts"]
    for desc, total in [
        ("scoring every fact before the edits", n),
        ("edit 0: scoring every fact after the edit", n),
        ("edit 1: scoring every fact after the edit", n),
        ("batch of 2: scoring every fact after the edit", n),
        ("exact forecast of 3 edit(s) and 4 baseline(s)", n),
        ("projected gradients 4096x4096 (cache)", n),  # 8x8 is restricted from it: no pass
        ("second order: scoring under ε·ΔW", 2 * n),
    ]:
        assert re.search(rf"{re.escape(desc)}: {total}/{total} \w+ \(\d+s, ETA 0s\)", log), desc
    assert log.count("target vectors of 2 request(s)") == 1
    times = doc["times"]
    for e, name in enumerate(["edit 0", "edit 1", "batch of 2"]):
        line = re.search(rf"  {name}: ([\d.]+)s \(ΔW ([\d.]+)s, re-scoring the facts ([\d.]+)s\)", log)
        assert line, name
        total, edit, score = (float(v) for v in line.groups())
        assert edit == pytest.approx(times["update_s_per_group"][e], abs=0.051)
        assert score == pytest.approx(times["score_after_s_per_group"][e], abs=0.051)
        assert total == pytest.approx(edit + score, abs=0.11)


def _fact(i, prompt):
    return Fact(f"f{i}", "hop1", prompt, "a", [1], [2])


def test_own_facts_by_id_and_by_prompt_whitespace_aside():
    facts = [_fact(0, "The capital of  France is"), _fact(1, "Paris is in"), _fact(2, "The capital of France is")]
    named = SimpleNamespace(source_id="f1", prompt="Paris is in")
    asked = SimpleNamespace(source_id="edit/0", prompt=" The capital of France\tis ")
    own = own_facts([[named], [asked], [named, asked]], facts)
    assert own.tolist() == [[False, True, False], [True, False, True], [True, True, True]]


def test_plot_keeps_the_batch_apart_and_leaves_own_facts_out(tmp_path, monkeypatch):
    """13 edits and their batch: the batch is drawn in its own colour with its own label, and no own fact is
    drawn (the old plot drew the first 12 names only: the batch was dropped and the 11th edit took edit 0's
    colour)."""
    from matplotlib.axes import Axes

    n_single, n = 13, 20
    names = [f"edit {e}" for e in range(n_single)] + [f"batch of {n_single}"]
    rng = np.random.default_rng(0)
    predicted, measured = rng.normal(size=(n_single + 1, n)), rng.normal(size=(n_single + 1, n))
    own = np.zeros_like(predicted, dtype=bool)
    own[np.arange(n_single), np.arange(n_single) % n] = True
    own[-1, :] = own[:-1].any(0)
    predicted[own], measured[own] = 1e6, -1e6  # an own fact would stand out wherever it lands
    drawn = []
    scatter = Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        drawn.append((kwargs["label"], kwargs["c"], np.asarray(x), np.asarray(y)))
        return scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", spy)
    _plot(tmp_path / "p.png", names, predicted, measured, own, n_single)
    assert (tmp_path / "p.png").stat().st_size > 0
    labels = [d[0] for d in drawn]
    assert len(set(labels)) == len(labels) and labels[-1] == f"batch of {n_single}"
    colours = [d[1] for d in drawn]
    assert len(set(colours)) == len(colours) and "C7" not in colours  # C7 is grey: the grey series' look-alike
    assert sum(len(d[2]) for d in drawn) == (~own).sum()
    assert all(np.all(np.abs(d[2]) < 1e6) and np.all(np.abs(d[3]) < 1e6) for d in drawn)
    assert [s["label"] for s in plot_series(names, predicted, measured, own, n_single)] == labels


def test_an_edit_of_a_stored_fact_leaves_that_fact_out(world, tmp_path):  # noqa: F811
    """--edit with a stored fact's prompt (other whitespace): the request's source is that fact, and the fact is
    left out of the statistics as a piece's own fact is (it used to be an anonymous edit/0 that counted)."""
    pieces, _ = load_pieces(world["pieces"])
    pieces = pieces[:40]
    piece = next(p for p in pieces if p.is_single_hop and p.subject in p.prompt)
    new = next(p.answer for p in pieces if p.answer != piece.answer and p.kind == piece.kind)
    spaced = "  " + piece.prompt.replace(" ", "   ", 1) + " "
    args = world_args(world, tmp_path, "--edit", f"{piece.subject}|{spaced}|{new}", "--validate", "--top", "1")
    with contextlib.redirect_stderr(io.StringIO()):
        doc = forecast(args)
    request = doc["edits"][0]["requests"][0]
    assert (request["source"], request["target_true"]) == (piece.id, piece.answer)
    same = [p.id for p in pieces if " ".join(p.prompt.split()) == " ".join(piece.prompt.split())]
    assert doc["validation_left_out"] == len(same) >= 1
    assert doc["validation"]["single_edits"]["exact"]["pairs"] == 40 - len(same)
    with open(tmp_path / "forecast.csv") as f:
        flagged = {r["fact"] for r in csv.DictReader(f) if r["own_fact"] == "1"}
    assert flagged == set(same)


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
        (["--stats_dir", "/dev/null"], "--stats_dir"),
        (["--cache_dir", "/dev/null"], "--cache_dir"),
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
