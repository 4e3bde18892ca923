"""Blockwise reduction of GradSim shards: per-layer Gram matrices, then the N×N GradSim, with bounded memory.

Only blocks j ≥ i are computed (the Gram matrix is symmetric). Per layer, at most `reduce_memory_gb` of inputs/output
gradients is resident at once: when a layer's shard is larger, it is read in big blocks, pair by pair.
"""

from __future__ import annotations

import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lit_coupling.errors import UserError
from lit_coupling.gradients.cosine import cosine_from_inner, summarise
from lit_coupling.gradients.inner import (
    METHODS,
    choose_method,
    gemm_flops,
    gemm_inner,
    ghost_flops,
    ghost_inner,
    piece_gradients,
)
from lit_coupling.gradients.options import GradSimOptions
from lit_coupling.gradients.shards import ShardSet
from lit_coupling.outputs import (
    COUPLING_ANALYSIS,
    COUPLING_LAYERS,
    COUPLING_MATRIX,
    PIECE_HIDDEN,
    atomic_write,
    save_npy,
    write_json,
)

ANALYSIS_FORMAT = "lit_coupling.coupling_analysis/1"


@dataclass
class ReduceSettings:
    """How the reduction runs: the user's settings (`GradSimOptions`: exact_method, reduce_memory_gb, progress) and
    the block sizes, which only change speed."""

    options: GradSimOptions = field(default_factory=GradSimOptions)
    block_tokens: int = 512
    """Ghost: tokens per row block. Small blocks waste less of the diagonal blocks (computed whole)."""
    column_tokens: int = 16384
    """Ghost: tokens per column chunk (a row block × chunk product matrix is the largest temporary)."""
    projected_rows: int = 2048
    """Projected: pieces per row block."""
    device: str = "cpu"

    @classmethod
    def for_device(cls, options: GradSimOptions, device: torch.device | str) -> ReduceSettings:
        """Ghost row blocks of 512 tokens on CPU, 4096 on GPU (big GEMMs keep it busy)."""
        block = 4096 if torch.device(device).type == "cuda" else 512
        return cls(options, block_tokens=block, column_tokens=max(16384, 16 * block), device=str(device))


def _ranges(weights: np.ndarray, limit: float) -> list[tuple[int, int]]:
    """Consecutive ranges [a, b) whose weights sum to at most `limit` (at least one item each)."""
    ends = np.cumsum(np.asarray(weights, dtype=np.float64))
    ranges, start, base = [], 0, 0.0
    while start < len(ends):
        stop = max(start + 1, int(np.searchsorted(ends, base + limit, side="right")))
        ranges.append((start, stop))
        start, base = stop, float(ends[stop - 1])
    return ranges


@dataclass
class Resident:
    """A range of pieces of one layer loaded onto the device: packed x and d, or projected g."""

    start: int
    tensors: tuple[Tensor, ...]
    tokens: np.ndarray  # per piece (x/d) — rows per piece
    offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.tokens)]).astype(np.int64)

    def take(self, a: int, b: int) -> tuple[Tensor, ...]:
        """Pieces [a, b) (storage order) of this block."""
        lo, hi = int(self.offsets[a - self.start]), int(self.offsets[b - self.start])
        return tuple(t[lo:hi] for t in self.tensors)


def symmetric_gram(
    n: int,
    load: Callable[[int, int], Resident],
    pair: Callable[[Resident, int, int, Resident, int, int], Tensor],
    resident_bytes: np.ndarray,
    memory_bytes: float,
    row_weights: np.ndarray,
    row_limit: float,
    column_limit: float,
    dtype: np.dtype,
) -> np.ndarray:
    """N×N Gram matrix from blocks j ≥ i: big blocks of pieces as resident memory allows, then row blocks × column
    chunks inside each pair of big blocks."""
    gram = np.zeros((n, n), dtype=dtype)
    big = _ranges(resident_bytes, memory_bytes / 2)
    for bi, (i0, i1) in enumerate(big):
        block_i = load(i0, i1)
        for j0, j1 in big[bi:]:
            block_j = block_i if j0 == i0 else load(j0, j1)
            for a0, a1 in _ranges(row_weights[i0:i1], row_limit):
                a0, a1 = a0 + i0, a1 + i0
                start = a0 if j0 == i0 else j0
                for b0, b1 in _ranges(row_weights[start:j1], column_limit):
                    b0, b1 = b0 + start, b1 + start
                    block = pair(block_i, a0, a1, block_j, b0, b1).cpu().numpy()
                    gram[a0:a1, b0:b1] = block
                    gram[b0:b1, a0:a1] = block.T
            del block_j
    return gram


