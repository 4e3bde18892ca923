"""How many knowledge pieces real HotpotQA records give, why the rest are dropped, and whether any piece is defective.

    python benchmarks/pieces.py --hotpot_data ../shared/data/hotpotqa/hotpot_dev_distractor_v1.sample40.json \
        --tokenizer ../shared/tokenizers/gpt2

prints one table row per part of the records (by default dev = 0:20, the records the rules were developed on,
held-out = 20:40, and all = 0:40; `--records 20:40` or `--records dev=0:20,held-out=20:40` chooses others): bridge
chains with both hops (each with its own answer), bridge chains with one hop (the other not found), records with
at least one piece, pieces by kind, and the defects found (must be 0):

- the answer tokens do not decode to the answer (tokenised jointly with the prompt, as every stage scores them);
- prompt + answer is not a prefix of the source sentence (a restated piece: the answer and subject are not in
  the supporting sentence it restates);
- the subject is not in the prompt;
- the prompt does not read as a statement (`statement_problem`: an open bracket or quote, a trailing comma, no verb).

Then, per part, the drops by reason (whole records and single pieces) and the candidate clozes the statement filter
turned down, by reason. `--show` also lists every piece (prompt → answer) and every drop.

`--model smollm2-135m` (any model the project loads) also asks whether the prompts are statements that model can
complete: per part, the single facts and questions whose answer's first token is the model's top choice after the
prompt, and those whose every answer token is (teacher-forced). One forward pass per piece, on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_coupling.data.hotpotqa import read_hotpotqa  # noqa: E402
from lit_coupling.data.pieces import extract_pieces, piece_defects, tokenize_pieces  # noqa: E402

DEFAULT_PARTS = "dev=0:20,held-out=20:40,all=0:40"


def records_slice(spec: str) -> slice:
    start, _, stop = spec.partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


def parts(spec: str) -> list[tuple[str, slice]]:
    """ "dev=0:20,held-out=20:40" → [("dev", slice(0, 20)), ...]; a bare slice is named by itself."""
    out = []
    for item in spec.split(","):
        name, _, part = item.rpartition("=")
        out.append((name or part, records_slice(part)))
    return out


def summary(dataset, tokenizer) -> dict:
    """The acceptance figures of issue 14 for these records."""
    result = tokenize_pieces(extract_pieces(dataset), tokenizer, bos_ids=[])
    kinds = {}
    for piece in result.pieces:
        kinds.setdefault(piece.chain_id, set()).add(piece.kind)
    bridges = [r["id"] for r in dataset if r["type"] == "bridge"]
    hops = [len({"hop1", "hop2"} & kinds.get(i, set())) for i in bridges]
    defects = [d for p in result.pieces for d in piece_defects(p, tokenizer)]
    return {
        "records": len(dataset),
        "bridge": len(bridges),
        "bridge_two_hops": hops.count(2),
        "bridge_one_hop": hops.count(1),
        "records_with_pieces": len(kinds),
        "pieces": len(result.pieces),
        "by_kind": dict(Counter(p.kind for p in result.pieces)),
        "by_shape": dict(Counter(p.shape for p in result.pieces if p.kind != "question")),
        "skipped": result.skipped(),
        "skipped_pieces": dict(Counter(s.piece for s in result.skips)),
        "rejected": result.rejected_candidates(),
        "defects": defects,
        "result": result,
    }


def known_fractions(dataset, model_path: str) -> dict[str, tuple[int, int, int]]:
    """{"single fact"/"question": (pieces, first answer token top-1, every answer token top-1)} for `model_path`."""
    import torch

    from lit_coupling.models.adapters import bos_ids
    from lit_coupling.models.loading import load_model

    loaded = load_model(model_path, dtype="float32", device="cpu")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    result = tokenize_pieces(extract_pieces(dataset), tokenizer, bos_ids(model.config, tokenizer))
    out: dict[str, list[int]] = {}
    with torch.no_grad():
        for piece in result.pieces:
            ids = list(piece.prompt_ids) + list(piece.answer_ids)
            n = len(piece.prompt_ids)
            choice = model(torch.tensor([ids])).logits[0, n - 1 : len(ids) - 1].argmax(-1).tolist()
            row = out.setdefault("question" if piece.kind == "question" else "single fact", [0, 0, 0])
            row[0] += 1
            row[1] += choice[0] == piece.answer_ids[0]
            row[2] += choice == list(piece.answer_ids)
    return {kind: tuple(row) for kind, row in out.items()}


def pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / max(d, 1):.0f}%)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hotpot_data", required=True)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (the real GPT-2 one)")
    parser.add_argument(
        "--records",
        default=DEFAULT_PARTS,
        help=f"which records, as named slices (default {DEFAULT_PARTS}) or one slice: 20:40",
    )
    parser.add_argument("--show", action="store_true", help="list every piece and every drop")
    parser.add_argument("--model", help="also: how many prompts this model completes (e.g. smollm2-135m)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = read_hotpotqa(args.hotpot_data)
    results = [
        (name, summary(dataset.select(range(len(dataset))[part]), tokenizer)) for name, part in parts(args.records)
    ]
    print(
        "| records | bridge chains with both hops, each its own answer | bridge chains with one hop "
        "| records with ≥ 1 piece | pieces | defects |\n|---|---|---|---|---|---|"
    )
    for name, s in results:
        print(
            f"| {name} | {pct(s['bridge_two_hops'], s['bridge'])} | {s['bridge_one_hop']} "
            f"| {pct(s['records_with_pieces'], s['records'])} | {s['pieces']} | {len(s['defects'])} |"
        )
    if args.model:
        print(
            f"\n| records | {args.model}: pieces | n | first answer token top-1 | every answer token top-1 "
            "(teacher-forced) |\n|---|---|---|---|---|"
        )
        for name, part in parts(args.records):
            fractions = known_fractions(dataset.select(range(len(dataset))[part]), args.model)
            for kind, (n, first, every) in sorted(fractions.items(), reverse=True):
                print(f"| {name} | {kind} | {n} | {pct(first, n)} | {pct(every, n)} |")
    for name, s in results:
        print(f"\n## {name}: {s['records']} records ({s['bridge']} bridge)")
        print(f"pieces by kind {s['by_kind']}; chain shapes (single facts) {s['by_shape']}")
        for defect in s["defects"]:
            print("  DEFECT", defect)
        print("\n| dropped (record or piece) | records | pieces |\n|---|---|---|")
        by_reason: dict[str, list[int]] = {}
        for skip in s["result"].skips:
            by_reason.setdefault(skip.reason, [0, 0])[skip.piece != "record"] += 1
        for reason, (n_records, n_pieces) in sorted(by_reason.items(), key=lambda item: -sum(item[1])):
            print(f"| {reason} | {n_records} | {n_pieces} |")
        print("\n| candidate clozes the statement filter dropped | count |\n|---|---|")
        for reason, n in s["rejected"].items():
            print(f"| {reason} | {n} |")
        if args.show:
            for piece in s["result"].pieces:
                print(f"{piece.id:32} {piece.shape:13} [{piece.subject}] {piece.prompt!r} → {piece.answer!r}")
            for skip in s["result"].skips:
                print(f"SKIP {skip.hotpot_id} {skip.piece}: {skip.reason} ({skip.detail})")
    return 1 if any(s["defects"] for _, s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
