"""Scoring a cloze answer with a causal LM — the one definition every stage shares.

log P(answer | prompt) is the sum of the log-probabilities of *every* answer token, teacher-forced. GradSim takes
its gradient, the ripple stage compares it before and after an edit, knowledge injection measures recall with it.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import string
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch
from torch.nn.utils.rnn import pad_sequence

from lit_coupling.errors import UserError
from lit_coupling.models.hooks import Hooks

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
        if split < len(ids) and offsets[split][0] < cut and text[offsets[split][0] : cut].strip():
            raise ClozeTokenError(
                f"token {tokenizer.convert_ids_to_tokens(ids[split])!r} spans the end of the "
                f"prompt and the start of the answer {answer!r}"
            )
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
    seqs = [torch.tensor([*p, *a], dtype=torch.long) for p, a in items]
    input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)
    attention_mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
    answer_mask = pad_sequence([torch.arange(len(s)) >= len(p) for s, (p, _) in zip(seqs, items)], batch_first=True)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "prompt_lengths": torch.tensor([len(p) for p, _ in items]),
        "lengths": torch.tensor(lengths),
    }


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


def padded_batches(lengths: Sequence[int], batch_size: int, overhead: int = 48) -> list[list[int]]:
    """Indices cut into batches of at most `batch_size` that pad little: sorted by length, then cut where the
    padded area (rows × the longest row) plus `overhead` tokens a batch (the fixed cost of one forward) is least,
    by dynamic programming. Real HotpotQA pieces run from 5 to 45 tokens: one batch of all of them pads ~2×."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    cost = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        width = lengths[order[end - 1]]
        for begin in range(max(0, end - max(1, batch_size)), end):
            c = cost[begin] + (end - begin) * width + overhead
            if c < cost[end]:
                cost[end], cut[end] = c, begin
    batches, end = [], n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def answer_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log P(answer | prompt) per row: the sum over every answer token. Differentiable."""
    token_logp, _, rows = answer_token_logprobs(logits, input_ids, answer_mask)
    return torch.zeros(input_ids.shape[0], dtype=token_logp.dtype, device=token_logp.device).index_add(
        0, rows, token_logp
    )


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
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    )
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
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=positions).logits
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
    return {"position_ids", "use_cache", "logits_to_keep"} <= params and (
        "cache" in params or "past_key_values" in params
    )


_CACHE = object()  # stands for the KV cache object in the block calls a PrefixReuse keeps


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _fresh_cache(template, prefix: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A copy of a DynamicCache whose first len(prefix) layers hold `prefix`'s keys and values and whose other
    layers are empty (they fill as the blocks above run). None when the cache is of another kind."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(template, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers) or len(layers) < len(prefix):
        return None
    fresh = copy.copy(template)
    fresh.layers = [DynamicLayer() for _ in layers]
    for layer, (keys, values) in zip(fresh.layers, prefix):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # `update` concatenates into new tensors: these stay as they are
    return fresh


class PrefixReuse:
    """What an edit of blocks `start` and above cannot change, kept from the first pass over each batch.

    The residual stream entering block `start` depends only on the blocks below it: an edit of the blocks from
    `start` up (MEMIT's band starts there) leaves it as it was. The first `CachedScores` of a batch runs the whole
    model and keeps, through forward pre-hooks, the hidden states entering block `start`, the other arguments of
    every block from `start` up (attention mask, position embeddings, cache positions: the same after an edit)
    and the keys and values of the blocks below `start` (for greedy decoding on from the new pass). Every later
    pass over the same batch (`CachedScores(..., reuse=...)`) runs only blocks `start`..N−1, the final norm and
    the LM head at the answer window, with a KV cache whose lower layers are the kept ones.

    Checked, not assumed: the first kept batch is re-run both ways and must give the full model's logits (else
    this model runs whole every time: a family with extra output scaling); every parameter outside the blocks
    from `start` up (embeddings, lower blocks, final norm, head) must be the same tensor, unmodified (its
    in-place version counter) as when the states were kept — otherwise the states are dropped and taken again.
    """

    def __init__(self, model, blocks: Sequence[torch.nn.Module], start: int, norm, head):
        self.model, self.start, self.norm, self.head = model, start, norm, head
        self.blocks = list(blocks)[start:]
        rerun = {id(p) for block in self.blocks for p in block.parameters()}
        self._outside = [p for p in model.parameters() if id(p) not in rerun]
        self.states: dict = {}
        self.usable = bool(self.blocks) and norm is not None and head is not None
        self.checked = False
        self.reruns = 0  # passes that ran from block `start` (for tests and benchmarks)
        self._stamp = self._stamp_now()

    def _stamp_now(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for p in self._outside]

    def _valid(self) -> bool:
        stamp = self._stamp_now()
        if stamp != self._stamp:  # the part below `start` changed: what was kept no longer holds
            self.states.clear()
            self._stamp = stamp
            return False
        return True

    def ready(self, key, input_ids: torch.Tensor) -> bool:
        state = self.states.get(key) if self.usable and self._valid() else None
        return state is not None and torch.equal(state["input_ids"], input_ids)

    @contextmanager
    def capture(self, key, input_ids: torch.Tensor):
        """Around the full forward of a batch: keeps what `rerun` needs (see the class)."""
        from transformers.cache_utils import Cache

        if not self.usable:
            yield None
            return
        self._valid()
        calls: list = []

        def mark(value):
            return _CACHE if isinstance(value, Cache) else value

        def pre_hook(_module, args, kwargs):
            hidden_kw = not args
            hidden = kwargs["hidden_states"] if hidden_kw else args[0]
            if not calls:
                found["hidden"] = hidden.detach()
            rest = {k: mark(v) for k, v in kwargs.items() if k != "hidden_states"}
            calls.append((hidden_kw, tuple(mark(a) for a in args[1:]), rest))

        found: dict = {}
        with Hooks(pre=[(block, pre_hook) for block in self.blocks], pre_kwargs=True):
            yield found
        cache = found.get("cache")
        prefix = [] if cache is None else [(layer.keys, layer.values) for layer in cache.layers[: self.start]]
        template = None if cache is None else _fresh_cache(cache, prefix)
        if len(calls) != len(self.blocks) or "hidden" not in found or template is None:
            self.usable = False  # a model that does not call its blocks once each, or another cache kind
            return
        self.states[key] = {
            "input_ids": input_ids.clone(),
            "hidden": found["hidden"],
            "calls": calls,
            "template": template,
            "prefix": prefix,
        }

    def rerun(self, key, positions: torch.Tensor):
        """(window logits (B, W, V), a KV cache of every layer) of the kept batch `key`, from block `start` up."""
        state = self.states[key]
        cache = _fresh_cache(state["template"], state["prefix"])
        h = state["hidden"]
        for block, (hidden_kw, args, kwargs) in zip(self.blocks, state["calls"]):
            args = tuple(cache if a is _CACHE else a for a in args)
            kwargs = {k: (cache if v is _CACHE else v) for k, v in kwargs.items()}
            h = _hidden(block(hidden_states=h, *args, **kwargs) if hidden_kw else block(h, *args, **kwargs))
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        self.reruns += 1
        return self.head(self.norm(h[rows, positions])), cache

    def check(self, key, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Once: the re-run of a kept batch must give the full model's logits, else reuse is turned off."""
        if self.checked or key not in self.states:
            return
        self.checked = True
        got = self.rerun(key, positions)[0].float()
        self.reruns -= 1
        want = logits.float()
        tol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 5e-2
        scale = max(1.0, want.abs().max().item())
        if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * scale):
            self.usable = False
            self.states.clear()