def layer_gram(shards: ShardSet, layer: int, settings: ReduceSettings, dtype: torch.dtype) -> tuple[np.ndarray, dict]:
    """⟨G_i, G_j⟩ of one layer for every pair, in storage order, and how it was computed."""
    n, device = shards.num_pieces, torch.device(settings.device)
    item = torch.finfo(dtype).bits // 8
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    budget = settings.options.reduce_memory_gb * 2**30
    tokens = shards.tokens
    if "g" in shards.kinds:
        k = shards.dim(layer, "g")

        def load(a: int, b: int) -> Resident:
            return Resident(a, (shards.read(layer, "g", a, b, dtype, device),), np.ones(b - a, dtype=np.int64))

        def pair(bi, a0, a1, bj, b0, b1):
            return gemm_inner(bi.take(a0, a1)[0], bj.take(b0, b1)[0])

        ones = np.ones(n)
        gram = symmetric_gram(
            n, load, pair, ones * k * item, budget, ones, settings.projected_rows, 4 * settings.projected_rows, np_dtype
        )
        return gram, {"method": "projected", "dims": k}

    d_in, d_out = shards.dim(layer, "x"), shards.dim(layer, "d")
    gradient_bytes = d_in * d_out * item
    # Half the budget for built G_i (a row block and a column chunk), half for the resident x and d.
    gemm_pieces = max(1, int(budget / 4 / gradient_bytes))
    method = settings.options.exact_method
    if method == "auto":
        method = choose_method(tokens.tolist(), d_in, d_out, gemm_pieces)
    elif method not in METHODS:
        raise UserError(f"exact method {method!r} is unknown: choose auto, ghost or gemm")
    flops = {
        "ghost": ghost_flops(tokens.tolist(), d_in, d_out),
        "gemm": gemm_flops(tokens.tolist(), d_in, d_out, gemm_pieces),
    }

    def load(a: int, b: int) -> Resident:
        return Resident(
            a, (shards.read(layer, "x", a, b, dtype, device), shards.read(layer, "d", a, b, dtype, device)), tokens[a:b]
        )

    resident = tokens * (d_in + d_out) * item
    if method == "ghost":

        def pair(bi, a0, a1, bj, b0, b1):
            x_a, d_a = bi.take(a0, a1)
            x_b, d_b = bj.take(b0, b1)
            return ghost_inner(x_a, d_a, torch.as_tensor(tokens[a0:a1]), x_b, d_b, torch.as_tensor(tokens[b0:b1]))

        gram = symmetric_gram(
            n, load, pair, resident, budget, tokens, settings.block_tokens, settings.column_tokens, np_dtype
        )
    else:
        cache: dict = {}

        def pair(bi, a0, a1, bj, b0, b1):
            if cache.get("key") != (a0, a1):  # the row block's gradients are built once, not once per column chunk
                cache.update(key=(a0, a1), g=piece_gradients(*bi.take(a0, a1), tokens[a0:a1]))
            if (b0, b1) == (a0, a1):  # a diagonal block: its columns are its rows (all of them when N is small)
                return gemm_inner(cache["g"], cache["g"])
            return gemm_inner(cache["g"], piece_gradients(*bj.take(b0, b1), tokens[b0:b1]))

        ones = np.ones(n)
        gram = symmetric_gram(n, load, pair, resident, budget / 2, ones, gemm_pieces, gemm_pieces, np_dtype)
        cache.clear()
    return gram, {
        "method": method,
        "d_in": d_in,
        "d_out": d_out,
        "estimated_gflop": {k: round(v / 1e9, 3) for k, v in flops.items()},
    }


