"""GradSim under several processes on CPU (gloo): DDP and FSDP2 give the matrix of one process; the predict CLI.

Each job runs as a subprocess: `ddp` and ModelParallelStrategy re-execute the command line, which must not be pytest.
"""

from pathlib import Path

import numpy as np
import pytest

from tests.test_gradsim import gradsim
from tests.tiny import cli_command, run_cli, write_pieces

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """family → (model dir, pieces file, the one-process matrix)."""
    cache = {}

    def get(family):
        if family not in cache:
            model_dir = tiny_model_dir(family)
            run = tmp_path_factory.mktemp(f"single-{family}")
            pieces = write_pieces(run, model_dir, repeat=2)  # 20 pieces: 10 per rank, batches of 3 end unevenly
            cache[family] = (model_dir, pieces, gradsim(run, model_dir, dtype="float32")[0])
        return cache[family]

    return get


@pytest.mark.parametrize("strategy,family", [("ddp", "gpt2"), ("fsdp", "llama")])
def test_two_processes_give_the_matrix_of_one(single, tmp_path, strategy, family):
    model_dir, pieces, want = single(family)
    (tmp_path / "knowledge_pieces.json").write_bytes(pieces.read_bytes())
    out = run_cli(
        cli_command(
            "run",
            "--stages",
            "gradsim",
            "--output_dir",
            tmp_path,
            "--model_path",
            model_dir,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--gradsim.batch_size",
            3,
            "--trainer.strategy",
            strategy,
            "--trainer.devices",
            2,
        ),
        tmp_path,
        timeout=240,
    )
    got = np.load(tmp_path / "coupling_matrix.npy")
    assert np.abs(got - want).max() <= 1e-5
    assert "[gradsim]" in out and "20 pieces" in out
    analysis = (tmp_path / "coupling_analysis.json").read_text()
    assert '"world_size": 2' in analysis
    if strategy == "fsdp":
        assert "ModelParallelStrategy" in analysis and '"shards": 2' in analysis


def test_predict_cli_with_the_gradsim_config(single, tmp_path):
    model_dir, pieces, want = single("gpt2")
    (tmp_path / "knowledge_pieces.json").write_bytes(pieces.read_bytes())
    run_cli(
        cli_command(
            "predict",
            "--config",
            REPO / "configs/gradsim/tiny-gpt2.yaml",
            "--model.init_args.model.model_path",
            model_dir,
            "--data.init_args.pieces_path",
            tmp_path,
            "--trainer.default_root_dir",
            tmp_path,
            "--trainer.enable_progress_bar",
            "false",
        ),
        tmp_path,
        timeout=240,
    )
    assert np.abs(np.load(tmp_path / "coupling_matrix.npy") - want).max() <= 1e-5
    assert (tmp_path / "config.yaml").exists() and not (tmp_path / "gradsim_shards").exists()
