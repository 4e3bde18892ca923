"""Scoring a cloze answer with a causal LM — the one definition every stage shares.

log P(answer | prompt) is the sum of the log-probabilities of *every* answer token, teacher-forced. GradSim takes
its gradient, the ripple stage compares it before and after an edit, knowledge injection measures recall with it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

from lit_coupling.errors import UserError

# A prompt that ends with an opening bracket or quote is glued to its answer; otherwise one space separates them.
_GLUE = tuple("([{\"'‘“/-")


def cloze_text(prompt: str, answer: str) -> str:
    """The text a piece stands for: its prompt followed by its answer, as they read in the source sentence."""
    if not prompt:
        return answer
    return prompt + ("" if prompt.endswith(_GLUE) else " ") + answer


class ClozeTokenError(UserError, ValueError):
    """The answer cannot be cut cleanly from the prompt at a token boundary."""


def encode_cloze(tokenizer, prompt: str, answer: str, bos_ids: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids), tokenised jointly so BPE/SentencePiece boundaries are those of the real text.

    The answer's tokens are the ones that start at or after the end of the prompt (the space before the answer
    belongs to the answer's first token, as in "ĠParis" / "▁Paris"). `bos_ids` go before the prompt.
    """
    if not answer.strip():
        raise ClozeTokenError("empty answer")
    text = cloze_text(prompt, answer)
    cut = len(prompt)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        split = next((i for i, (start, end) in enumerate(offsets) if end > cut), len(ids))
        if split < len(ids) and offsets[split][0] < cut and text[offsets[split][0]:cut].strip():
            raise ClozeTokenError(f"token {tokenizer.convert_ids_to_tokens(ids[split])!r} spans the end of the "
                                  f"prompt and the start of the answer {answer!r}")
    else:  # slow tokenizers have no offsets: the prompt's own ids must be a prefix of the joint ids
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt_only = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        if ids[: len(prompt_only)] != prompt_only:
            raise ClozeTokenError(f"prompt tokens change when the answer {answer!r} follows")
        split = len(prompt_only)
    prompt_ids, answer_ids = list(bos_ids) + list(ids[:split]), list(ids[split:])
    if not answer_ids:
        raise ClozeTokenError(f"answer {answer!r} produced no tokens")
    if not prompt_ids:
        raise ClozeTokenError("empty prompt and no BOS token: a causal LM needs at least one token of context")
    return prompt_ids, answer_ids


def collate_clozes(items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids = prompt + answer; answer_mask marks answer positions; padding is masked."""
    lengths = [len(p) + len(a) for p, a in items]
    width = max(lengths)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    answer_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, (p, a) in enumerate(items):
        seq = list(p) + list(a)
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        answer_mask[row, len(p): len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
            "prompt_lengths": torch.tensor([len(p) for p, _ in items]), "lengths": torch.tensor(lengths)}


def answer_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor):
    """Log-probabilities of the answer tokens, computed in fp32 only where an answer token is predicted.

    Returns (logp per answer token (K,), argmax-is-right per answer token (K,), row index of each (K,)).
    """
    target_mask = answer_mask[:, 1:]  # logits at t-1 predict the token at t
    rows, cols = target_mask.nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, cols]  # (K, V): never materialise B×T×V in fp32
    picked = picked.to(torch.promote_types(picked.dtype, torch.float32))  # bf16 → fp32; a float64 run stays float64
    log_probs = torch.log_softmax(picked, dim=-1)
    targets = input_ids[:, 1:][rows, cols]
    token_logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    return token_logp, picked.argmax(-1) == targets, rows


def answer_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log P(answer | prompt) per row: the sum over every answer token. Differentiable."""
    token_logp, _, rows = answer_token_logprobs(logits, input_ids, answer_mask)
    return torch.zeros(input_ids.shape[0], dtype=token_logp.dtype, device=token_logp.device).index_add(
        0, rows, token_logp)


def answer_window(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, W) positions per row: the last prompt token and every answer token — all `answer_logprobs` reads.

    Pass it as HF `logits_to_keep` and gather `input_ids`/`answer_mask` at the same positions: the LM head then
    runs on W positions instead of the whole sequence (for GPT-2 small it is ~40% of a forward's FLOPs).
    """
    lengths = batch["lengths"]
    width = int((lengths - batch["prompt_lengths"]).max()) + 1
    start = (lengths - width).clamp(min=0)  # a short row's window runs into its padding: masked
    return start[:, None] + torch.arange(width, device=lengths.device)[None, :]  # the batch may be on a GPU


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    return out.logits


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """log P(answer | prompt) and teacher-forced exact match (every answer token is the argmax), on the CPU."""
    logits = forward_logits(model, batch)
    input_ids, answer_mask = (batch[k].to(logits.device) for k in ("input_ids", "answer_mask"))
    token_logp, hit, rows = answer_token_logprobs(logits, input_ids, answer_mask)
    n = input_ids.shape[0]
    logp = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add(0, rows, token_logp.double())
    misses = torch.zeros(n, dtype=torch.long, device=logits.device).index_add(0, rows, (~hit).long())
    return {"logp": logp.cpu(), "tf_em": (misses == 0).cpu()}


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA answer normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                         eos_id: int | None = None) -> list[list[int]]:
    """Greedy decoding of a batch of prompts (left-padded for generation), returning only the new tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                         eos_token_id=eos_id)
    return [row[width:].tolist() for row in out.cpu()]


def generated_exact_match(tokenizer, generated_ids: Sequence[int], answer: str) -> bool:
    """The greedy continuation reads as the answer (normalised), possibly followed by more text."""
    got = normalize_answer(tokenizer.decode(list(generated_ids), skip_special_tokens=True))
    want = normalize_answer(answer)
    return bool(want) and (got == want or got.startswith(want + " "))
