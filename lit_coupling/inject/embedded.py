"""Training the embedded default models (`tiny-gpt2`, `tiny-llama`) on first use: `ensure_embedded`.

Their names and cache locations are `lit_coupling.models.embedded` (resolving a name never trains). Here
`lit-coupling fit` trains one on the default synthetic world with its config in `lit_coupling/resources/inject/`
(= `configs/inject/`); the result is cached under `$LIT_COUPLING_CACHE/models`, keyed by a hash of that config and
of the world, and loaded like any HF model directory from then on. Called by the run, `check-model` and
`predict` before they open the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from lit_coupling.cache import model_complete
from lit_coupling.errors import UserError
from lit_coupling.models.embedded import EMBEDDED_MODELS, embedded_config, embedded_dir

# A process started by DDP/torchrun/SLURM carries these; the training subprocess must not think it is a rank.
_LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "PL_", "SLURM_")


class EmbeddedModelError(UserError, RuntimeError):
    """Training an embedded model failed; the message holds the end of its log."""


def ensure_embedded(name: str) -> Path | None:
    """The directory of an embedded model, training it first if needed; None for any other name.

    Safe when several processes ask at once: one trains under a file lock while the others wait, and the model
    appears under its final name only when complete (trained in a temporary directory, then renamed).
    """
    target = embedded_dir(name)
    if target is None:
        return None
    from lit_coupling.cache import built_once

    return built_once(target, lambda directory: train_embedded(name, directory))


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}


def train_embedded(name: str, target: Path) -> Path:
    """Run `lit-coupling fit` with the embedded config in a fresh process, and move its model to `target`."""
    print(
        f"lit-coupling: training the embedded model {name} on the default synthetic world (first use; "
        f"cached in {target})",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as work:
        command = [
            sys.executable,
            "-m",
            "lit_coupling",
            "fit",
            "--config",
            str(embedded_config(name)),
            "--trainer.default_root_dir",
            work,
            "--trainer.enable_progress_bar",
            "false",
        ]
        tail: deque[str] = deque(maxlen=40)
        with subprocess.Popen(
            command, env=_clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            for line in process.stdout:
                tail.append(line)
                if line.startswith(("[recall]", "[inject]")):
                    print(f"  {name} {line.rstrip()}", file=sys.stderr, flush=True)
        if process.returncode != 0 or not model_complete(Path(work) / "model"):
            raise EmbeddedModelError(
                f"training the embedded model {name} failed (exit code {process.returncode}):\n" + "".join(tail)
            )
        os.replace(Path(work) / "model", target)
    return target


__all__ = ["EMBEDDED_MODELS", "EmbeddedModelError", "embedded_config", "ensure_embedded", "train_embedded"]
