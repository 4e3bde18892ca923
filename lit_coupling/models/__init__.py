"""Model families and loading: the only place that knows how GPT-2, LLaMA & co. differ."""

from lit_coupling.models.adapters import FAMILIES, AdapterError, Family, ModelAdapter, TargetModule, parse_layers
from lit_coupling.models.loading import LoadedModel, ModelLoadError, load_model, load_tokenizer

__all__ = ["FAMILIES", "AdapterError", "Family", "LoadedModel", "ModelAdapter", "ModelLoadError", "TargetModule",
           "load_model", "load_tokenizer", "parse_layers"]
