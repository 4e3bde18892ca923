"""Where lit_coupling keeps what it computes once and reuses: `$LIT_COUPLING_CACHE`, default ~/.cache/lit_coupling."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LIT_COUPLING_CACHE") or Path.home() / ".cache" / "lit_coupling").expanduser()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
