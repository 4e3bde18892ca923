"""Settings of the GradSim stage (`run --gradsim.*`, and the GradientModule's init arguments)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GradSimOptions:
    mode: str = "exact"
    """exact (ghost dot products / chunked GEMM, chosen per layer by cost) or projected (seeded Kronecker)."""
    k_in: int = 64
    """Projected mode: dimension the MLP-output inputs X are projected to, per layer."""
    k_out: int = 64
    """Projected mode: dimension the output gradients D are projected to, per layer."""
    projection_seed: int = 0
    """Seed of the random projection (recorded in coupling_analysis.json)."""
    batch_size: int = 16
    """Pieces per forward/backward."""
