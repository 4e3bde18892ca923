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
from lit_coupling.editing.finetune import FinetuneHparams, apply_finetune
from lit_coupling.editing.covariance import (
    covariance_quality,
    covariance_totals,
    key_covariances,
    resolve_corpus,
    shrink,
)
from lit_coupling.editing.hparams import MemitHparams, deviations, resolve_hparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.data.counterfact import CounterFactCase, read_counterfact
from lit_coupling.progress import Progress, say
from lit_coupling.editing.requests import (
    EditRequest,
    RequestPlan,
    entities_for_source,
    plan_counterfact,
    plan_requests,
)
from lit_coupling.editing.ripple import (
    KNOWN_CRITERIA,
    PieceScores,
    baseline_block,
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


EDIT_SOURCES = ("pieces", "counterfact:PATH")


class EditRequestDataModule(LightningDataModule):
    def __init__(self, pieces_path: str, max_experiments: int = 10, seed: int = 0, edit_source: str = "pieces"):
        """
        Args:
            pieces_path: knowledge_pieces.json (or the run directory holding it), tokenised for the model.
            max_experiments: number of edits (source pieces, drawn seeded from the single-fact pieces).
            seed: seeds the choice of sources and their counterfactual answers.
            edit_source: pieces (the single-fact pieces, each with a same-type counterfactual), or
                counterfact:PATH (CounterFact's requested rewrites; the pieces are then the ripple's targets).
        """
        super().__init__()
        self.save_hyperparameters()
        if edit_source != "pieces" and not (edit_source.startswith("counterfact:") and len(edit_source) > 12):
            raise UserError(f"edit_source must be pieces or counterfact:PATH (a CounterFact JSON file), not "
                            f"{edit_source!r}")
        self.pieces: list[KnowledgePiece] = []
        self.meta: dict = {}
        self.cases: list[CounterFactCase] = []
        self.plan: RequestPlan | None = None

    def setup(self, stage: str | None = None) -> None:
        if not self.pieces:
            self.pieces, self.meta = load_pieces(Path(self.hparams.pieces_path))
            source = self.hparams.edit_source
            if source.startswith("counterfact:"):
                self.cases = read_counterfact(source.removeprefix("counterfact:"))

    def make_plan(self, known_pieces=None, known_cases=None) -> RequestPlan:
        """The edits: drawn from the sources the model knows, when told which (None: every source)."""
        self.setup()
        hp = self.hparams
        if self.cases:
            return plan_counterfact(self.cases, hp.max_experiments, hp.seed, known_cases)
        entities = entities_for_source(self.meta.get("source", {}).get("path"))
        return plan_requests(self.pieces, hp.max_experiments, hp.seed, known_pieces, entities)

    def predict_dataloader(self) -> DataLoader:
        """The edit requests. The model judges first which sources it knows (MemitModule.known_sources): the
        datamodule is asked for its dataloader after the model is loaded and before any predict hook runs."""
        self.setup()
        if self.plan is None:
            trainer = self.trainer  # a datamodule holds a plain `trainer` attribute (None until attached)
            module = trainer.lightning_module if trainer is not None else None
            judge = getattr(module, "known_sources", None)
            self.plan = self.make_plan(*judge(self)) if judge is not None else self.make_plan()
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
        known: str = "generated",
        progress: bool = True,
        editor: str = "memit",
        ft_steps: int = 1,
        ft_lr: float = 1.0,
        ft_max_norm: float = 0.05,
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
            known: which facts count as known before editing (edit sources are drawn only from those):
                generated (default: greedy decoding reads as the answer), teacher_forced, top1_first_token,
                or any (no filter).
            progress: bars (terminal) or lines (logs) with an ETA for the scoring, each edit's target
                optimisation and one line per finished edit.
            editor: memit, or ft (the positive control: FT-L style constrained gradient steps,
                lit_coupling/editing/finetune.py) with ft_steps, ft_lr, ft_max_norm.
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
        if known not in KNOWN_CRITERIA:
            raise UserError(f"known must be one of {', '.join(KNOWN_CRITERIA)}, not {known!r}")
        self.memit_hparams: MemitHparams | None = None
        self.pieces: list[KnowledgePiece] = []
        self.solvers: dict[int, CovarianceSolver] = {}
        self.covariance_info: dict = {}
        self.prefixes: list[str] = []
        self.baseline: PieceScores | None = None
        self.case_baseline: PieceScores | None = None  # CounterFact sources: their prompts with the true answers
        self.case_known: dict[str, bool] = {}  # CounterFact source id → known before editing
        self.plan_info: dict = {}
        if editor not in ("memit", "ft"):
            raise UserError(f"editor must be memit or ft, not {editor!r}")
        self.finetune = FinetuneHparams(ft_steps, ft_lr, ft_max_norm) if editor == "ft" else None
        # edit_id → {layer: (U, V)}, ΔW = U Vᵀ: written to edit_updates.pt by the stage (rank 0, all ranks')
        self.updates: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

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

    def _show_progress(self) -> bool:
        trainer = self._trainer
        return bool(self.hparams.progress) and (trainer is None or trainer.is_global_zero)

    def known_sources(self, datamodule: EditRequestDataModule) -> tuple[list[bool] | None, list[bool] | None]:
        """Score every piece once before any edit (every edit reuses these scores) and, for CounterFact sources,
        each case's prompt with its true answer; return which pieces and which cases the model knows."""
        datamodule.setup()
        self.pieces = datamodule.pieces
        self._check_pieces(datamodule.meta)
        hp = self.hparams
        with Progress(len(self.pieces), "scoring every piece before editing", self._show_progress(),
                      "piece") as bar:
            self.baseline = score_pieces(self.lm, self.tokenizer, self.pieces, hp.batch_size, self.pad_id, bar)
        known_cases = None
        if datamodule.cases:
            from lit_coupling.scoring import encode_cloze as encode

            items = [encode(self.tokenizer, c.prompt, c.target_true, self.bos) for c in datamodule.cases]
            with Progress(len(items), "scoring the CounterFact sources", self._show_progress(), "case") as bar:
                self.case_baseline, _ = score_clozes(self.lm, self.tokenizer, items,
                                                     [c.target_true for c in datamodule.cases], hp.batch_size,
                                                     self.pad_id, progress=bar)
            known_cases = self.case_baseline.known(hp.known)
        known_pieces = None if hp.known == "any" else self.baseline.known(hp.known)
        if known_cases is not None and hp.known == "any":
            known_cases = None
        return known_pieces, known_cases

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, EditRequestDataModule):
            raise UserError(
                "MemitModule predicts over an EditRequestDataModule (it holds the pieces to measure)"
            )
        self.describe_plan(datamodule)
        hp, memit = self.hparams, self.memit_hparams
        self.prefixes = generate_prefixes(
            self.lm,
            self.tokenizer,
            self.bos,
            memit.context_prefixes,
            memit.context_prefix_tokens,
            seed=hp.seed,
        )
        self.updates = {}
        if self.finetune is None:  # the fine-tuning editor needs no key statistics
            self._load_covariances(datamodule.meta)

    def describe_plan(self, datamodule: EditRequestDataModule) -> None:
        """plan_info: what was asked for, how many sources there were, were known, could be matched."""
        if datamodule.plan is None or self.baseline is None:  # the dataloader was not asked for through us
            datamodule.plan = datamodule.make_plan(*self.known_sources(datamodule))
        plan = datamodule.plan
        self.plan_info = {
            "requested": datamodule.hparams.max_experiments,
            "planned": len(plan.requests),
            "eligible": plan.eligible,
            "skipped": plan.skipped,
            "seed": datamodule.hparams.seed,
            "kind": "counterfact" if datamodule.cases else "pieces",
            "edit_source": datamodule.hparams.edit_source,
            "known_criterion": self.hparams.known,
            "sources": plan.sources,
            "known": plan.known,
            "unmatched": plan.unmatched,
            "types": plan.types,
        }
        self.case_known = {}
        if datamodule.cases:
            flags = self.case_baseline.known(self.hparams.known)
            self.case_known = {f"counterfact/{c.case_id}": flags[i] for i, c in enumerate(datamodule.cases)}

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
                **covariance_quality(c, m["tokens"], m.get("texts"), self.adapter.target(layer).name),
                "shrinkage": alpha,
                "cache": m["cache"],
                "cached": m["cached"],
            }
        self.covariance_info = {
            "corpus": corpus.name,
            "corpus_fingerprint": corpus.fingerprint,
            "tokens_requested": hp.cov_tokens,
            **covariance_totals(layers_info),
            "layers": layers_info,
        }

    # --- one edit
    # --------------------------------------------------------------------------------------------------

    def predict_step(self, request: EditRequest, batch_idx: int = 0) -> dict:
        """One edit, measured; then one line saying how it went (and how long it took)."""
        start = time.perf_counter()
        record = self._edit_and_measure(request)
        if record["status"] == "ok":
            record["efficacy"]["known_before"] = self._source_known(request)
            e = record["efficacy"]
            outcome = (f"P(new) {'>' if e['success'] else '<='} P(true), "
                       f"{'generates' if e['generated_success'] else 'does not generate'} the new answer")
        else:
            outcome = f"failed: {record['error']}"
        say(f"edit {request.edit_id} ({request.source_id}: {request.target_true!r} → {request.target_new!r}, "
            f"{request.answer_type or 'untyped'}): {outcome}, {time.perf_counter() - start:.1f}s",
            self._show_progress())
        return record

    def _source_known(self, request: EditRequest) -> bool:
        if request.source_index >= 0:
            return bool(self.baseline.known(self.hparams.known)[request.source_index])
        return bool(self.case_known.get(request.source_id, False))

    def _edit_and_measure(self, request: EditRequest) -> dict:
        hp = self.hparams
        start = time.perf_counter()
        try:
            probes = build_probes(self.tokenizer, request, self.pieces, self.bos)
            # Teacher-forced only: the pieces' own before-scores (self.baseline) are reused, not recomputed.
            probe_before, _ = score_clozes(
                self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id,
                generate="none",
            )
            if request.source_index >= 0:
                probe_before.logp[0] = self.baseline.logp[request.source_index]
            edited = time.perf_counter()
            if self.finetune is not None:
                result = apply_finetune(self.adapter, self.tokenizer, request, self.memit_hparams.layers,
                                        self.finetune, self.bos, self.pad_id)
            else:
                result = apply_memit(self.adapter, self.tokenizer, [request], self.memit_hparams, self.solvers,
                                     self.prefixes, self.bos, self.pad_id, progress=self._show_progress())
        except Exception as error:
            if hp.on_edit_error == "raise":
                raise
            return failed_record(request, error, {"edit": time.perf_counter() - start, "measure": 0.0})
        measured = time.perf_counter()
        with Progress(len(self.pieces), f"edit {request.edit_id}: scoring every piece after the edit",
                      self._show_progress(), "piece") as bar:
            after = score_pieces(self.lm, self.tokenizer, self.pieces, hp.batch_size, self.pad_id, bar)
        probe_after, probe_texts = score_clozes(
            self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id, generate="all"
        )
        self.updates[request.edit_id] = {
            layer: (u.float().cpu(), v.float().cpu()) for layer, (u, v) in result.updates.items()}
        if self.finetune is not None:
            info = {"editor": "ft", "delta_norms": {str(k): v for k, v in result.delta_norms.items()},
                    "logp_new": result.logp_new, "norm_constraint_bound": result.scaled}
            times = {"edit": measured - edited, "measure": time.perf_counter() - measured}
            return experiment_record(request, self.pieces, self.baseline, after, probes, probe_before,
                                     probe_after, probe_texts, info, times)
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

    def on_predict_end(self) -> None:
        from lit_coupling.editing.callbacks import gather_objects

        gathered: dict = {}
        for part in gather_objects(self.updates, self.trainer):  # every rank's edits, for rank 0 to write
            gathered.update(part)
        self.updates = gathered

    def ripple_header(self) -> dict:
        """Everything in ripple_experiments.json besides the experiments: what was run, and with what."""
        return {
            "model": self.model_info,
            "editor": "ft" if self.finetune is not None else "memit",
            "finetune": self.finetune.to_dict() if self.finetune is not None else None,
            "hparams": self.memit_hparams.to_dict(),
            "seed": self.hparams.seed,
            "covariance": self.covariance_info,
            "deviations": deviations(self.memit_hparams, self.covariance_info),  # from the paper: docs/memit.md
            "context_prefixes": self.prefixes,
            "requests": self.plan_info,
            "baseline": baseline_block(self.baseline, self.hparams.known, self.plan_info),
            "piece_ids": [p.id for p in self.pieces],
        }
