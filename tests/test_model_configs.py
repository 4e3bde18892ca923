"""configs/models/*.yaml: each parses as a `lit-coupling run` config, and `--memit.hparams auto` finds the
published MEMIT set for the models that have one (by shape, as it would for the real loaded model)."""

from pathlib import Path

import pytest

from lit_coupling.editing.hparams import select_hparams
from lit_coupling.pipeline.run import parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"

# (model_type, d_model, layers, MLP width) of the real models: the shape `auto` selects by.
SHAPES = {
    "gpt2": ("gpt2", 768, 12, 3072),
    "gpt2-medium": ("gpt2", 1024, 24, 4096),
    "gpt2-large": ("gpt2", 1280, 36, 5120),
    "gpt2-xl": ("gpt2", 1600, 48, 6400),
    "llama-2-7b": ("llama", 4096, 32, 11008),
    "llama-2-13b": ("llama", 5120, 40, 13824),
    "llama-2-70b": ("llama", 8192, 80, 28672),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_model_config_parses_and_has_memit_hyperparameters(name):
    cfg = parse_config(["--config", str(CONFIGS / f"{name}.yaml")])
    assert name in cfg.model_path.lower()
    model_type, d_model, layers, key_dim = SHAPES[name]
    hp = select_hparams(model_type, d_model, layers, key_dim, model_type)
    assert hp.layers and all(0 <= layer < layers for layer in hp.layers)
    published = name in ("gpt2-xl", "llama-2-7b")
    assert hp.source.startswith("published") == published, hp.source
    if name == "llama-2-70b":  # GradSim sharded over 8 GPUs; the ripple stage needs a whole model per process
        assert cfg.trainer.strategy == "fsdp" and "ripple" not in cfg.stages
