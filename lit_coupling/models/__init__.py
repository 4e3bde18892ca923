"""Model families and loading: the only place that knows how GPT-2, LLaMA & co. differ.

The names below load on first use, so importing a light submodule (`models.options`, `models.embedded`) does not
import torch and transformers.
"""

_EXPORTS = {
    "FAMILIES": "adapters",
    "AdapterError": "adapters",
    "Family": "adapters",
    "ModelAdapter": "adapters",
    "TargetModule": "adapters",
    "parse_layers": "adapters",
    "LoadedModel": "loading",
    "ModelLoadError": "loading",
    "load_model": "loading",
    "load_tokenizer": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import sys

    submodule = name if name in ("adapters", "loading") else _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module 'lit_coupling.models' has no attribute {name!r}")
    if submodule == "adapters":
        import lit_coupling.models.adapters  # noqa: F401 - sets the attribute; sys.modules holds it
    else:
        import lit_coupling.models.loading  # noqa: F401
    module = sys.modules[f"lit_coupling.models.{submodule}"]
    return module if name == submodule else getattr(module, name)
