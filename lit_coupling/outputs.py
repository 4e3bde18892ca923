"""The files a run writes (same names for every model), and writers that never leave a file half-written.

Every writer puts its bytes in a temporary file beside the target and renames it over the target: a killed run
leaves either the previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PIECES = "knowledge_pieces.json"
COUPLING_MATRIX = "coupling_matrix.npy"
COUPLING_LAYERS = "coupling_layers.npz"  # per-layer gradient inner products, for any layer subset later
COUPLING_ANALYSIS = "coupling_analysis.json"
PIECE_HIDDEN = "piece_hidden.npy"  # final hidden state at the last prompt token (a baseline predictor)
RIPPLE = "ripple_experiments.json"
RIPPLE_PAIRS = "ripple_pairs.csv"
EDIT_UPDATES = "edit_updates.pt"  # each edit's ΔW per edit layer as low-rank factors (U, V): ΔW = U Vᵀ
EDIT_PREDICTORS = "edit_predictors.npz"  # (edit × piece) gradient predictors of ripple (analysis stage)
CORRELATION = "correlation_analysis.json"
PAIR_TABLE = "pair_table.csv"  # one row per (edit, piece): GradSim, ripple, baselines (analysis stage)
HEATMAP = "coupling_heatmap.png"
COMPREHENSIVE = "comprehensive_analysis.png"
LAYER_PLOT = "coupling_by_layer.png"
PREDICTOR_PLOT = "predictor_ranking.png"  # every predictor's ρ with ripple, ranked (analysis report)
REPORT = "final_mvp_report.md"
MANIFEST = "manifest.json"

# The eight files of mission.md, in pipeline order.
MAIN_OUTPUTS = (PIECES, COUPLING_MATRIX, COUPLING_ANALYSIS, RIPPLE, CORRELATION, HEATMAP, COMPREHENSIVE, REPORT)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


atomic_write = _atomic  # public: for writers that stream their bytes (coupling_layers.npz layer by layer)

# What `_atomic` names its temporary files: "." + target name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_temp_files(directory: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `directory` and its sub-folders.

    A kill between `mkstemp` and `os.replace` leaves one; the target file itself is untouched (the previous complete
    version, or none). Call it only when no other process is writing to the directory.
    """
    removed = []
    for path in sorted(Path(directory).rglob(".*.tmp")):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file() and not any(part in skip for part in path.parts):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _jsonable(value: Any) -> Any:
    """numpy/torch scalars and arrays → plain JSON; NaN/inf → null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


jsonable = _jsonable  # public: in memory exactly what write_json stores (NaN → None)


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    text = json.dumps(_jsonable(data), indent=indent, ensure_ascii=False, allow_nan=False)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text + "\n", encoding="utf-8")

    return _atomic(path, write)


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return _atomic(path, write)


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return _atomic(path, write)


def save_figure(path: str | Path, figure, **kwargs) -> Path:
    def write(tmp: str) -> None:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)

    return _atomic(path, write)


def save_torch(path: str | Path, obj: Any) -> Path:
    """torch.save, atomically (tensors and plain containers only, so `torch.load(weights_only=True)` reads it)."""
    import torch

    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(data: Any) -> str:
    """Hash of JSON-able settings, independent of key order: what the manifest and caches key on."""
    return hashlib.sha256(json.dumps(_jsonable(data), sort_keys=True).encode()).hexdigest()[:16]
