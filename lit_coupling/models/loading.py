"""Load any HF causal LM and its tokenizer, from the Hub or a local directory, with errors a person can act on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_coupling.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


class ModelLoadError(UserError, RuntimeError):
    """Loading failed; the message says what failed and how to fix it."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"--device {device} was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}). Use --device cpu or auto."
        )
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """fp32 on CPU, bf16 on GPU unless asked otherwise. fp16 is refused: its gradients underflow."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = dtype
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name in ("float16", "fp16", "half"):
        raise ModelLoadError(
            "dtype float16 is not supported: per-piece gradients underflow in fp16. "
            "Use bfloat16 (weights; inner products are accumulated in fp32) or float32."
        )
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: choose one of auto, float32, bfloat16, float64")
    return DTYPES[name]


def resolve_model_path(model_path: str) -> str:
    """Embedded names and GGUF files become a cached HF directory; anything else is returned as given.

    The one place a model name becomes the directory the files are read from: `load_model` calls it once and
    reads config, weights and tokenizer from what it returns. `tiny-gpt2`, `tiny-llama`: the trained tiny model's
    cached directory (never trained here: `inject.embedded.ensure_embedded` trains it, and the run, `check-model`
    and `predict` call that first). `smollm2-135m` (a packaged real model) or a `.gguf` file: its conversion to a
    plain HF directory (`models.gguf`).
    """
    from lit_coupling.cache import model_complete
    from lit_coupling.models.embedded import embedded_dir
    from lit_coupling.models.gguf import resolve_gguf

    converted = resolve_gguf(model_path)
    if converted is not None:
        return str(converted)
    embedded = embedded_dir(model_path)
    if embedded is not None:
        if not model_complete(embedded):
            raise ModelLoadError(
                f"the embedded model {model_path} has not been trained on this machine yet (its "
                f"cached copy would be {embedded}). `lit-coupling run`, `lit-coupling check-model "
                f"{model_path}` and `lit-coupling predict` train it on first use (about a minute)."
            )
        return str(embedded)
    return model_path


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or os.path.sep in path.rstrip("/").split("/", 1)[0]
        or Path(path).exists()
    )


def _explain(model_path: str, error: Exception) -> str:
    """Turn transformers/huggingface_hub failures into a few lines that say what to do."""
    text = str(error)
    name = type(error).__name__
    if "GatedRepo" in name or "gated" in text.lower() or "401" in text or "403" in text:
        return (
            f"{model_path} is a gated repository and this machine is not authorised to read it.\n"
            f"  Accept the licence on https://huggingface.co/{model_path}, then run `huggingface-cli login` "
            f"or set HF_TOKEN=<your token>.\n  Or pass a local directory that holds the weights."
        )
    if "trust_remote_code" in text:
        return (
            f"{model_path} needs custom modelling code from its repository, which lit_coupling does not run "
            f"unless asked.\n  If you trust it, pass --trust_remote_code true."
        )
    if "Unrecognized configuration class" in text:
        return (
            f"{model_path} is not a causal language model: AutoModelForCausalLM cannot load its "
            f"config ({text.splitlines()[0][:160]}).\n  lit_coupling needs a decoder LM that predicts the "
            f"next token (GPT-2, LLaMA, Mistral, ...)."
        )
    if "model_type" in text:
        return (
            f"{model_path}/config.json is not a transformers model config (it has no `model_type`).\n"
            f"  Save the model with `model.save_pretrained(dir)` or point at the right directory."
        )
    if "couldn't connect" in text.lower() or "offline" in text.lower() or "connection" in text.lower():
        return (
            f"could not reach the Hugging Face Hub, and {model_path} is not in the local cache.\n"
            f"  Pass a local directory that holds the model instead, or download it first on a machine "
            f"with network:\n    huggingface-cli download {model_path}\n  then run with HF_HUB_OFFLINE=1."
        )
    if "not a valid model identifier" in text or "Repo id must be" in text or "does not exist" in text:
        return (
            f"{model_path} is neither a local directory nor a model id on the Hub.\n"
            f"  Check the spelling, or give the path of a directory saved with save_pretrained."
        )
    return f"could not load {model_path}: {name}: {text.splitlines()[0] if text else ''}"


def _check_local_dir(model_path: str) -> None:
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{model_path} does not exist. Pass a directory saved with save_pretrained, "
            f"or a Hub id such as gpt2 or meta-llama/Llama-2-7b-hf."
        )
    if path.is_dir() and not (path / "config.json").exists():
        contents = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "it is empty"
        raise ModelLoadError(
            f"{model_path} holds no config.json, so it is not a saved HF model ({contents}).\n"
            f"  Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir), or "
            f"download with `huggingface-cli download <id> --local-dir {model_path}`."
        )


def load_config(model_path: str, trust_remote_code: bool = False):
    """The model's config, from a name or path (resolved here)."""
    return config_at(resolve_model_path(model_path), trust_remote_code)


