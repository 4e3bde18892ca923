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
from lit_coupling.models.options import DEFAULT_MODEL, ModelOptions


class CausalLMModule(LightningModule):
    def __init__(self, model: ModelOptions | None = None):
        """
        Args:
            model: which model and which of its modules (`ModelOptions`: model_path, dtype, layers,
                target_pattern, trust_remote_code), the settings `lit-coupling run` takes as --model_path etc.
        """
        super().__init__()
        self.save_hyperparameters()
        # Kept as given (under LightningCLI, `hparams` holds the parsed config rather than the object).
        self.model_options = model if isinstance(model, ModelOptions) else ModelOptions(**(model or {}))
        self.lm: torch.nn.Module | None = None
        self.adapter: ModelAdapter | None = None
        self.tokenizer = None
        self.model_info: dict = {}

    @property
    def model_path(self) -> str:
        return self.model_options.model_path or DEFAULT_MODEL

    def load_dtype(self) -> str:
        """The dtype to load the weights in (`model.dtype`; a module may decide what `auto` means for it)."""
        return self.model_options.dtype

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        options = self.model_options
        # Loaded on the CPU; the strategy moves (DDP) or shards (FSDP2) it afterwards. `auto` resolves for the
        # device the model will run on (bf16 on a GPU), not for the CPU it is loaded on.
        target = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        loaded = load_model(
            self.model_path,
            dtype=resolve_dtype(self.load_dtype(), target),
            device="cpu",
            trust_remote_code=options.trust_remote_code,
        )
        self.lm, self.tokenizer = loaded.model, loaded.tokenizer
        self.lm.requires_grad_(False)
        self.adapter = ModelAdapter(self.lm, layers=options.layers, target_pattern=options.target_pattern)
        self.model_info = {
            "name": self.model_path,
            "path": loaded.resolved_path,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in self.lm.parameters()),
            **self.adapter.describe(),
        }
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
