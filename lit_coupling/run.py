"""`lit-coupling run`: the whole experiment on one model — pieces → gradsim → ripple → analysis → report.

Each stage reads what earlier stages wrote into `--output_dir` and writes its own files there (names in
`lit_coupling.outputs`), so a stage can be run alone on a run directory.

    lit-coupling run --hotpot_data hotpot_dev_distractor_v1.json --model_path gpt2 \\
        --max_samples 20 --max_experiments 2 --device cpu --output_dir quick_test
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.errors import UserError
from lit_coupling.editing.options import MemitOptions
from lit_coupling.gradients.options import GradSimOptions

DEFAULT_MODEL = "tiny-gpt2"
STAGE_ORDER = ("pieces", "gradsim", "ripple", "analysis", "report")

# Stage name → "module:function". A function takes (RunConfig, output dir) and returns a StageResult.
STAGES = {
    "pieces": "lit_coupling.data.stage:pieces_stage",
    "gradsim": "lit_coupling.gradients.stage:gradsim_stage",
    "ripple": "lit_coupling.editing.stage:ripple_stage",
    "analysis": "lit_coupling.analysis.stage:analysis_stage",
    "report": "lit_coupling.analysis.stage:report_stage",
}


@dataclass
class TrainerOptions:
    """Lightning Trainer settings for the stages that run as predict jobs (gradsim, ripple)."""

    accelerator: str | None = None
    """cpu, gpu, auto; default: from --device."""
    strategy: str = "auto"
    """auto, ddp, ddp_spawn, fsdp (FSDP2 through ModelParallelStrategy)."""
    devices: int | str = 1
    """Processes/GPUs per node."""
    num_nodes: int = 1
    """Nodes (multi-node: launch one command per node with torchrun or SLURM)."""


@dataclass
class RunConfig:
    """The experiment on one model (the seed's flags, plus per-stage settings)."""

    hotpot_data: str | None = None
    """HotpotQA file (JSON list, JSON Lines, or the hub copy's schema); default: the embedded synthetic world."""
    model_path: str | None = None
    """Hub id (gpt2, meta-llama/Llama-2-7b-hf), local HF directory, or embedded name (tiny-gpt2, tiny-llama).
    Default: the model of the run in --output_dir, else tiny-gpt2."""
    max_samples: int | None = None
    """Use the first N HotpotQA records (all when unset)."""
    max_experiments: int = 10
    """Number of MEMIT edits (source pieces), each measured on every piece."""
    device: str = "auto"
    """cpu, cuda or auto."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float64."""
    output_dir: str | None = None
    """Where every output file of the run goes; default runs/<model name>."""
    stages: str = "pieces,gradsim,ripple,analysis,report"
    """Comma-separated stages to run, in pipeline order."""
    seed: int = 0
    """Seeds everything random (counterfactual targets, projections, bootstrap); recorded in the outputs."""
    layers: str | None = None
    """GradSim layers: all (default), '4-8', '4,6,8'."""
    target_pattern: str | None = None
    """Override the MLP output module pattern, e.g. 'transformer.h.{}.mlp.c_proj'."""
    trust_remote_code: bool = False
    """Allow a model repository's own Python code to run (off unless asked)."""
    overwrite: bool = False
    """Start over in an output directory that holds another run."""
    logger: Literal["wandb", "csv", "none"] = "wandb"
    """wandb (offline when no API key is set), csv, or none."""
    gradsim: GradSimOptions = field(default_factory=GradSimOptions)
    memit: MemitOptions = field(default_factory=MemitOptions)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    trainer: TrainerOptions = field(default_factory=TrainerOptions)

    def stage_list(self) -> list[str]:
        wanted = [s.strip() for s in self.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGE_ORDER)}")
        return [s for s in STAGE_ORDER if s in wanted]


@dataclass
class StageResult:
    files: list[str]
    summary: str = ""


class StageUnavailable(UserError):
    """The stage is not part of this version of lit_coupling."""


def load_stage(name: str):
    module_name, function = STAGES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("lit_coupling"):
            raise StageUnavailable(f"the {name} stage is not available in this version of lit_coupling "
                                   f"({error.name} is missing); run the stages before it with --stages") from error
        raise
    return getattr(module, function)


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-coupling run", description=__doc__.split("\n\n")[0],
                            default_config_files=[])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
    parser.add_class_arguments(RunConfig, None, fail_untyped=False)
    return parser


# Switches that read naturally without a value: `--overwrite` means `--overwrite true`.
_SWITCHES = ("--overwrite", "--trust_remote_code")


def _expand_switches(argv: list[str]) -> list[str]:
    expanded = []
    for i, arg in enumerate(argv):
        expanded.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in _SWITCHES and (following is None or following.lower() not in ("true", "false")):
            expanded.append("true")
    return expanded


def parse_config(argv: list[str] | None) -> RunConfig:
    argv = _expand_switches(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    namespace = parser.parse_args(argv)
    namespace = parser.instantiate_classes(namespace)
    data = {k: v for k, v in vars(namespace).items() if k not in ("config", "__path__")}
    return RunConfig(**{k: v for k, v in data.items() if k in RunConfig.__dataclass_fields__})


def default_output_dir(model_path: str) -> str:
    """runs/<model>: one directory per model, so runs of different models never mix."""
    name = Path(model_path.rstrip("/")).name if Path(model_path).exists() else model_path
    return str(Path("runs") / "".join(c if c.isalnum() or c in "-_." else "_" for c in name))


def run(cfg: RunConfig) -> list[tuple[str, StageResult]]:
    """Run the chosen stages in order, skipping those already finished with the same inputs and settings.

    Under `--trainer.strategy ddp` Lightning re-executes this command in every rank; every rank walks the same
    stages (the predict stages need all of them), and only global rank 0 writes the manifest and final files.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_coupling.manifest import Manifest, stage_hashes

    is_rank_zero = rank_zero_only.rank == 0
    if cfg.model_path is None:  # continue the run in --output_dir, or the embedded default
        cfg.model_path = (cfg.output_dir and Manifest.recorded_model(Path(cfg.output_dir))) or DEFAULT_MODEL
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg.model_path)
    out = Path(cfg.output_dir)
    names = cfg.stage_list()
    stages = [(name, load_stage(name)) for name in names]  # refuse before doing any work
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and is_rank_zero:
        Manifest(out, cfg.model_path).clear()
    manifest = Manifest.open(out, cfg.model_path, overwrite=cfg.overwrite and is_rank_zero)
    hashes = stage_hashes(cfg, names, manifest.stages)
    results = []
    for name, stage in stages:
        if manifest.is_done(name, hashes[name]):
            record = manifest.stages[name]
            _say(is_rank_zero, f"[{name}] finished earlier with the same inputs — kept {', '.join(record['files'])}")
            results.append((name, StageResult(record["files"], record.get("summary", ""))))
            continue
        start = time.perf_counter()
        result: StageResult = stage(cfg, out)
        elapsed = time.perf_counter() - start
        if is_rank_zero:
            manifest.record(name, hashes[name], [str(f) for f in result.files], elapsed, result.summary)
            written = ", ".join(Path(f).name for f in result.files) or "nothing"
            _say(True, f"[{name}] {elapsed:.1f}s  wrote {written}" + (f"  — {result.summary}" if result.summary
                                                                       else ""))
        results.append((name, result))
    return results


def _say(is_rank_zero: bool, line: str) -> None:
    if is_rank_zero:
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        run(cfg)
    except UserError as error:
        print(f"lit-coupling run: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
