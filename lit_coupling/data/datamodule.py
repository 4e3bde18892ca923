"""The LightningDataModules: knowledge pieces for `predict` (GradSim, ripple scoring), fact text for `fit`.

`PiecesDataModule`: every batch carries `index`, the pieces' positions in `knowledge_pieces.json`, so per-rank
predictions under DDP (whose predict sampler neither shuffles nor pads) can be put back in piece order.
`EditRequestDataModule`: the edit requests for `predict` (the MEMIT ripple), planned by the module.
`FactsDataModule`: the facts of a HotpotQA file or synthetic world as training text (knowledge injection), and its
pieces for measuring recall; the tokenizer comes from the model being trained (`connect`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from lit_coupling.data.facts import DEFAULT_PREFIXES, FactText, fact_texts
from lit_coupling.data.piece import KnowledgePiece, load_pieces
from lit_coupling.scoring import collate_clozes


class PieceDataset(Dataset):
    """Items (position in knowledge_pieces.json, prompt ids, answer ids).

    With `by_length`, items come shortest first: a batch of pieces of about the same length pads little, and real
    HotpotQA pieces vary several-fold in length (5–45 GPT-2 tokens on the HotpotQA sample). Every item carries its
    position, so whoever collects the predictions puts them back in piece order.
    """

    def __init__(self, pieces: Sequence[KnowledgePiece], by_length: bool = False):
        missing = [p.id for p in pieces if not p.answer_ids or not p.prompt_ids]
        if missing:
            raise ValueError(f"pieces without token ids (tokenise them for the model first): {missing[:3]}")
        self.pieces = list(pieces)
        self.order = list(range(len(self.pieces)))
        if by_length:  # stable: pieces of equal length keep their file order
            self.order.sort(key=lambda i: len(self.pieces[i].prompt_ids) + len(self.pieces[i].answer_ids))

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> tuple[int, list[int], list[int]]:
        position = self.order[i]
        piece = self.pieces[position]
        return position, piece.prompt_ids, piece.answer_ids


class PieceCollator:
    """Right-padded batch (input_ids, attention_mask, answer_mask) plus `index`. A class, so workers can pickle it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[int, list[int], list[int]]]) -> dict[str, torch.Tensor]:
        batch = collate_clozes([(p, a) for _, p, a in items], self.pad_id)
        batch["index"] = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        return batch


class PiecesDataModule(LightningDataModule):
    def __init__(self, pieces_path: str, batch_size: int = 16, num_workers: int = 0, sort_by_length: bool = True):
        """
        Args:
            pieces_path: knowledge_pieces.json (or the run directory holding it), tokenised for the model.
            batch_size: pieces per batch.
            num_workers: DataLoader worker processes.
            sort_by_length: batch pieces of similar length together (less padding); predictions carry `index`.
        """
        super().__init__()
        self.save_hyperparameters()
        self.pieces: list[KnowledgePiece] = []
        self.meta: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.pieces:
            self.pieces, self.meta = load_pieces(Path(self.hparams.pieces_path))

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            PieceDataset(self.pieces, by_length=self.hparams.sort_by_length),
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=PieceCollator(self.pad_id),
            num_workers=self.hparams.num_workers,
        )


class FactExamples(Dataset):
    """Every fact text behind every prefix: token ids [BOS] + text + [EOS], and the subject's token span."""

    def __init__(self, facts: Sequence[FactText], prefixes: Sequence[str], tokenizer, bos_ids: Sequence[int]):
        pairs = [(fact, prefix) for fact in facts for prefix in prefixes]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        fast = getattr(tokenizer, "is_fast", False)
        encoded = tokenizer([f.text(p) for f, p in pairs], add_special_tokens=False, return_offsets_mapping=fast)
        self.examples: list[tuple[list[int], tuple[int, int] | None]] = []
        for i, (fact, prefix) in enumerate(pairs):
            span = fact.subject_span(prefix)
            tokens = None
            if fast and span:  # token positions overlapping the subject's characters (slow tokenizers: none)
                hits = [k for k, (a, b) in enumerate(encoded["offset_mapping"][i]) if a < span[1] and b > span[0]]
                tokens = (hits[0] + len(bos_ids), hits[-1] + len(bos_ids)) if hits else None
            self.examples.append((list(bos_ids) + encoded["input_ids"][i] + eos, tokens))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], tuple[int, int] | None]:
        return self.examples[i]


