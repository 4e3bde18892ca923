"""`lit-coupling run`: the whole experiment on one model — pieces → gradsim → ripple → analysis → report.

Each stage reads what earlier stages wrote into `--output_dir` and writes its own files there (names in
`lit_coupling.outputs`), so a stage can be run alone on a run directory.

    lit-coupling run --hotpot_data hotpot_dev_distractor_v1.json --model_path gpt2 \\
        --max_samples 20 --max_experiments 2 --device cpu --output_dir quick_test
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.errors import SettingError, UserError
from lit_coupling.editing.options import MemitOptions
from lit_coupling.gradients.options import GradSimOptions

DEFAULT_MODEL = "tiny-gpt2"
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float64", "fp64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
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

    def validate(self, device: str = "auto") -> None:
        """Refuse what Lightning would reject with a traceback, or quietly ignore, before any stage runs."""
        import torch

        from lit_coupling.errors import bad_setting, check_choice, check_int
        from lit_coupling.trainer import STRATEGIES, _processes, accelerator_for

        if self.accelerator is not None:
            check_choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        check_int("trainer.num_nodes", self.num_nodes, 1)
        devices = self.devices
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        if not (devices in (-1, "auto") or (isinstance(devices, int) and not isinstance(devices, bool)
                                            and devices >= 1)):
            raise bad_setting("trainer.devices", self.devices, "a number of processes ≥ 1, or auto / -1 (every GPU)")
        accelerator = accelerator_for(device, self.accelerator)
        if accelerator in ("gpu", "cuda"):
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not available:
                raise bad_setting("trainer.accelerator", self.accelerator or accelerator,
                                  "an accelerator this machine has", f"torch {torch.__version__} sees no CUDA GPU: "
                                  f"use --device cpu (or leave --trainer.accelerator unset)")
            if isinstance(devices, int) and devices > available:
                raise bad_setting("trainer.devices", self.devices, f"at most {available} (the GPUs torch sees)")
        if self.strategy == "fsdp":
            _processes(devices, accelerator)


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
    max_experiments: int = 60
    """Number of edits (source pieces), each measured on every piece. 60 by default: at least 30 edits for a
    cluster bootstrap to be trusted, and enough pairs for every all-pairs interval to have half-width ≤ 0.1,
    within the 5-minute default run (docs/benchmarks.md)."""
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
        if not isinstance(self.stages, str) or not self.stages.strip(", "):
            raise SettingError(f"--stages {self.stages!r}: expected a comma-separated list of stages, from "
                               f"{', '.join(STAGE_ORDER)} (all of them by default)")
        wanted = [s.strip() for s in self.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise SettingError(f"unknown stage(s) {', '.join(unknown)} in --stages: choose from "
                               f"{', '.join(STAGE_ORDER)}")
        return [s for s in STAGE_ORDER if s in wanted]

    def validate(self) -> None:
        """Every setting's type and range, before any work (the checks that need the model or the data files are
        in `lit_coupling.preflight`)."""
        import torch

        from lit_coupling.errors import bad_setting, check_choice, check_int, check_layer_spec, check_text

        for name in ("hotpot_data", "model_path", "output_dir", "target_pattern"):
            check_text(name, getattr(self, name))
        check_int("max_samples", self.max_samples, 1, optional=True, hint="leave it unset to use every record")
        check_int("max_experiments", self.max_experiments, 1,
                  hint="it is the number of MEMIT edits whose ripple is measured")
        check_int("seed", self.seed, 0, 2**32 - 1)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise bad_setting("device", self.device, "cpu, cuda, cuda:N or auto")
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(self.device.partition(":")[2] or 0)
            if index >= count:
                raise bad_setting("device", self.device, "a device this machine has",
                                  f"torch {torch.__version__} sees {count or 'no'} CUDA GPU{'s' if count != 1 else ''}"
                                  f": use --device cpu or auto")
        if self.dtype in ("float16", "fp16", "half"):
            raise bad_setting("dtype", self.dtype, "auto, float32, bfloat16 or float64",
                              "float16 is refused: per-piece gradients underflow in it; bfloat16 keeps float32's range")
        check_choice("dtype", self.dtype, DTYPES)
        if "ripple" in self.stage_list() and self.trainer.strategy == "fsdp":
            raise bad_setting("trainer.strategy", "fsdp", "auto, ddp or ddp_spawn when --stages has ripple",
                              "The ripple stage edits a whole copy of the model in each process; run the stages "
                              "before it under fsdp (--stages pieces,gradsim), then ripple under ddp")
        check_layer_spec("layers", self.layers)
        if self.target_pattern is not None and "{}" not in self.target_pattern:
            raise bad_setting("target_pattern", self.target_pattern,
                              "a module path with {} where the layer number goes, e.g. 'transformer.h.{}.mlp.c_proj'")
        for name in ("trust_remote_code", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad_setting(name, getattr(self, name), "true or false")
        check_choice("logger", self.logger, ("wandb", "csv", "none"))
        self.gradsim.validate()
        self.memit.validate()
        self.analysis.validate()
        self.trainer.validate(self.device)


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


def _check_config_files(argv: list[str]) -> None:
    """A --config YAML that is missing or not valid YAML is named with its line (the parser names neither)."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2] \
            if arg.startswith("--config=") else None
        if not path:
            continue
        file = Path(path).expanduser()
        if not file.is_file():
            raise SettingError(f"--config {path}: " + ("this is a directory; pass a YAML file of run options"
                                                        if file.is_dir() else "no such file"))
        try:
            doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SettingError(f"--config {path}: not UTF-8 text; a config is a YAML file") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SettingError(f"--config {path}: not valid YAML{where} "
                               f"({getattr(error, 'problem', None) or error}); fix the file") from None
        if doc is not None and not isinstance(doc, dict):
            raise SettingError(f"--config {path}: expected a mapping of options (key: value lines), found a "
                               f"{type(doc).__name__}")


