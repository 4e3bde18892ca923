"""Tiny causal LMs of several families, built from a config and saved like a hub model (tests only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# `python -m lit_coupling` in a child process: offline, no W&B, one thread each (tests run several at once).
CLI_ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
}


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "lit_coupling", *map(str, args)]


def run_cli(command: list[str], cwd: Path, timeout: int = 600) -> str:
    """Runs a `cli_command`; its stdout, or a failed assertion showing the ends of stdout and stderr."""
    proc = subprocess.run(command, cwd=cwd, env=CLI_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


TEXTS = [
    "The capital of France is Paris.",
    "Marie Curie was born in Warsaw.",
    "The Eiffel Tower stands in Paris.",
    "Warsaw is the capital of Poland.",
    "Arthur's Magazine was started in 1844.",
    "First for Women is a magazine.",
] * 20


def tiny_config(family: str, vocab_size: int, layers: int = 2, width: int = 32, **overrides):
    import transformers as T

    common = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=2, vocab_size=vocab_size)
    gated = dict(common, intermediate_size=2 * width, num_key_value_heads=2)
    builders = {
        "gpt2": lambda: T.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab_size, n_positions=128),
        "llama": lambda: T.LlamaConfig(**gated),
        "mistral": lambda: T.MistralConfig(**gated),
        "qwen2": lambda: T.Qwen2Config(**gated),
        "gemma": lambda: T.GemmaConfig(**gated, head_dim=width // 2),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common, intermediate_size=2 * width),
        "gptj": lambda: T.GPTJConfig(
            n_layer=layers, n_embd=width, n_head=2, vocab_size=vocab_size, rotary_dim=8, n_positions=128
        ),
        "opt": lambda: T.OPTConfig(**common, ffn_dim=2 * width, word_embed_proj_dim=width),
        "falcon": lambda: T.FalconConfig(**common),
        "phi": lambda: T.PhiConfig(**common, intermediate_size=2 * width),
        "bloom": lambda: T.BloomConfig(n_layer=layers, hidden_size=width, n_head=2, vocab_size=vocab_size),
    }
    config = builders[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_model(
    directory: Path, family: str, style: str | None = None, seed: int = 0, dtype=torch.float32, **overrides
) -> Path:
    """Build a random tiny model of `family`, train a small BPE tokenizer, save both with save_pretrained."""
    from transformers import AutoModelForCausalLM

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    style = style or ("llama" if family in ("llama", "mistral", "gemma", "opt") else "gpt2")
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=320, style=style)
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), **overrides)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Clozes over the tokenizer's training texts: several pieces per "chain", answers of one or more tokens.
CLOZES = [
    ("c0", "The capital of France is", "Paris"),
    ("c0", "The Eiffel Tower stands in", "Paris"),
    ("c1", "Marie Curie was born in", "Warsaw"),
    ("c1", "Warsaw is the capital of", "Poland"),
    ("c2", "Arthur's Magazine was started in", "1844"),
    ("c2", "First for Women is a", "magazine"),
    ("c3", "The capital of", "France is Paris"),
    ("c3", "Marie Curie was", "born in Warsaw"),
    ("c4", "The Eiffel", "Tower"),
    ("c4", "Arthur's", "Magazine was started"),
]


def write_pieces(directory: Path, model_dir: Path, clozes=CLOZES, repeat: int = 1) -> Path:
    """knowledge_pieces.json (the documented format) of hand-made clozes, tokenised for the model in `model_dir`."""
    from transformers import AutoConfig, AutoTokenizer

    from lit_coupling.data.piece import PIECES_FORMAT, KnowledgePiece
    from lit_coupling.models.adapters import bos_ids, ensure_padding
    from lit_coupling.outputs import PIECES, write_json
    from lit_coupling.scoring import encode_cloze

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = ensure_padding(tokenizer)
    bos = bos_ids(AutoConfig.from_pretrained(model_dir), tokenizer)
    pieces = []
    for r in range(repeat):
        for i, (chain, prompt, answer) in enumerate(clozes):
            prompt_ids, answer_ids = encode_cloze(tokenizer, prompt, answer, bos)
            pieces.append(
                KnowledgePiece(
                    id=f"{chain}-{r}/{i}",
                    hotpot_id=f"{chain}-{r}",
                    chain_id=f"{chain}-{r}",
                    kind="hop1",
                    hop=1,
                    prompt=prompt,
                    answer=answer,
                    subject=prompt.split()[0],
                    prompt_ids=prompt_ids,
                    answer_ids=answer_ids,
                ).to_dict()
            )
    directory = Path(directory)
    write_json(
        directory / PIECES,
        {
            "format": PIECES_FORMAT,
            "model": {"name": str(model_dir)},
            "tokenizer": {"name_or_path": str(model_dir), "pad_id": pad_id, "bos_ids": bos},
            "source": {"kind": "hand-made test clozes"},
            "seed": 0,
            "counts": {"pieces": len(pieces)},
            "skipped": {},
            "pieces": pieces,
        },
    )
    return directory / PIECES
