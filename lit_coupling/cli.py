"""LightningCLI for `lit-coupling fit|validate|test|predict`: any LightningModule and DataModule, picked in YAML.

lit-coupling fit --config configs/inject/tiny-gpt2.yaml
lit-coupling predict --config configs/gradsim/tiny-gpt2.yaml --trainer.strategy ddp --trainer.devices 2
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LitCouplingCLI(LightningCLI):
    """Subclass mode: `model` and `data` name their classes (`class_path`) in the config."""

    def before_instantiate_classes(self) -> None:
        """An embedded model named in the config (`tiny-gpt2`) is trained now if it is not cached yet."""
        from lit_coupling.inject.embedded import ensure_embedded

        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model = config.get("model") if config is not None else None
        for model_path in _values_of("model_path", model.as_dict() if hasattr(model, "as_dict") else model):
            if isinstance(model_path, str):
                ensure_embedded(model_path)

    def before_predict(self) -> None:
        """A GradSimWriter without output_dir writes next to the pieces file the data module reads."""
        from lit_coupling.gradients.writer import GradSimWriter

        pieces_path = getattr(getattr(self.datamodule, "hparams", None), "pieces_path", None)
        for writer in self.trainer.callbacks:
            if isinstance(writer, GradSimWriter) and writer.output_dir is None and pieces_path is not None:
                pieces = Path(pieces_path)
                writer.output_dir = str(pieces if pieces.is_dir() else pieces.parent)

    def after_predict(self) -> None:
        """GradSim: the writers wrote per-rank shards; global rank 0 assembles the N×N matrix from them."""
        from lit_coupling.gradients.module import GradientModule
        from lit_coupling.gradients.reduce import reduce_predict_job
        from lit_coupling.gradients.writer import GradSimWriter

        if not isinstance(self.model, GradientModule):
            return
        for writer in self.trainer.callbacks:
            if isinstance(writer, GradSimWriter):
                reduce_predict_job(self.trainer, self.model, writer, getattr(self.datamodule, "pieces", None))


def _values_of(key: str, tree) -> list:
    """Every value stored under `key` anywhere in a nested dict/list."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in _values_of(key, v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _values_of(key, v)]
    return []


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
