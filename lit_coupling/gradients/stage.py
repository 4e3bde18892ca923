"""The `gradsim` stage of `lit-coupling run`: GradientModule + GradSimWriter under the run's Trainer settings."""

from __future__ import annotations

from pathlib import Path

from lit_coupling.data.datamodule import PiecesDataModule
from lit_coupling.errors import UserError
from lit_coupling.gradients.module import GradientModule
from lit_coupling.gradients.writer import GradSimWriter
from lit_coupling.outputs import PIECES
from lit_coupling.run import RunConfig, StageResult
from lit_coupling.trainer import build_trainer_from_run


def gradsim_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """Runs on every rank (DDP/FSDP re-execute the command); only global rank 0 reduces and writes the files."""
    pieces = Path(out_dir) / PIECES
    if not pieces.exists():
        raise UserError(f"{pieces} does not exist: run the pieces stage first (--stages pieces,gradsim)")
    g = cfg.gradsim
    module = GradientModule(model_path=cfg.model_path, dtype=cfg.dtype, layers=cfg.layers,
                            target_pattern=cfg.target_pattern, trust_remote_code=cfg.trust_remote_code, mode=g.mode,
                            k_in=g.k_in, k_out=g.k_out,
                            projection_seed=cfg.seed if g.projection_seed is None else g.projection_seed)
    data = PiecesDataModule(str(pieces), batch_size=g.batch_size)
    writer = GradSimWriter(output_dir=str(out_dir), keep_shards=g.keep_shards, method=g.exact_method,
                           memory_gb=g.reduce_memory_gb)
    trainer = build_trainer_from_run(cfg, callbacks=[writer], enable_progress_bar=g.progress)
    trainer.predict(module, datamodule=data, return_predictions=False)
    if not trainer.is_global_zero:
        return StageResult([], f"rank {trainer.global_rank}: gradient shard written, rank 0 reduces")
    return StageResult(writer.files, writer.summary())
