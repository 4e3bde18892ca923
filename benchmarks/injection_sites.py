"""Where does a trained model recall its facts, and can a vector at the subject's last token change them?

    python benchmarks/injection_sites.py --model runs/inject/tiny-gpt2/model --world WORLD.json --n 40

1. Causal trace (Meng et al. 2022): noise on the subject's token embeddings, then the clean hidden state (or the
   clean MLP outputs of a 3-layer window) restored at one position and layer; the table is the mean recovered
   P(answer's first token) at the subject's first token, its last token and the prompt's last token.
2. Upper bound of a MEMIT edit: a vector δ added after block l at the subject's last token, optimised (Adam) for a
   counterfactual answer with ‖δ‖ ≤ clamp·‖h‖, as MEMIT's target vector is. Counts: new answer generated greedily,
   and P(new) > P(true). MEMIT cannot do better at that layer than this δ does.
"""

from __future__ import annotations

import argparse
import random

import torch

from lit_coupling.data.hotpotqa import read_hotpotqa
from lit_coupling.data.pieces import extract_pieces, tokenize_pieces
from lit_coupling.inject.embedded import ensure_embedded
from lit_coupling.models.adapters import ModelAdapter, bos_ids
from lit_coupling.models.hooks import Hooks
from lit_coupling.models.loading import load_model
from lit_coupling.scoring import encode_cloze


