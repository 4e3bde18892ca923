"""How many knowledge pieces real HotpotQA records give, why the rest are dropped, and whether any piece is defective.

    python benchmarks/pieces.py --hotpot_data ../shared/data/hotpotqa/hotpot_dev_distractor_v1.sample40.json \
        --tokenizer ../shared/tokenizers/gpt2 --records 20:40

prints, for the chosen records (a Python slice, `start:stop`): bridge chains with both hops (each with its own
answer), records with at least one piece, pieces by kind and chain shape, drops by reason (records and pieces),
candidate clozes the statement filter dropped by reason, and the defects found (must be 0):

- the answer tokens do not decode to the answer (tokenised jointly with the prompt, as every stage scores them);
- prompt + answer is not a prefix of the source sentence (a restated piece: the answer and subject are not in
  the supporting sentence it restates);
- the subject is not in the prompt;
- the prompt does not read as a statement (`statement_problem`: an open bracket or quote, a trailing comma, no verb).

`--show` also lists every piece (prompt → answer).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_coupling.data.hotpotqa import read_hotpotqa  # noqa: E402
from lit_coupling.data.pieces import extract_pieces, piece_defects, tokenize_pieces  # noqa: E402


def records_slice(spec: str) -> slice:
    start, _, stop = spec.partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


def summary(dataset, tokenizer) -> dict:
    """The acceptance figures of issue 14 for these records."""
    result = tokenize_pieces(extract_pieces(dataset), tokenizer, bos_ids=[])
    kinds = {}
    for piece in result.pieces:
        kinds.setdefault(piece.chain_id, set()).add(piece.kind)
    bridges = [r["id"] for r in dataset if r["type"] == "bridge"]
    two_hops = [i for i in bridges if {"hop1", "hop2"} <= kinds.get(i, set())]
    defects = [d for p in result.pieces for d in piece_defects(p, tokenizer)]
    return {"records": len(dataset), "bridge": len(bridges), "bridge_two_hops": len(two_hops),
            "records_with_pieces": len(kinds), "pieces": len(result.pieces),
            "by_kind": dict(Counter(p.kind for p in result.pieces)),
            "by_shape": dict(Counter(p.shape for p in result.pieces if p.kind != "question")),
            "skipped": result.skipped(), "skipped_pieces": dict(Counter(s.piece for s in result.skips)),
            "rejected": result.rejected_candidates(), "defects": defects, "result": result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hotpot_data", required=True)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (the real GPT-2 one)")
    parser.add_argument("--records", default=":", help="which records, as a slice: 0:20, 20:40, : (all)")
    parser.add_argument("--show", action="store_true", help="list every piece")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    dataset = read_hotpotqa(args.hotpot_data)
    part = records_slice(args.records)
    dataset = dataset.select(range(len(dataset))[part])
    s = summary(dataset, AutoTokenizer.from_pretrained(args.tokenizer))
    pct = lambda n, d: f"{n}/{d} ({100 * n / max(d, 1):.0f}%)"  # noqa: E731
    print(f"records {args.records}: {s['records']} ({s['bridge']} bridge)")
    print(f"| bridge chains with two hops, each its own answer | {pct(s['bridge_two_hops'], s['bridge'])} |")
    print(f"| records with at least one piece | {pct(s['records_with_pieces'], s['records'])} |")
    print(f"| pieces | {s['pieces']} {s['by_kind']} |")
    print(f"| chain shapes (single-fact pieces) | {s['by_shape']} |")
    print(f"| defects | {len(s['defects'])} |")
    for defect in s["defects"]:
        print("  DEFECT", defect)
    print("\n| dropped (record or piece) | count |\n|---|---|")
    for reason, n in s["skipped"].items():
        print(f"| {reason} | {n} |")
    print("\n| candidate clozes the statement filter dropped | count |\n|---|---|")
    for reason, n in s["rejected"].items():
        print(f"| {reason} | {n} |")
    if args.show:
        for piece in s["result"].pieces:
            print(f"{piece.id:32} {piece.shape:13} [{piece.subject}] {piece.prompt!r} → {piece.answer!r}")
        for skip in s["result"].skips:
            print(f"SKIP {skip.hotpot_id} {skip.piece}: {skip.reason} ({skip.detail})")
    return 1 if s["defects"] else 0


if __name__ == "__main__":
    sys.exit(main())
