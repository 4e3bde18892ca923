"""Side effects of the ripple job: restore the edited weights after each edit, write the gathered results."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from lit_coupling.editing.ripple import RIPPLE_FORMAT, pair_rows, pairs_csv, summarise
from lit_coupling.editing.snapshot import WeightSnapshot
from lit_coupling.outputs import RIPPLE, RIPPLE_PAIRS, write_json, write_text


class RestoreEditedWeights(Callback):
    """Snapshot the edit layers before each edit; write them back bit for bit once the ripple is measured.

    Also on an exception (an edit or a measurement that raises), so a failed run never leaves an edited model.
    """

    def __init__(self) -> None:
        self.snapshot: WeightSnapshot | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.snapshot = WeightSnapshot(pl_module.edited_weights())

    def _restore(self) -> None:
        if self.snapshot is not None:
            self.snapshot.restore()
            if not self.snapshot.matches():
                raise RuntimeError("the edited weights could not be restored bit for bit")
            self.snapshot = None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


def gather_objects(obj, trainer) -> list:
    """Every rank's `obj`, in rank order (only the local one outside distributed runs)."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class RippleWriter(Callback):
    """Collects the experiment records the module hands it (with the header of the file and the pieces), gathers
    every rank's, and (global rank 0 only) writes `ripple_experiments.json` and `ripple_pairs.csv` in edit order: the
    files one process would write."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.records: list[dict] = []
        self.header: dict | None = None
        self.pieces: list | None = None
        self.summary: dict = {}
        self.written: list[Path] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.records, self.written, self.header, self.pieces = [], [], None, None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None:  # {"records", "header", "pieces"} (MemitModule.predict_step)
            self.records.extend(outputs["records"])
            self.header, self.pieces = outputs["header"], outputs["pieces"]

    def on_predict_end(self, trainer, pl_module) -> None:
        spare = self.pieces if trainer.global_rank != 0 else None  # for a rank 0 that made no edit
        parts = gather_objects((self.records, self.header, spare), trainer)
        records = sorted((r for part, _, _ in parts for r in part), key=lambda r: r["edit_id"])
        self.summary = summarise(records)
        if trainer.global_rank != 0:
            return
        if self.header is None:  # this rank made no edit: the header and pieces of one that did
            self.header, self.pieces = next(((h, p) for _, h, p in parts if h is not None), (None, None))
        if self.header is not None:
            self.write(records, self.header, self.pieces)

    def write(self, records: list[dict], header: dict, pieces: list) -> None:
        """Write both files (also with no edit at all: the baseline then says what the model knew)."""
        self.summary = summarise(records)
        doc = {"format": RIPPLE_FORMAT, **header, "summary": self.summary, "experiments": records}
        self.written = [
            write_json(self.output_dir / RIPPLE, doc),
            write_text(self.output_dir / RIPPLE_PAIRS, pairs_csv(pair_rows(records, pieces))),
        ]
