"""Settings of the MEMIT ripple stage (`run --memit.*`, and the MemitModule's init arguments)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemitOptions:
    hparams: str = "auto"
    """A YAML of MEMIT hyperparameters, or auto: configs/memit/ by model family and size."""
    layers: str | None = None
    """Edit layers, overriding the hyperparameter file: '13-17', '4,5,6'."""
    batch_size: int = 32
    """Pieces per batch when scoring ripple."""
