"""Per-rank shards of GradientModule predictions on disk, and the reader the blockwise reduction draws blocks from.

One folder per rank; one raw file per (layer, x|d|g) that batches are appended to, so a block of pieces of one layer
is one contiguous read. bfloat16 is stored as its raw 16 bits (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SHARD_FORMAT = "lit_coupling.gradsim_shard/1"
KINDS = ("x", "d", "g")


def _numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _np_dtype(dtype_name: str) -> np.dtype:
    return np.dtype(np.int16) if dtype_name == "bfloat16" else np.dtype(dtype_name)


def rank_dir(shard_dir: str | Path, rank: int) -> Path:
    return Path(shard_dir) / f"rank{rank:03d}"


class ShardWriter:
    """Appends one rank's predictions batch by batch; `close` writes the piece index and meta.json."""

    def __init__(self, shard_dir: str | Path, rank: int, world_size: int, run_token: str):
        self.dir = rank_dir(shard_dir, rank)
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous run's shard of this rank
        self.dir.mkdir(parents=True)
        self.meta = {
            "format": SHARD_FORMAT,
            "rank": rank,
            "world_size": world_size,
            "run_token": run_token,
            "layers": None,
            "dims": {},
            "dtypes": {},
            "complete": False,
        }
        self.files: dict[str, object] = {}
        self.index: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.logp: list[np.ndarray] = []
        self.hidden: list[np.ndarray] = []

    def append(self, prediction: dict, layers: list[int]) -> None:
        for kind in KINDS:
            for layer, tensor in zip(layers, prediction.get(kind, ())):
                name = f"L{layer}.{kind}"
                if name not in self.files:
                    self.files[name] = open(self.dir / f"{name}.bin", "wb")
                    self.meta["dims"][name] = int(tensor.shape[1])
                    self.meta["dtypes"][name] = str(tensor.dtype).removeprefix("torch.")
                self.files[name].write(_numpy(tensor).tobytes())
        self.index.append(prediction["index"].numpy().astype(np.int64))
        self.tokens.append(prediction["tokens"].numpy().astype(np.int64))
        self.logp.append(prediction["logp"].numpy().astype(np.float64))
        self.hidden.append(
            prediction["hidden"].float().numpy()
            if prediction["hidden"].dtype == torch.bfloat16
            else prediction["hidden"].numpy()
        )

    def close(self, layers: list[int], hidden_size: int) -> None:
        for f in self.files.values():
            f.close()
        self.meta["layers"] = list(layers)

        def cat(parts, dtype, width=None):
            if parts:
                return np.concatenate(parts)
            return np.zeros((0,) if width is None else (0, width), dtype=dtype)

        np.save(self.dir / "index.npy", cat(self.index, np.int64))
        np.save(self.dir / "tokens.npy", cat(self.tokens, np.int64))
        np.save(self.dir / "logp.npy", cat(self.logp, np.float64))
        np.save(self.dir / "hidden.npy", cat(self.hidden, np.float32, hidden_size))
        self.meta["pieces"] = int(sum(len(i) for i in self.index))
        self.meta["complete"] = True
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=1))


class ShardSet:
    """Every rank's shard of one run, in storage order (rank by rank); `index` maps storage order to piece order."""

    def __init__(self, shard_dir: str | Path, world_size: int, run_token: str | None = None):
        self.directory = Path(shard_dir)
        self.dirs = [rank_dir(shard_dir, r) for r in range(world_size)]
        self.metas = []
        for d in self.dirs:
            path = d / "meta.json"
            if not path.exists():
                raise RuntimeError(f"{d}: no meta.json — that rank did not finish writing its GradSim shard")
            meta = json.loads(path.read_text())
            if meta.get("format") != SHARD_FORMAT or not meta.get("complete"):
                raise RuntimeError(f"{d}: not a complete GradSim shard")
            if run_token is not None and meta["run_token"] != run_token:
                raise RuntimeError(f"{d}: the shard belongs to another run (token {meta['run_token']})")
            self.metas.append(meta)
        written = [m for m in self.metas if m["pieces"]]
        self.layers: list[int] = (written or self.metas)[0]["layers"] or []
        self.kinds = sorted({name.split(".")[1] for m in written for name in m["dims"]})
        self.counts = [m["pieces"] for m in self.metas]
        self.index = np.concatenate([np.load(d / "index.npy") for d in self.dirs])
        rank_tokens = [np.load(d / "tokens.npy") for d in self.dirs]
        self.tokens = np.concatenate(rank_tokens)
        self.piece_starts = np.concatenate([[0], np.cumsum(self.counts)])
        # Token offsets inside each rank's files, per piece in storage order.
        self.token_starts = np.concatenate([np.concatenate([[0], np.cumsum(t)])[:-1] for t in rank_tokens]).astype(
            np.int64
        )

    @property
    def num_pieces(self) -> int:
        return len(self.index)

    def logp(self) -> np.ndarray:
        return np.concatenate([np.load(d / "logp.npy") for d in self.dirs])

    def hidden(self) -> np.ndarray:
        return np.concatenate([np.load(d / "hidden.npy") for d in self.dirs])

    def dim(self, layer: int, kind: str) -> int:
        return next(m["dims"][f"L{layer}.{kind}"] for m in self.metas if m["pieces"])

    def dtype(self, layer: int, kind: str) -> str:
        return next(m["dtypes"][f"L{layer}.{kind}"] for m in self.metas if m["pieces"])

    def _rank_of(self, piece: int) -> int:
        return int(np.searchsorted(self.piece_starts, piece, side="right") - 1)

    def _rows(self, rank: int, layer: int, kind: str, first: int, count: int) -> np.ndarray:
        """`count` rows from row `first` of one rank's file. A plain read, not a memory map: mapped pages would
        count as this process's memory, and over all layers that is the whole shard."""
        dim, dtype = self.dim(layer, kind), _np_dtype(self.dtype(layer, kind))
        data = np.fromfile(
            self.dirs[rank] / f"L{layer}.{kind}.bin",
            dtype=dtype,
            count=count * dim,
            offset=first * dim * dtype.itemsize,
        )
        return data.reshape(count, dim)

    def read(
        self, layer: int, kind: str, start: int, stop: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Rows of pieces [start, stop) in storage order: packed tokens for x/d, one row per piece for g."""
        parts = []
        piece = start
        while piece < stop:
            rank = self._rank_of(piece)
            end = min(stop, int(self.piece_starts[rank + 1]))
            if kind == "g":
                rows = self._rows(rank, layer, kind, piece - int(self.piece_starts[rank]), end - piece)
            else:
                rows = self._rows(rank, layer, kind, int(self.token_starts[piece]), int(self.tokens[piece:end].sum()))
            tensor = torch.from_numpy(rows)
            if self.dtype(layer, kind) == "bfloat16":
                tensor = tensor.view(torch.bfloat16)
            parts.append(tensor)
            piece = end
        width = self.dim(layer, kind)
        out = torch.cat(parts) if parts else torch.zeros((0, width))
        return out.to(device=device, dtype=dtype)

    def remove(self) -> None:
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
