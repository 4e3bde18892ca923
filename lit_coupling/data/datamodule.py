"""LightningDataModule over knowledge pieces: padded batches for `predict` (GradSim, ripple scoring).

Every batch carries `index`, the pieces' positions in `knowledge_pieces.json`, so per-rank predictions under DDP
(whose predict sampler neither shuffles nor pads) can be put back in piece order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_coupling.data.piece import KnowledgePiece, load_pieces
from lit_coupling.scoring import collate_clozes


class PieceDataset(Dataset):
    def __init__(self, pieces: Sequence[KnowledgePiece]):
        missing = [p.id for p in pieces if not p.answer_ids or not p.prompt_ids]
        if missing:
            raise ValueError(f"pieces without token ids (tokenise them for the model first): {missing[:3]}")
        self.pieces = list(pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> tuple[int, list[int], list[int]]:
        piece = self.pieces[i]
        return i, piece.prompt_ids, piece.answer_ids


class PieceCollator:
    """Right-padded batch (input_ids, attention_mask, answer_mask) plus `index`. A class, so workers can pickle it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, list[int], list[int]]]) -> dict[str, torch.Tensor]:
        batch = collate_clozes([(p, a) for _, p, a in items], self.pad_id)
        batch["index"] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        return batch


class PiecesDataModule(LightningDataModule):
    def __init__(self, pieces_path: str, batch_size: int = 16, num_workers: int = 0):
        """
        Args:
            pieces_path: knowledge_pieces.json (or the run directory holding it), tokenised for the model.
            batch_size: pieces per batch.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        self.save_hyperparameters()
        self.pieces: list[KnowledgePiece] = []
        self.meta: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.pieces:
            self.pieces, self.meta = load_pieces(Path(self.hparams.pieces_path))

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(PieceDataset(self.pieces), batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=PieceCollator(self.pad_id), num_workers=self.hparams.num_workers)
