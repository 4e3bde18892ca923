"""Knowledge injection: a LightningModule that teaches a causal LM the facts of a world (`lit-coupling fit`).

A tiny model is built from a config with a tokenizer trained on the world's text; an existing HF model
(`model_path`) is fine-tuned with its own tokenizer. Either way the module owns model and tokenizer, hands the
tokenizer to the FactsDataModule (`connect`), and the SavePretrained callback saves both like a hub model.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

ARCHITECTURES = ("gpt2", "llama")  # families a model can be built from a config for (tokenizer styles exist)


def build_tokenizer(texts: list[str], vocab_size: int, family: str):
    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size=vocab_size, style=family)


def build_model(family: str, config: dict[str, Any], tokenizer, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM of `family`, sized to the tokenizer, with its special tokens set."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in ARCHITECTURES:
        from lit_coupling.errors import UserError

        raise UserError(
            f"cannot build a {family!r} model from a config: choose one of {', '.join(ARCHITECTURES)}, "
            f"or fine-tune an existing model with --model.model_path"
        )
    hf_config = AutoConfig.for_model(family, **config)
    hf_config.vocab_size = len(tokenizer)
    hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    hf_config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng():  # the same seed gives the same initial weights, whatever ran before
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def warmup_then_decay(optimizer: torch.optim.Optimizer, total: int, warmup: int, floor: float):
    """Linear warm-up over `warmup` steps (step k at (k + 1)/warmup × lr), then linear decay to `floor` × lr at
    `total` steps, where it stays: `SequentialLR` of two `LinearLR`, stepped once per optimiser step."""
    from torch.optim.lr_scheduler import LinearLR, SequentialLR

    decay = LinearLR(optimizer, start_factor=1.0, end_factor=floor, total_iters=max(1, total - warmup))
    if warmup <= 0:
        return decay
    warm = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [warm, decay], milestones=[warmup])


class InjectionModule(LightningModule):
    def __init__(
        self,
        family: str = "gpt2",
        config: dict[str, Any] | None = None,
        vocab_size: int = 4096,
        model_path: str | None = None,
        trust_remote_code: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.1,
        init_seed: int = 0,
        num_threads: int | None = None,
    ):
        """
        Args:
            family: architecture of a model built from `config`: gpt2 or llama.
            config: HF config fields of the new model (n_layer, n_embd, hidden_size, ...); vocabulary size and
                special tokens come from the tokenizer.
            vocab_size: upper bound of the byte-level BPE vocabulary trained on the world's text.
            model_path: fine-tune this HF model (hub id or directory) with its own tokenizer instead of building one.
            trust_remote_code: allow `model_path`'s repository code to run.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps.
            min_lr_ratio: the learning rate decays linearly to this fraction of `lr` at the last planned step.
            init_seed: seeds the initial weights of a model built from `config`.
            num_threads: torch CPU threads (None: torch's default). On a busy machine 1 can be the fastest.
        """
        super().__init__()
        self.save_hyperparameters()
        self.lm: torch.nn.Module | None = None
        self.tokenizer = None
        self.bos_ids: list[int] = []

    def setup(self, stage: str) -> None:
        from lit_coupling.models.adapters import bos_ids, ensure_padding

        if self.hparams.num_threads:
            torch.set_num_threads(self.hparams.num_threads)
        if self.lm is None:
            hp, data = self.hparams, self.trainer.datamodule
            if hp.model_path:
                from lit_coupling.models.loading import load_model

                loaded = load_model(
                    hp.model_path, dtype="float32", device="cpu", trust_remote_code=hp.trust_remote_code
                )
                self.lm, self.tokenizer = loaded.model, loaded.tokenizer
            else:
                self.tokenizer = build_tokenizer(data.corpus(), hp.vocab_size, hp.family)
                self.lm = build_model(hp.family, hp.config or {}, self.tokenizer, hp.init_seed)
            ensure_padding(self.tokenizer)
            self.lm.train().requires_grad_(True)  # load_model hands out eval mode
            self.bos_ids = bos_ids(self.lm.config, self.tokenizer)
        self.trainer.datamodule.connect(self.tokenizer, self.bos_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.lm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.lm.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.98))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_then_decay(optimizer, total, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