def _npy_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )


def reduce_shards(
    shards: ShardSet,
    out_dir: str | Path,
    num_pieces: int,
    settings: ReduceSettings,
    dtype: torch.dtype,
    info: dict,
    piece_ids: list[str] | None = None,
    chain_ids: list[str] | None = None,
) -> dict:
    """Write coupling_layers.npz, coupling_matrix.npy, piece_hidden.npy and coupling_analysis.json; return the
    analysis document.

    `info` holds the model and method sections and anything else to record; `dtype` is the accumulation dtype.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    index = shards.index
    if len(index) != num_pieces or not np.array_equal(np.sort(index), np.arange(num_pieces)):
        missing = np.setdiff1d(np.arange(num_pieces), index)
        raise RuntimeError(
            f"the GradSim shards hold {len(index)} predictions for {num_pieces} pieces "
            f"(missing {missing[:10].tolist()}, duplicated: {len(index) - len(np.unique(index))})"
        )
    order = np.argsort(index, kind="stable")  # storage position of piece i
    n, layers = num_pieces, shards.layers
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    total = np.zeros((n, n), dtype=np.float64)
    layer_norms = np.zeros((len(layers), n), dtype=np.float64)
    per_layer: dict[str, dict] = {}
    rows_per_chunk = max(1, (64 << 20) // max(1, n * np_dtype().itemsize))

    def write_layers(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            with archive.open("inner.npy", "w", force_zip64=True) as f:
                _npy_header(f, (len(layers), n, n), np_dtype)
                for li, layer in enumerate(layers):
                    layer_start = time.perf_counter()
                    gram, how = layer_gram(shards, layer, settings, dtype)
                    for r0 in range(0, n, rows_per_chunk):
                        rows = gram[order[r0 : r0 + rows_per_chunk]][:, order]  # storage order → piece order
                        f.write(np.ascontiguousarray(rows).tobytes())
                        total[r0 : r0 + rows_per_chunk] += rows
                    layer_norms[li] = np.diagonal(gram)[order]
                    per_layer[str(layer)] = {**how, "seconds": round(time.perf_counter() - layer_start, 3)}
                    if settings.options.progress:
                        print(
                            f"gradsim: layer {layer} ({li + 1}/{len(layers)}) {how['method']}, "
                            f"{per_layer[str(layer)]['seconds']:.1f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                    del gram
            for name, array in (
                ("layers", np.asarray(layers, dtype=np.int64)),
                ("logp", shards.logp()[order]),
                ("tokens", shards.tokens[order]),
            ):
                with archive.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, array)

    atomic_write(out_dir / COUPLING_LAYERS, write_layers)
    norms2 = np.diagonal(total).copy()
    cosine, zero = cosine_from_inner(total, in_place=True)
    save_npy(out_dir / COUPLING_MATRIX, cosine.astype(np_dtype, copy=False))
    save_npy(out_dir / PIECE_HIDDEN, shards.hidden()[order])
    share = np.divide(layer_norms, norms2, out=np.zeros_like(layer_norms), where=norms2 > 0)
    for li, layer in enumerate(layers):
        per_layer[str(layer)]["gradient_norm_share"] = float(share[li][~zero].mean()) if (~zero).any() else None
    ids = piece_ids if piece_ids is not None else [str(i) for i in range(n)]
    document = {
        "format": ANALYSIS_FORMAT,
        **info,
        "pieces": {"count": n, "gradient_tokens_mean": float(shards.tokens.mean()) if n else 0.0},
        "per_layer": per_layer,
        "summary": summarise(cosine, zero, chain_ids),
        "zero_gradient_pieces": [ids[i] for i in np.flatnonzero(zero)],
        "files": {"matrix": COUPLING_MATRIX, "layers": COUPLING_LAYERS, "hidden": PIECE_HIDDEN},
    }
    document.setdefault("timing", {})["reduce_s"] = round(time.perf_counter() - start, 3)
    write_json(out_dir / COUPLING_ANALYSIS, document)
    return document


def reduce_gradsim(
    shards: ShardSet,
    out_dir: str | Path,
    settings: ReduceSettings,
    dtype: torch.dtype,
    info: dict,
    pieces: list | None = None,
) -> tuple[dict, list[str]]:
    """The N×N GradSim of a finished predict job: its shards → the coupling files in `out_dir`; then the shards go
    (unless `keep_shards`). Returns (the coupling_analysis.json document, the files written).

    Called once, on global rank 0, after every rank's `GradSimWriter` has closed its shard: by the gradsim stage, and
    by `lit-coupling predict` for a GradSim config. `pieces` (KnowledgePiece, in file order) name the rows and the
    chains; without them the rows are the shards' piece indices.
    """
    out_dir = Path(out_dir)
    analysis = reduce_shards(
        shards,
        out_dir,
        len(pieces) if pieces else int(shards.index.max()) + 1,
        settings,
        dtype,
        info,
        piece_ids=[p.id for p in pieces] if pieces else None,
        chain_ids=[p.chain_id for p in pieces] if pieces else None,
    )
    if not settings.options.keep_shards:
        shards.remove()
        try:
            shards.directory.rmdir()
        except OSError:  # holds something that is not ours
            pass
    return analysis, [
        str(out_dir / name) for name in (COUPLING_MATRIX, COUPLING_LAYERS, PIECE_HIDDEN, COUPLING_ANALYSIS)
    ]


def reduce_predict_job(trainer, module, writer, pieces: list | None = None) -> tuple[dict, list[str]] | None:
    """After `trainer.predict` of a GradientModule with a GradSimWriter: on global rank 0, the N×N files from the
    shards the writer wrote, with what the module records about the model and the method; None on other ranks."""
    from lit_coupling.gradients.inner import accumulation_dtype

    if not trainer.is_global_zero:
        return None
    info = {
        "model": module.model_info,
        "method": module.method_info(),
        "run": {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "device": str(module.device),
        },
        "timing": {"predict_s": round(writer.predict_seconds, 3)},
    }
    settings = ReduceSettings.for_device(module.options, module.device)
    analysis, files = reduce_gradsim(
        writer.shard_set(), writer.out_dir, settings, accumulation_dtype(module.compute_dtype), info, pieces
    )
    log_summary(trainer.loggers, analysis)
    return analysis, files


def log_summary(loggers: list, analysis: dict) -> None:
    """Summary numbers to the Trainer's loggers (W&B, CSV); `self.log` is not allowed in predict."""
    s = analysis["summary"]
    metrics = {f"gradsim/{k}": s[k] for k in ("mean", "std", "mean_abs") if k in s}
    for group in ("same_chain", "other_chain"):
        if s.get(group, {}).get("mean") is not None:
            metrics[f"gradsim/{group}_mean"] = s[group]["mean"]
    metrics["gradsim/zero_gradient_pieces"] = len(analysis["zero_gradient_pieces"])
    metrics.update({f"gradsim/{k}": v for k, v in analysis["timing"].items()})
    for logger in loggers:
        logger.log_metrics(metrics)


def summary_text(analysis: dict) -> str:
    """One line on the reduction: pieces, layers, how, mean GradSim, zero-gradient pieces."""
    s = analysis["summary"]
    methods = sorted({v["method"] for v in analysis["per_layer"].values()})
    mean = f", mean GradSim {s['mean']:.3f}" if "mean" in s else ""
    return (
        f"{s['pieces']} pieces × {len(analysis['per_layer'])} layers, {analysis['method']['mode']} "
        f"({'/'.join(methods)}){mean}, {len(analysis['zero_gradient_pieces'])} zero-gradient pieces"
    )
