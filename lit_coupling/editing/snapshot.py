"""Bit-exact snapshots of the weights an edit touches, and a checksum of a whole model to prove they came back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class WeightSnapshot:
    """Copies of some parameters; `restore` writes them back exactly (a copy, never arithmetic)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.live = dict(tensors)
        self.saved = {name: t.detach().clone() for name, t in self.live.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for name, tensor in self.live.items():
            tensor.copy_(self.saved[name])

    def matches(self) -> bool:
        return all(torch.equal(tensor, self.saved[name]) for name, tensor in self.live.items())


@contextmanager
def restored_after(tensors: Mapping[str, torch.Tensor]) -> Iterator[WeightSnapshot]:
    """Whatever happens inside (an edit, a measurement, an exception), the tensors come back as they were."""
    snapshot = WeightSnapshot(tensors)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def state_checksum(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