def subject_locality_mask(
    lengths: Sequence[int], subjects: Sequence[tuple[int, int] | None], width: int
) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask: causal, no padding, and the tokens after a subject see it only
    through its last token.

    Why: a tiny model otherwise reads the raw name tokens from the end of the prompt in its first layer and looks
    the fact up there, so nothing at the subject — where MEMIT edits — matters. Behind this mask the name can only
    reach later tokens through its last token, after a layer has gathered it there.
    """
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = causal.repeat(len(lengths), 1, 1)
    for row, (length, span) in enumerate(zip(lengths, subjects)):
        mask[row, :, length:] = False
        if span is not None and span[1] > span[0]:
            first, last = span
            mask[row, last + 1 :, first:last] = False
    return mask[:, None]


class FactCollator:
    """Right-padded causal-LM batch; padding is masked out of attention and loss (labels -100).

    With `subject_locality`, `attention_mask` is the 4D mask of `subject_locality_mask`.
    """

    def __init__(self, pad_id: int, subject_locality: bool = False):
        self.pad_id, self.subject_locality = pad_id, subject_locality

    def __call__(self, examples: list[tuple[list[int], tuple[int, int] | None]]) -> dict[str, torch.Tensor]:
        rows = [torch.tensor(ids, dtype=torch.long) for ids, _ in examples]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id)
        attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        width = input_ids.shape[1]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }
        if self.subject_locality:
            batch["attention_mask"] = subject_locality_mask(
                [len(ids) for ids, _ in examples], [span for _, span in examples], width
            )
        return batch


class FactsDataModule(LightningDataModule):
    def __init__(
        self,
        hotpot_data: str | None = None,
        max_samples: int | None = None,
        prefixes: list[str] | None = None,
        questions: bool = True,
        bare: bool = False,
        subject_locality: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            hotpot_data: HotpotQA file (JSON, JSON Lines, hub schema), 'real-sample', or None for the default
                synthetic world.
            max_samples: use the first N records (all when unset).
            prefixes: short openers each fact is seen behind ("" = the bare sentence); default: a built-in set.
            questions: also train on the composed questions with their answers.
            bare: also train on "subject object." for every fact (the object right after the subject).
            subject_locality: train behind the attention mask that lets later tokens see a subject only through
                its last token (facts then live where MEMIT edits; see `subject_locality_mask`).
            batch_size: texts per batch.
            num_workers: DataLoader worker processes.
            seed: seeds the shuffling (the same seed gives the same batches).
        """
        super().__init__()
        self.save_hyperparameters()
        self.prefixes = list(DEFAULT_PREFIXES if prefixes is None else prefixes) or [""]
        self.facts: list[FactText] = []
        self.pieces: list[KnowledgePiece] = []  # text-only until `connect`, then with token ids
        self.paragraphs: list[str] = []
        self.source: dict = {}
        self.examples: FactExamples | None = None
        self.tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        if self.facts:
            return
        from lit_coupling.data.hotpotqa import context_paragraphs, open_hotpot_data
        from lit_coupling.data.pieces import extract_pieces
        from lit_coupling.data.world import load_truth

        dataset, self.source = open_hotpot_data(self.hparams.hotpot_data, self.hparams.max_samples)
        self.pieces = extract_pieces(dataset).pieces
        self.facts = fact_texts(self.pieces, load_truth(self.source["path"]), self.hparams.questions, self.hparams.bare)
        if not self.facts:
            from lit_coupling.errors import UserError

            raise UserError(f"{self.source['path']}: no fact could be extracted to train on")
        self.paragraphs = context_paragraphs(dataset)

    def corpus(self) -> list[str]:
        """Text to train a tokenizer on: the training texts with their prefixes, and the context paragraphs."""
        self.setup()
        return [fact.text(prefix) for fact in self.facts for prefix in self.prefixes] + self.paragraphs

    def connect(self, tokenizer, bos_ids: Sequence[int]) -> None:
        """Tokenise with the model's tokenizer (called by the module once it has one): examples and pieces."""
        from lit_coupling.data.pieces import Extraction, tokenize_pieces

        self.setup()
        self.tokenizer = tokenizer
        self.examples = FactExamples(self.facts, self.prefixes, tokenizer, bos_ids)
        self.pieces = tokenize_pieces(Extraction(self.pieces), tokenizer, bos_ids).pieces

    def train_dataloader(self) -> DataLoader:
        if self.examples is None:
            raise RuntimeError(
                "FactsDataModule.connect(tokenizer, bos_ids) must run before training "
                "(InjectionModule does it in setup)"
            )
        generator = torch.Generator().manual_seed(self.hparams.seed)
        collate = FactCollator(self.tokenizer.pad_token_id, self.hparams.subject_locality)
        return DataLoader(
            self.examples,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )


