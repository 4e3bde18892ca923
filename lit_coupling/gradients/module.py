"""GradientModule: in `predict_step`, what each piece's gradient of log P(answer | prompt) on the target layers needs.

Hooks capture each target module's input X and output gradient D; exact mode returns them packed (padding and the
last token dropped), projected mode returns the Kronecker-projected gradient. `GradSimWriter` stores them;
`gradients.reduce.reduce_gradsim` then assembles the N×N matrix.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from lit_coupling.errors import UserError
from lit_coupling.gradients.inner import accumulation_dtype
from lit_coupling.gradients.options import GradSimOptions
from lit_coupling.gradients.projection import kronecker_projection, project_gradients
from lit_coupling.models.adapters import TargetModule
from lit_coupling.models.hooks import Hooks
from lit_coupling.models.module import CausalLMModule
from lit_coupling.models.options import ModelOptions
from lit_coupling.scoring import answer_logprobs, answer_window, takes_logits_to_keep

MODES = ("exact", "projected")


class TargetHooks:
    """Forward hooks on the target modules keeping each input X and, through a tensor hook, each output gradient D.

    The weights stay frozen. The first target's output is made a leaf that requires grad, so the backward runs from
    the loss down to the first target layer and no further, and no weight gradient is ever formed.
    """

    def __init__(self, targets: list[TargetModule], keep: bool = True):
        self.targets = targets
        self.keep = keep
        self.x: dict[int, Tensor] = {}
        self.d: dict[int, Tensor] = {}
        self._hooks = Hooks(forward=[(t.module, partial(self._forward, t.layer)) for t in targets])

    def attach(self) -> TargetHooks:
        self._hooks.attach()
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def clear(self) -> None:
        self.x.clear()
        self.d.clear()

    def _forward(self, layer: int, module, args, output):
        if not isinstance(output, Tensor):
            raise UserError(
                f"the target module of layer {layer} returns {type(output).__name__}, not a tensor; "
                "point --target_pattern at a linear layer"
            )
        if self.keep:
            self.x[layer] = args[0].detach()
        if not output.requires_grad:
            output = output.detach().requires_grad_()
        if self.keep:
            output.register_hook(partial(self._backward, layer))
        return output

    def _backward(self, layer: int, grad: Tensor) -> None:
        self.d[layer] = grad.detach()

    def __enter__(self) -> TargetHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def gradient_mask(lengths: Tensor, width: int) -> Tensor:
    """(B, T) True at the tokens whose output gradient can be non-zero: every real token but the last.

    The last token's logits predict nothing that is scored and a causal model lets no earlier token see it, so its
    D is exactly zero; padding comes after it. Dropping them is exact and saves their cost in every later step.
    """
    return torch.arange(width, device=lengths.device)[None, :] < (lengths - 1)[:, None]


def backward_log_prob(
    lm, batch: dict[str, Tensor], device: torch.device | str, hidden: bool = False, window: bool = True
):
    """Forward and backward of Σ_batch log P(answer | prompt) under the caller's hooks: (log P per row, last hidden).

    Summed, not averaged, over the batch, so each piece's gradient is exactly its own (a mean scales it by 1/B).
    With `window`, where the model takes `logits_to_keep`, the LM head runs only on the positions the answer is
    scored from (the same numbers; `window=False` is the plain forward, for comparison).
    """
    full_ids = batch["input_ids"].to(device)
    input_ids, answer_mask = full_ids, batch["answer_mask"].to(device)  # what the scored logits line up with
    extra = {}
    if window and takes_logits_to_keep(type(lm)):
        positions = answer_window(batch).to(device)
        extra["logits_to_keep"] = positions
        input_ids, answer_mask = input_ids.gather(1, positions), answer_mask.gather(1, positions)
    with torch.enable_grad():
        out = lm(
            input_ids=full_ids,
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
            output_hidden_states=hidden,
            **extra,
        )
        logp = answer_logprobs(out.logits, input_ids, answer_mask)
        logp.sum().backward()
    return logp.detach(), (out.hidden_states[-1].detach() if hidden else None)


class GradientModule(CausalLMModule):
    def __init__(self, model: ModelOptions | None = None, gradsim: GradSimOptions | None = None, seed: int = 0):
        """
        Args:
            model: which model and which of its modules (`ModelOptions`; `layers` are the GradSim layers).
            gradsim: the GradSim settings (`GradSimOptions`, `run --gradsim.*`): mode, projection dims and seed
                here; batch size, reduction and progress for whoever runs the job.
            seed: seeds the projection when `gradsim.projection_seed` is unset (the run's --seed).
        """
        gradsim = gradsim if isinstance(gradsim, GradSimOptions) else GradSimOptions(**(gradsim or {}))
        if gradsim.mode not in MODES:
            raise UserError(f"GradSim mode {gradsim.mode!r} is unknown: choose exact or projected")
        if gradsim.mode == "projected" and (gradsim.k_in < 1 or gradsim.k_out < 1):
            raise UserError(f"projection dims must be positive, got k_in={gradsim.k_in}, k_out={gradsim.k_out}")
        super().__init__(model=model)
        self.save_hyperparameters()
        self.options = gradsim
        self.projection_seed = seed if gradsim.projection_seed is None else gradsim.projection_seed
        self.hooks: TargetHooks | None = None
        self.projections: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def targets(self) -> list[TargetModule]:
        return [self.adapter.targets[layer] for layer in self.adapter.layers]

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.targets)).module.weight.dtype

    def method_info(self) -> dict:
        """What coupling_analysis.json records about how the gradients were taken."""
        hp = self.options
        info = {
            "mode": hp.mode,
            "loss": "sum over answer tokens of log P(answer token | prefix), summed over the batch",
            "accumulation_dtype": str(accumulation_dtype(self.compute_dtype)).removeprefix("torch."),
            "weight_dtype": str(self.compute_dtype).removeprefix("torch."),
        }
        if hp.mode == "projected":
            info.update(
                k_in=hp.k_in,
                k_out=hp.k_out,
                projection_seed=self.projection_seed,
                projection="Kronecker (D P_out)ᵀ(X P_in), Gaussian N(0, 1/k), float64 draw per (seed, layer)",
                effective_dims={
                    str(t.layer): [min(hp.k_out, t.shape[0]), min(hp.k_in, t.shape[1])] for t in self.targets
                },
            )
        return info

    def on_predict_start(self) -> None:
        self.hooks = TargetHooks(self.targets).attach()
        if self.options.mode == "projected":
            acc = accumulation_dtype(self.compute_dtype)
            self.projections = {
                t.layer: kronecker_projection(
                    t.shape[1],
                    t.shape[0],
                    self.options.k_in,
                    self.options.k_out,
                    self.projection_seed,
                    t.layer,
                    dtype=acc,
                    device=self.device,
                )
                for t in self.targets
            }

    def on_predict_end(self) -> None:
        if self.hooks is not None:
            self.hooks.detach()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict:
        vocab, top = self.lm.get_input_embeddings().num_embeddings, int(batch["input_ids"].max())
        if top >= vocab:
            raise UserError(
                f"piece token ids go up to {top} but the model's vocabulary "
                f"has {vocab} entries: knowledge_pieces.json was tokenised for another model"
            )
        self.hooks.clear()
        logp, hidden = backward_log_prob(self.lm, batch, self.device, hidden=True)
        lengths = batch["lengths"].to(self.device)
        mask = gradient_mask(lengths, batch["input_ids"].shape[1])
        rows = torch.arange(len(lengths), device=self.device)
        last_prompt = batch["prompt_lengths"].to(self.device) - 1  # predicts the first answer token
        store = accumulation_dtype(self.compute_dtype)
        prediction = {
            "index": batch["index"].cpu(),
            "tokens": mask.sum(1).cpu(),
            "logp": logp.double().cpu(),
            "hidden": hidden[rows, last_prompt].to(store).cpu(),
        }
        if self.options.mode == "exact":
            prediction["x"] = [self.hooks.x[t.layer][mask].cpu() for t in self.targets]
            prediction["d"] = [self.hooks.d[t.layer][mask].cpu() for t in self.targets]
        else:
            prediction["g"] = [
                project_gradients(self.hooks.x[t.layer], self.hooks.d[t.layer], mask, *self.projections[t.layer]).cpu()
                for t in self.targets
            ]
        self.hooks.clear()
        return prediction
