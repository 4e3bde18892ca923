"""One table for every model-family quirk, and the adapter that applies it to a loaded HF causal LM.

Nothing else in lit_coupling branches on the model family: the gradient, editing and scoring code ask the adapter
for blocks, the MLP output projection of a layer, its weight in (out, in) orientation, and the BOS convention.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from lit_coupling.errors import UserError

try:  # GPT-2, GPT-BigCode, ... store their projections as Conv1D: weight is (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]


class AdapterError(UserError, ValueError):
    """The model's structure does not give what lit_coupling needs (blocks, an MLP output projection)."""


@dataclass(frozen=True)
class Family:
    """How one model family lays out what lit_coupling touches. Paths are dotted attribute paths."""

    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values of the family (read from the config, not the name)
    blocks: str  # the nn.ModuleList of transformer blocks
    mlp_out: str  # inside a block: the MLP output projection (the "value" matrix MEMIT edits)
    embed: str
    final_norm: str
    weight_layout: str = "out_in"  # "in_out" for Conv1D (GPT-2); nn.Linear is (out, in)
    prepend_bos: bool = False  # fallback only (bos_decision): the family trains with BOS before every text
    examples: str = ""

    @property
    def pattern(self) -> str:
        return f"{self.blocks}.{{}}.{self.mlp_out}"


FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        "mlp.c_proj",
        "transformer.wte",
        "transformer.ln_f",
        weight_layout="in_out",
        examples="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2",
    ),
    Family(
        "llama",
        ("llama",),
        "model.layers",
        "mlp.down_proj",
        "model.embed_tokens",
        "model.norm",
        prepend_bos=True,
        examples="meta-llama/Llama-2-7b-hf, -13b, -70b, Llama-3",
    ),
    Family(
        "mistral",
        ("mistral",),
        "model.layers",
        "mlp.down_proj",
        "model.embed_tokens",
        "model.norm",
        prepend_bos=True,
        examples="mistralai/Mistral-7B-v0.1",
    ),
    Family(
        "qwen2",
        ("qwen2", "qwen3"),
        "model.layers",
        "mlp.down_proj",
        "model.embed_tokens",
        "model.norm",
        examples="Qwen/Qwen2.5-0.5B, Qwen3",
    ),
    Family(
        "gemma",
        ("gemma", "gemma2"),
        "model.layers",
        "mlp.down_proj",
        "model.embed_tokens",
        "model.norm",
        prepend_bos=True,
        examples="google/gemma-2b, gemma-2",
    ),
    Family(
        "phi3",
        ("phi3",),
        "model.layers",
        "mlp.down_proj",
        "model.embed_tokens",
        "model.norm",
        examples="microsoft/Phi-3-mini-4k-instruct",
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        "gpt_neox.embed_in",
        "gpt_neox.final_layer_norm",
        examples="EleutherAI/pythia-*, gpt-neox-20b",
    ),
    Family(
        "gptj",
        ("gptj",),
        "transformer.h",
        "mlp.fc_out",
        "transformer.wte",
        "transformer.ln_f",
        examples="EleutherAI/gpt-j-6b",
    ),
    Family(
        "opt",
        ("opt",),
        "model.decoder.layers",
        "fc2",
        "model.decoder.embed_tokens",
        "model.decoder.final_layer_norm",
        prepend_bos=True,
        examples="facebook/opt-125m ... opt-66b",
    ),
    Family(
        "falcon",
        ("falcon",),
        "transformer.h",
        "mlp.dense_4h_to_h",
        "transformer.word_embeddings",
        "transformer.ln_f",
        examples="tiiuae/falcon-7b",
    ),
    Family(
        "phi",
        ("phi",),
        "model.layers",
        "mlp.fc2",
        "model.embed_tokens",
        "model.final_layernorm",
        examples="microsoft/phi-2",
    ),
    Family(
        "bloom",
        ("bloom",),
        "transformer.h",
        "mlp.dense_4h_to_h",
        "transformer.word_embeddings",
        "transformer.ln_f",
        examples="bigscience/bloom-560m",
    ),
)