def prefix_reuse(model, adapter, start: int) -> PrefixReuse | None:
    """A PrefixReuse for edits of blocks `start` and above, or None where the model does not allow it."""
    if not supports_cached_scoring(model) or adapter.final_norm is None:
        return None
    head = model.get_output_embeddings()
    return PrefixReuse(model, adapter.blocks, start, adapter.final_norm, head) if head is not None else None


Branch = tuple[int, Sequence[int]]  # (answer tokens kept, tokens fed after them): a draft of greedy decoding


def with_branches(batch: dict[str, torch.Tensor], branches: Sequence[Branch | None], pad_id: int, dtype) -> dict:
    """The batch with each row's branch after its prompt + answer, in one forward (tree attention, as speculative
    decoding verifies drafts): a branch token sees the prompt, the first `keep` answer tokens and the branch tokens
    before it, at the positions greedy decoding would give it; the prompt and answer see nothing of the branch, so
    their logits are unchanged. Adds "attention_4d" (B, 1, T, T: 0 where seen, the dtype's minimum elsewhere),
    "position_ids", "branch_columns" (B, Wb) and "branch_lengths"; "attention_mask" becomes the 2D mask of every
    real column (main and branch), "answer_mask" is widened with False."""
    lengths, prompt_lengths = batch["lengths"], batch["prompt_lengths"]
    n_branch = torch.tensor([len(b[1]) if b else 0 for b in branches])
    cut = prompt_lengths + torch.tensor([b[0] if b else 0 for b in branches])  # a branch sees the columns before
    width = int((lengths + n_branch).max())
    rows = batch["input_ids"].shape[0]
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    input_ids[:, : batch["input_ids"].shape[1]] = batch["input_ids"]
    col = torch.arange(width)[None, :]
    position_ids = col.expand(rows, -1).clone()
    for r, branch in enumerate(branches):
        if branch:
            at = int(lengths[r])
            input_ids[r, at : at + len(branch[1])] = torch.tensor(list(branch[1]), dtype=torch.long)
            position_ids[r, at : at + len(branch[1])] = int(cut[r]) + torch.arange(len(branch[1]))
    main = col < lengths[:, None]
    in_branch = (col >= lengths[:, None]) & (col < (lengths + n_branch)[:, None])
    q, k = col[:, :, None], col[:, None, :]  # (1, T, 1), (1, 1, T)
    causal = k <= q
    seen = (main[:, :, None] & main[:, None, :] & causal) | (
        in_branch[:, :, None] & ((main[:, None, :] & (k < cut[:, None, None])) | (in_branch[:, None, :] & causal))
    )
    seen |= torch.eye(width, dtype=torch.bool)[None]  # padding sees itself: no row of the mask is empty
    attention = torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
    widest = int(n_branch.max()) if len(n_branch) else 0
    branch_columns = (lengths[:, None] + torch.arange(max(widest, 1))[None, :]).clamp(max=width - 1)
    answer_mask = torch.zeros((rows, width), dtype=torch.bool)
    answer_mask[:, : batch["answer_mask"].shape[1]] = batch["answer_mask"]
    return batch | {
        "input_ids": input_ids,
        "attention_mask": (main | in_branch).long(),
        "answer_mask": answer_mask,
        "attention_4d": attention[:, None],
        "position_ids": position_ids,
        "branch_columns": branch_columns,
        "branch_lengths": n_branch,
    }


