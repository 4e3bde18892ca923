"""The `ripple` stage of `lit-coupling run`: MEMIT edits of `--max_experiments` pieces and the ripple on every
piece.

Under `--trainer.strategy ddp` Lightning re-executes the command in every rank, so this function runs on each
of
them; the edits are shared out, and only global rank 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

from lit_coupling.editing.callbacks import RippleWriter
from lit_coupling.editing.module import EditRequestDataModule, MemitModule
from lit_coupling.errors import UserError
from lit_coupling.outputs import EDIT_UPDATES, PIECES, save_torch
from lit_coupling.run import RunConfig, StageResult
from lit_coupling.trainer import build_trainer_from_run


def ripple_stage(cfg: RunConfig, out_dir: Path) -> StageResult:
    out_dir = Path(out_dir)
    pieces_path = out_dir / PIECES
    if not pieces_path.exists():
        raise UserError(f"{pieces_path} is missing: run the pieces stage first (--stages pieces,ripple)")
    if cfg.trainer.strategy == "fsdp":
        raise UserError(
            "the ripple stage edits a whole copy of the model in each process: use --trainer.strategy "
            "ddp (edits are shared out across ranks), not fsdp"
        )
    m = cfg.memit
    module = MemitModule(
        model_path=cfg.model_path,
        dtype=cfg.dtype,
        memit=m.hparams,
        layers=m.layers,
        target_pattern=cfg.target_pattern,
        trust_remote_code=cfg.trust_remote_code,
        cov_corpus=m.cov_corpus,
        cov_tokens=m.cov_tokens,
        stats_dir=m.stats_dir,
        batch_size=m.batch_size,
        seed=cfg.seed,
        on_edit_error=m.on_edit_error,
        known=m.known,
        progress=m.progress,
        editor=m.editor,
        ft_steps=m.ft_steps,
        ft_lr=m.ft_lr,
        ft_max_norm=m.ft_max_norm,
    )
    data = EditRequestDataModule(str(pieces_path), max_experiments=cfg.max_experiments, seed=cfg.seed,
                                 edit_source=m.edit_source)
    writer = RippleWriter(str(out_dir))
    trainer = build_trainer_from_run(cfg, callbacks=[writer], enable_progress_bar=m.progress)
    trainer.predict(module, datamodule=data, return_predictions=False)
    if trainer.global_rank != 0:
        return StageResult([], f"rank {trainer.global_rank}: edits sent to rank 0")
    if not writer.written:  # no edit was planned (Lightning skips an empty predict): say what the model knew
        module.describe_plan(data)
        writer.write([], module)
    written = [str(p) for p in writer.written]
    if writer.written:  # each edit's ΔW as factors, so the analysis can compute ⟨∇_W log P_j, ΔW⟩
        written.append(str(save_edit_updates(out_dir / EDIT_UPDATES, module)))
    s = writer.summary
    rate = "n/a" if s["efficacy_generated"] is None else f"{s['efficacy_generated']:.0%}"
    summary = f"{s['edits']} edits ({s['failed']} failed), new answer generated after {rate} of them"
    summary += "; " + known_summary(module.plan_info, cfg.max_experiments)
    return StageResult(written, summary)


def save_edit_updates(path: Path, module: MemitModule) -> Path:
    """edit_updates.pt: {"editor", "layers", "edits": {edit_id: {layer: {"u": (d_out, r), "v": (d_in, r)}}}},
    ΔW_l = u vᵀ in (out, in) orientation (float32; torch.load(weights_only=True) reads it)."""
    edits = {int(e): {int(layer): {"u": u, "v": v} for layer, (u, v) in per_layer.items()}
             for e, per_layer in sorted(module.updates.items())}
    return save_torch(path, {"format": "lit_coupling.edit_updates/1",
                             "editor": "ft" if module.finetune is not None else "memit",
                             "layers": list(module.memit_hparams.layers), "edits": edits})


def known_summary(plan: dict, requested: int) -> str:
    """How many edit sources the model knew, and a plain warning when too few were known to edit as asked."""
    what = "CounterFact cases" if plan.get("kind") == "counterfact" else "single-fact pieces"
    known, sources = plan.get("known"), plan.get("sources")
    if known is None:
        line = f"sources drawn from all {sources} {what} (--memit.known any)"
    else:
        line = (f"the model knew {known} of {sources} {what} ({plan.get('known_criterion')}); "
                f"{plan.get('eligible')} known with a same-type counterfactual")
    if plan.get("kind") != "counterfact":
        line += f", {plan.get('unmatched')} with none (not edited)"
    if plan.get("planned", 0) < requested:
        line += (f". TOO FEW KNOWN FACTS: only {plan.get('planned', 0)} of the {requested} requested edits could be "
                 f"made on facts the model knows; the ripple rests on fewer edits (more records, "
                 f"--max_samples, or --memit.known any to edit unknown facts too)")
    return line
