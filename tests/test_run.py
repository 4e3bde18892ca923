"""`lit-coupling run` end to end, as a user runs it: the seed's command on tiny models saved to a local directory,
the same run under DDP, and a run killed with SIGKILL during the ripple stage that resumes to the same outputs.

Each run is a real `lit-coupling` process (the console script's module), so DDP re-executes it as it would for a
user and SIGKILL hits a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lit_coupling.outputs import (
    CORRELATION,
    COUPLING_MATRIX,
    MAIN_OUTPUTS,
    MANIFEST,
    PAIR_TABLE,
    RIPPLE,
    RIPPLE_PAIRS,
)
from tests.tiny import CLI_ENV, cli_command, run_cli


def seed_command(world: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """The seed's usage, word for word but for the paths."""
    return cli_command(
        "run",
        "--hotpot_data",
        world,
        "--model_path",
        model,
        "--max_samples",
        "20",
        "--max_experiments",
        "2",
        "--device",
        "cpu",
        "--output_dir",
        out,
        *extra,
    )


# The tiny models here are untrained: they know none of the facts, and edit sources are drawn from known facts
# by default. The runs that compare edits therefore ask to edit unknown facts too.
EDIT_UNKNOWN = ("--memit.known", "any")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from lit_coupling.data.world import main as make_world

    path = tmp_path_factory.mktemp("world") / "hotpot.json"
    make_world(["--chains", "12", "--seed", "3", "--out", str(path)])
    return path


@pytest.fixture(scope="module")
def reference_run(world, tiny_model_dir, tmp_path_factory) -> Path:
    """The seed's command with a tiny GPT-2 saved locally, uninterrupted, one process."""
    out = tmp_path_factory.mktemp("runs") / "quick_test"
    run_cli(seed_command(world, tiny_model_dir("gpt2"), out, *EDIT_UNKNOWN), out.parent)
    return out


# Fields that say how long something took or whether a cache was warm: they differ between two identical runs.
VOLATILE = ("seconds", "time", "_s", "cached", "timing", "inputs", "path", "elapsed")


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(k.endswith(x) for x in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def read_json(path: Path):
    return stable(json.loads(path.read_text()))


def test_seed_command_with_a_local_tiny_gpt2_writes_the_eight_files(reference_run):
    assert all((reference_run / name).is_file() for name in MAIN_OUTPUTS), sorted(
        p.name for p in reference_run.iterdir()
    )
    ripple = json.loads((reference_run / RIPPLE).read_text())
    assert len(ripple["experiments"]) == 2
    matrix = np.load(reference_run / COUPLING_MATRIX)
    assert matrix.shape[0] == matrix.shape[1] > 0 and np.allclose(np.diag(matrix), 1, atol=1e-5)
    report = (reference_run / "final_mvp_report.md").read_text()
    assert "Spearman" in report


def test_seed_command_with_a_local_tiny_llama(world, tiny_model_dir, tmp_path):
    out = tmp_path / "quick_test"
    stdout = run_cli(seed_command(world, tiny_model_dir("llama"), out), tmp_path)
    assert all((out / name).is_file() for name in MAIN_OUTPUTS)
    for stage in ("pieces", "gradsim", "ripple", "analysis", "report"):
        assert f"[{stage}]" in stdout  # a one-line summary per stage
    # An untrained model knows no fact: no edit is made, and the run says so plainly instead of editing noise.
    assert "TOO FEW KNOWN FACTS" in stdout
    assert json.loads((out / RIPPLE).read_text())["experiments"] == []
    assert "No edit was made" in json.loads((out / CORRELATION).read_text())["verdict"]["text"]
    analysis = json.loads((out / "coupling_analysis.json").read_text())
    assert analysis["model"]["family"] == "llama"


def test_ddp_with_two_processes_gives_the_same_matrix_and_ripple_table(world, tiny_model_dir, reference_run, tmp_path):
    out = tmp_path / "ddp"
    run_cli(
        seed_command(
            world, tiny_model_dir("gpt2"), out, *EDIT_UNKNOWN, "--trainer.strategy", "ddp", "--trainer.devices", "2"
        ),
        tmp_path,
    )
    assert all((out / name).is_file() for name in MAIN_OUTPUTS)
    np.testing.assert_allclose(np.load(out / COUPLING_MATRIX), np.load(reference_run / COUPLING_MATRIX), atol=1e-5)
    one, two = pd.read_csv(reference_run / RIPPLE_PAIRS), pd.read_csv(out / RIPPLE_PAIRS)
    assert list(one.columns) == list(two.columns) and len(one) == len(two) > 0
    key = [c for c in ("edit", "edit_id", "piece_id") if c in one.columns]
    one, two = one.sort_values(key).reset_index(drop=True), two.sort_values(key).reset_index(drop=True)
    numeric = one.select_dtypes("number").columns
    np.testing.assert_allclose(two[numeric].to_numpy(float), one[numeric].to_numpy(float), atol=1e-5)
    pd.testing.assert_frame_equal(one.drop(columns=numeric), two.drop(columns=numeric))


def test_a_run_killed_during_ripple_resumes_to_the_outputs_of_an_uninterrupted_run(
    world, tiny_model_dir, reference_run, tmp_path
):
    out = tmp_path / "quick_test"
    command = seed_command(world, tiny_model_dir("gpt2"), out, *EDIT_UNKNOWN)
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    manifest = out / MANIFEST
    deadline = time.monotonic() + 300
    try:
        # The manifest records gradsim the moment it finishes; the ripple stage starts right after.
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and "gradsim" in json.loads(manifest.read_text() or "{}").get("stages", {}):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the ripple stage could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    stages = json.loads(manifest.read_text())["stages"]
    assert "gradsim" in stages and "ripple" not in stages, f"not killed during ripple: {sorted(stages)}"
    assert not (out / RIPPLE).exists()
    for path in out.glob("*.json"):  # outputs are renamed into place whole: none is half-written
        json.loads(path.read_text())

    stdout = run_cli(command, tmp_path)
    assert "[pieces] finished earlier" in stdout and "[gradsim] finished earlier" in stdout
    assert np.array_equal(np.load(out / COUPLING_MATRIX), np.load(reference_run / COUPLING_MATRIX))
    assert read_json(out / RIPPLE) == read_json(reference_run / RIPPLE)
    assert read_json(out / CORRELATION) == read_json(reference_run / CORRELATION)
    for table in (RIPPLE_PAIRS, PAIR_TABLE):
        assert (out / table).read_text() == (reference_run / table).read_text()


def test_seed_command_on_real_hotpotqa_with_a_short_context_model(tiny_model_dir, tmp_path):
    """The seed's command on the HotpotQA sample: real sentences are long in a tiny tokenizer's tokens, and the tiny
    GPT-2 holds 128 positions; pieces that do not fit are skipped with a counted reason, the rest run through."""
    from tests.conftest import shared_path

    sample = shared_path("data", "hotpotqa", "hotpot_dev_distractor_v1.sample40.json")
    out = tmp_path / "quick_test"
    run_cli(seed_command(sample, tiny_model_dir("gpt2"), out), tmp_path)
    assert all((out / name).is_file() for name in MAIN_OUTPUTS)
    pieces = json.loads((out / "knowledge_pieces.json").read_text())
    assert pieces["counts"]["records"] == 20 and pieces["pieces"]
    assert all(len(p["prompt_ids"]) + len(p["answer_ids"]) <= 128 for p in pieces["pieces"])
