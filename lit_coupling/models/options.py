"""Which model, and which of its modules: the settings every stage that opens a model shares (`ModelOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

# The embedded model a run or module uses when no model_path is given.
DEFAULT_MODEL = "tiny-gpt2"


@dataclass
class ModelOptions:
    model_path: str | None = None
    """Hub id (gpt2, meta-llama/Llama-2-7b-hf), local HF directory, .gguf file, or embedded name (tiny-gpt2,
    tiny-llama, smollm2-135m). Default: tiny-gpt2 (`run`: the model of the run in --output_dir first)."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on GPU; MEMIT edits in fp32), float32, bfloat16, float64."""
    layers: str | None = None
    """Layers whose MLP output projection GradSim targets: all (default), '4-8', '4,6,8' (MEMIT's edit layers are
    --memit.layers)."""
    target_pattern: str | None = None
    """Override the MLP output module pattern, e.g. 'transformer.h.{}.mlp.c_proj'."""
    trust_remote_code: bool = False
    """Allow a model repository's own Python code to run (off unless asked)."""

    def model_options(self) -> ModelOptions:
        """These settings alone (a RunConfig or CheckOptions is a ModelOptions with more settings)."""
        return ModelOptions(**{f.name: getattr(self, f.name) for f in fields(ModelOptions)})