def subject_tokens(tokenizer, piece, bos: list[int]) -> list[int]:
    start = piece.prompt.rfind(piece.subject)
    end = start + len(piece.subject)
    offsets = tokenizer(piece.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [k + len(bos) for k, (a, b) in enumerate(offsets) if a < end and b > start]


def block_output_hook(position: int, replace):
    """Forward hook on a block: h[0, position] ← replace(h[0, position]) (skips cached single-token steps)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] <= position:
            return output
        hidden = hidden.clone()
        hidden[0, position] = replace(hidden[0, position])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


@torch.no_grad()
def trace_piece(model, adapter, tokenizer, piece, bos, noise_std: float, generator):
    """(state effects, MLP-window effects), each (layers, 3), for one piece; None when the noise does not hurt."""
    embedding, blocks = adapter.embedding, adapter.blocks
    layers = adapter.num_layers
    mlps = [adapter.target(layer).module for layer in range(layers)]
    ids = torch.tensor([piece.prompt_ids])
    answer = piece.answer_ids[0]
    subject = subject_tokens(tokenizer, piece, bos)
    positions = (subject[0], subject[-1], ids.shape[1] - 1)
    clean_states, clean_mlps = {}, {}
    hooks = [
        (b, lambda m, a, o, i=i: clean_states.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
        for i, b in enumerate(blocks)
    ]
    hooks += [(m, lambda m, a, o, i=i: clean_mlps.__setitem__(i, o.clone())) for i, m in enumerate(mlps)]
    with Hooks(forward=hooks):
        clean = torch.softmax(model(ids).logits[0, -1], -1)[answer].item()
    noise = torch.randn(len(subject), embedding.weight.shape[1], generator=generator) * noise_std

    def corrupt(module, args, output):
        output = output.clone()
        output[0, subject] += noise
        return output

    def run(extra_hooks=()):
        with Hooks(forward=[(embedding, corrupt), *extra_hooks]):
            return torch.softmax(model(ids).logits[0, -1], -1)[answer].item()

    corrupted = run()
    if clean - corrupted < 0.2:
        return None
    state, mlp = torch.zeros(layers, 3), torch.zeros(layers, 3)
    for layer in range(layers):
        for column, t in enumerate(positions):
            restore = block_output_hook(t, lambda h, k=layer, t=t: clean_states[k][0, t])
            state[layer, column] = run([(blocks[layer], restore)]) - corrupted
            window = range(max(0, layer - 1), min(layers, layer + 2))
            patches = [
                (
                    mlps[w],
                    lambda m, a, o, w=w, t=t: torch.cat([o[:, :t], clean_mlps[w][:, t : t + 1], o[:, t + 1 :]], 1),
                )
                for w in window
            ]
            mlp[layer, column] = run(patches) - corrupted
    return state, mlp


def causal_trace(model, adapter, tokenizer, pieces, bos, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    noise_std = 3 * adapter.embedding.weight.std().item()
    traces = [t for p in pieces if (t := trace_piece(model, adapter, tokenizer, p, bos, noise_std, generator))]
    if not traces:
        zeros = torch.zeros(adapter.num_layers, 3)
        return zeros, zeros, 0
    return (torch.stack([s for s, _ in traces]).mean(0), torch.stack([m for _, m in traces]).mean(0), len(traces))


def edit_piece(
    model, adapter, tokenizer, piece, new: str, bos, layer: int, clamp: float, steps: int, lr: float
) -> tuple[bool, bool]:
    """(new answer generated, P(new) > P(true)) after optimising δ at the subject's last token after `layer`."""
    prompt_ids, new_ids = encode_cloze(tokenizer, piece.prompt, new, bos)
    ids = torch.tensor([prompt_ids + new_ids])
    t = subject_tokens(tokenizer, piece, bos)[-1]
    delta = torch.zeros(adapter.d_model, requires_grad=True)
    norm = {}

    def add_delta(h):
        norm.setdefault("h", h.norm().detach())
        return h + delta

    with Hooks(forward=[(adapter.blocks[layer], block_output_hook(t, add_delta))]):
        optimizer = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            logp = torch.log_softmax(model(ids).logits[0], -1)
            loss = -torch.stack([logp[len(prompt_ids) - 1 + k, a] for k, a in enumerate(new_ids)]).mean()
            if loss.item() < 0.05:  # MEMIT's early stop
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.mul_(min(1.0, clamp * norm["h"].item() / max(delta.norm().item(), 1e-12)))
        with torch.no_grad():

            def total(prompt, answer_ids):
                logp = torch.log_softmax(model(torch.tensor([prompt + answer_ids])).logits[0], -1)
                return sum(logp[len(prompt) - 1 + k, a].item() for k, a in enumerate(answer_ids))

            wins = total(prompt_ids, new_ids) > total(piece.prompt_ids, piece.answer_ids)
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=len(new_ids),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            generated = tokenizer.decode(out[0, len(prompt_ids) :]).strip() == new
    return generated, wins


def edit_upper_bound(
    model,
    adapter,
    tokenizer,
    pieces,
    candidates,
    bos,
    layer: int,
    clamp: float,
    steps: int = 25,
    lr: float = 0.5,
    seed: int = 0,
) -> tuple[int, int]:
    rng = random.Random(seed)
    results = [
        edit_piece(
            model,
            adapter,
            tokenizer,
            p,
            rng.choice([a for a in candidates[p.kind] if a != p.answer]),
            bos,
            layer,
            clamp,
            steps,
            lr,
        )
        for p in pieces
    ]
    return sum(g for g, _ in results), sum(w for _, w in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model directory (or tiny-gpt2 / tiny-llama)")
    parser.add_argument("--world", required=True, help="the HotpotQA file / world it was trained on")
    parser.add_argument("--n", type=int, default=40, help="single-hop pieces traced and edited")
    parser.add_argument("--clamps", default="0.75,4", help="norm clamps of δ (GPT-2 XL: 0.75, LLaMA-2: 4)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_embedded(args.model)  # an embedded name (tiny-gpt2) is trained on first use
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    adapter = ModelAdapter(model)
    bos = bos_ids(model.config, tokenizer)
    pieces = [
        p
        for p in tokenize_pieces(extract_pieces(read_hotpotqa(args.world)), tokenizer, bos).pieces
        if p.kind in ("hop1", "hop2")
    ]
    candidates = {kind: sorted({p.answer for p in pieces if p.kind == kind}) for kind in ("hop1", "hop2")}
    sample = random.Random(0).sample(pieces, min(args.n, len(pieces)))
    state, mlp, traced = causal_trace(model, adapter, tokenizer, sample, bos)
    print(f"causal trace over {traced} pieces (indirect effect on P(answer)):")
    print("layer | state: subj first, subj last, prompt last | MLP window: subj first, subj last, prompt last")
    for layer in range(adapter.num_layers):
        print(
            f"{layer:5d} | "
            + "  ".join(f"{v:6.3f}" for v in state[layer])
            + " | "
            + "  ".join(f"{v:6.3f}" for v in mlp[layer])
        )
    print(f"\nδ at the subject's last token, {len(sample)} counterfactual edits: generated / P(new) > P(true)")
    for clamp in (float(c) for c in args.clamps.split(",")):
        row = [
            edit_upper_bound(model, adapter, tokenizer, sample, candidates, bos, layer, clamp)
            for layer in range(adapter.num_layers)
        ]
        print(f"clamp {clamp:4}: " + "  ".join(f"L{layer} {g}/{w}" for layer, (g, w) in enumerate(row)))


if __name__ == "__main__":
    main()
