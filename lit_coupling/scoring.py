"""Scoring a cloze answer with a causal LM — the one definition every stage shares.

log P(answer | prompt) is the sum of the log-probabilities of *every* answer token, teacher-forced. GradSim takes
its gradient, the ripple stage compares it before and after an edit, knowledge injection measures recall with it.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Sequence
from functools import lru_cache

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


@lru_cache(maxsize=None)
def takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def window_logits(model, batch: dict[str, torch.Tensor]):
    """Logits at the `answer_window` positions only, with input_ids and answer_mask gathered alike.

    The LM head then runs on a few positions per row, not the whole sequence (for SmolLM2's 49k vocabulary the
    full B×T×V logits of a scoring batch are half a gigabyte). Models without `logits_to_keep` run whole.
    Returns (logits (B, W, V), input_ids (B, W), answer_mask (B, W), positions (B, W)).
    """
    device = next(model.parameters()).device
    positions = answer_window(batch).to(device)
    input_ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if takes_logits_to_keep(type(model)):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False,
                       logits_to_keep=positions).logits
    else:
        full = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        logits = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    return logits, input_ids.gather(1, positions), batch["answer_mask"].to(device).gather(1, positions), positions


def _window_scores(logits, input_ids, answer_mask, positions, lengths) -> dict:
    """score_batch's results from the answer-window logits (see `window_logits`)."""
    token_logp, hit, rows = answer_token_logprobs(logits, input_ids, answer_mask)
    n = input_ids.shape[0]
    logp = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add(0, rows, token_logp.double())
    misses = torch.zeros(n, dtype=torch.long, device=logits.device).index_add(0, rows, (~hit).long())
    t_rows, t_cols = answer_mask[:, 1:].nonzero(as_tuple=True)
    picked = logits[:, :-1][t_rows, t_cols]  # (K, V): the logits predicting each answer token, in row order
    argmax = picked.argmax(-1).cpu().tolist()
    targets = input_ids[:, 1:][t_rows, t_cols]
    ranks = (picked > picked.gather(-1, targets[:, None])).sum(-1).cpu().tolist()
    last = (lengths.to(logits.device) - 1) - positions[:, 0]  # the last answer token, in the window
    following = logits[torch.arange(n, device=logits.device), last].argmax(-1).cpu().tolist()
    greedy: list[list[int]] = [[] for _ in range(n)]
    rank = [0] * n
    for row, token, r in zip(t_rows.cpu().tolist(), argmax, ranks):
        if not greedy[row]:
            rank[row] = r
        greedy[row].append(token)
    return {"logp": logp.cpu(), "tf_em": (misses == 0).cpu(), "rank": rank, "greedy": greedy, "next": following}


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor]) -> dict:
    """Teacher-forced scores of a batch of clozes, on the CPU:

    logp: log P(answer | prompt) (every answer token); tf_em: every answer token is the argmax; rank: how many
    tokens the model ranks above the answer's first token after the prompt (0: its top choice); greedy: per row,
    the argmax after the prompt and after each answer token but the last (what greedy decoding picks while it
    follows the answer); next: the argmax after the whole answer (the token greedy decoding adds next).
    """
    logits, input_ids, answer_mask, positions = window_logits(model, batch)
    return _window_scores(logits, input_ids, answer_mask, positions, batch["lengths"])


def _forward_params(model) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def supports_cached_scoring(model) -> bool:
    """Decoding on from the scoring pass needs explicit position ids, a KV cache and `logits_to_keep`."""
    params = _forward_params(model)
    return {"position_ids", "use_cache", "logits_to_keep"} <= params and ("cache" in params
                                                                          or "past_key_values" in params)


class CachedScores:
    """One teacher-forced pass over a batch of clozes (what `score_batch` gives: logp, tf_em, rank, greedy, next)
    that keeps its KV cache, so greedy decoding can go on from any point of any row without running the prompt
    again (`continue_greedy`). The batch is laid out as `score_batch`'s (right-padded), so the scores are the same.
    """

    @torch.no_grad()
    def __init__(self, model, items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
        self.model, self.pad_id = model, pad_id
        device = next(model.parameters()).device
        self.lengths = [len(p) for p, _ in items]  # prompt lengths: where each row's answer starts
        batch = collate_clozes(items, pad_id)
        positions = answer_window(batch).to(device)
        self.cache_kw = "cache" if "cache" in _forward_params(model) else "past_key_values"
        self.mask = batch["attention_mask"].to(device)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=self.mask, use_cache=True,
                    logits_to_keep=positions)
        self.cache = out.cache if self.cache_kw == "cache" else out.past_key_values
        scores = _window_scores(out.logits, batch["input_ids"].to(device).gather(1, positions),
                                batch["answer_mask"].to(device).gather(1, positions), positions, batch["lengths"])
        self.logp, self.tf_em, self.rank = scores["logp"], scores["tf_em"], scores["rank"]
        self.greedy, self.next = scores["greedy"], scores["next"]

    @torch.no_grad()
    def continue_greedy(self, keep: Sequence[int], first: Sequence[int], max_new: Sequence[int],
                        eos_id: int | None) -> list[list[int]]:
        """Greedy decoding of every row after its prompt + its first `keep[r]` answer tokens, whose next token is
        `first[r]` (already known); `max_new[r]` new tokens at most (`first` included), stopping after EOS.

        The cache of the teacher-forced pass is reused: the columns after the tokens a row keeps (the rest of its
        answer, its padding) are masked out, new tokens go after the last column, and positions go on from the
        tokens kept: what decoding from that point sees.
        """
        device = self.mask.device
        n = len(keep)
        mask = self.mask.clone()
        for row, k in enumerate(keep):
            mask[row, self.lengths[row] + k:] = 0
        out: list[list[int]] = [[int(t)] for t in first]
        done = [t == eos_id or max_new[r] <= 1 for r, t in enumerate(first)]
        position = torch.tensor([self.lengths[r] + keep[r] for r in range(n)], device=device)
        token = torch.tensor(list(first), device=device)
        cache = self.cache
        for _ in range(max(max_new) - 1):
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
            result = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                                use_cache=True, **{self.cache_kw: cache})
            cache = result.cache if self.cache_kw == "cache" else result.past_key_values
            token = result.logits[:, -1].argmax(-1)
            position = position + 1
            for r, t in enumerate(token.tolist()):
                if not done[r]:
                    out[r].append(t)
                    done[r] = t == eos_id or len(out[r]) >= max_new[r]
            token = torch.where(torch.tensor(done, device=device), torch.full_like(token, self.pad_id), token)
        self.cache = None  # grown past the teacher-forced pass: not reusable
        return out


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
