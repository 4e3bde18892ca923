"""The `ripple` stage of `lit-coupling run`: MEMIT edits of `--max_experiments` pieces and the ripple on every
piece.

Under `--trainer.strategy ddp` Lightning re-executes the command in every rank, so this function runs on each
of
them; the edits are shared out, and only global rank 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

from lit_coupling.editing.callbacks import RippleWriter
from lit_coupling.editing.module import EditRequestDataModule, MemitModule
from lit_coupling.errors import UserError
from lit_coupling.outputs import PIECES
from lit_coupling.run import RunConfig, StageResult
from lit_coupling.trainer import build_trainer_from_run


def ripple_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    out_dir = Path(out_dir)
    pieces_path = out_dir / PIECES
    if not pieces_path.exists():
        raise UserError(f"{pieces_path} is missing: run the pieces stage first (--stages pieces,ripple)")
    if cfg.trainer.strategy == "fsdp":
        raise UserError(
            "the ripple stage edits a whole copy of the model in each process: use --trainer.strategy "
            "ddp (edits are shared out across ranks), not fsdp"
        )
    m = cfg.memit
    module = MemitModule(
        model_path=cfg.model_path,
        dtype=cfg.dtype,
        memit=m.hparams,
        layers=m.layers,
        target_pattern=cfg.target_pattern,
        trust_remote_code=cfg.trust_remote_code,
        cov_corpus=m.cov_corpus,
        cov_tokens=m.cov_tokens,
        stats_dir=m.stats_dir,
        batch_size=m.batch_size,
        seed=cfg.seed,
        on_edit_error=m.on_edit_error,
    )
    data = EditRequestDataModule(str(pieces_path), max_experiments=cfg.max_experiments, seed=cfg.seed)
    writer = RippleWriter(str(out_dir))
    trainer = build_trainer_from_run(cfg, callbacks=[writer], enable_progress_bar=m.progress)
    trainer.predict(module, datamodule=data, return_predictions=False)
    if trainer.global_rank != 0:
        return StageResult([], f"rank {trainer.global_rank}: edits sent to rank 0")
    s = writer.summary
    rate = "n/a" if s["efficacy_generated"] is None else f"{s['efficacy_generated']:.0%}"
    summary = f"{s['edits']} edits ({s['failed']} failed), new answer generated after {rate} of them"
    return StageResult([str(p) for p in writer.written], summary)