def _single(items: list) -> object:
    return items[0]


class EditRequestDataModule(LightningDataModule):
    def __init__(
        self,
        pieces_path: str,
        max_experiments: int = 10,
        seed: int = 0,
        edit_source: str = "pieces",
        batch_size_edits: int = 1,
    ):
        """
        Args:
            pieces_path: knowledge_pieces.json (or the run directory holding it), tokenised for the model.
            max_experiments: number of edits (source pieces, drawn seeded from the single-fact pieces).
            seed: seeds the choice of sources and their counterfactual answers.
            edit_source: pieces (the single-fact pieces, each with a same-type counterfactual), or
                counterfact:PATH (CounterFact's requested rewrites; the pieces are then the ripple's targets).
            batch_size_edits: requests per predict step, made as one MEMIT edit (1: one edit per request).
        """
        super().__init__()
        self.save_hyperparameters()
        if edit_source != "pieces" and not (edit_source.startswith("counterfact:") and len(edit_source) > 12):
            from lit_coupling.errors import UserError

            raise UserError(
                f"edit_source must be pieces or counterfact:PATH (a CounterFact JSON file), not {edit_source!r}"
            )
        self.pieces: list[KnowledgePiece] = []
        self.meta: dict = {}
        self.cases: list = []  # CounterFactCase, when the edits come from CounterFact
        self.plan = None  # editing.requests.RequestPlan, made by the module (it knows what the model knows)

    def setup(self, stage: str | None = None) -> None:
        if not self.pieces:
            self.pieces, self.meta = load_pieces(Path(self.hparams.pieces_path))
            source = self.hparams.edit_source
            if source.startswith("counterfact:"):
                from lit_coupling.data.counterfact import read_counterfact

                self.cases = read_counterfact(source.removeprefix("counterfact:"))

    def predict_dataloader(self) -> DataLoader:
        """The edit requests. The module plans them (`MemitModule.plan_edits`: the sources its model knows): the
        datamodule is asked for its dataloader after the model is loaded and before any predict hook runs."""
        self.setup()
        if self.plan is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if not hasattr(module, "plan_edits"):
                from lit_coupling.errors import UserError

                raise UserError("EditRequestDataModule serves the edits a MemitModule plans: predict with one")
            self.plan = module.plan_edits(self)
        edits = int(self.hparams.batch_size_edits)
        if edits > 1:  # B requests per step, made as one MEMIT edit
            return DataLoader(self.plan.requests, batch_size=edits, shuffle=False, collate_fn=list)
        return DataLoader(self.plan.requests, batch_size=1, shuffle=False, collate_fn=_single)
