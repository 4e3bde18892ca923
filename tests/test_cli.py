import subprocess
import sys

import pytest


def lit(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "lit_coupling", *args], capture_output=True, text=True, timeout=180, **kwargs
    )


@pytest.mark.parametrize("command", [[], ["run"], ["fit"], ["predict"], ["check-model"]])
def test_help(command):
    result = lit(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_run_help_shows_the_seed_flags():
    out = lit("run", "--help").stdout
    for flag in (
        "--hotpot_data",
        "--model_path",
        "--max_samples",
        "--max_experiments",
        "--device",
        "--output_dir",
        "--stages",
        "--config",
        "--trainer.strategy",
        "--trainer.devices",
    ):
        assert flag in out


def test_unknown_command_and_stage_are_refused(tmp_path):
    result = lit("frobnicate")
    assert result.returncode == 2 and "unknown command" in result.stderr
    result = lit("run", "--stages", "pieces,nonsense", "--output_dir", str(tmp_path))
    assert result.returncode == 2 and "unknown stage" in result.stderr and "Traceback" not in result.stderr


def test_fsdp_process_count(monkeypatch):
    """`--trainer.devices auto` means every GPU under FSDP, never the GPUs of a machine told to run on its CPU."""
    import torch

    from lit_coupling.errors import UserError
    from lit_coupling.trainer import strategy_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert strategy_for("fsdp", "gpu", "auto", num_nodes=2)._data_parallel_size == 8
    assert strategy_for("fsdp", "cpu", "2")._data_parallel_size == 2
    with pytest.raises(UserError, match="explicit process count"):
        strategy_for("fsdp", "cpu", "auto")
