"""GradSimWriter: each rank appends its GradientModule predictions to a shard on disk; rank 0 then reduces them.

Under DDP/FSDP every rank sees only its share of the pieces and Lightning gathers nothing, so the shards meet on
disk (a filesystem all ranks share) and global rank 0 assembles the N×N matrix after a barrier.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from lit_coupling.errors import UserError
from lit_coupling.gradients.inner import accumulation_dtype
from lit_coupling.gradients.reduce import ReduceSettings, reduce_shards
from lit_coupling.gradients.shards import ShardSet, ShardWriter
from lit_coupling.outputs import COUPLING_ANALYSIS, COUPLING_LAYERS, COUPLING_MATRIX, PIECE_HIDDEN


class GradSimWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None, shard_dir: str | None = None, keep_shards: bool = False,
                 method: str = "auto", memory_gb: float = 4.0, block_tokens: int | None = None):
        """
        Args:
            output_dir: where coupling_matrix.npy and the other files go; default: the folder of the pieces file.
            shard_dir: per-rank shards (default: <output_dir>/gradsim_shards); on a filesystem every rank shares.
            keep_shards: keep the shards after the reduction (they are large: ~T·(d_in+d_out) floats per piece
                and layer in exact mode).
            method: exact mode: auto (ghost or GEMM per layer by cost), ghost or gemm.
            memory_gb: inputs and output gradients of one layer held in memory at once during the reduction.
            block_tokens: ghost row block, in tokens (default 512 on CPU, 4096 on GPU: big GEMMs keep it busy).
        """
        if method not in ("auto", "ghost", "gemm"):  # refused here, not after the whole gradient pass
            raise UserError(f"GradSim exact method {method!r}: expected auto, ghost or gemm")
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.shard_dir = shard_dir
        self.keep_shards = keep_shards
        self.settings = ReduceSettings(method=method, memory_gb=memory_gb)
        self.block_tokens = block_tokens
        self.run_token = ""
        self.shards: ShardWriter | None = None
        self.analysis: dict | None = None
        self.files: list[str] = []
        self._started = 0.0

    def _dirs(self, trainer) -> tuple[Path, Path]:
        out = self.output_dir
        if out is None:
            if not hasattr(getattr(trainer, "datamodule", None), "hparams") or \
                    "pieces_path" not in trainer.datamodule.hparams:
                raise UserError("GradSimWriter needs output_dir when the data is not a PiecesDataModule")
            pieces = Path(trainer.datamodule.hparams.pieces_path)
            out = pieces if pieces.is_dir() else pieces.parent
        out = Path(out)
        return out, Path(self.shard_dir) if self.shard_dir else out / "gradsim_shards"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # one token per run, so the reduction never mixes in a stale shard of an older run
            self.run_token = trainer.strategy.broadcast(uuid.uuid4().hex)

    def on_predict_start(self, trainer, pl_module) -> None:
        # The predictions are on disk; keeping them in memory as well would grow with N.
        trainer.predict_loop.return_predictions = False
        self._started = time.perf_counter()
        self.shards = ShardWriter(self._dirs(trainer)[1], trainer.global_rank, trainer.world_size, self.run_token)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        self.shards.append(prediction, pl_module.adapter.layers)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.shards.close(pl_module.adapter.layers, pl_module.adapter.d_model)
        predict_s = time.perf_counter() - self._started
        trainer.strategy.barrier("gradsim_shards_written")
        if not trainer.is_global_zero:
            return
        out_dir, shard_dir = self._dirs(trainer)
        shards = ShardSet(shard_dir, trainer.world_size, self.run_token)
        pieces = getattr(trainer.datamodule, "pieces", None) or None
        self.settings.device = str(pl_module.device)
        on_gpu = pl_module.device.type == "cuda"
        self.settings.block_tokens = self.block_tokens or (4096 if on_gpu else 512)
        self.settings.column_tokens = max(self.settings.column_tokens, 16 * self.settings.block_tokens)
        info = {"model": pl_module.model_info, "method": pl_module.method_info(),
                "run": {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                        "device": str(pl_module.device)},
                "timing": {"predict_s": round(predict_s, 3)}}
        self.analysis = reduce_shards(
            shards, out_dir, len(pieces) if pieces else int(shards.index.max()) + 1, self.settings,
            accumulation_dtype(pl_module.compute_dtype), info,
            piece_ids=[p.id for p in pieces] if pieces else None,
            chain_ids=[p.chain_id for p in pieces] if pieces else None)
        self.files = [str(out_dir / name) for name in (COUPLING_MATRIX, COUPLING_LAYERS, PIECE_HIDDEN,
                                                       COUPLING_ANALYSIS)]
        self._log(trainer)
        if not self.keep_shards:
            shards.remove()
            try:
                shard_dir.rmdir()
            except OSError:  # holds something that is not ours
                pass

    def _log(self, trainer) -> None:
        """Summary numbers to the Trainer's loggers (W&B, CSV); `self.log` is not allowed in predict."""
        s = self.analysis["summary"]
        metrics = {f"gradsim/{k}": s[k] for k in ("mean", "std", "mean_abs") if k in s}
        for group in ("same_chain", "other_chain"):
            if s.get(group, {}).get("mean") is not None:
                metrics[f"gradsim/{group}_mean"] = s[group]["mean"]
        metrics["gradsim/zero_gradient_pieces"] = len(self.analysis["zero_gradient_pieces"])
        metrics.update({f"gradsim/{k}": v for k, v in self.analysis["timing"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics)

    def summary(self) -> str:
        if not self.analysis:
            return ""
        a, s = self.analysis, self.analysis["summary"]
        methods = sorted({v["method"] for v in a["per_layer"].values()})
        mean = f", mean GradSim {s['mean']:.3f}" if "mean" in s else ""
        return (f"{s['pieces']} pieces × {len(a['per_layer'])} layers, {a['method']['mode']} "
                f"({'/'.join(methods)}){mean}, {len(a['zero_gradient_pieces'])} zero-gradient pieces")
