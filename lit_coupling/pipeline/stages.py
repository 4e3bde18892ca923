"""The stages of `lit-coupling run`, each a function (RunConfig, output directory) → StageResult, in `STAGES`.

A stage wires the domain packages together: it builds the LightningModule, DataModule and writer from the run's
settings (passed whole), runs them under the run's Trainer, and says which files it wrote. Under DDP/FSDP every
rank runs the command, so every stage runs on every rank; only global rank 0 writes the final files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lit_coupling import outputs
from lit_coupling.errors import UserError
from lit_coupling.pipeline.config import RunConfig


@dataclass
class StageResult:
    files: list[str]
    summary: str = ""


# The stages that open the model (an embedded one is trained before them, once: `ensure_model`).
MODEL_STAGES = ("pieces", "gradsim", "ripple", "analysis")


def ensure_model(model_path: str) -> None:
    """Train an embedded model (tiny-gpt2, tiny-llama) now if its cached copy is missing; nothing for any other name.

    Training happens here, where the run, `check-model` or a `predict` config asks for the model, and nowhere
    else: resolving the name (models.loading) or hashing a stage (the manifest) never trains.
    """
    from lit_coupling.inject.embedded import ensure_embedded

    ensure_embedded(model_path)


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def build_trainer_from_run(cfg: RunConfig, callbacks: list | None = None, **kwargs):
    """The Trainer for a stage that runs as a predict job, from `--device` and `--trainer.*`."""
    from lit_coupling.trainer import build_trainer

    t = cfg.trainer
    return build_trainer(
        cfg.device,
        t.accelerator,
        t.strategy,
        t.devices,
        t.num_nodes,
        callbacks=callbacks,
        default_root_dir=cfg.output_dir,
        **kwargs,
    )


# --- pieces ----------------------------------------------------------------------------------------------------


def pieces_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """HotpotQA → knowledge_pieces.json, tokenised for the run's model."""
    from lit_coupling.data.build import build_pieces, drop_table

    doc = build_pieces(cfg.hotpot_data, cfg.model_path, cfg.max_samples, cfg.seed, cfg.trust_remote_code)
    path = Path(out_dir) / outputs.PIECES
    if _is_rank_zero():  # under DDP every rank runs the command; one writes
        outputs.write_json(path, doc)
        print(drop_table(doc), flush=True)
    counts, skipped = doc["counts"], sum(doc["skipped"].values())
    kinds = ", ".join(f"{k} {n}" for k, n in counts["by_kind"].items())
    return StageResult(
        [str(path)], f"{counts['pieces']} pieces ({kinds}) from {counts['records']} records, {skipped} skipped"
    )


# --- gradsim ---------------------------------------------------------------------------------------------------


def gradsim_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """GradientModule + GradSimWriter under the run's Trainer settings.

    Runs on every rank (DDP/FSDP re-execute the command); only global rank 0 reduces and writes the files.
    """
    from lit_coupling.data.datamodule import PiecesDataModule
    from lit_coupling.gradients.module import GradientModule
    from lit_coupling.gradients.reduce import reduce_predict_job, summary_text
    from lit_coupling.gradients.writer import GradSimWriter

    pieces = Path(out_dir) / outputs.PIECES
    if not pieces.exists():
        raise UserError(f"{pieces} does not exist: run the pieces stage first (--stages pieces,gradsim)")
    module = GradientModule(model=cfg.model_options(), gradsim=cfg.gradsim, seed=cfg.seed)
    data = PiecesDataModule(str(pieces), batch_size=cfg.gradsim.batch_size)
    writer = GradSimWriter(output_dir=str(out_dir))
    trainer = build_trainer_from_run(cfg, callbacks=[writer], enable_progress_bar=cfg.gradsim.progress)
    trainer.predict(module, datamodule=data, return_predictions=False)
    reduced = reduce_predict_job(trainer, module, writer, data.pieces)  # the N×N matrix, on global rank 0
    if reduced is None:
        return StageResult([], f"rank {trainer.global_rank}: gradient shard written, rank 0 reduces")
    analysis, files = reduced
    return StageResult(files, summary_text(analysis))


# --- ripple ----------------------------------------------------------------------------------------------------


def ripple_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """MEMIT edits of `--max_experiments` pieces and the ripple of each on every piece.

    Under `--trainer.strategy ddp` every rank runs this; the edits are shared out, and only global rank 0 writes.
    """
    from lit_coupling.data.datamodule import EditRequestDataModule
    from lit_coupling.editing.callbacks import RippleWriter
    from lit_coupling.editing.module import MemitModule

    out_dir = Path(out_dir)
    pieces_path = out_dir / outputs.PIECES
    if not pieces_path.exists():
        raise UserError(f"{pieces_path} is missing: run the pieces stage first (--stages pieces,ripple)")
    if cfg.trainer.strategy == "fsdp":
        raise UserError(
            "the ripple stage edits a whole copy of the model in each process: use --trainer.strategy "
            "ddp (edits are shared out across ranks), not fsdp"
        )
    module = MemitModule(model=cfg.model_options(), memit=cfg.memit, seed=cfg.seed)
    data = EditRequestDataModule(
        str(pieces_path),
        max_experiments=cfg.max_experiments,
        seed=cfg.seed,
        edit_source=cfg.memit.edit_source,
        batch_size_edits=cfg.memit.batch_size_edits,
    )
    writer = RippleWriter(str(out_dir))
    trainer = build_trainer_from_run(cfg, callbacks=[writer], enable_progress_bar=cfg.memit.progress)
    trainer.predict(module, datamodule=data, return_predictions=False)
    if trainer.global_rank != 0:
        return StageResult([], f"rank {trainer.global_rank}: edits sent to rank 0")
    if not writer.written:  # no edit was planned (Lightning skips an empty predict): say what the model knew
        module.describe_plan(data)
        writer.write([], module.ripple_header(), module.pieces)
    written = [str(p) for p in writer.written]
    if writer.written:  # each edit's ΔW as factors, so the analysis can compute ⟨∇_W log P_j, ΔW⟩
        written.append(str(save_edit_updates(out_dir / outputs.EDIT_UPDATES, module)))
    s = writer.summary
    rate = "n/a" if s["efficacy_generated"] is None else f"{s['efficacy_generated']:.0%}"
    summary = f"{s['edits']} edits ({s['failed']} failed), new answer generated after {rate} of them"
    summary += "; " + known_summary(module.plan_info, cfg.max_experiments)
    return StageResult(written, summary)


