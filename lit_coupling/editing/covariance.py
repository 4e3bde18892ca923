"""Key covariance C = E[k kᵀ] of each edit layer over a text corpus, cached on disk and resumable.

k is the input of the layer's MLP output projection at every (non-padding) token. The default corpus is the context
paragraphs of the HotpotQA file the pieces came from (Wikipedia text); a text file or a HF dataset also works.
Statistics are cached by (model, layer, corpus, token count), so every later run and edit reuses them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from lit_coupling.errors import UserError
from lit_coupling.models.adapters import ModelAdapter, context_length
from lit_coupling.models.hooks import Hooks, StopForward
from lit_coupling.outputs import save_torch, sha256_file, stable_hash
from lit_coupling.progress import Progress

CACHE_FORMAT = "lit_coupling.key_covariance/1"


def default_stats_dir() -> Path:
    from lit_coupling.cache import cache_root

    return cache_root() / "memit_stats"


# --- corpora ----------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str  # what the user named, readable
    fingerprint: str  # changes when the text changes
    documents: Callable[[], Iterator[str]]


def hotpot_paragraphs(path: str | Path) -> Iterator[str]:
    """Every distinct context paragraph of a HotpotQA file (JSON list or Lines; original or hub schema), its
    sentences joined by `data.hotpotqa.paragraph_text`. Only `context` is read, so a corpus file
    may hold nothing else."""
    from lit_coupling.data.hotpotqa import paragraph_text, parse_records

    seen: set[str] = set()
    for record in parse_records(path)[0]:
        context = record.get("context") if isinstance(record, dict) else None
        if isinstance(context, dict):  # hub schema: {"title": [...], "sentences": [[...], ...]}
            context = list(zip(context.get("title", []), context.get("sentences", [])))
        for item in context or []:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                continue
            paragraph = paragraph_text(item[1])
            if paragraph and paragraph not in seen:
                seen.add(paragraph)
                yield paragraph


def text_lines(path: str | Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.strip()


def hf_texts(spec: str) -> tuple[Iterator[str], str]:
    """`hf:NAME[:CONFIG][:SPLIT]` (loaded through `datasets`, from its cache when offline) or a save_to_disk dir."""
    import datasets

    parts = spec.removeprefix("hf:").split(":")
    if Path(parts[0]).is_dir():
        data = datasets.load_from_disk(parts[0])
        if isinstance(data, datasets.DatasetDict):
            data = data[parts[1] if len(parts) > 1 else "train"]
    else:
        name, config, split = (
            parts[0],
            (parts[1] if len(parts) > 1 and parts[1] else None),
            (parts[2] if len(parts) > 2 else "train"),
        )
        try:
            data = datasets.load_dataset(name, config, split=split)
        except Exception as error:
            raise UserError(f"cannot load the HF dataset {spec!r} for key statistics: {error}") from error
    column = (
        "text"
        if "text" in data.column_names
        else next((c for c in data.column_names if data.features[c].dtype == "string"), None)
    )
    if column is None:
        raise UserError(f"HF dataset {spec!r} has no text column (columns: {', '.join(data.column_names)})")
    return (t for t in data[column] if t and t.strip()), data._fingerprint


def synthetic_world_corpus(path: str | Path) -> Corpus | None:
    """For a synthetic world file (it has a ground-truth sidecar): endless fact text of that world and of further
    seeds, as the tiny models are trained on (`data.world.world_texts`); None for any other file."""
    from lit_coupling.data.world import WorldSpec, load_truth, world_texts

    truth = load_truth(path) if Path(path).suffix == ".json" else None
    if not truth or "spec" not in truth:
        return None
    spec = WorldSpec(**truth["spec"])
    fingerprint = stable_hash(["world_texts/1: every fact, template and prefix; then the next seeds", truth["spec"]])
    return Corpus(f"world-text:{Path(path).name}", fingerprint[:16], lambda: world_texts(spec))


def resolve_corpus(corpus: str, hotpot_path: str | Path | None = None) -> Corpus:
    """`hotpot` (the pieces' HotpotQA file), a .json/.jsonl HotpotQA file, a text file (a document a line), or hf:…"""
    if corpus in ("hotpot", "", None):
        if not hotpot_path or not Path(hotpot_path).exists():
            raise UserError(
                f"the default key-statistics corpus is the HotpotQA file the pieces came from, and "
                f"{hotpot_path!r} is not there: name one with --memit.cov_corpus FILE"
            )
        corpus = str(hotpot_path)
        world = synthetic_world_corpus(corpus)
        if world is not None:  # the embedded models' world: more of the text they were trained on
            return world
    if corpus.startswith("hf:"):
        _, fingerprint = hf_texts(corpus)
        return Corpus(corpus, fingerprint, lambda: hf_texts(corpus)[0])
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise UserError(
            f"key-statistics corpus {corpus!r} is not a file (use hotpot, a .txt/.json/.jsonl file, "
            f"or hf:NAME[:CONFIG][:SPLIT])"
        )
    if path.suffix in (".json", ".jsonl"):
        # The fingerprint names how paragraphs are read as well as the file, so cached statistics from an older
        # reading of the same file (sentences glued without a space) are not reused.
        fingerprint = stable_hash(["context paragraphs, sentences joined by a space", sha256_file(path)])[:16]
        return Corpus(path.name, fingerprint, lambda: hotpot_paragraphs(path))
    return Corpus(path.name, sha256_file(path)[:16], lambda: text_lines(path))


# --- accumulation -----------------------------------------------------------------------------------------------------


def token_windows(
    tokenizer,
    documents: Iterable[str],
    bos_ids: Sequence[int],
    max_length: int,
    tokens: int | None = None,
    windows: list[tuple[int, int]] | None = None,
) -> list[list[int]]:
    """Documents cut into windows of at most `max_length` tokens (BOS first), in reading order, until `tokens` tokens
    in all (BOS included; the last window cut short): exactly the tokens the statistics count, read before the
    first forward, so the bar knows its total (a HotpotQA corpus often holds fewer than cov_tokens).

    `windows`, when given, receives (document index, window length) of every window, in order (`texts_read`).
    """
    out: list[list[int]] = []
    step = max_length - len(bos_ids)
    left = tokens if tokens is not None else float("inf")
    for index, text in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), step):
            window = (list(bos_ids) + ids[start : start + step])[: int(min(left, max_length))]
            if len(window) <= len(bos_ids):
                return out
            out.append(window)
            left -= len(window)
            if windows is not None:
                windows.append((index, len(window)))
        if left <= 0:
            break
    return out


