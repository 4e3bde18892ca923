"""Settings of the GradSim stage (`run --gradsim.*`, and the GradientModule's init arguments)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GradSimOptions:
    mode: str = "exact"
    """exact (ghost dot products / chunked GEMM, chosen per layer by cost) or projected (seeded Kronecker)."""
    k_in: int = 256
    """Projected mode: dimension the MLP-output inputs X are projected to, per layer (docs/benchmarks.md: 256×128
    is the smallest measured that keeps Spearman ≥ 0.95 with exact GradSim on the default run)."""
    k_out: int = 128
    """Projected mode: dimension the output gradients D are projected to, per layer."""
    projection_seed: int | None = None
    """Seed of the random projection (default: the run's --seed; recorded in coupling_analysis.json)."""
    batch_size: int = 16
    """Pieces per forward/backward."""
    exact_method: str = "auto"
    """Exact mode: auto (ghost or GEMM per layer by cost), ghost, gemm."""
    reduce_memory_gb: float = 4.0
    """Inputs and output gradients of one layer held in memory at once while the N×N matrix is assembled."""
    progress: bool = True
    """Show Lightning's progress bar over the batches and a line per reduced layer."""
    keep_shards: bool = False
    """Keep the per-rank shards (<output_dir>/gradsim_shards) after the reduction."""

    def validate(self) -> None:
        """Refuse bad values before the gradient pass (hours on a 7B model), not after it."""
        from lit_coupling.errors import check_choice, check_float, check_int

        check_choice("gradsim.mode", self.mode, ("exact", "projected"))
        check_choice("gradsim.exact_method", self.exact_method, ("auto", "ghost", "gemm"))
        check_int("gradsim.k_in", self.k_in, 1)
        check_int("gradsim.k_out", self.k_out, 1)
        check_int("gradsim.projection_seed", self.projection_seed, 0, 2**32 - 1, optional=True)
        check_int("gradsim.batch_size", self.batch_size, 1)
        check_float(
            "gradsim.reduce_memory_gb",
            self.reduce_memory_gb,
            0,
            low_open=True,
            hint="it is how many GB of one layer's inputs and gradients the reduction holds at once",
        )