class CachedScores:
    """One teacher-forced pass over a batch of clozes (what `score_batch` gives: logp, tf_em, rank, greedy, next)
    that keeps its KV cache, so greedy decoding can go on from any point of any row without running the prompt
    again (`continue_greedy`). The batch is laid out as `score_batch`'s (right-padded), so the scores are the same.

    With `reuse` (a PrefixReuse) and a `key` naming the batch, the first pass keeps what an edit of the upper
    blocks cannot change and every later pass over the same batch runs only those blocks.

    With `branches` (per row a `Branch` or None: `with_branches`), the same pass also reads the model's argmax after
    each branch token (`branch_argmax`): where a branch is an earlier greedy decoding of the row, it says whether
    greedy decoding still goes that way, without decoding.
    """

    @torch.no_grad()
    def __init__(
        self,
        model,
        items: Sequence[tuple[Sequence[int], Sequence[int]]],
        pad_id: int,
        reuse: PrefixReuse | None = None,
        key=None,
        branches: Sequence[Branch | None] | None = None,
    ):
        self.model, self.pad_id = model, pad_id
        device = next(model.parameters()).device
        self.lengths = [len(p) for p, _ in items]  # prompt lengths: where each row's answer starts
        batch = collate_clozes(items, pad_id)
        self.ends = batch["lengths"].tolist()  # where each row's answer ends (and its branch starts)
        window = answer_window(batch)
        inputs = {}
        if branches is not None and any(branches):
            batch = with_branches(batch, branches, pad_id, model.dtype)
            inputs = {"position_ids": batch["position_ids"].to(device)}
            positions = torch.cat([window, batch["branch_columns"]], 1).to(device)
        else:
            positions = window.to(device)
        self.cache_kw = "cache" if "cache" in _forward_params(model) else "past_key_values"
        self.mask = batch["attention_mask"].to(device)
        mask = batch["attention_4d"].to(device) if "attention_4d" in batch else self.mask
        input_ids = batch["input_ids"].to(device)
        if reuse is not None and key is not None and reuse.ready(key, input_ids):
            logits, self.cache = reuse.rerun(key, positions)
        else:
            with reuse.capture(key, input_ids) if reuse is not None and key is not None else nullcontext() as kept:
                out = model(
                    input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=positions, **inputs
                )
                self.cache = out.cache if self.cache_kw == "cache" else out.past_key_values
                if kept is not None:
                    kept["cache"] = self.cache
            logits = out.logits
            if kept is not None:
                reuse.check(key, positions, logits)
        width = window.shape[1]
        self.branch_argmax: list[list[int]] = [[] for _ in items]
        if "branch_lengths" in batch:
            picked = logits[:, width:].argmax(-1).cpu()
            self.branch_argmax = [picked[r, :n].tolist() for r, n in enumerate(batch["branch_lengths"].tolist())]
        logits, positions = logits[:, :width], positions[:, :width]
        scores = _window_scores(
            logits,
            input_ids.gather(1, positions),
            batch["answer_mask"].to(device).gather(1, positions),
            positions,
            batch["lengths"],
        )
        self.logp, self.tf_em, self.rank = scores["logp"], scores["tf_em"], scores["rank"]
        self.greedy, self.next = scores["greedy"], scores["next"]

    @torch.no_grad()
    def continue_greedy(
        self,
        keep: Sequence[int],
        first: Sequence[int],
        max_new: Sequence[int],
        eos_id: int | None,
        taken: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding of every row after its prompt + its first `keep[r]` answer tokens + the first `taken[r]`
        tokens of its branch (default 0: a draft's start that greedy decoding is known to follow), whose next token
        is `first[r]` (already known); `max_new[r]` new tokens at most (the taken ones and `first` included),
        stopping after EOS. Returns per row `first` and the tokens decoded after it.

        The cache of the teacher-forced pass is reused: the columns after the tokens a row keeps (the rest of its
        answer, its padding, the branch tokens not taken) are masked out, new tokens go after the last column, and
        positions go on from the tokens kept: what decoding from that point sees.
        """
        device = self.mask.device
        taken = list(taken) if taken is not None else [0] * len(keep)
        out: list[list[int]] = [[int(t)] for t in first]
        done = [t == eos_id or taken[r] + 1 >= max_new[r] for r, t in enumerate(first)]
        cache = self.cache
        self.cache = None  # grown past the teacher-forced pass: not reusable
        active = [r for r in range(len(keep)) if not done[r]]  # only rows still decoding run the model
        if not active:
            return out
        index = torch.tensor(active, device=device)
        if len(active) < len(keep) and hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(index)
        else:
            active = list(range(len(keep)))
            index = torch.arange(len(keep), device=device)
        n = len(active)
        mask = self.mask.index_select(0, index).clone()
        for row, r in enumerate(active):
            mask[row, self.lengths[r] + keep[r] :] = 0
            mask[row, self.ends[r] : self.ends[r] + taken[r]] = 1  # a branch starts after its row's answer
        position = torch.tensor([self.lengths[r] + keep[r] + taken[r] for r in active], device=device)
        token = torch.tensor([first[r] for r in active], device=device)
        for _ in range(max(max_new[r] - taken[r] for r in active) - 1):
            if all(done[r] for r in active):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
            result = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                use_cache=True,
                **{self.cache_kw: cache},
            )
            cache = result.cache if self.cache_kw == "cache" else result.past_key_values
            token = result.logits[:, -1].argmax(-1)
            position = position + 1
            for row, t in enumerate(token.tolist()):
                r = active[row]
                if not done[r]:
                    out[r].append(t)
                    done[r] = t == eos_id or taken[r] + len(out[r]) >= max_new[r]
            finished = torch.tensor([done[r] for r in active], device=device)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
        return out


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA answer normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def greedy_continuations(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, eos_id: int | None = None
) -> list[list[int]]:
    """Greedy decoding of a batch of prompts (left-padded for generation), returning only the new tokens."""
    device = next(model.parameters()).device
    rows = [torch.tensor(list(p), dtype=torch.long) for p in prompts]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    width = input_ids.shape[1]
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    return [row[width:].tolist() for row in out.cpu()]


def generated_exact_match(tokenizer, generated_ids: Sequence[int], answer: str) -> bool:
    """The greedy continuation reads as the answer (normalised), possibly followed by more text."""
    got = normalize_answer(tokenizer.decode(list(generated_ids), skip_special_tokens=True))
    want = normalize_answer(answer)
    return bool(want) and (got == want or got.startswith(want + " "))