def config_at(model_path: str, trust_remote_code: bool = False):
    """The config of an already resolved model path (`resolve_model_path`)."""
    from transformers import AutoConfig

    if _looks_local(model_path):
        _check_local_dir(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError/ValueError/HF errors with long texts
        raise ModelLoadError(_explain(model_path, error)) from error
    check_causal_decoder(config, model_path)
    return config


def check_causal_decoder(config, model_path: str) -> None:
    """Refuse encoders and encoder–decoders: the experiment needs a decoder that predicts the next token.

    AutoModelForCausalLM alone does not tell: it loads BERT or RoBERTa as `...LMHeadModel` (an encoder run with a
    causal mask it was never trained with) and BART as its decoder half. Every stage loads through here.
    """
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    architecture = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    what = None
    if getattr(config, "is_encoder_decoder", False):
        what = "an encoder–decoder (sequence-to-sequence) model"
    elif model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        what = "an encoder (a masked language model that reads the whole text in both directions)"
    elif model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in (
        getattr(config, "auto_map", None) or {}
    ):
        what = "a model that transformers has no causal-LM class for"
    if what:
        raise ModelLoadError(
            f"{model_path} is not a causal language model: it is {architecture} "
            f"(model_type {model_type!r}), {what}.\n  lit_coupling needs a decoder LM that "
            f"predicts the next token (GPT-2, LLaMA, Mistral, Qwen2, ...)."
        )


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, from a name or path (resolved here)."""
    return tokenizer_at(resolve_model_path(model_path), trust_remote_code)


def tokenizer_at(model_path: str, trust_remote_code: bool = False):
    """The tokenizer of an already resolved model path (`resolve_model_path`), padding set."""
    from transformers import AutoTokenizer

    from lit_coupling.models.adapters import ensure_padding

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as error:
        if _looks_local(model_path):
            raise ModelLoadError(
                f"{model_path} holds no usable tokenizer ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:160]}).\n  Save it next to the weights with "
                f"tokenizer.save_pretrained(dir)."
            ) from error
        raise ModelLoadError(_explain(model_path, error)) from error
    # Without tokenizer files transformers builds an empty tokenizer instead of failing: every text then has no
    # tokens, which would surface much later as "answer produced no tokens".
    if len(tokenizer) < 2 or not tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"{model_path} holds no tokenizer: transformers built an empty one ({len(tokenizer)} "
            f"token(s)), as the directory has none of tokenizer.json, vocab.json + merges.txt or "
            f"tokenizer.model.\n  Save it next to the weights with tokenizer.save_pretrained(dir)."
        )
    ensure_padding(tokenizer)
    return tokenizer


def check_finite_weights(model: torch.nn.Module, model_path: str, dtype: torch.dtype) -> None:
    """NaN or inf in the checkpoint itself is named here, before gradients would blame it on bfloat16 overflow."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
                bad = int((~torch.isfinite(parameter)).sum())
                raise ModelLoadError(
                    f"{model_path}: the weights are damaged: {name} holds {bad} NaN/inf value(s) as loaded "
                    f"(in {str(dtype).removeprefix('torch.')}), so every gradient and edit through it would be NaN. "
                    f"Re-download or re-save the model."
                )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # what the user named (hub id, directory or embedded name)
    resolved_path: str
    dtype: torch.dtype
    device: torch.device


def load_model(
    model_path: str,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_tokenizer_too: bool = True,
) -> LoadedModel:
    """`from_pretrained` for hub ids, local directories and embedded names; eval mode, on `device`.

    Weights load from safetensors when the checkpoint has them; transformers reads `.bin` files with
    `weights_only=True`, so no pickle runs. `trust_remote_code` stays off unless asked.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    resolved = resolve_model_path(model_path)  # the one resolution: everything below reads from `resolved`
    config = config_at(resolved, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except Exception as error:
        raise ModelLoadError(_explain(model_path, error)) from error
    model.to(torch_device).eval()
    check_finite_weights(model, model_path, torch_dtype)
    tokenizer = tokenizer_at(resolved, trust_remote_code) if load_tokenizer_too else None
    return LoadedModel(model, tokenizer, model_path, resolved, torch_dtype, torch_device)