def length_batches(windows: Sequence[list[int]], area: int) -> list[list[list[int]]]:
    """Windows sorted by length and cut into batches of at most `area` padded tokens (rows × the longest row), as
    the reference implementation's length collation: a batch of mixed lengths pads to its longest row, and real
    paragraphs (HotpotQA's: 54,120 tokens padded to 106,854 in reading order) would run twice the tokens needed.
    Short windows share a batch (5-10 times fewer forward passes for the synthetic world's sentences)."""
    batches: list[list[list[int]]] = []
    batch: list[list[int]] = []
    for window in sorted(windows, key=len):  # stable: equal lengths keep reading order
        if batch and (len(batch) + 1) * len(window) > area:
            batches.append(batch)
            batch = []
        batch.append(window)
    if batch:
        batches.append(batch)
    return batches


def texts_read(windows: Sequence[tuple[int, int]], tokens: int) -> int:
    """How many documents the first `tokens` tokens of these windows come from (the last one perhaps in part)."""
    counted = 0
    for index, length in windows:
        counted += length
        if counted >= tokens:
            return index + 1
    return windows[-1][0] + 1 if windows else 0


@dataclass
class MomentState:
    """Running Σ k kᵀ (float64) per layer: what a checkpoint holds, so an interrupted computation resumes."""

    sums: dict[int, torch.Tensor]
    fourth: dict[int, float]  # Σ ‖k‖⁴: what Ledoit–Wolf shrinkage needs besides the mean
    count: int = 0
    batches: int = 0  # batches fully consumed

    def mean(self, layer: int) -> torch.Tensor:
        return self.sums[layer] / max(self.count, 1)


