"""Resume logic of `lit-coupling run`, with small stand-in stages that count their calls."""

import json
from pathlib import Path

import pytest

from lit_coupling.errors import UserError
from lit_coupling.outputs import write_json
from lit_coupling.pipeline import run as run_module

CALLS: list[str] = []


def _stage(name):
    def stage(cfg, out: Path):
        CALLS.append(name)
        path = write_json(out / f"{name}.json", {"stage": name, "seed": cfg.seed})
        return run_module.StageResult([str(path)], f"{name} ok")

    return stage


pieces_stage, gradsim_stage, ripple_stage, analysis_stage, report_stage = (
    _stage(n) for n in ("pieces", "gradsim", "ripple", "analysis", "report")
)


def use_fake_stages(monkeypatch):
    # Looked up when called, so a test can stand another function in for one of them.
    stages = {n: (lambda cfg, out, n=n: globals()[f"{n}_stage"](cfg, out)) for n in run_module.STAGE_ORDER}
    monkeypatch.setattr(run_module, "STAGES", stages)
    # The stand-in stages open neither data nor model: nothing for the pre-flight checks to open either.
    monkeypatch.setattr("lit_coupling.pipeline.preflight.check_inputs", lambda cfg, stages: None)


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    use_fake_stages(monkeypatch)


def config(tmp_path, **overrides):
    model = tmp_path / "model"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text("{}")
    return run_module.parse_config(
        [
            "--model_path",
            str(model),
            "--output_dir",
            str(tmp_path / "run"),
            *[x for k, v in overrides.items() for x in (f"--{k}", str(v))],
        ]
    )


def test_finished_stages_are_kept_and_changed_inputs_recompute_downstream(tmp_path, fake_stages):
    run_module.run(config(tmp_path))
    assert CALLS == ["pieces", "gradsim", "ripple", "analysis", "report"]
    CALLS.clear()
    run_module.run(config(tmp_path))
    assert CALLS == []  # nothing changed
    CALLS.clear()
    run_module.run(config(tmp_path, **{"gradsim.mode": "projected"}))
    assert CALLS == ["gradsim", "analysis", "report"]  # ripple does not read gradsim
    CALLS.clear()
    run_module.run(config(tmp_path, **{"gradsim.mode": "projected", "gradsim.batch_size": 3}))
    assert CALLS == []  # batch size changes speed, not results


def test_a_missing_output_reruns_its_stage(tmp_path, fake_stages):
    run_module.run(config(tmp_path))
    (tmp_path / "run" / "ripple.json").unlink()
    CALLS.clear()
    run_module.run(config(tmp_path))
    assert CALLS == ["ripple"]


def test_a_killed_stage_is_rerun(tmp_path, fake_stages, monkeypatch):
    def killed(cfg, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        run_module, "load_stage", lambda name: killed if name == "ripple" else globals()[f"{name}_stage"]
    )
    with pytest.raises(KeyboardInterrupt):
        run_module.run(config(tmp_path))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"pieces", "gradsim"}
    monkeypatch.undo()
    use_fake_stages(monkeypatch)
    CALLS.clear()
    run_module.run(config(tmp_path))
    assert CALLS == ["ripple", "analysis", "report"]


def test_runs_of_different_models_do_not_mix(tmp_path, fake_stages):
    run_module.run(config(tmp_path))
    other = tmp_path / "other-model"
    other.mkdir()
    cfg = run_module.parse_config(["--model_path", str(other), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(UserError, match="holds a run of model"):
        run_module.run(cfg)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cfg = run_module.parse_config(["--model_path", str(other), "--output_dir", str(tmp_path / "run"), "--overwrite"])
    CALLS.clear()
    run_module.run(cfg)
    assert CALLS == ["pieces", "gradsim", "ripple", "analysis", "report"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # --overwrite removes only the run's own files


def test_default_output_dir_is_per_model():
    assert run_module.default_output_dir("tiny-llama") == "runs/tiny-llama"
    assert run_module.default_output_dir("meta-llama/Llama-2-7b-hf") == "runs/meta-llama_Llama-2-7b-hf"


def test_later_stages_on_a_finished_run_need_neither_model_nor_model_path(tmp_path, fake_stages, monkeypatch):
    run_module.run(config(tmp_path))

    def no_model(model_path):
        raise AssertionError("the model was resolved")

    monkeypatch.setattr("lit_coupling.pipeline.manifest.model_identity", no_model)
    CALLS.clear()
    cfg = run_module.parse_config(
        ["--stages", "analysis,report", "--output_dir", str(tmp_path / "run"), "--analysis.bootstrap", "200"]
    )
    run_module.run(cfg)
    assert cfg.model_path == str(tmp_path / "model")  # taken from the run's manifest
    assert CALLS == ["analysis", "report"]


def test_outputs_are_readable_by_others(tmp_path, fake_stages):
    run_module.run(config(tmp_path))
    assert (tmp_path / "run" / "pieces.json").stat().st_mode & 0o044 == 0o044
