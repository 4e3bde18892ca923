"""Experiment loggers (W&B, offline unless an API key is set; CSV; none) and logging a run's results to them.

The same classes serve `lit-coupling run` (`--logger wandb|csv|none`) and the LightningCLI jobs
(`--config callbacks/wandb.yaml` or `callbacks/csv.yaml`). Not named `logging.py`: run as a script from inside
the package, that name would shadow the standard library's `logging` for torch and transformers.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from lit_coupling.errors import UserError

PROJECT = "lit_coupling"
LOGGERS = ("wandb", "csv", "none")


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set (tests set `disabled`), else online only with an API key: nothing ever waits on a
    network that is not there. Sync offline runs later with `wandb sync <run>/wandb/offline-run-*`."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with the mode chosen by `wandb_mode()` (Lightning's own `offline=True` would
    also overwrite WANDB_MODE for the whole process)."""

    def __init__(self, *args, project: str = PROJECT, mode: str | None = None, **kwargs):
        super().__init__(*args, project=project, mode=mode or wandb_mode(), **kwargs)


def build_logger(kind: str, save_dir: str | Path, name: str) -> Logger | None:
    """The logger `--logger` asks for, writing under `save_dir` (the run directory)."""
    if kind == "wandb":
        return WandbLogger(name=name, save_dir=str(save_dir))
    if kind == "csv":
        return CSVLogger(save_dir=str(save_dir), name="csv_logs")
    if kind in ("none", "", None):
        return None
    raise UserError(f"unknown logger {kind!r}: choose from {', '.join(LOGGERS)}")


def flatten_numbers(data: Mapping, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Nested dicts → {'a/b/c': number} for every finite number (lists and strings are left to tables)."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key in skip:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, name + "/", skip))
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            if np.isfinite(value):
                flat[name] = float(value)
    return flat


def log_results(
    logger: Logger | None,
    *,
    hyperparameters: Mapping[str, Any],
    metrics: Mapping[str, float],
    texts: Mapping[str, str],
    tables: Mapping[str, pd.DataFrame],
    images: Mapping[str, Path],
    artifacts: Mapping[str, list[Path]],
) -> list[str]:
    """Log everything a run produced; returns what was logged where (for the stage summary)."""
    if logger is None:
        return []
    logger.log_hyperparams(dict(hyperparameters))
    if isinstance(logger, _LightningWandbLogger):
        return _log_wandb(logger, metrics, texts, tables, images, artifacts)
    logger.log_metrics(dict(metrics))
    if isinstance(logger, CSVLogger):
        texts_frame = pd.DataFrame({"key": list(texts), "text": list(texts.values())})
        return _log_csv(logger, {**tables, "texts": texts_frame})
    return ["hyperparameters", "metrics"]


# Rows of a table logged to W&B (W&B's own limit for a logged table is 10,000 rows).
TABLE_ROWS = 10_000


def _log_wandb(logger: _LightningWandbLogger, metrics, texts, tables, images, artifacts) -> list[str]:
    import wandb

    run = logger.experiment
    # One history row holds the whole result (a run has no steps); the summary shows the numbers and verdict.
    payload: dict[str, Any] = dict(metrics)
    for key, frame in tables.items():
        if len(frame) > TABLE_ROWS:
            # The whole table is in the run's artefact; a W&B table of 144k pairs took 2 minutes to log (the default
            # run's pair table), so the browsable one is a seeded sample of the rows, in their order.
            frame = frame.sample(TABLE_ROWS, random_state=0).sort_index()
        # W&B tables want one type per column: mixed object columns (None/bool) become strings.
        mixed = {c: str for c in frame.columns if frame[c].dtype == object}
        payload[key] = wandb.Table(dataframe=frame.astype(mixed))
    for key, path in images.items():
        payload[key] = wandb.Image(str(path))
    run.log(payload)
    run.summary.update(dict(texts))
    for name, paths in artifacts.items():
        artifact = wandb.Artifact(name=f"{name}-{run.id}", type=name)
        for path in paths:
            artifact.add_file(str(path))
        run.log_artifact(artifact)
    where = getattr(run, "dir", None) or "disabled"
    return [
        f"wandb ({getattr(run.settings, 'mode', 'n/a')}): {len(tables)} tables, {len(images)} images, "
        f"{len(artifacts)} artefacts → {where}"
    ]


def _log_csv(logger: CSVLogger, tables) -> list[str]:
    directory = Path(logger.log_dir) / "tables"
    directory.mkdir(parents=True, exist_ok=True)
    for key, frame in tables.items():
        frame.to_csv(directory / f"{key}.csv", index=False)
    logger.save()
    return [f"csv: metrics and hyperparameters in {logger.log_dir}, {len(tables)} tables in {directory}"]


def finish(logger: Logger | None) -> None:
    """Flush and close (a W&B run must finish for its offline directory to be complete)."""
    if logger is None:
        return
    logger.finalize("success")
    if isinstance(logger, _LightningWandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