def parse_config(argv: list[str] | None) -> RunConfig:
    argv = _expand_switches(list(sys.argv[1:] if argv is None else argv))
    _check_config_files(argv)
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

    from lit_coupling import manifest as M
    from lit_coupling.outputs import remove_temp_files
    from lit_coupling.preflight import check_inputs, check_output_dir

    is_rank_zero = rank_zero_only.rank == 0
    cfg.validate()
    names = cfg.stage_list()

    def prepare(directory: Path) -> None:
        check_output_dir(directory)
        if is_rank_zero and M.interrupted_overwrite(directory):
            restored = M.restore_set_aside(directory)
            _say(True, f"[overwrite] an earlier --overwrite was interrupted before its first stage finished: "
                       f"brought back the {len(restored)} files of the run it had set aside")

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
        _say(True, f"[overwrite] set the earlier run's {len(set_aside)} files aside in {out / M.SET_ASIDE}: they "
                   f"come back if this run fails before its first stage finishes")
    finished_one = False
    try:
        results = []
        for name, stage in stages:
            reason = reasons[name]
            if reason is None and name not in manifest.stages:  # dropped when a stage it reads changed content
                reason = f"an earlier stage it reads ({', '.join(M.DEPENDS_ON[name])}) now has different output"
            if reason is None:
                record = manifest.stages[name]
                _say(is_rank_zero, f"[{name}] finished earlier with the same inputs — kept "
                                   f"{', '.join(record['files'])}")
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
                _say(True, f"[{name}] {elapsed:.1f}s  wrote {written}" + (f"  — {result.summary}"
                                                                           if result.summary else ""))
            results.append((name, result))
    except BaseException:
        if set_aside is not None and not finished_one:
            M.restore_set_aside(out)
            print(f"[overwrite] this run failed before its first stage finished: the earlier run is back in {out}, "
                  f"as it was", file=sys.stderr, flush=True)
        elif is_rank_zero and (out / M.SET_ASIDE).exists():
            print(f"[overwrite] the earlier run's files are kept in {out / M.SET_ASIDE} until this run finishes "
                  f"(move them elsewhere to keep them)", file=sys.stderr, flush=True)
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
