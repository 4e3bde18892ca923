"""`lit-coupling check-model MODEL`: is this causal LM supported, and what exactly will be targeted?

Prints the family, the blocks, the MLP output projections with their shapes and storage orientation, the size
and a memory estimate, then scores one cloze answer and takes its gradient on the target modules.
Exit 0 when supported; 2 with a message naming the problem otherwise (an encoder or encoder–decoder is refused
by name).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from lit_coupling.errors import UserError
from lit_coupling.inject.embedded import ensure_embedded
from lit_coupling.models.adapters import FAMILIES, ModelAdapter
from lit_coupling.models.loading import load_model
from lit_coupling.models.options import ModelOptions
from lit_coupling.scoring import answer_logprobs, collate_clozes, encode_cloze

SMOKE_PROMPT, SMOKE_ANSWER = "The capital of France is", "Paris"


@dataclass
class CheckOptions(ModelOptions):
    """The model settings of `run` (`ModelOptions`), and the device to check on."""

    device: str = "cpu"
    """cpu, cuda or auto."""


def format_families() -> str:
    rows = [("family", "config model_type", "MLP output projection", "stored", "BOS", "e.g.")]
    for f in FAMILIES:
        rows.append(
            (
                f.name,
                ",".join(f.model_types),
                f.pattern,
                "(in,out) Conv1D" if f.weight_layout == "in_out" else "(out,in) Linear",
                "yes" if f.prepend_bos else "no",
                f.examples,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines += [
        "",
        "The family is read from the loaded model's config (model_type), never from its name.",
        "Any other causal LM: a structural fallback finds the block list and, in each block, the linear map",
        "from the MLP's wide layer back to the model width. Override with --target_pattern and --layers.",
    ]
    return "\n".join(lines)


def _gb(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def describe(adapter: ModelAdapter, loaded) -> list[str]:
    model, tok = adapter.model, loaded.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    n_target = sum(t.module.weight.numel() for t in adapter.targets.values())
    first = adapter.targets[adapter.layers[0]]
    d_out, d_in = first.shape
    stored = tuple(first.module.weight.shape)
    bos = adapter.bos_ids(tok)
    lines = [
        f"model        {loaded.path}" + (f"  ({loaded.resolved_path})" if loaded.resolved_path != loaded.path else ""),
        f"family       {adapter.family.name}  (config model_type {adapter.model_type!r}, "
        f"{type(model).__name__})"
        + (f"  [structural fallback: {adapter.fallback_reason}]" if adapter.fallback_reason else ""),
        f"blocks       {adapter.num_layers} × {adapter.block_class.__name__} at {adapter.family.blocks} "
        f"(FSDP wraps {', '.join(sorted(adapter.no_split_modules))})",
        f"targets      {adapter.family.pattern}  layers {_layer_text(adapter.layers)}",
        f"             {type(first.module).__name__} stored {stored} = "
        f"{'(in, out)' if first.transposed else '(out, in)'}; read as (out, in) = ({d_out}, {d_in})",
    ]
    for layer in adapter.layers:
        t = adapter.targets[layer]
        lines.append(f"   layer {layer:>3}  {t.name}  (out, in) = {t.shape}")
    embed = adapter.embedding
    lines += [
        f"embedding    {adapter.family.embed or '?'} {tuple(embed.weight.shape)}; final norm "
        f"{adapter.family.final_norm or 'none found'}",
        f"tokens       BOS {'prepended: ' + repr(tok.convert_ids_to_tokens(bos[0])) if bos else 'not prepended'}; "
        f"pad {tok.pad_token!r} ({tok.pad_token_id}), right padding",
        bos_line(adapter, tok),
        f"parameters   {n_params / 1e6:,.1f}M in all; {n_target / 1e6:,.2f}M in the {len(adapter.layers)} target "
        f"modules",
        f"memory       weights fp32 {_gb(4 * n_params)}, bf16 {_gb(2 * n_params)}; MEMIT keeps one fp64 "
        f"covariance of {d_in}×{d_in} per edit layer ({_gb(8 * d_in * d_in)} each) and a snapshot of the edited "
        f"weights",
    ]
    return lines


def bos_line(adapter: ModelAdapter, tokenizer) -> str:
    """The BOS decision every stage follows, and why (models.adapters.bos_decision)."""
    decision = adapter.bos_decision(tokenizer)
    return f"BOS rule     {decision.ids or 'none'} from {decision.source}: {decision.reason}"


def _layer_text(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]} ({len(layers)})"
    return ",".join(map(str, layers))


def smoke_test(adapter: ModelAdapter, tokenizer) -> str:
    """Score one cloze answer and take the gradient of its log-probability w.r.t. every target weight."""
    model = adapter.model
    prompt_ids, answer_ids = encode_cloze(tokenizer, SMOKE_PROMPT, SMOKE_ANSWER, adapter.bos_ids(tokenizer))
    batch = collate_clozes([(prompt_ids, answer_ids)], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    weights = [t.module.weight for t in adapter.targets.values()]
    saved = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        logp = answer_logprobs(logits, batch["input_ids"].to(device), batch["answer_mask"].to(device))[0]
        grads = torch.autograd.grad(logp, weights)
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
    norms = torch.stack([g.float().norm() for g in grads])
    if not torch.isfinite(logp) or not torch.isfinite(norms).all():
        raise RuntimeError(f"the smoke test gave a non-finite value (log P {logp.item()}, gradient norms {norms})")
    if (norms == 0).all():
        raise RuntimeError("the gradient on every target module is zero: these modules do not affect the answer")
    return (
        f"smoke test   log P({SMOKE_ANSWER!r} | {SMOKE_PROMPT!r}) = {logp.item():.3f} over "
        f"{len(answer_ids)} answer token(s); gradient on {len(grads)} target modules, "
        f"‖g‖ = {norms.norm().item():.3e}, all finite"
    )


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print(format_families())
        return 0
    parser = ArgumentParser(
        prog="lit-coupling check-model",
        description=__doc__.split("\n\n")[0],
        epilog="lit-coupling check-model --list  prints the supported families and patterns.",
    )
    parser.add_class_arguments(CheckOptions, None)
    parser.add_argument(
        "model_positional",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="Hub id, local directory, .gguf file, or embedded name",
    )
    parser.add_argument("--model", default=None, help="The same as MODEL or --model_path.")
    args = parser.parse_args(argv)
    model_path = args.model_positional or args.model or args.model_path
    if not model_path:
        parser.print_usage(sys.stderr)
        print("lit-coupling check-model: name a MODEL (or use --list)", file=sys.stderr)
        return 2
    try:
        ensure_embedded(model_path)  # an embedded name (tiny-gpt2) is trained on first use, here
        loaded = load_model(model_path, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        adapter = ModelAdapter(loaded.model, layers=args.layers, target_pattern=args.target_pattern)
        for line in describe(adapter, loaded):
            print(line)
        print(smoke_test(adapter, loaded.tokenizer))
    except (UserError, RuntimeError) as error:
        print(f"not supported: {error}", file=sys.stderr)
        return 2
    print(f"OK: {model_path} is supported ({adapter.family.name}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
