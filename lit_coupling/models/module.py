"""The base LightningModule of the stages that run a HF causal LM (GradSim, MEMIT ripple).

The model is loaded in `configure_model`, not in `__init__`: a DDP-spawned or FSDP job then pickles only a path,
and each process loads (and, under FSDP2, shards) its own copy. Weights are frozen: GradSim captures activations
and output gradients through hooks, MEMIT optimises its own vectors.

FSDP2: when the strategy provides a device mesh (`ModelParallelStrategy`, `--trainer.strategy fsdp`), each
transformer block (the family's `_no_split_modules`) is sharded, then the root model.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.loading import load_model, resolve_dtype


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
        # Loaded on the CPU; the strategy moves (DDP) or shards (FSDP2) it afterwards. `auto` resolves for the
        # device the model will run on (bf16 on a GPU), not for the CPU it is loaded on.
        target = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        loaded = load_model(hp.model_path, dtype=resolve_dtype(hp.dtype, target), device="cpu",
                            trust_remote_code=hp.trust_remote_code)
        self.lm, self.tokenizer = loaded.model, loaded.tokenizer
        self.lm.requires_grad_(False)
        self.adapter = ModelAdapter(self.lm, layers=hp.layers, target_pattern=hp.target_pattern)
        self.model_info = {"name": hp.model_path, "path": loaded.resolved_path,
                           "dtype": str(loaded.dtype).removeprefix("torch."),
                           "parameters": sum(p.numel() for p in self.lm.parameters()), **self.adapter.describe()}
        if self.device_mesh is not None:
            self._shard(self.device_mesh)

    def _shard(self, mesh) -> None:
        """FSDP2: one shard unit per transformer block, then the root (embeddings, final norm, head)."""
        from torch.distributed.fsdp import fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise UserError("tensor parallelism is not supported: use ModelParallelStrategy(tensor_parallel_size=1)")
        data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        wrap = self.adapter.no_split_modules
        for module in list(self.lm.modules()):
            if type(module).__name__ in wrap:
                fully_shard(module, mesh=data_mesh)
        fully_shard(self.lm, mesh=data_mesh)
        self.model_info["fsdp"] = {"shards": data_mesh.size(), "units": sorted(wrap)}
