"""The embedded default models (`tiny-gpt2`, `tiny-llama`): names a user can pass wherever a model path goes.

Trained on the default synthetic world on first use, cached, then loaded like any HF model directory.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODELS: dict[str, str] = {}  # name -> config under configs/inject/ (filled by the injection stage)


def resolve_embedded(name: str) -> Path | None:
    """The directory of an embedded model, training it first if needed; None for any other name."""
    if name not in EMBEDDED_MODELS:
        return None
    raise NotImplementedError(f"the embedded model {name!r} is not available yet (knowledge injection has not landed)")
