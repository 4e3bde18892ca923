"""The base LightningModule of the stages that run a HF causal LM (GradSim, MEMIT ripple).

The model is loaded in `configure_model`, not in `__init__`: a DDP-spawned or FSDP job then pickles only a path,
and each process loads (and, under FSDP2, shards) its own copy. Weights are frozen: GradSim captures activations
and output gradients through hooks, MEMIT optimises its own vectors.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.loading import load_model


class CausalLMModule(LightningModule):
    def __init__(self, model_path: str = "tiny-gpt2", dtype: str = "auto", layers: str | list[int] | None = None,
                 target_pattern: str | None = None, trust_remote_code: bool = False):
        """
        Args:
            model_path: Hub id, local HF directory, or embedded name (tiny-gpt2, tiny-llama).
            dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float64.
            layers: target layers: all (default), '4-8', '4,6,8' or a list.
            target_pattern: override the MLP output module pattern, e.g. 'transformer.h.{}.mlp.c_proj'.
            trust_remote_code: allow the model repository's own code to run.
        """
        super().__init__()
        self.save_hyperparameters()
        self.lm: torch.nn.Module | None = None
        self.adapter: ModelAdapter | None = None
        self.tokenizer = None
        self.model_info: dict = {}

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        hp = self.hparams
        # Loaded on the CPU; the strategy moves (DDP) or shards (FSDP2) it afterwards.
        loaded = load_model(hp.model_path, dtype=hp.dtype, device="cpu", trust_remote_code=hp.trust_remote_code)
        self.lm, self.tokenizer = loaded.model, loaded.tokenizer
        self.lm.requires_grad_(False)
        self.adapter = ModelAdapter(self.lm, layers=hp.layers, target_pattern=hp.target_pattern)
        self.model_info = {"name": hp.model_path, "path": loaded.resolved_path,
                           "dtype": str(loaded.dtype).removeprefix("torch."),
                           "parameters": sum(p.numel() for p in self.lm.parameters()), **self.adapter.describe()}
