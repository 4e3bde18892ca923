"""Logging a run's results: a W&B offline run directory, the CSV alternative, the logger config fragments."""

import json
from pathlib import Path

import pytest
import yaml

from lit_coupling import loggers, outputs
from lit_coupling.analysis.options import AnalysisOptions
from lit_coupling.pipeline.run import RunConfig
from lit_coupling.pipeline.stages import analysis_stage, report_stage
from tests.analysis_synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]


def analysed_run(directory: Path, logger: str) -> RunConfig:
    write_synthetic_run(directory, n_chains=5, n_edits=5)
    cfg = RunConfig(output_dir=str(directory), logger=logger, analysis=AnalysisOptions(bootstrap=50, permutations=50))
    analysis_stage(cfg, directory)
    return cfg


@pytest.mark.slow
def test_wandb_offline_run_directory_holds_tables_images_and_artefacts(tmp_path, monkeypatch):
    # conftest disables W&B for every test; this one runs it offline, with every W&B folder under tmp_path.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    directory = tmp_path / "run"
    cfg = analysed_run(directory, "wandb")
    result = report_stage(cfg, directory)
    assert "wandb (offline)" in result.summary

    (run_dir,) = (directory / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    tables = {p.name.split("_")[0] for p in (media / "table").glob("*.table.json")}
    assert {"pieces", "pair", "correlations"} <= tables
    pair_table = json.loads(next((media / "table").glob("pair_table_*.table.json")).read_text())
    assert "gradsim" in pair_table["columns"] and len(pair_table["data"]) == 5 * (15 - 1)
    images = {p.name.rsplit("_", 2)[0] for p in (media / "images").glob("*.png")}
    assert images == {"coupling_heatmap", "comprehensive_analysis", "coupling_by_layer", "predictor_ranking"}
    log = next(run_dir.glob("*.wandb")).read_bytes()  # hyperparameters, metrics and artefact manifests
    for needle in (
        b"headline/spearman/value",
        b"analysis",
        b"final_mvp_report.md",
        b"coupling_matrix.npy",
        b"verdict_text",
    ):
        assert needle in log, needle


def test_csv_logger_writes_metrics_hyperparameters_and_tables(tmp_path):
    directory = tmp_path / "run"
    cfg = analysed_run(directory, "csv")
    report_stage(cfg, directory)
    (log_dir,) = (directory / "csv_logs").glob("version_*")
    metrics = (log_dir / "metrics.csv").read_text()
    spearman = json.loads((directory / outputs.CORRELATION).read_text())["headline"]["spearman"]["value"]
    assert "headline/spearman/value" in metrics and f"{spearman:.6f}"[:7] in metrics
    assert "bootstrap: 50" in (log_dir / "hparams.yaml").read_text()
    tables = {p.name for p in (log_dir / "tables").iterdir()}
    assert tables == {"pieces.csv", "pair_table.csv", "correlations.csv", "texts.csv"}


def test_wandb_is_offline_without_an_api_key_and_the_env_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert loggers.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"
    with pytest.raises(Exception, match="choose from wandb, csv, none"):
        loggers.build_logger("tensorboard", tmp_path, "x")


@pytest.mark.parametrize(
    "fragment, expected", [("wandb.yaml", "WandbLogger"), ("csv.yaml", "CSVLogger"), ("no_logger.yaml", None)]
)
def test_callback_fragments_build_the_logger_for_lightning_cli(fragment, expected, tmp_path, monkeypatch):
    from lightning.pytorch import LightningDataModule, LightningModule

    from lit_coupling.cli import LitCouplingCLI

    monkeypatch.setattr("sys.argv", ["lit-coupling"])  # the CLI reads only `args`, not pytest's own arguments
    cli = LitCouplingCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=[
            "--model",
            "lit_coupling.models.module.CausalLMModule",
            "--data",
            "lit_coupling.data.datamodule.PiecesDataModule",
            "--data.pieces_path",
            str(tmp_path / "pieces.json"),
            "--config",
            str(ROOT / "callbacks" / fragment),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
    )
    logger = cli.trainer.logger
    assert (type(logger).__name__ if logger else None) == expected


@pytest.mark.parametrize("kind", ["wandb", "csv", "none"])
def test_run_logger_configs_set_the_logger(kind):
    from lit_coupling.pipeline.run import parse_config

    assert yaml.safe_load((ROOT / "configs" / "logger" / f"{kind}.yaml").read_text()) == {"logger": kind}
    assert parse_config(["--config", str(ROOT / "configs" / "logger" / f"{kind}.yaml")]).logger == kind
