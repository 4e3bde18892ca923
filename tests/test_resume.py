"""Resume trusts only what it verified, and no command loses a finished run: tampered outputs are redone,
a damaged manifest is named, leftover temporary files go, and `--overwrite` sets the earlier run aside until
the new one has finished a stage. Stand-in stages from test_manifest (they count their calls)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lit_coupling.errors import UserError
from lit_coupling.pipeline import manifest as M
from lit_coupling.pipeline import run as run_module
from tests.test_manifest import CALLS, config, use_fake_stages

ALL = ["pieces", "gradsim", "ripple", "analysis", "report"]


@pytest.fixture
def finished(tmp_path, monkeypatch, capsys) -> Path:
    """A finished run of the stand-in stages in tmp_path/run."""
    use_fake_stages(monkeypatch)
    run_module.run(config(tmp_path))
    CALLS.clear()
    capsys.readouterr()
    return tmp_path / "run"


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_the_manifest_records_size_and_hash(finished):
    record = json.loads((finished / "manifest.json").read_text())["stages"]["gradsim"]
    data = (finished / "gradsim.json").read_bytes()
    assert record["checks"] == {"gradsim.json": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


def test_a_truncated_output_is_redone_and_said_so(finished, tmp_path, capsys):
    (finished / "gradsim.json").write_bytes((finished / "gradsim.json").read_bytes()[:5])
    run_module.run(config(tmp_path))
    assert CALLS == ["gradsim"]  # rewritten with the same content: what reads it stays valid
    assert "[gradsim] redoing this stage: gradsim.json has 5 bytes" in capsys.readouterr().out
    json.loads((finished / "gradsim.json").read_text())


def test_a_hand_edited_output_of_the_same_size_is_redone(finished, tmp_path, capsys):
    text = (finished / "ripple.json").read_text()
    (finished / "ripple.json").write_text(text.replace("ripple", "ripplE"))
    run_module.run(config(tmp_path))
    assert CALLS == ["ripple"]
    assert "ripple.json was changed after its stage wrote it" in capsys.readouterr().out


def test_a_redone_stage_with_new_content_redoes_what_reads_it(finished, tmp_path, monkeypatch, capsys):
    (finished / "pieces.json").unlink()
    import tests.test_manifest as stand_ins

    def new_pieces(cfg, out):
        CALLS.append("pieces")
        path = stand_ins.write_json(out / "pieces.json", {"stage": "pieces", "now": "different"})
        return run_module.StageResult([str(path)])

    monkeypatch.setattr(stand_ins, "pieces_stage", new_pieces)
    run_module.run(config(tmp_path))
    assert CALLS == ALL
    assert (
        "[gradsim] redoing this stage: an earlier stage it reads (pieces) now has different output"
        in capsys.readouterr().out
    )


def test_a_damaged_manifest_is_named_with_the_way_out_and_left_alone(finished, tmp_path):
    (finished / "manifest.json").write_text('{"format": "lit_coupling.manifest/1", "stag')
    before = snapshot(finished)
    with pytest.raises(M.DamagedManifest, match=r"manifest.json is damaged \(not valid JSON.*mv .*--overwrite"):
        run_module.run(config(tmp_path))
    (finished / "manifest.json").write_text('{"format": "lit_coupling.manifest/1", "model": "m", "stages": []}')
    with pytest.raises(M.DamagedManifest, match="'stages' should be an object"):
        run_module.run(config(tmp_path))
    (finished / "manifest.json").write_text('{"format": "lit_coupling.manifest/1", "stag')
    assert snapshot(finished) == before and CALLS == []


def test_leftover_temporary_files_are_removed(finished, tmp_path, capsys):
    leftovers = [finished / ".pieces.json.k3j_x9q2.tmp", finished / "gradsim_shards" / ".shard.npy.abcdefgh.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    mine = finished / ".notes.tmp"  # not a name the atomic writer gives: not ours to delete
    mine.write_text("keep")
    run_module.run(config(tmp_path))
    assert not any(p.exists() for p in leftovers) and mine.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().out


def failing(name: str, after: str | None = None):
    """load_stage where stage `name` fails with a user error."""
    import tests.test_manifest as stand_ins

    def load(stage):
        if stage == name:

            def fail(cfg, out):
                raise UserError(f"{name} failed")

            return fail
        return getattr(stand_ins, f"{stage}_stage")

    return load


def test_overwrite_that_fails_before_its_first_stage_leaves_the_run_byte_identical(finished, tmp_path, monkeypatch):
    before = snapshot(finished)
    monkeypatch.setattr(run_module, "load_stage", failing("pieces"))
    with pytest.raises(UserError, match="pieces failed"):
        run_module.run(config(tmp_path, overwrite="true", seed=5))
    assert snapshot(finished) == before


def test_overwrite_refused_by_a_check_touches_nothing(finished, tmp_path, monkeypatch):
    before = snapshot(finished)

    def bad_data(cfg, stages):
        raise UserError("bad data")

    monkeypatch.setattr("lit_coupling.pipeline.preflight.check_inputs", bad_data)
    with pytest.raises(UserError, match="bad data"):
        run_module.run(config(tmp_path, overwrite="true"))
    assert snapshot(finished) == before


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes(finished, tmp_path, monkeypatch):
    before = snapshot(finished)
    monkeypatch.setattr(run_module, "load_stage", failing("ripple"))
    with pytest.raises(UserError, match="ripple failed"):
        run_module.run(config(tmp_path, overwrite="true", seed=5))
    # pieces and gradsim of the new run finished: they replace the earlier run, which waits aside
    assert snapshot(finished / M.SET_ASIDE) == before
    assert set(json.loads((finished / "manifest.json").read_text())["stages"]) == {"pieces", "gradsim"}
    monkeypatch.undo()
    use_fake_stages(monkeypatch)
    run_module.run(config(tmp_path, seed=5))  # the resumed new run finishes: the earlier run goes
    assert not (finished / M.SET_ASIDE).exists()
    assert json.loads((finished / "pieces.json").read_text())["seed"] == 5


def test_an_overwrite_killed_before_its_first_stage_is_undone_by_the_next_command(finished, tmp_path, capsys):
    before = snapshot(finished)
    M.set_aside(finished)  # what --overwrite did before it was killed
    assert not (finished / "manifest.json").exists()
    run_module.run(config(tmp_path))
    assert "brought back the" in capsys.readouterr().out
    assert CALLS == [] and snapshot(finished) == before
