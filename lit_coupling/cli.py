"""LightningCLI for `lit-coupling fit|validate|test|predict`: any LightningModule and DataModule, picked in YAML.

    lit-coupling fit --config configs/inject/tiny-gpt2.yaml
    lit-coupling predict --config configs/gradsim/tiny-gpt2.yaml --trainer.strategy ddp --trainer.devices 2
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LitCouplingCLI(LightningCLI):
    """Subclass mode: `model` and `data` name their classes (`class_path`) in the config."""


def lightning_main(args: list[str] | None = None) -> LitCouplingCLI:
    return LitCouplingCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # GradSim and MEMIT take gradients inside predict: Lightning's default inference_mode would forbid them.
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


def lightning_entry(argv: list[str]) -> int:
    import sys

    # From the console (also when DDP re-executes it) LightningCLI reads sys.argv itself.
    lightning_main(None if argv == sys.argv[1:] else argv)
    return 0
