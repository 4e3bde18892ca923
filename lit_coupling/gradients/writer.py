"""GradSimWriter: each rank appends the predictions its GradientModule hands it to a shard on disk.

Under DDP/FSDP every rank sees only its share of the pieces and Lightning gathers nothing, so the shards meet on
disk (a filesystem all ranks share). After the job, global rank 0 assembles the N×N matrix from them:
`gradients.reduce.reduce_gradsim`, called by the gradsim stage (or by `lit-coupling predict`), not by this writer.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

from lit_coupling.errors import UserError
from lit_coupling.gradients.shards import ShardSet, ShardWriter


class GradSimWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None, shard_dir: str | None = None):
        """
        Args:
            output_dir: where coupling_matrix.npy and the other files go; `lit-coupling predict` sets it to the
                folder of the pieces file when it is null.
            shard_dir: per-rank shards (default: <output_dir>/gradsim_shards); on a filesystem every rank shares.
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.shard_dir = shard_dir
        self.run_token = ""
        self.world_size = 1
        self.shards: ShardWriter | None = None
        self.predict_seconds = 0.0
        self._started = 0.0

    @property
    def out_dir(self) -> Path:
        if self.output_dir is None:
            raise UserError("GradSimWriter needs output_dir: the folder the coupling files go to")
        return Path(self.output_dir)

    @property
    def shard_path(self) -> Path:
        return Path(self.shard_dir) if self.shard_dir else self.out_dir / "gradsim_shards"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # one token per run, so the reduction never mixes in a stale shard of an older run
            self.run_token = trainer.strategy.broadcast(uuid.uuid4().hex)

    def on_predict_start(self, trainer, pl_module) -> None:
        # The predictions are on disk; keeping them in memory as well would grow with N.
        trainer.predict_loop.return_predictions = False
        self._started = time.perf_counter()
        self.world_size = trainer.world_size
        self.shards = ShardWriter(self.shard_path, trainer.global_rank, trainer.world_size, self.run_token)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.shards.append(prediction, pl_module.adapter.layers)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.shards.close(pl_module.adapter.layers, pl_module.adapter.d_model)
        self.predict_seconds = time.perf_counter() - self._started
        trainer.strategy.barrier("gradsim_shards_written")

    def shard_set(self) -> ShardSet:
        """Every rank's shard of the finished job (read on global rank 0 once all have closed theirs)."""
        return ShardSet(self.shard_path, self.world_size, self.run_token)