@torch.no_grad()
def accumulate_moments(
    adapter: ModelAdapter,
    batches: Iterable[list[list[int]]],
    layers: Sequence[int],
    tokens: int,
    pad_id: int,
    state: MomentState | None = None,
    checkpoint: Callable[[MomentState], None] | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
) -> MomentState:
    """Σ k kᵀ over the first `tokens` tokens of `batches`, for the MLP-output inputs k of `layers`.

    Continues from `state` (skipping the batches it consumed). Only the blocks up to the deepest layer run.
    """
    model = adapter.model
    device = next(model.parameters()).device
    d_in = {layer: adapter.target(layer).shape[1] for layer in layers}
    state = state or MomentState(
        {layer: torch.zeros(d, d, dtype=torch.float64, device=device) for layer, d in d_in.items()},
        {layer: 0.0 for layer in layers},
    )
    deepest = max(layers)
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(layer):
        def capture(_module, args):
            x = args[0][mask_holder["mask"]].float()  # (n, d_in) keys at the counted tokens
            state.sums[layer] += (x.T @ x).double()
            state.fourth[layer] += float((x.double().pow(2).sum(1) ** 2).sum())
            if layer == deepest:
                raise StopForward  # the deepest keys are read: nothing after them is needed

        return capture

    hooks = Hooks(pre=[(adapter.target(layer).module, hook(layer)) for layer in layers])
    # A bar on a terminal, a line every few seconds in a log: on a real model this takes minutes.
    bar = Progress(
        tokens,
        f"key covariance, layers {','.join(map(str, layers))}",
        enabled=progress,
        unit="tok",
        initial=min(state.count, tokens),
    )
    last_save = time.monotonic()
    try:
        for index, batch in enumerate(batches):
            if state.count >= tokens:
                break
            if index < state.batches:
                continue
            rows = [torch.tensor(ids, dtype=torch.long) for ids in batch]
            input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
            attention = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
            counted = attention.bool()
            excess = int(counted.sum()) - (tokens - state.count)
            if excess > 0:  # the last batch: count exactly `tokens`, the first ones in reading order
                flat = counted.flatten()
                flat[flat.nonzero().squeeze(1)[-excess:]] = False
                counted = flat.view_as(counted)
            mask_holder["mask"] = counted.to(device)
            with hooks:  # registered per batch: the stop at the deepest layer ends this batch's forward only
                model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            added = int(counted.sum())
            state.count += added
            state.batches = index + 1
            bar.update(added)
            if checkpoint is not None and time.monotonic() - last_save > checkpoint_every_s:
                checkpoint(state)
                last_save = time.monotonic()
    finally:
        bar.close()
    return state


# --- the cache --------------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """Changes when the weights change (a retrained tiny model), cheap for a 70B model: config + sampled weights."""
    import hashlib

    items = []
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()  # exact for fp32/bf16, device-independent
        items.append((name, list(p.shape), str(p.dtype), hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]))
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith(("_", "transformers_version"))}
    return stable_hash({"config": config, "weights": items})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip("/").split("/")[-1])[:60] or "model"


@dataclass
class CovarianceCache:
    """Where the statistics of one (model, corpus, token count) live: a file per layer, and a shared checkpoint."""

    root: Path
    model_name: str
    model_fp: str
    corpus: Corpus
    tokens: int
    dtype: str

    @property
    def directory(self) -> Path:
        return self.root / f"{_slug(self.model_name)}-{self.model_fp[:12]}"

    def path(self, layer_name: str) -> Path:
        return (
            self.directory / f"{layer_name}__{_slug(self.corpus.name)}-{self.corpus.fingerprint[:12]}"
            f"__{self.tokens}tok__{self.dtype}.pt"
        )

    def partial_path(self, layer_names: Sequence[str], batching: dict) -> Path:
        key = stable_hash({"layers": list(layer_names), "batching": batching})[:12]
        return (
            self.directory / f"partial__{_slug(self.corpus.name)}-{self.corpus.fingerprint[:12]}"
            f"__{self.tokens}tok__{self.dtype}__{key}.pt"
        )

    def meta(self, layer_name: str, count: int) -> dict:
        return {
            "format": CACHE_FORMAT,
            "model": self.model_name,
            "model_fingerprint": self.model_fp,
            "layer": layer_name,
            "corpus": self.corpus.name,
            "corpus_fingerprint": self.corpus.fingerprint,
            "tokens_requested": self.tokens,
            "tokens": count,
            "dtype": self.dtype,
        }


def load_cached(path: Path) -> tuple[torch.Tensor, dict] | None:
    if not path.exists():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["mom2"], data["meta"]


