"""`lit-coupling run`: the whole experiment on one model — pieces → gradsim → ripple → analysis → report.

Each stage reads what earlier stages wrote into `--output_dir` and writes its own files there (names in
`lit_coupling.outputs`), so a stage can be run alone on a run directory.

    lit-coupling run --hotpot_data hotpot_dev_distractor_v1.json --model_path gpt2 \\
        --max_samples 20 --max_experiments 2 --device cpu --output_dir quick_test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lit_coupling.errors import UserError
from lit_coupling.pipeline import manifest as M
from lit_coupling.pipeline.config import DEFAULT_MODEL, STAGE_ORDER, RunConfig, parse_config
from lit_coupling.pipeline.stages import MODEL_STAGES, STAGES, StageResult, ensure_model

__all__ = ["STAGES", "STAGE_ORDER", "RunConfig", "StageResult", "load_stage", "main", "parse_config", "run"]


def load_stage(name: str):
    """The function of stage `name` (a real function in `STAGES`; tests stand their own in)."""
    return STAGES[name]


def default_output_dir(model_path: str) -> str:
    """runs/<model>: one directory per model, so runs of different models never mix."""
    name = Path(model_path.rstrip("/")).name if Path(model_path).exists() else model_path
    return str(Path("runs") / "".join(c if c.isalnum() or c in "-_." else "_" for c in name))


def run(cfg: RunConfig) -> list[tuple[str, StageResult]]:
    """Run the chosen stages in order, skipping those already finished with the same inputs and settings.

    Everything is checked before the first stage computes: the settings, the output directory, the manifest,
    and what the stages about to run will open (the HotpotQA file, the model's config and tokenizer). A finished
    stage is kept only while its files are as it wrote them (size and SHA-256 in the manifest); otherwise it is
    redone, and so is every stage whose inputs that changed.

    `--overwrite` sets the earlier run aside (in <output_dir>/.overwritten-run) and brings it back when the new run
    fails before its first stage finishes; it is deleted only when the new run has finished all its stages.

    Under `--trainer.strategy ddp` Lightning re-executes this command in every rank; every rank walks the same
    stages (the predict stages need all of them), and only global rank 0 writes the manifest and final files.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_coupling.outputs import remove_temp_files
    from lit_coupling.pipeline.preflight import check_inputs, check_output_dir

    is_rank_zero = rank_zero_only.rank == 0
    cfg.validate()
    names = cfg.stage_list()

    def prepare(directory: Path) -> None:
        check_output_dir(directory)
        if is_rank_zero and M.interrupted_overwrite(directory):
            restored = M.restore_set_aside(directory)
            _say(
                True,
                f"[overwrite] an earlier --overwrite was interrupted before its first stage finished: "
                f"brought back the {len(restored)} files of the run it had set aside",
            )

    if cfg.output_dir is not None:
        prepare(Path(cfg.output_dir))
    if cfg.model_path is None:  # continue the run in --output_dir, or the embedded default
        cfg.model_path = (cfg.output_dir and M.Manifest.recorded_model(Path(cfg.output_dir))) or DEFAULT_MODEL
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg.model_path)
        prepare(Path(cfg.output_dir))
    out = Path(cfg.output_dir)
    stages = [(name, load_stage(name)) for name in names]  # refuse before doing any work
    overwrite = cfg.overwrite and is_rank_zero
    manifest = M.Manifest.open(out, cfg.model_path, overwrite=overwrite)
    if any(name in MODEL_STAGES for name in names):  # an embedded model is trained here, once, if not yet cached
        ensure_model(cfg.model_path)
    hashes = M.stage_hashes(cfg, names, manifest.stages)
    reasons = {name: manifest.check(name, hashes[name]) for name in names}
    check_inputs(cfg, [name for name in names if reasons[name] is not None])

    # Nothing of the earlier run has been touched up to here.
    out.mkdir(parents=True, exist_ok=True)
    if is_rank_zero:
        leftovers = remove_temp_files(out, skip=(M.SET_ASIDE,))
        if leftovers:
            _say(True, f"removed {len(leftovers)} temporary file(s) that an interrupted write left in {out}")
    set_aside = M.set_aside(out) if overwrite else None
    if set_aside:
        _say(
            True,
            f"[overwrite] set the earlier run's {len(set_aside)} files aside in {out / M.SET_ASIDE}: they "
            f"come back if this run fails before its first stage finishes",
        )
    finished_one = False
    try:
        results = []
        for name, stage in stages:
            reason = reasons[name]
            if reason is None and name not in manifest.stages:  # dropped when a stage it reads changed content
                reason = f"an earlier stage it reads ({', '.join(M.DEPENDS_ON[name])}) now has different output"
            if reason is None:
                record = manifest.stages[name]
                _say(
                    is_rank_zero, f"[{name}] finished earlier with the same inputs — kept {', '.join(record['files'])}"
                )
                results.append((name, StageResult(record["files"], record.get("summary", ""))))
                continue
            if reason:
                _say(is_rank_zero, f"[{name}] redoing this stage: {reason}")
            start = time.perf_counter()
            result: StageResult = stage(cfg, out)
            elapsed = time.perf_counter() - start
            if is_rank_zero:
                manifest.record(name, hashes[name], [str(f) for f in result.files], elapsed, result.summary)
                finished_one = True
                written = ", ".join(Path(f).name for f in result.files) or "nothing"
                _say(
                    True,
                    f"[{name}] {elapsed:.1f}s  wrote {written}" + (f"  — {result.summary}" if result.summary else ""),
                )
            results.append((name, result))
    except BaseException:
        if set_aside is not None and not finished_one:
            M.restore_set_aside(out)
            print(
                f"[overwrite] this run failed before its first stage finished: the earlier run is back in {out}, "
                f"as it was",
                file=sys.stderr,
                flush=True,
            )
        elif is_rank_zero and (out / M.SET_ASIDE).exists():
            print(
                f"[overwrite] the earlier run's files are kept in {out / M.SET_ASIDE} until this run finishes "
                f"(move them elsewhere to keep them)",
                file=sys.stderr,
                flush=True,
            )
        raise
    if is_rank_zero and M.discard_set_aside(out):
        _say(True, f"[overwrite] this run finished: deleted the earlier run it replaced ({out / M.SET_ASIDE})")
    return results


def _say(is_rank_zero: bool, line: str) -> None:
    if is_rank_zero:
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(argv))
    except UserError as error:
        print(f"lit-coupling run: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