FAMILY_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}

# Names an MLP output projection goes by in the wild; the structural fallback prefers them.
_MLP_OUT_NAMES = ("c_proj", "down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "wo", "out_proj", "proj_out")
_MLP_CONTAINERS = ("mlp", "ffn", "feed_forward", "feedforward")


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def hidden_size(config) -> int:
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise AdapterError(f"config {type(config).__name__} names no hidden size (hidden_size / n_embd / d_model)")


def parse_layers(spec: str | int | Sequence[int] | None, num_layers: int) -> list[int]:
    """`None`/"all" → every layer; "4-8" (inclusive); "4,6,8"; an int or a list. Negative indices count from the
    end."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
            if m:  # both ends must exist (no wrap-around: '4-5' on a 4-layer model is an error) and run upwards
                lo, hi = (int(g) for g in m.groups())
                for end in (lo, hi):
                    if not -num_layers <= end < num_layers:
                        raise AdapterError(
                            f"layer {end} of the range {part!r} is out of range: the model has "
                            f"{num_layers} layers (0..{num_layers - 1})"
                        )
                lo, hi = lo % num_layers, hi % num_layers
                if lo > hi:
                    raise AdapterError(
                        f"the layer range {part!r} runs backwards (layers {lo} to {hi}): "
                        f"write it first-to-last, e.g. '{hi}-{lo}'"
                    )
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"-?\d+", part):
                items.append(int(part))
            else:
                raise AdapterError(f"cannot read layer spec {spec!r}: use 'all', '4-8', '4,6,8' or a list of ints")
    else:
        items = [int(i) for i in spec]
    layers = []
    for i in items:
        if not -num_layers <= i < num_layers:
            raise AdapterError(f"layer {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        layers.append(i % num_layers)
    return sorted(set(layers))


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList whose children all share one class: the transformer blocks of almost any LM."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise AdapterError("no stack of transformer blocks (an nn.ModuleList of identical modules) was found")
    return best


def _find_mlp_out(block: nn.Module, d_model: int) -> str:
    """Inside one block: the linear map from the MLP's wide hidden layer back to the residual stream."""
    candidates = []
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        d_in, d_out = weight.shape if is_conv1d(module) else weight.shape[::-1]
        if d_out == d_model and d_in > d_model:
            score = (any(c in name.lower() for c in _MLP_CONTAINERS), name.split(".")[-1] in _MLP_OUT_NAMES)
            candidates.append((score, name))
    if not candidates:
        raise AdapterError(
            "no MLP output projection found: no linear layer in a block maps a wider hidden layer back to the "
            f"model width {d_model}. Name it yourself with --target_pattern 'path.to.blocks.{{}}.mlp.out_proj'."
        )
    best = max(s for s, _ in candidates)
    return [n for s, n in candidates if s == best][-1]  # the last in forward order is the output side


def _find_final_norm(model: nn.Module, blocks_path: str) -> str | None:
    found = None
    for name, module in model.named_modules():
        if name.startswith(blocks_path + ".") or name == blocks_path:
            continue
        if "norm" in type(module).__name__.lower() or name.split(".")[-1] in ("ln_f", "norm", "final_layer_norm"):
            found = name
    return found


@dataclass
class TargetModule:
    """The MLP output projection of one layer."""

    layer: int
    name: str  # dotted name inside the model
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """True when the weight is stored (in, out), as GPT-2's Conv1D does."""
        return is_conv1d(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) whatever the storage."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def weight(self) -> torch.Tensor:
        """The weight as an (out, in) view: y = x @ W.T (+ b) for both layouts."""
        w = self.module.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> None:
        """W ← W + ΔW with ΔW given in (out, in) orientation; written in place in the weight's own dtype."""
        w = self.module.weight
        if delta.shape != self.shape:
            raise ValueError(f"{self.name}: update has shape {tuple(delta.shape)}, expected (out, in) {self.shape}")
        w.add_((delta.T if self.transposed else delta).to(device=w.device, dtype=w.dtype))


class ModelAdapter:
    """What lit_coupling needs from one loaded causal LM, whatever its family."""

    def __init__(self, model: nn.Module, layers: str | Sequence[int] | None = None, target_pattern: str | None = None):
        self.model = model
        config = model.config
        self.model_type: str = getattr(config, "model_type", "") or ""
        self.d_model = hidden_size(config)
        family = FAMILY_BY_MODEL_TYPE.get(self.model_type)
        self.fallback_reason: str | None = None
        if target_pattern:
            if "{}" not in target_pattern:
                raise AdapterError(f"--target_pattern {target_pattern!r} needs a '{{}}' where the layer index goes")
            blocks_path, mlp_out = (s.strip(".") for s in target_pattern.split("{}", 1))
            base = family or Family("custom", (self.model_type,), "", "", "", "")
            self.family = replace(base, blocks=blocks_path, mlp_out=mlp_out)
        elif family is not None and _get(model, family.blocks) is not None:
            self.family = family
        else:
            self.fallback_reason = (
                f"model_type {self.model_type!r} is not in the family table"
                if family is None
                else f"{family.blocks} not found in this {family.name} variant"
            )
            self.family = self._structural_family()
        blocks = _get(model, self.family.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise AdapterError(f"{self.family.blocks!r} is not a list of blocks in {type(model).__name__}")
        self.blocks: nn.ModuleList = blocks
        self.num_layers = len(blocks)
        self.layers = parse_layers(layers, self.num_layers)
        self.targets = {layer: self._target(layer) for layer in self.layers}
        # Orientation is always read from the module class; for a table family a mismatch means a surprise variant.
        checked = family is self.family
        for t in self.targets.values():
            if checked and t.transposed != (self.family.weight_layout == "in_out"):
                raise AdapterError(
                    f"{t.name} is {type(t.module).__name__}, but the {self.family.name} family "
                    f"expects weight layout {self.family.weight_layout}"
                )

    def _structural_family(self) -> Family:
        blocks_path, blocks = _find_blocks(self.model)
        mlp_out = _find_mlp_out(blocks[0], self.d_model)
        embed = self.model.get_input_embeddings()
        embed_name = next((n for n, m in self.model.named_modules() if m is embed), "")
        return Family(
            "unknown",
            (self.model_type,),
            blocks_path,
            mlp_out,
            embed_name,
            _find_final_norm(self.model, blocks_path) or "",
        )

    def _target(self, layer: int) -> TargetModule:
        name = self.family.pattern.format(layer)
        module = _get(self.model, name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AdapterError(f"no MLP output projection at {name!r} (pattern {self.family.pattern!r})")
        return TargetModule(layer, name, module)

    # --- the rest of the table, applied -------------------------------------------------------------------

    def target(self, layer: int) -> TargetModule:
        """The MLP output projection of any layer (not only the chosen ones)."""
        return self.targets.get(layer) or self._target(layer)

    @property
    def target_names(self) -> list[str]:
        return [self.targets[layer].name for layer in self.layers]

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def final_norm(self) -> nn.Module | None:
        return _get(self.model, self.family.final_norm) if self.family.final_norm else None

    @property
    def block_class(self) -> type[nn.Module]:
        """The class FSDP wraps: one shard unit per transformer block."""
        return type(self.blocks[0])

    @property
    def no_split_modules(self) -> set[str]:
        declared = getattr(self.model, "_no_split_modules", None)
        return set(declared) if declared else {self.block_class.__name__}

    def bos_ids(self, tokenizer) -> list[int]:
        """Token ids put before every text: `bos_decision` (the tokenizer first, the family table as a fallback)."""
        return bos_ids(self.model.config, tokenizer, self.family)

    def bos_decision(self, tokenizer) -> BosDecision:
        return bos_decision(self.model.config, tokenizer, self.family)

    def describe(self) -> dict:
        """A JSON-ready description of what is targeted (goes into every output file's model section)."""
        return {
            "family": self.family.name,
            "model_type": self.model_type,
            "architecture": type(self.model).__name__,
            "num_layers": self.num_layers,
            "layers": self.layers,
            "target_pattern": self.family.pattern,
            "weight_layout": "in_out (Conv1D)"
            if any(t.transposed for t in self.targets.values())
            else "out_in (Linear)",
            "d_model": self.d_model,
            "fallback": self.fallback_reason,
        }


def context_length(config) -> int | None:
    """Positions the model holds (GPT-2 calls it n_positions, most others max_position_embeddings); None if unsaid."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# BOS tokens that are really chat-role markers (SmolLM2/Qwen-style ChatML, Llama-3 headers, Gemma turns): a model
# reads them only at the start of a chat message, never before plain text.
_ROLE_TOKEN = re.compile(
    r"<\|?(im_start|im_end|start_header_id|end_header_id|eot_id|start_of_turn|end_of_turn|"
    r"user|assistant|system|turn)\|?>",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class BosDecision:
    """Which ids go before every text the model reads, and why (check-model prints `reason`)."""

    ids: list[int]
    source: str  # tokenizer | chat-token | tokenizer-config | family-table | none
    reason: str


def _is_role_token(token: str, tokenizer) -> bool:
    """A chat/role marker: named like one, or written literally into the chat template (which then opens every
    message with it; a true BOS is written there as the `bos_token` variable, once)."""
    if _ROLE_TOKEN.fullmatch(token.strip()):
        return True
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and token in template and "bos_token" not in template


def bos_decision(config, tokenizer, family: Family | None = None) -> BosDecision:
    """BOS as the model reads text, decided in this order:

    1. the tokenizer has no BOS token → nothing;
    2. the tokenizer puts BOS before a text by itself (`tokenizer("x")`, i.e. `add_bos_token` in effect: LLaMA-2,
       Mistral, Gemma, OPT, Llama-3) → [BOS], as the model was trained;
    3. the BOS token is a chat/role marker (SmolLM2's `<|im_start|>`) → nothing, whatever the family;
    4. the tokenizer's own config says `add_bos_token: false` → nothing;
    5. the tokenizer says nothing (a bare tokenizer.json, as the embedded tiny models ship): the family table's
       `prepend_bos` (the config's model_type), and for a family outside the table, nothing.

    Every stage (pieces, GradSim, edits, covariance, scoring) takes its ids from here, through `bos_ids`.
    """
    family = family or FAMILY_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
    bos, token = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is None:
        return BosDecision([], "none", "the tokenizer has no BOS token")
    config_bos = getattr(config, "bos_token_id", None)
    note = (
        f" (the model config's bos_token_id is {config_bos}, not {bos})"
        if isinstance(config_bos, int) and config_bos != bos
        else ""
    )
    if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return BosDecision([bos], "tokenizer", f"the tokenizer puts {token!r} before every text itself{note}")
    if _is_role_token(str(token), tokenizer):
        return BosDecision(
            [],
            "chat-token",
            f"the tokenizer's bos_token {token!r} is a chat role marker, not a "
            f"text start, and the tokenizer does not add it{note}",
        )
    if (getattr(tokenizer, "init_kwargs", None) or {}).get("add_bos_token") is False:
        return BosDecision([], "tokenizer-config", f"the tokenizer config says add_bos_token: false{note}")
    if family is not None and family.name != "unknown":
        if family.prepend_bos:
            return BosDecision(
                [bos],
                "family-table",
                f"the tokenizer does not say; the {family.name} family trains with {token!r} before every text{note}",
            )
        return BosDecision(
            [], "family-table", f"the tokenizer does not add one and the {family.name} family puts none{note}"
        )
    return BosDecision([], "none", f"the tokenizer does not add {token!r} and the family is unknown{note}")


def bos_ids(config, tokenizer, family: Family | None = None) -> list[int]:
    """The ids put before every text (pieces, GradSim, edits, covariance, scoring): `bos_decision(...).ids`."""
    return bos_decision(config, tokenizer, family).ids


def ensure_padding(tokenizer) -> int:
    """Right padding with a real token id: pad → eos → unk. Padding is masked everywhere, so its id is inert."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            raise AdapterError("the tokenizer has no pad, eos, unk or bos token to pad with")
    return tokenizer.pad_token_id