def key_covariances(
    adapter: ModelAdapter,
    tokenizer,
    layers: Sequence[int],
    corpus: Corpus,
    tokens: int,
    stats_dir: str | Path | None = None,
    model_name: str = "model",
    bos_ids: Sequence[int] = (),
    max_length: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    checkpoint_every_s: float = 60.0,
    compute: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """E[k kᵀ] (float32, on the CPU) and its metadata for each layer: from the cache, or computed and cached.

    Layers missing from the cache are computed together in one pass over the corpus; the pass checkpoints its
    running sums every `checkpoint_every_s` seconds and resumes from the checkpoint when interrupted.
    With `compute=False` a missing layer raises (other DDP ranks wait for rank 0 to compute).
    """
    model = adapter.model
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if tokens < 1:  # not "a corpus with no text": no token was asked for
        raise UserError(
            f"cov_tokens {tokens} (--memit.cov_tokens): the key covariance needs at least one corpus "
            f"token per layer; 100000 is the default"
        )
    cache = CovarianceCache(
        Path(stats_dir) if stats_dir else default_stats_dir(),
        model_name,
        model_fingerprint(model),
        corpus,
        tokens,
        dtype,
    )
    names = {layer: adapter.target(layer).name for layer in layers}
    result: dict[int, torch.Tensor] = {}
    metas: dict[int, dict] = {}
    missing = []
    for layer in layers:
        found = load_cached(cache.path(names[layer]))
        if found is None:
            missing.append(layer)
        else:
            result[layer], metas[layer] = found
            metas[layer] = {**metas[layer], "cache": str(cache.path(names[layer])), "cached": True}
    if not missing:
        return result, metas
    if not compute:
        raise FileNotFoundError(f"key statistics missing from the cache: {cache.path(names[missing[0]])}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    area = batch_size * max_length  # a model with a shorter context gets more windows a batch, not smaller batches
    max_length = min(max_length, context_length(model.config) or max_length)
    batching = {
        "max_length": max_length,
        "batch_size": batch_size,
        "bos": list(bos_ids),
        "area": area,
        "collation": "length",
    }
    partial = cache.partial_path([names[layer] for layer in missing], batching)
    state = None
    if partial.exists():
        saved = torch.load(partial, map_location="cpu", weights_only=True)
        device = next(model.parameters()).device
        state = MomentState(
            {int(k): v.to(device) for k, v in saved["sums"].items()},
            {int(k): float(v) for k, v in saved["fourth"].items()},
            saved["count"],
            saved["batches"],
        )

    def checkpoint(s: MomentState) -> None:
        save_torch(
            partial,
            {
                "sums": {str(k): v.cpu() for k, v in s.sums.items()},
                "fourth": {str(k): v for k, v in s.fourth.items()},
                "count": s.count,
                "batches": s.batches,
            },
        )

    start = time.perf_counter()
    windows: list[tuple[int, int]] = []
    read = token_windows(tokenizer, corpus.documents(), bos_ids, max_length, tokens, windows)
    counted = sum(map(len, read))  # at most `tokens`: the windows stop there
    state = accumulate_moments(
        adapter, length_batches(read, area), missing, counted, pad_id, state, checkpoint, checkpoint_every_s, progress
    )
    if state.count == 0:
        raise UserError(f"the key-statistics corpus {corpus.name!r} holds no text")
    elapsed = time.perf_counter() - start
    for layer in missing:
        mean = state.mean(layer).float().cpu()
        meta = {
            **cache.meta(names[layer], state.count),
            "seconds": round(elapsed, 3),
            "texts": texts_read(windows, state.count),  # the reference's mom2_n_samples counts these
            "mean_fourth_power": state.fourth[layer] / state.count,
        }
        save_torch(cache.path(names[layer]), {"mom2": mean, "meta": meta})
        result[layer], metas[layer] = mean, {**meta, "cache": str(cache.path(names[layer])), "cached": False}
    partial.unlink(missing_ok=True)
    return result, metas


def shrink(
    mom2: torch.Tensor, mean_fourth_power: float, count: int, shrinkage: str | float = "ledoit-wolf"
) -> tuple[torch.Tensor, float]:
    """(1 − α) C + α (tr C / d) I, and α.

    A covariance from fewer, repetitive tokens than it has dimensions to fill is near singular; the update then puts
    huge weights on directions the corpus never visited, and any key with a component there is thrown far. Ledoit–Wolf
    (2004) picks α from the estimate's own sampling noise, using E‖k‖⁴: it goes to 0 as the corpus grows, so a large
    corpus gives the published update. `none` (or 0) is the published algorithm; a number fixes α.
    """
    c = mom2.to(torch.float64)
    d = c.shape[0]
    mu = torch.trace(c) / d
    if shrinkage in ("none", None):
        alpha = 0.0
    elif shrinkage == "ledoit-wolf":
        frob2 = (c * c).sum()
        spread = frob2 - d * mu**2  # ‖C − μI‖²
        noise = (mean_fourth_power - frob2) / max(count, 1)  # E‖kkᵀ − C‖² / n
        alpha = float(torch.clamp(noise / spread, 0.0, 1.0)) if spread > 0 else 1.0
    else:
        alpha = float(shrinkage)
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"covariance shrinkage must be ledoit-wolf, none or a number in [0, 1], not {shrinkage!r}")
    if alpha == 0.0:
        return c, 0.0
    return (1 - alpha) * c + alpha * mu * torch.eye(d, dtype=c.dtype, device=c.device), alpha


# --- how well the covariance is estimated -----------------------------------------------------------------

# Below this many corpus tokens (keys) per key dimension the estimate of C is noise-dominated in its small
# eigenvalues: for n keys in d dimensions they are biased low by about (1 − √(d/n))² (Marchenko–Pastur): 0.50 at
# 12 tokens per dimension, 0.73 at 50, 0.81 at 100. (λC + KKᵀ)⁻¹ is steered by exactly those directions: measured on
# the embedded models (docs/memit.md), Ledoit-Wolf shrinkage moved ΔW by 54-75% at 7-12 tokens per dimension and by
# 5-26% at 195-291. The reference's 44M keys give GPT-2 XL about 6,900 per dimension.
MIN_TOKENS_PER_DIM = 50.0


def covariance_quality(mom2: torch.Tensor, tokens: int, texts: int | None = None, name: str = "") -> dict:
    """Tokens, texts, tokens per key dimension and condition number (largest / smallest eigenvalue, float64) of
    one layer's C; warns when there are fewer than MIN_TOKENS_PER_DIM tokens per dimension or C is singular."""
    import warnings

    d = mom2.shape[0]
    eig = torch.linalg.eigvalsh(mom2.to(torch.float64))
    smallest, largest = float(eig[0]), float(eig[-1])
    singular = smallest <= largest * d * torch.finfo(torch.float64).eps
    quality = {
        "tokens": int(tokens),
        "texts": texts,
        "key_dim": d,
        "tokens_per_dim": round(tokens / d, 2),
        "condition_number": None if singular else largest / smallest,  # None: singular (JSON has no infinity)
        "eigenvalue_min": smallest,
        "eigenvalue_max": largest,
        "well_estimated": bool(tokens / d >= MIN_TOKENS_PER_DIM and not singular),
    }
    if not quality["well_estimated"]:
        warnings.warn(
            f"the key covariance{' of ' + name if name else ''} comes from {tokens} tokens for {d} key dimensions "
            f"({tokens / d:.1f} per dimension{', singular' if singular else ''}); below {MIN_TOKENS_PER_DIM:g} "
            f"per dimension its small eigenvalues are noise and MEMIT's update is unreliable: give more text "
            f"(--memit.cov_tokens, --memit.cov_corpus FILE; docs/memit.md)",
            stacklevel=2,
        )
    return quality


def covariance_totals(layers: dict[str, dict]) -> dict:
    """The run-level figures of the per-layer `covariance_quality` records: tokens and texts (every layer reads the
    same corpus), the lowest tokens per dimension and the worst condition number."""
    if not layers:
        return {}
    records = list(layers.values())
    conditions = [r["condition_number"] for r in records]
    return {
        "tokens": records[0]["tokens"],
        "texts": records[0]["texts"],
        "min_tokens_per_dim": min(r["tokens_per_dim"] for r in records),
        "max_condition_number": None if None in conditions else max(conditions),
        "min_tokens_per_dim_threshold": MIN_TOKENS_PER_DIM,
    }
