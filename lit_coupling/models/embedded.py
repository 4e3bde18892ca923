"""The embedded default models (`tiny-gpt2`, `tiny-llama`): their names and where their trained copies are cached.

Names a user can pass wherever a model path goes. Resolving a name only finds the cached directory, it never
trains: `lit_coupling.inject.embedded.ensure_embedded` trains one (`lit-coupling fit` with its config in
`lit_coupling/resources/inject/` = `configs/inject/`), and the run, `check-model` and `predict` call it before
they open the model. The cache key is a hash of that config and of the default world, so changing either trains
again.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODELS: dict[str, str] = {"tiny-gpt2": "tiny-gpt2.yaml", "tiny-llama": "tiny-llama.yaml"}


def embedded_config(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "resources" / "inject" / EMBEDDED_MODELS[name]


def cache_key(name: str) -> str:
    """Hash of the training config and the default world: change either and the model is trained again."""
    from lit_coupling.data.world import default_world_file
    from lit_coupling.outputs import sha256_file, stable_hash

    return stable_hash(
        {"config": embedded_config(name).read_text(encoding="utf-8"), "world": sha256_file(default_world_file())}
    )


def embedded_dir(name: str) -> Path | None:
    """Where the trained copy of embedded model `name` is (or will be) cached; None for any other name."""
    if name not in EMBEDDED_MODELS:
        return None
    from lit_coupling.cache import cache_dir

    return cache_dir("models") / f"{name}-{cache_key(name)}"
