"""HotpotQA → the content of knowledge_pieces.json, tokenised for a model (what the `pieces` stage writes)."""

from __future__ import annotations

from lit_coupling.data.piece import PIECES_FORMAT
from lit_coupling.data.pieces import Extraction, extract_pieces, tokenize_pieces
from lit_coupling.errors import UserError

# Tokens a piece leaves free in the model's context: MEMIT puts a 10-token context prefix before the prompt and a
# new answer after it, and the ripple decodes a couple of tokens past the answer.
CONTEXT_RESERVE = 16


def piece_token_limit(config) -> int | None:
    """The longest prompt + answer (in tokens) a piece may have for this model, or None when it says no limit."""
    from lit_coupling.models.adapters import context_length

    context = context_length(config)
    return None if not context else max(1, int(context) - CONTEXT_RESERVE)


def pieces_document(
    extraction: Extraction, source: dict, model: dict, tokenizer, bos_ids: list[int], seed: int
) -> dict:
    """The content of knowledge_pieces.json (format in docs/outputs.md)."""
    return {
        "format": PIECES_FORMAT,
        "model": model,
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "pad_id": tokenizer.pad_token_id, "bos_ids": bos_ids},
        "source": source,
        "seed": seed,
        "counts": extraction.counts(),
        "skipped": extraction.skipped(),
        "skipped_records": [s.to_dict() for s in extraction.skips],
        "rejected_candidates": extraction.rejected_candidates(),
        "pieces": [p.to_dict() for p in extraction.pieces],
    }


def drop_table(doc: dict) -> str:
    """The pieces stage's report: what the records gave, then every drop by reason (whole records, single pieces),
    then the candidate clozes the statement filter turned down (docs/pieces.md)."""
    counts = doc["counts"]
    records, bridges = counts["records"], counts.get("bridge_records", 0)
    pct = lambda n, d: f"{n}/{d} ({100 * n / d:.0f}%)" if d else f"{n}/0"  # noqa: E731
    lines = [
        f"records with at least one piece: {pct(counts['records_with_pieces'], records)}",
        f"bridge chains with both hops: {pct(counts.get('bridge_two_hops', 0), bridges)}"
        f" (one hop only: {counts.get('bridge_one_hop', 0)})",
    ]
    by_reason: dict[str, list[int]] = {}
    for skip in doc["skipped_records"]:
        by_reason.setdefault(skip["reason"], [0, 0])[skip["piece"] != "record"] += 1
    rows = [
        (reason, str(n_records), str(n_pieces))
        for reason, (n_records, n_pieces) in sorted(by_reason.items(), key=lambda item: -sum(item[1]))
    ]
    rows += [(f"(candidate cloze) {reason}", "", str(n)) for reason, n in doc.get("rejected_candidates", {}).items()]
    if rows:
        width = max(len("dropped because"), *(len(r[0]) for r in rows))
        lines += [f"{'dropped because':<{width}}  records  pieces"]
        lines += [f"{reason:<{width}}  {n_records:>7}  {n_pieces:>6}" for reason, n_records, n_pieces in rows]
    return "\n".join(lines)


def build_pieces(
    hotpot_data: str | None,
    model_path: str,
    max_samples: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict:
    """Read the data, extract the pieces and tokenise them with `model_path`'s tokenizer and BOS convention."""
    from lit_coupling.data.hotpotqa import open_hotpot_data
    from lit_coupling.models.adapters import FAMILY_BY_MODEL_TYPE, bos_ids
    from lit_coupling.models.loading import config_at, resolve_model_path, tokenizer_at

    dataset, source = open_hotpot_data(hotpot_data, max_samples)
    resolved = resolve_model_path(model_path)
    config = config_at(resolved, trust_remote_code)
    tokenizer = tokenizer_at(resolved, trust_remote_code)
    bos = bos_ids(config, tokenizer)
    extraction = tokenize_pieces(extract_pieces(dataset), tokenizer, bos, piece_token_limit(config))
    if not extraction.pieces:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in extraction.skipped().items())
        raise UserError(
            f"{source['path']}: no knowledge piece could be extracted from {source['records_read']} records ({reasons})"
        )
    model_type = getattr(config, "model_type", "")
    family = FAMILY_BY_MODEL_TYPE.get(model_type)
    model = {"name": model_path, "family": family.name if family else "unknown", "model_type": model_type}
    return pieces_document(extraction, source, model, tokenizer, bos, seed)
