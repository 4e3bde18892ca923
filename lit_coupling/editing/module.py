"""MemitModule: one MEMIT edit per predict step, with the ripple it causes measured on every piece.

The predict dataset is the edit requests (`EditRequestDataModule`); under DDP they are shared out across ranks
and
each rank edits its own copy of the model. `RestoreEditedWeights` (always attached) puts the weights back
after
every edit; `RippleWriter` gathers the records and writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_coupling.data.piece import KnowledgePiece, load_pieces
from lit_coupling.editing.callbacks import RestoreEditedWeights
from lit_coupling.editing.covariance import key_covariances, resolve_corpus, shrink
from lit_coupling.editing.hparams import MemitHparams, resolve_hparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.editing.requests import EditRequest, RequestPlan, plan_requests
from lit_coupling.editing.ripple import (
    PieceScores,
    build_probes,
    experiment_record,
    failed_record,
    score_clozes,
    score_pieces,
)
from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.module import CausalLMModule
from lit_coupling.scoring import ClozeTokenError, encode_cloze


def _single(items: list[EditRequest]) -> EditRequest:
    return items[0]


class EditRequestDataModule(LightningDataModule):
    def __init__(self, pieces_path: str, max_experiments: int = 10, seed: int = 0):
        """
        Args:
            pieces_path: knowledge_pieces.json (or the run directory holding it), tokenised for the model.
            max_experiments: number of edits (source pieces, drawn seeded from the single-fact pieces).
            seed: seeds the choice of sources and their counterfactual answers.
        """
        super().__init__()
        self.save_hyperparameters()
        self.pieces: list[KnowledgePiece] = []
        self.meta: dict = {}
        self.plan: RequestPlan | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.plan is None:
            self.pieces, self.meta = load_pieces(Path(self.hparams.pieces_path))
            self.plan = plan_requests(self.pieces, self.hparams.max_experiments, self.hparams.seed)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.plan.requests, batch_size=1, shuffle=False, collate_fn=_single)


class MemitModule(CausalLMModule):
    def __init__(
        self,
        model_path: str = "tiny-gpt2",
        dtype: str = "auto",
        memit: MemitHparams | str = "auto",
        layers: str | list[int] | None = None,
        target_pattern: str | None = None,
        trust_remote_code: bool = False,
        cov_corpus: str = "hotpot",
        cov_tokens: int = 100_000,
        stats_dir: str | None = None,
        batch_size: int = 128,
        seed: int = 0,
        on_edit_error: str = "record",
    ):
        """
        Args:
            model_path: Hub id, local HF directory, or embedded name (tiny-gpt2, tiny-llama).
            dtype: auto (float32 on every device: in bf16 weights a MEMIT update, a small change to large
                entries, is mostly rounded away), float32, bfloat16, float64.
            memit: MEMIT hyperparameters, a YAML file holding them, or auto (configs/memit/ by family and
            shape).
            layers: edit layers, overriding the hyperparameters: '13-17', '4,5,6'.
            target_pattern: override the MLP output module pattern, e.g. 'transformer.h.{}.mlp.c_proj'.
            trust_remote_code: allow the model repository's own code to run.
            cov_corpus: key-statistics corpus: hotpot (the pieces' HotpotQA context paragraphs), a .txt file
            (a
                document a line), a HotpotQA .json/.jsonl, or hf:NAME[:CONFIG][:SPLIT].
            cov_tokens: number of corpus tokens (key vectors) in each layer's covariance.
            stats_dir: cache of key statistics (default $LIT_COUPLING_CACHE/memit_stats or
            ~/.cache/lit_coupling).
            batch_size: pieces per batch when scoring the ripple.
            seed: seeds the context prefixes.
            on_edit_error: record (a failed edit becomes a record with its error) or raise.
        """
        super().__init__(
            model_path=model_path,
            dtype=dtype,
            layers=layers,
            target_pattern=target_pattern,
            trust_remote_code=trust_remote_code,
        )
        self.hparams.dtype = "float32" if dtype == "auto" else dtype  # what the base class loads
        if on_edit_error not in ("record", "raise"):
            raise UserError(f"on_edit_error must be record or raise, not {on_edit_error!r}")
        self.memit_hparams: MemitHparams | None = None
        self.pieces: list[KnowledgePiece] = []
        self.solvers: dict[int, CovarianceSolver] = {}
        self.covariance_info: dict = {}
        self.prefixes: list[str] = []
        self.baseline: PieceScores | None = None
        self.plan_info: dict = {}

    # --- set-up ---------------------------------------------------------------------------------------
    # -------------

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        super().configure_model()
        hp = self.hparams
        self.memit_hparams = resolve_hparams(hp.memit, self.adapter, hp.layers)
        self.adapter = ModelAdapter(
            self.lm, layers=self.memit_hparams.layers, target_pattern=hp.target_pattern
        )
        self.model_info.update(self.adapter.describe())
        self.bos = self.adapter.bos_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id

    def configure_callbacks(self):
        return [RestoreEditedWeights()]

    def edited_weights(self) -> dict[str, torch.Tensor]:
        return {
            t.name: t.module.weight
            for t in (self.adapter.target(layer) for layer in self.memit_hparams.layers)
        }

    def _check_pieces(self, meta: dict) -> None:
        """The stored token ids must be this tokenizer's: pieces made for another model score garbage."""
        for piece in self.pieces[:20]:
            try:
                ids = encode_cloze(self.tokenizer, piece.prompt, piece.answer, self.bos)
            except ClozeTokenError as error:
                raise UserError(
                    f"piece {piece.id} does not tokenise for {self.hparams.model_path} ({error}): "
                    f"run the pieces stage for this model"
                ) from error
            if ids != (piece.prompt_ids, piece.answer_ids):
                made_for = meta.get("model", {}).get("name", "another model")
                raise UserError(
                    f"knowledge_pieces.json was tokenised for {made_for}, not for "
                    f"{self.hparams.model_path} (piece {piece.id}): run the pieces stage for this model"
                )

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, EditRequestDataModule):
            raise UserError(
                "MemitModule predicts over an EditRequestDataModule (it holds the pieces to measure)"
            )
        datamodule.setup()
        self.pieces = datamodule.pieces
        self._check_pieces(datamodule.meta)
        plan = datamodule.plan
        self.plan_info = {
            "requested": datamodule.hparams.max_experiments,
            "planned": len(plan.requests),
            "eligible": plan.eligible,
            "skipped": plan.skipped,
            "seed": datamodule.hparams.seed,
        }
        hp, memit = self.hparams, self.memit_hparams
        self.prefixes = generate_prefixes(
            self.lm,
            self.tokenizer,
            self.bos,
            memit.context_prefixes,
            memit.context_prefix_tokens,
            seed=hp.seed,
        )
        self._load_covariances(datamodule.meta)
        self.baseline = score_pieces(self.lm, self.tokenizer, self.pieces, hp.batch_size, self.pad_id)

    def _load_covariances(self, meta: dict) -> None:
        hp = self.hparams
        corpus = resolve_corpus(hp.cov_corpus, meta.get("source", {}).get("path"))
        kwargs = {
            "adapter": self.adapter,
            "tokenizer": self.tokenizer,
            "layers": self.memit_hparams.layers,
            "corpus": corpus,
            "tokens": hp.cov_tokens,
            "stats_dir": hp.stats_dir,
            "model_name": hp.model_path,
            "bos_ids": self.bos,
        }
        # One process per machine computes (and caches); the others wait, then read the cache.
        if self.trainer.local_rank == 0:
            covs, metas = key_covariances(
                **kwargs,
                progress=self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None,
            )
        self.trainer.strategy.barrier("memit-key-statistics")
        if self.trainer.local_rank != 0:
            covs, metas = key_covariances(**kwargs, compute=False)
        self.solvers, layers_info = {}, {}
        for layer, c in covs.items():
            m = metas[layer]
            shrunk, alpha = shrink(
                c.to(self.device), m["mean_fourth_power"], m["tokens"], self.memit_hparams.mom2_shrinkage
            )
            self.solvers[layer] = CovarianceSolver(shrunk)
            layers_info[str(layer)] = {
                "tokens": m["tokens"],
                "shrinkage": alpha,
                "cache": m["cache"],
                "cached": m["cached"],
            }
        self.covariance_info = {
            "corpus": corpus.name,
            "corpus_fingerprint": corpus.fingerprint,
            "tokens_requested": hp.cov_tokens,
            "layers": layers_info,
        }

    # --- one edit
    # --------------------------------------------------------------------------------------------------

    def predict_step(self, request: EditRequest, batch_idx: int = 0) -> dict:
        hp = self.hparams
        start = time.perf_counter()
        try:
            probes = build_probes(self.tokenizer, request, self.pieces, self.bos)
            probe_before, _ = score_clozes(
                self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id
            )
            edited = time.perf_counter()
            result = apply_memit(
                self.adapter,
                self.tokenizer,
                [request],
                self.memit_hparams,
                self.solvers,
                self.prefixes,
                self.bos,
                self.pad_id,
            )
        except Exception as error:
            if hp.on_edit_error == "raise":
                raise
            return failed_record(request, error, {"edit": time.perf_counter() - start, "measure": 0.0})
        measured = time.perf_counter()
        after = score_pieces(self.lm, self.tokenizer, self.pieces, hp.batch_size, self.pad_id)
        probe_after, probe_texts = score_clozes(
            self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id
        )
        target = result.targets[0]
        info = {
            "delta_norms": {str(k): v for k, v in result.delta_norms.items()},
            "residual_norms": {str(k): v for k, v in result.residual_norms.items()},
            "target": {
                "steps": target.steps,
                "nll": target.nll,
                "delta_norm": target.delta_norm,
                "h_norm": target.h_norm,
                "later_layers_only": target.shortcut,
            },
        }
        times = {
            "edit": measured - edited,
            "targets": result.time_targets_s,
            "updates": result.time_updates_s,
            "measure": time.perf_counter() - measured,
        }
        return experiment_record(
            request,
            self.pieces,
            self.baseline,
            after,
            probes,
            probe_before,
            probe_after,
            probe_texts,
            info,
            times,
        )

    def ripple_header(self) -> dict:
        """Everything in ripple_experiments.json besides the experiments: what was run, and with what."""
        return {
            "model": self.model_info,
            "hparams": self.memit_hparams.to_dict(),
            "seed": self.hparams.seed,
            "covariance": self.covariance_info,
            "context_prefixes": self.prefixes,
            "requests": self.plan_info,
            "piece_ids": [p.id for p in self.pieces],
        }
