"""MemitModule: one MEMIT edit per predict step, with the ripple it causes measured on every piece.

The predict dataset is the edit requests (`data.datamodule.EditRequestDataModule`, planned here: `plan_edits`);
under DDP they are shared out across ranks and each rank edits its own copy of the model. `RestoreEditedWeights`
(always attached) puts the weights back after every edit; `RippleWriter` gathers the records the module hands it
(with the header of the file) and writes the files.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import torch

from lit_coupling.data.datamodule import EditRequestDataModule
from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.editing.callbacks import RestoreEditedWeights
from lit_coupling.editing.covariance import (
    covariance_quality,
    covariance_totals,
    key_covariances,
    resolve_corpus,
    shrink,
)
from lit_coupling.editing.finetune import FinetuneHparams, apply_finetune
from lit_coupling.editing.hparams import MemitHparams, deviations, resolve_hparams
from lit_coupling.editing.memit import CovarianceSolver, apply_memit, generate_prefixes
from lit_coupling.editing.options import TRACED, MemitOptions
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
    checked_drafts,
    experiment_record,
    failed_record,
    score_clozes,
    score_pieces,
)
from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.module import CausalLMModule
from lit_coupling.models.options import ModelOptions
from lit_coupling.progress import Progress, say
from lit_coupling.scoring import ClozeTokenError, PrefixReuse, encode_cloze, prefix_reuse


class MemitModule(CausalLMModule):
    def __init__(self, model: ModelOptions | None = None, memit: MemitOptions | None = None, seed: int = 0):
        """
        Args:
            model: which model (`ModelOptions`). Its `layers` are GradSim's: MEMIT edits `memit.layers`, or the
                layers of its hyperparameters. dtype auto means float32 on every device here: in bf16 weights a
                MEMIT update, a small change to large entries, is mostly rounded away.
            memit: the MEMIT ripple settings (`MemitOptions`, `run --memit.*`): the hyperparameters (a set, a YAML
                file holding one, or auto), the key statistics, scoring, which facts count as known, the editor.
            seed: seeds the context prefixes (the run's --seed).
        """
        memit = memit if isinstance(memit, MemitOptions) else MemitOptions(**(memit or {}))
        model = model if isinstance(model, ModelOptions) else ModelOptions(**(model or {}))
        super().__init__(model=replace(model, layers=None))
        self.save_hyperparameters()
        self.options = memit
        if memit.on_edit_error not in ("record", "raise"):
            raise UserError(f"on_edit_error must be record or raise, not {memit.on_edit_error!r}")
        if memit.known not in KNOWN_CRITERIA:
            raise UserError(f"known must be one of {', '.join(KNOWN_CRITERIA)}, not {memit.known!r}")
        self.memit_hparams: MemitHparams | None = None
        self.pieces: list[KnowledgePiece] = []
        self.solvers: dict[int, CovarianceSolver] = {}
        self.covariance_info: dict = {}
        self.prefixes: list[str] = []
        self.baseline: PieceScores | None = None
        self.drafts: list | None = None  # the baseline's greedy continuations, checked after each edit (ripple.py)
        self.reuse: PrefixReuse | None = None  # the pieces' states below the first edit layer (every re-scoring)
        self.case_baseline: PieceScores | None = None  # CounterFact sources: their prompts with the true answers
        self.case_known: dict[str, bool] = {}  # CounterFact source id → known before editing
        self.plan_info: dict = {}
        self.layer_choice: dict | None = None  # --memit.layers traced: the causal trace that chose the edit band
        self.header: dict | None = None  # ripple_experiments.json without the experiments, once the job has started
        if memit.editor not in ("memit", "ft"):
            raise UserError(f"editor must be memit or ft, not {memit.editor!r}")
        edits = memit.batch_size_edits
        if int(edits) < 1 or (int(edits) > 1 and memit.editor != "memit"):
            raise UserError(f"batch_size_edits must be ≥ 1 (and 1 with the ft editor), not {edits!r}")
        self.finetune = (
            FinetuneHparams(memit.ft_steps, memit.ft_lr, memit.ft_max_norm) if memit.editor == "ft" else None
        )
        # edit_id → {layer: (U, V)}, ΔW = U Vᵀ: written to edit_updates.pt by the stage (rank 0, all ranks')
        self.updates: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    # --- set-up ---------------------------------------------------------------------------------------
    # -------------

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        super().configure_model()
        # `traced`: the hyperparameters' own band until the causal trace chooses one (`choose_layers`)
        layers = None if self.options.layers == TRACED else self.options.layers
        self.memit_hparams = resolve_hparams(self.options.hparams, self.adapter, layers)
        self.adapter = ModelAdapter(
            self.lm, layers=self.memit_hparams.layers, target_pattern=self.model_options.target_pattern
        )
        self.model_info.update(self.adapter.describe())
        self.bos = self.adapter.bos_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id

    def load_dtype(self) -> str:
        return "float32" if self.model_options.dtype == "auto" else self.model_options.dtype

    def configure_callbacks(self):
        return [RestoreEditedWeights()]

    def edited_weights(self) -> dict[str, torch.Tensor]:
        return {t.name: t.module.weight for t in (self.adapter.target(layer) for layer in self.memit_hparams.layers)}

    def _check_pieces(self, meta: dict) -> None:
        """The stored token ids must be this tokenizer's: pieces made for another model score garbage."""
        for piece in self.pieces[:20]:
            try:
                ids = encode_cloze(self.tokenizer, piece.prompt, piece.answer, self.bos)
            except ClozeTokenError as error:
                raise UserError(
                    f"piece {piece.id} does not tokenise for {self.model_path} ({error}): "
                    f"run the pieces stage for this model"
                ) from error
            if ids != (piece.prompt_ids, piece.answer_ids):
                made_for = meta.get("model", {}).get("name", "another model")
                raise UserError(
                    f"knowledge_pieces.json was tokenised for {made_for}, not for "
                    f"{self.model_path} (piece {piece.id}): run the pieces stage for this model"
                )

    def _show_progress(self) -> bool:
        trainer = self._trainer
        return bool(self.options.progress) and (trainer is None or trainer.is_global_zero)

    def known_sources(self, datamodule: EditRequestDataModule) -> tuple[list[bool] | None, list[bool] | None]:
        """Score every piece once before any edit (every edit reuses these scores) and, for CounterFact sources,
        each case's prompt with its true answer; return which pieces and which cases the model knows."""
        datamodule.setup()
        self.pieces = datamodule.pieces
        self._check_pieces(datamodule.meta)
        hp = self.options
        started = time.perf_counter()
        with Progress(len(self.pieces), "scoring every piece before editing", self._show_progress(), "piece") as bar:
            # Every edit changes blocks from the first edit layer up only: what enters that block is kept from
            # this pass and each re-scoring runs the blocks from there (scoring.PrefixReuse).
            # (`traced`: the band is not chosen yet; made in `choose_layers`)
            self.reuse = (
                None
                if self.options.layers == TRACED
                else prefix_reuse(self.lm, self.adapter, min(self.memit_hparams.layers))
            )
            self.baseline = score_pieces(
                self.lm, self.tokenizer, self.pieces, hp.batch_size, self.pad_id, bar, self.reuse
            )
        # Greedy continuations the baseline decoded are checked, not decoded again, after each edit (most hold).
        self.drafts = checked_drafts(self.lm, self.tokenizer, self.pieces, self.baseline, self.pad_id)
        known_cases = None
        if datamodule.cases:
            from lit_coupling.scoring import encode_cloze as encode

            items = [encode(self.tokenizer, c.prompt, c.target_true, self.bos) for c in datamodule.cases]
            with Progress(len(items), "scoring the CounterFact sources", self._show_progress(), "case") as bar:
                self.case_baseline, _ = score_clozes(
                    self.lm,
                    self.tokenizer,
                    items,
                    [c.target_true for c in datamodule.cases],
                    hp.batch_size,
                    self.pad_id,
                    progress=bar,
                )
            known_cases = self.case_baseline.known(hp.known)
        self.baseline_time_s = time.perf_counter() - started  # ripple_experiments.json: baseline.time_s
        known_pieces = None if hp.known == "any" else self.baseline.known(hp.known)
        if known_cases is not None and hp.known == "any":
            known_cases = None
        return known_pieces, known_cases

    def on_predict_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, EditRequestDataModule):
            raise UserError("MemitModule predicts over an EditRequestDataModule (it holds the pieces to measure)")
        self.describe_plan(datamodule)
        if self.options.layers == TRACED and self.layer_choice is None:
            self.choose_layers(datamodule)
        self.header = None
        memit = self.memit_hparams
        self.prefixes = generate_prefixes(
            self.lm,
            self.tokenizer,
            self.bos,
            memit.context_prefixes,
            memit.context_prefix_tokens,
            seed=self.hparams.seed,
        )
        self.updates = {}
        if self.finetune is None:  # the fine-tuning editor needs no key statistics
            self._load_covariances(datamodule.meta)

    def choose_layers(self, datamodule: EditRequestDataModule) -> None:
        """`--memit.layers traced`: the edit band by causal tracing of the MLP (`tracing.trace_band`) over up to
        TRACE_FACTS facts the model knows that are not edited (pieces and CounterFact cases, drawn seeded), as wide
        as the hyperparameters' band; that band stays when too few facts inform the trace. Recorded in
        `layer_choice` (ripple_experiments.json) and in the hyperparameters' source."""
        import random

        from lit_coupling.editing.tracing import TRACE_FACTS, TraceFact, trace_band

        criterion = "generated" if self.options.known == "any" else self.options.known
        edited = {r.source_id for r in datamodule.plan.requests}
        facts = [
            TraceFact(p.id, p.prompt, p.subject, p.answer)
            for p, known in zip(self.pieces, self.baseline.known(criterion))
            if known and p.is_single_hop and p.id not in edited
        ]
        if datamodule.cases:
            facts += [
                TraceFact(f"counterfact/{c.case_id}", c.prompt, c.subject, c.target_true)
                for c, known in zip(datamodule.cases, self.case_baseline.known(criterion))
                if known and f"counterfact/{c.case_id}" not in edited
            ]
        candidates = len(facts)
        random.Random(self.hparams.seed).shuffle(facts)
        scaled = list(self.memit_hparams.layers)
        say(
            f"choosing the MEMIT layers by causal tracing: {min(len(facts), TRACE_FACTS)} of {candidates} known, "
            f"unedited facts",
            self._show_progress(),
        )
        record = trace_band(
            self.adapter,
            self.tokenizer,
            facts[:TRACE_FACTS],
            self.bos,
            self.pad_id,
            len(scaled),
            scaled,
            self.memit_hparams.fact_token,
            seed=self.hparams.seed,
            progress=self._show_progress(),
        )
        record.update(known_criterion=criterion, candidates=candidates)
        band = record["layers"]
        if band is not None:
            self.memit_hparams = replace(
                self.memit_hparams,
                layers=band,
                source=f"{self.memit_hparams.source}; layers {band[0]}-{band[-1]} chosen by causal tracing "
                f"(the set's own: {scaled[0]}-{scaled[-1]})",
            )
            self.adapter = ModelAdapter(self.lm, layers=band, target_pattern=self.model_options.target_pattern)
            self.model_info.update(self.adapter.describe())
        self.reuse = prefix_reuse(self.lm, self.adapter, min(self.memit_hparams.layers))
        self.layer_choice = record
        effects = " ".join(f"{layer}:{e:.3f}" for layer, e in enumerate(record["indirect_effect"]))
        say(
            f"MEMIT layers: {record['reason']}; the scaled band {scaled[0]}-{scaled[-1]}: "
            f"{record.get('scaled_effect') or 0:.4f} ({record['time_s']:.0f}s). MLP indirect effect by layer: "
            f"{effects or 'none'}",
            self._show_progress(),
        )

    def plan_edits(self, datamodule: EditRequestDataModule) -> RequestPlan:
        """The edits the datamodule serves: drawn from the sources this model knows (`known_sources`)."""
        return self.make_plan(datamodule, *self.known_sources(datamodule))

    def make_plan(self, datamodule: EditRequestDataModule, known_pieces=None, known_cases=None) -> RequestPlan:
        """The edits: drawn from the sources the model knows, when told which (None: every source)."""
        datamodule.setup()
        hp = datamodule.hparams
        if datamodule.cases:
            return plan_counterfact(datamodule.cases, hp.max_experiments, hp.seed, known_cases)
        entities = entities_for_source(datamodule.meta.get("source", {}).get("path"))
        return plan_requests(datamodule.pieces, hp.max_experiments, hp.seed, known_pieces, entities)

    def describe_plan(self, datamodule: EditRequestDataModule) -> None:
        """plan_info: what was asked for, how many sources there were, were known, could be matched."""
        if datamodule.plan is None or self.baseline is None:  # the dataloader was not asked for through us
            datamodule.plan = self.make_plan(datamodule, *self.known_sources(datamodule))
        plan = datamodule.plan
        self.plan_info = {
            "requested": datamodule.hparams.max_experiments,
            "planned": len(plan.requests),
            "eligible": plan.eligible,
            "skipped": plan.skipped,
            "seed": datamodule.hparams.seed,
            "kind": "counterfact" if datamodule.cases else "pieces",
            "edit_source": datamodule.hparams.edit_source,
            "known_criterion": self.options.known,
            "sources": plan.sources,
            "known": plan.known,
            "unmatched": plan.unmatched,
            "types": plan.types,
        }
        self.case_known = {}
        if datamodule.cases:
            flags = self.case_baseline.known(self.options.known)
            self.case_known = {f"counterfact/{c.case_id}": flags[i] for i, c in enumerate(datamodule.cases)}

    def _load_covariances(self, meta: dict) -> None:
        hp = self.options
        started = time.perf_counter()
        corpus = resolve_corpus(hp.cov_corpus, meta.get("source", {}).get("path"))
        kwargs = {
            "adapter": self.adapter,
            "tokenizer": self.tokenizer,
            "layers": self.memit_hparams.layers,
            "corpus": corpus,
            "tokens": hp.cov_tokens,
            "stats_dir": hp.stats_dir,
            "model_name": self.model_path,
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
            "time_s": time.perf_counter() - started,  # computing (or reading the cache) and factoring C
            **covariance_totals(layers_info),
            "layers": layers_info,
        }

    # --- one edit
    # --------------------------------------------------------------------------------------------------

    def predict_step(self, request: EditRequest | list[EditRequest], batch_idx: int = 0) -> dict:
        """One edit, measured; then one line saying how it went (and how long it took). A list of requests
        (batch_size_edits > 1) is one MEMIT edit: a record per request, each saying how its own request went.

        Hands the writer what it writes: {"records": the experiment records, "header": the rest of
        ripple_experiments.json (`ripple_header`, made once per job), "pieces": the measured pieces}."""
        start = time.perf_counter()
        if isinstance(request, list):
            records = [
                self._report(r, record, start) for r, record in zip(request, self._edit_batch_and_measure(request))
            ]
        else:
            records = [self._report(request, self._edit_and_measure(request), start)]
        if self.header is None:
            self.header = self.ripple_header()
        return {"records": records, "header": self.header, "pieces": self.pieces}

    def _report(self, request: EditRequest, record: dict, start: float) -> dict:
        if record["status"] == "ok":
            record["efficacy"]["known_before"] = self._source_known(request)
            e = record["efficacy"]
            outcome = (
                f"P(new) {'>' if e['success'] else '<='} P(true), "
                f"{'generates' if e['generated_success'] else 'does not generate'} the new answer"
            )
        else:
            outcome = f"failed: {record['error']}"
        say(
            f"edit {request.edit_id} ({request.source_id}: {request.target_true!r} → {request.target_new!r}, "
            f"{request.answer_type or 'untyped'}): {outcome}, {time.perf_counter() - start:.1f}s",
            self._show_progress(),
        )
        return record

    def _prefix_reuse(self) -> PrefixReuse | None:
        """The pieces' kept states below the first edit layer (made when the baseline was scored). Layers chosen
        later (traced) may start elsewhere: a new one then, whose first pass keeps the states below the new first
        edit layer — the edit does not change them, so they may be taken after it."""
        first = min(self.memit_hparams.layers)
        if self.reuse is None or self.reuse.start != first:
            self.reuse = prefix_reuse(self.lm, self.adapter, first)
        return self.reuse

    def _source_known(self, request: EditRequest) -> bool:
        if request.source_index >= 0:
            return bool(self.baseline.known(self.options.known)[request.source_index])
        return bool(self.case_known.get(request.source_id, False))

    def _probes_before(self, request: EditRequest):
        """The request's probes and their teacher-forced scores before the edit (the source piece's own log P is
        the baseline's, not recomputed)."""
        probes = build_probes(self.tokenizer, request, self.pieces, self.bos)
        before, _ = score_clozes(
            self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id, generate="none"
        )
        if request.source_index >= 0:
            before.logp[0] = self.baseline.logp[request.source_index]
        return probes, before

    def _probes_after(self, probes):
        return score_clozes(
            self.lm, self.tokenizer, probes.items, probes.answers, len(probes.items), self.pad_id, generate="all"
        )

    def _pieces_after(self, label: str):
        """Every piece scored on the edited model, with a progress bar named `label`."""
        with Progress(
            len(self.pieces), f"{label}: scoring every piece after the edit", self._show_progress(), "piece"
        ) as bar:
            return score_pieces(
                self.lm,
                self.tokenizer,
                self.pieces,
                self.options.batch_size,
                self.pad_id,
                bar,
                self._prefix_reuse(),
                self.drafts,
            )

    @staticmethod
    def _memit_info(result, i: int) -> dict:
        """What a MEMIT edit records of request i: per-layer norms and its target vector's optimisation."""
        target = result.targets[i]
        return {
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

    @staticmethod
    def _memit_times(result, edited: float, measured: float) -> dict:
        return {
            "edit": measured - edited,
            "targets": result.time_targets_s,
            "updates": result.time_updates_s,
            "measure": time.perf_counter() - measured,
        }

    def _apply_memit(self, requests: list[EditRequest]):
        return apply_memit(
            self.adapter,
            self.tokenizer,
            requests,
            self.memit_hparams,
            self.solvers,
            self.prefixes,
            self.bos,
            self.pad_id,
            progress=self._show_progress(),
        )

    @staticmethod
    def _factors(result) -> dict:
        """The edit's ΔW as its low-rank factors, float32 on the CPU (what edit_updates.pt keeps)."""
        return {layer: (u.float().cpu(), v.float().cpu()) for layer, (u, v) in result.updates.items()}

    def _record(self, request, after, probes, probe_before, info: dict, times) -> dict:
        """The request's probes scored after the edit, then its record; `times()` is read after that scoring, so
        the measure time includes it."""
        probe_after, probe_texts = self._probes_after(probes)
        return experiment_record(
            request, self.pieces, self.baseline, after, probes, probe_before, probe_after, probe_texts, info, times()
        )

    def _edit_batch_and_measure(self, requests: list[EditRequest]) -> list[dict]:
        """B requests as one MEMIT edit: every piece scored once after it (the joint ripple), each request's own
        probes before and after; the batch's ΔW is saved under every member's edit id."""
        hp = self.options
        start = time.perf_counter()
        batch_info = {"size": len(requests), "edit_ids": [r.edit_id for r in requests]}
        try:
            probes, probe_before = map(list, zip(*(self._probes_before(r) for r in requests)))
            edited = time.perf_counter()
            result = self._apply_memit(requests)
        except Exception as error:
            if hp.on_edit_error == "raise":
                raise
            elapsed = time.perf_counter() - start
            return [
                failed_record(r, error, {"edit": elapsed, "measure": 0.0}) | {"memit": {"batch": batch_info}}
                for r in requests
            ]
        measured = time.perf_counter()
        after = self._pieces_after(f"batch of {len(requests)} edits")
        joint = self._factors(result)
        records = []
        for i, request in enumerate(requests):
            self.updates[request.edit_id] = joint
            info = self._memit_info(result, i) | {"batch": batch_info}
            times = partial(self._memit_times, result, edited, measured)
            records.append(self._record(request, after, probes[i], probe_before[i], info, times))
        return records

    def _edit_and_measure(self, request: EditRequest) -> dict:
        hp = self.options
        start = time.perf_counter()
        try:
            probes, probe_before = self._probes_before(request)
            edited = time.perf_counter()
            if self.finetune is not None:
                result = apply_finetune(
                    self.adapter,
                    self.tokenizer,
                    request,
                    self.memit_hparams.layers,
                    self.finetune,
                    self.bos,
                    self.pad_id,
                )
            else:
                result = self._apply_memit([request])
        except Exception as error:
            if hp.on_edit_error == "raise":
                raise
            return failed_record(request, error, {"edit": time.perf_counter() - start, "measure": 0.0})
        measured = time.perf_counter()
        after = self._pieces_after(f"edit {request.edit_id}")
        self.updates[request.edit_id] = self._factors(result)
        if self.finetune is None:
            info = self._memit_info(result, 0)
            times = partial(self._memit_times, result, edited, measured)
        else:
            info = {
                "editor": "ft",
                "delta_norms": {str(k): v for k, v in result.delta_norms.items()},
                "logp_new": result.logp_new,
                "norm_constraint_bound": result.scaled,
            }

            def times():
                return {"edit": measured - edited, "measure": time.perf_counter() - measured}

        return self._record(request, after, probes, probe_before, info, times)

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
            "layer_choice": self.layer_choice,  # --memit.layers traced: the causal trace and the band it chose
            "context_prefixes": self.prefixes,
            "requests": self.plan_info,
            "baseline": {
                **baseline_block(self.baseline, self.options.known, self.plan_info),
                "time_s": getattr(self, "baseline_time_s", None),
            },
            "piece_ids": [p.id for p in self.pieces],
        }
