"""Build the Lightning Trainer the predict stages run under, from `--device` and `--trainer.*`.

`strategy: fsdp` means FSDP2 (`fully_shard`) through `ModelParallelStrategy`: Lightning's classic `fsdp` refuses
the CPU, FSDP2 runs on CPU with gloo and on GPUs with NCCL, so the sharded path is the same code everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_coupling.errors import UserError

# `--trainer.strategy` values the run's stages are written for ("fsdp" is FSDP2, see above).
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp")


def accelerator_for(device: str, accelerator: str | None = None) -> str:
    if accelerator:
        return accelerator
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device.startswith("cuda") else "cpu"


def _processes(devices: int | str | list, accelerator: str) -> int:
    """Processes per node that `--trainer.devices` asks for ("auto"/-1: every GPU, and only on GPUs)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in (-1, "auto") and accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    raise UserError(f"--trainer.strategy fsdp needs an explicit process count, got --trainer.devices {devices!r}")


def strategy_for(strategy: str, accelerator: str, devices: int | str, num_nodes: int = 1):
    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # Pure data-parallel sharding: every process is one FSDP shard ("auto" would mean one shard per node).
        return ModelParallelStrategy(
            data_parallel_size=_processes(devices, accelerator) * num_nodes,
            tensor_parallel_size=1,
            process_group_backend="gloo" if accelerator == "cpu" else None,
        )
    if strategy in ("ddp", "ddp_spawn") and accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo", start_method="popen" if strategy == "ddp" else "spawn")
    return strategy


def build_trainer(
    device: str = "auto",
    accelerator: str | None = None,
    strategy: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    callbacks: list | None = None,
    default_root_dir: str | None = None,
    logger: Any = False,
    **kwargs,
):
    """A Trainer for predict jobs that take gradients: inference_mode off, no checkpoints."""
    from lightning.pytorch import Trainer

    accelerator = accelerator_for(device, accelerator)
    return Trainer(
        accelerator=accelerator,
        strategy=strategy_for(strategy, accelerator, devices, num_nodes),
        devices=devices,
        num_nodes=num_nodes,
        inference_mode=False,  # GradSim and MEMIT need autograd inside predict
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=logger,
        callbacks=callbacks or [],
        default_root_dir=default_root_dir,
        **kwargs,
    )
