"""The settings of `lit-coupling run`: `RunConfig` (the flags) and `TrainerOptions`, parsed from the command line.

Each setting is declared once, as a dataclass field whose docstring is its `--help`; the options of a stage
(`--gradsim.*`, `--memit.*`, `--analysis.*`) are the domain packages' own dataclasses, passed whole.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.editing.options import MemitOptions
from lit_coupling.errors import SettingError
from lit_coupling.gradients.options import GradSimOptions
from lit_coupling.models.options import DEFAULT_MODEL, ModelOptions

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float64", "fp64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# The stages of a run, in pipeline order (their functions: `lit_coupling.pipeline.stages.STAGES`).
STAGE_ORDER = ("pieces", "gradsim", "ripple", "analysis", "report")
RUN_DESCRIPTION = (
    "`lit-coupling run`: the whole experiment on one model — pieces → gradsim → ripple → analysis → report."
)


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
        if not (
            devices in (-1, "auto") or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)
        ):
            raise bad_setting("trainer.devices", self.devices, "a number of processes ≥ 1, or auto / -1 (every GPU)")
        accelerator = accelerator_for(device, self.accelerator)
        if accelerator in ("gpu", "cuda"):
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not available:
                raise bad_setting(
                    "trainer.accelerator",
                    self.accelerator or accelerator,
                    "an accelerator this machine has",
                    f"torch {torch.__version__} sees no CUDA GPU: "
                    f"use --device cpu (or leave --trainer.accelerator unset)",
                )
            if isinstance(devices, int) and devices > available:
                raise bad_setting("trainer.devices", self.devices, f"at most {available} (the GPUs torch sees)")
        if self.strategy == "fsdp":
            _processes(devices, accelerator)


@dataclass
class RunConfig(ModelOptions):
    """The experiment on one model (the seed's flags, plus per-stage settings).

    The model settings (--model_path, --dtype, --layers, --target_pattern, --trust_remote_code) are
    `ModelOptions`'s, inherited: declared once, and handed whole to the stages' modules (`model_options()`).
    """

    hotpot_data: str | None = None
    """HotpotQA file (JSON list, JSON Lines, or the hub copy's schema); default: the embedded synthetic world."""
    max_samples: int | None = None
    """Use the first N HotpotQA records (all when unset)."""
    max_experiments: int = 240
    """Number of edits (source pieces), each measured on every piece. 240 by default: enough edits for the
    headline (related facts) ρ interval to have half-width ≤ 0.1 (0.09 measured) and for every all-pairs interval
    to be far narrower, within the 5-minute default run (3 min 34 s from an empty cache; docs/benchmarks.md)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    output_dir: str | None = None
    """Where every output file of the run goes; default runs/<model name>."""
    stages: str = "pieces,gradsim,ripple,analysis,report"
    """Comma-separated stages to run, in pipeline order."""
    seed: int = 0
    """Seeds everything random (counterfactual targets, projections, bootstrap); recorded in the outputs."""
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
            raise SettingError(
                f"--stages {self.stages!r}: expected a comma-separated list of stages, from "
                f"{', '.join(STAGE_ORDER)} (all of them by default)"
            )
        wanted = [s.strip() for s in self.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in STAGE_ORDER]
        if unknown:
            raise SettingError(
                f"unknown stage(s) {', '.join(unknown)} in --stages: choose from {', '.join(STAGE_ORDER)}"
            )
        return [s for s in STAGE_ORDER if s in wanted]

    def validate(self) -> None:
        """Every setting's type and range, before any work (the checks that need the model or the data files are
        in `lit_coupling.pipeline.preflight`)."""
        import torch

        from lit_coupling.errors import bad_setting, check_choice, check_int, check_layer_spec, check_text

        for name in ("hotpot_data", "model_path", "output_dir", "target_pattern"):
            check_text(name, getattr(self, name))
        check_int("max_samples", self.max_samples, 1, optional=True, hint="leave it unset to use every record")
        check_int(
            "max_experiments", self.max_experiments, 1, hint="it is the number of MEMIT edits whose ripple is measured"
        )
        check_int("seed", self.seed, 0, 2**32 - 1)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise bad_setting("device", self.device, "cpu, cuda, cuda:N or auto")
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(self.device.partition(":")[2] or 0)
            if index >= count:
                raise bad_setting(
                    "device",
                    self.device,
                    "a device this machine has",
                    f"torch {torch.__version__} sees {count or 'no'} CUDA GPU{'s' if count != 1 else ''}"
                    f": use --device cpu or auto",
                )
        if self.dtype in ("float16", "fp16", "half"):
            raise bad_setting(
                "dtype",
                self.dtype,
                "auto, float32, bfloat16 or float64",
                "float16 is refused: per-piece gradients underflow in it; bfloat16 keeps float32's range",
            )
        check_choice("dtype", self.dtype, DTYPES)
        if "ripple" in self.stage_list() and self.trainer.strategy == "fsdp":
            raise bad_setting(
                "trainer.strategy",
                "fsdp",
                "auto, ddp or ddp_spawn when --stages has ripple",
                "The ripple stage edits a whole copy of the model in each process; run the stages "
                "before it under fsdp (--stages pieces,gradsim), then ripple under ddp",
            )
        check_layer_spec("layers", self.layers)
        if self.target_pattern is not None and "{}" not in self.target_pattern:
            raise bad_setting(
                "target_pattern",
                self.target_pattern,
                "a module path with {} where the layer number goes, e.g. 'transformer.h.{}.mlp.c_proj'",
            )
        for name in ("trust_remote_code", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad_setting(name, getattr(self, name), "true or false")
        check_choice("logger", self.logger, ("wandb", "csv", "none"))
        self.gradsim.validate()
        self.memit.validate()
        self.analysis.validate()
        self.trainer.validate(self.device)


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-coupling run", description=RUN_DESCRIPTION, default_config_files=[])
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
        path = (
            argv[i + 1]
            if arg == "--config" and i + 1 < len(argv)
            else arg.partition("=")[2]
            if arg.startswith("--config=")
            else None
        )
        if not path:
            continue
        file = Path(path).expanduser()
        if not file.is_file():
            raise SettingError(
                f"--config {path}: "
                + ("this is a directory; pass a YAML file of run options" if file.is_dir() else "no such file")
            )
        try:
            doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SettingError(f"--config {path}: not UTF-8 text; a config is a YAML file") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SettingError(
                f"--config {path}: not valid YAML{where} ({getattr(error, 'problem', None) or error}); fix the file"
            ) from None
        if doc is not None and not isinstance(doc, dict):
            raise SettingError(
                f"--config {path}: expected a mapping of options (key: value lines), found a {type(doc).__name__}"
            )


def parse_config(argv: list[str] | None) -> RunConfig:
    argv = _expand_switches(list(sys.argv[1:] if argv is None else argv))
    _check_config_files(argv)
    parser = build_parser()
    namespace = parser.parse_args(argv)
    namespace = parser.instantiate_classes(namespace)
    data = {k: v for k, v in vars(namespace).items() if k not in ("config", "__path__")}
    return RunConfig(**{k: v for k, v in data.items() if k in RunConfig.__dataclass_fields__})


__all__ = ["DEFAULT_MODEL", "RunConfig", "TrainerOptions", "build_parser", "parse_config"]
