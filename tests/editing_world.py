"""A tiny 2-hop world for the MEMIT tests: a model trained on its facts, its pieces, and a HotpotQA-format
corpus.

Subjects come last in every cloze ("born in: Anna Hill" → Delhi), so even a 4-block model reads the fact from
the subject's last token — where MEMIT edits. (A tiny model trained on "Anna Hill was born in" resolves the
subject
in block 0 at the final position, and no subject-position edit can reach it.)
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch

from lit_coupling.data.piece import PIECES_FORMAT, KnowledgePiece
from lit_coupling.scoring import cloze_text, encode_cloze

FIRSTS = ("Anna", "Boris", "Clara", "David")
LASTS = ("Stone", "Hill", "Lane", "Gray")
CITIES = {
    "Paris": "France",
    "Rome": "Italy",
    "Oslo": "Norway",
    "Lima": "Peru",
    "Cairo": "Egypt",
    "Tokyo": "Japan",
}
FILLER = (
    "The weather was mild that year.",
    "Many people visited the old market.",
    "Therefore the plan changed.",
    "Because of rain, the game stopped.",
    "You can see the river from here.",
    "I think the story is long.",
)


def world_facts(seed: int = 0) -> list[dict]:
    """A chain per person: hop 1 person → birth city, hop 2 city → country, question person → country."""
    rng = random.Random(seed)
    chains = []
    for i, (first, last) in enumerate(itertools.product(FIRSTS, LASTS)):
        person, city = f"{first} {last}", rng.choice(sorted(CITIES))
        chains.append({"id": f"c{i:02d}", "person": person, "city": city, "country": CITIES[city]})
    return chains


def clozes(chain: dict) -> list[tuple[str, str, str, str, int]]:
    """(kind, prompt, answer, subject, hop) of a chain's pieces."""
    return [
        ("hop1", f"born in: {chain['person']}", chain["city"], chain["person"], 1),
        ("hop2", f"in the country: {chain['city']}", chain["country"], chain["city"], 2),
        ("question", f"born in the country: {chain['person']}", chain["country"], chain["person"], 0),
    ]


def training_texts(chains: list[dict]) -> list[str]:
    return [cloze_text(prompt, answer) + "." for c in chains for _, prompt, answer, _, _ in clozes(c)] + list(FILLER)


def write_hotpot(path: Path, chains: list[dict]) -> Path:
    """The world's sentences as HotpotQA records (context paragraphs): the default key-statistics corpus."""
    records = []
    for c in chains:
        sentences = [cloze_text(p, a) + ". " for _, p, a, _, _ in clozes(c)] + [s + " " for s in FILLER[:2]]
        records.append(
            {
                "_id": c["id"],
                "question": f"Where was {c['person']} born?",
                "answer": c["country"],
                "type": "bridge",
                "level": "easy",
                "supporting_facts": [[c["person"], 0]],
                "context": [[c["person"], sentences]],
            }
        )
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_pieces(
    path: Path, chains: list[dict], tokenizer, bos_ids: list[int], source: Path, model_name: str
) -> list[KnowledgePiece]:
    """knowledge_pieces.json in the documented format, tokenised for `tokenizer`."""
    pieces = []
    for c in chains:
        ids = [f"{c['id']}/{kind}" for kind, *_ in clozes(c)]
        for kind, prompt, answer, subject, hop in clozes(c):
            p_ids, a_ids = encode_cloze(tokenizer, prompt, answer, bos_ids)
            pieces.append(
                KnowledgePiece(
                    id=f"{c['id']}/{kind}",
                    hotpot_id=c["id"],
                    chain_id=c["id"],
                    kind=kind,
                    hop=hop,
                    prompt=prompt,
                    answer=answer,
                    subject=subject,
                    source_title=c["person"],
                    source_sentence=cloze_text(prompt, answer) + ".",
                    record_type="bridge",
                    links=[i for i in ids if i != f"{c['id']}/{kind}"],
                    prompt_ids=p_ids,
                    answer_ids=a_ids,
                )
            )
    doc = {
        "format": PIECES_FORMAT,
        "model": {"name": model_name},
        "tokenizer": {"name_or_path": model_name, "pad_id": tokenizer.pad_token_id, "bos_ids": bos_ids},
        "source": {"path": str(source), "kind": "synthetic-world"},
        "seed": 0,
        "counts": {"pieces": len(pieces)},
        "skipped": {},
        "pieces": [p.to_dict() for p in pieces],
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return pieces


def train_world_model(
    directory: Path,
    family: str = "gpt2",
    steps: int = 400,
    layers: int = 4,
    width: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> Path:
    """Train a tiny model on the world's sentences (a few seconds on a CPU) and save it with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer
    from tests.tiny import tiny_config

    chains = world_facts(seed)
    texts = training_texts(chains)
    tokenizer = train_bpe_tokenizer(texts * 3, vocab_size=300, style="llama" if family == "llama" else "gpt2")
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), layers=layers, width=width)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    bos = [tokenizer.bos_token_id] if family == "llama" else []
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        # Facts after other text, as in a paragraph: MEMIT's context prefixes must not be a novelty
        # to the model.
        docs = [" ".join(rng.sample(texts, rng.randint(1, 3))) for _ in range(batch_size)]
        seqs = [bos + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in docs]
        ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_run(directory: Path, model_dir: Path, family: str = "gpt2", seed: int = 0) -> Path:
    """A run directory holding knowledge_pieces.json (and the world's HotpotQA file) for `model_dir`."""
    from lit_coupling.models.adapters import bos_ids
    from lit_coupling.models.loading import load_config, load_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chains = world_facts(seed)
    tokenizer = load_tokenizer(str(model_dir))
    bos = bos_ids(load_config(str(model_dir)), tokenizer)
    source = write_hotpot(directory / "world.json", chains)
    write_pieces(directory / "knowledge_pieces.json", chains, tokenizer, bos, source, str(model_dir))
    return directory


# The hyperparameters this toy world was measured to edit with (benchmarks/memit.py --layer-sweep): its hidden
# states are small, so it needs the LLaMA-style clamp, and its keys are few and alike, so a small λ.
WORLD_HPARAMS = {
    "layers": [0, 1],
    "mom2_update_weight": 200.0,
    "clamp_norm_factor": 4.0,
    "source": "measured: layer sweep on the editing test world",
}


def world_hparams_file(path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(WORLD_HPARAMS), encoding="utf-8")
    return path
