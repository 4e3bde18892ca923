"""Where lit_coupling keeps what it computes once and reuses: `$LIT_COUPLING_CACHE`, default ~/.cache/lit_coupling."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LIT_COUPLING_CACHE") or Path.home() / ".cache" / "lit_coupling").expanduser()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# What makes a cached model directory complete: written under a temporary name and renamed, so these exist only
# in a finished one.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def model_complete(directory: Path) -> bool:
    return all((directory / f).exists() for f in MODEL_FILES)


def built_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(target)` the first time; several processes asking at once build it once (the
    others wait on a file lock)."""
    from filelock import FileLock

    if model_complete(target):
        return target
    with FileLock(str(target) + ".lock"):
        if not model_complete(target):
            build(target)
    return target