def save_edit_updates(path: Path, module) -> Path:
    """edit_updates.pt: {"editor", "layers", "edits": {edit_id: {layer: {"u": (d_out, r), "v": (d_in, r)}}}},
    ΔW_l = u vᵀ in (out, in) orientation (float32; torch.load(weights_only=True) reads it)."""
    edits = {
        int(e): {int(layer): {"u": u, "v": v} for layer, (u, v) in per_layer.items()}
        for e, per_layer in sorted(module.updates.items())
    }
    return outputs.save_torch(
        path,
        {
            "format": "lit_coupling.edit_updates/1",
            "editor": "ft" if module.finetune is not None else "memit",
            "layers": list(module.memit_hparams.layers),
            "edits": edits,
        },
    )


def known_summary(plan: dict, requested: int) -> str:
    """How many edit sources the model knew, and a plain warning when too few were known to edit as asked."""
    what = "CounterFact cases" if plan.get("kind") == "counterfact" else "single-fact pieces"
    known, sources = plan.get("known"), plan.get("sources")
    if known is None:
        line = f"sources drawn from all {sources} {what} (--memit.known any)"
    else:
        line = (
            f"the model knew {known} of {sources} {what} ({plan.get('known_criterion')}); "
            f"{plan.get('eligible')} known with a same-type counterfactual"
        )
    if plan.get("kind") != "counterfact":
        line += f", {plan.get('unmatched')} with none (not edited)"
    if plan.get("planned", 0) < requested:
        line += (
            f". TOO FEW KNOWN FACTS: only {plan.get('planned', 0)} of the {requested} requested edits could be "
            f"made on facts the model knows; the ripple rests on fewer edits (more records, "
            f"--max_samples, or --memit.known any to edit unknown facts too)"
        )
    return line


# --- analysis and report ---------------------------------------------------------------------------------------
# Both read files and need no GPU: only global rank 0 does the work.


def analysis_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """Pair table + every statistic → pair_table.csv, correlation_analysis.json (and edit_predictors.npz)."""
    from lit_coupling.analysis.analyse import analyse_run, edit_predictors, headline_text
    from lit_coupling.analysis.pairs import load_run

    if not _is_rank_zero():
        return StageResult([], "rank > 0: the analysis runs on global rank 0")
    out_dir = Path(out_dir)
    missing = edit_predictors(out_dir, cfg.model_path, cfg.device)
    table, result = analyse_run(load_run(out_dir), cfg.analysis, cfg.seed)
    if missing and "predictor_table" in result:
        result["predictor_table"]["why_unavailable"] = missing
    files = [
        outputs.write_text(out_dir / outputs.PAIR_TABLE, table.to_csv(index=False)),
        outputs.write_json(out_dir / outputs.CORRELATION, result),
    ]
    if not missing:
        files.append(out_dir / outputs.EDIT_PREDICTORS)
    return StageResult([str(f) for f in files], headline_text(result))


def report_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    """Plots, final_mvp_report.md, and the same numbers, tables and images to the chosen logger."""
    from lit_coupling.analysis.analyse import log_run, write_plots
    from lit_coupling.analysis.pairs import describe_run, load_run, pair_table
    from lit_coupling.analysis.report import write_report

    if not _is_rank_zero():
        return StageResult([], "rank > 0: the report is written on global rank 0")
    out_dir = Path(out_dir)
    if not (out_dir / outputs.CORRELATION).exists():
        raise UserError(
            f"{out_dir / outputs.CORRELATION} is missing: run the analysis stage first "
            f"(lit-coupling run --stages analysis,report --output_dir {out_dir})"
        )
    run = load_run(out_dir)
    result = outputs.read_json(out_dir / outputs.CORRELATION)
    table = pair_table(run)
    context = describe_run(run)
    figures = write_plots(run, table, result, out_dir, context["model_name"])
    report = write_report(out_dir / outputs.REPORT, context, result, [f.name for f in figures])
    logged = log_run(cfg.logger, asdict(cfg), run, context, table, result, figures, report)
    return StageResult([str(f) for f in [*figures, report]], "; ".join(logged) or f"logger: {cfg.logger}")


# Stage name → its function (RunConfig, output dir) → StageResult, in pipeline order (config.STAGE_ORDER).
STAGES = {
    "pieces": pieces_stage,
    "gradsim": gradsim_stage,
    "ripple": ripple_stage,
    "analysis": analysis_stage,
    "report": report_stage,
}
