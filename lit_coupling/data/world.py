"""A seeded synthetic 2-hop world in HotpotQA's own schema, with its ground truth in a sidecar file.

    lit-coupling make-world --chains 200 --seed 0 --out world.json   # also writes world.truth.json

Shaped so that the tiny models trained on it can be edited by MEMIT (measured: docs/benchmarks.md, "Where the facts
live"):

- Every sentence names the relation first and the subject last, and the object follows the subject after one
  word: "The birthplace of Mira Tolvane is Velmor Falls." A tiny model recalls a fact at the prompt's last token
  (it reads the subject's name tokens from there in its first block, whatever the template), so MEMIT edits at the
  token right after the subject (`fact_token: subject_first_after_last` in configs/memit/tiny-*.yaml), which here
  is the prompt's last token and has seen both relation and subject. With subject-first sentences ("Mira Tolvane
  was born in") that token is " was" and knows nothing of the relation.
- Every entity's first word is its own; the later words are shared ("Velmor Falls", "Drask Falls"; "Mira
  Tolvane", "Oren Tolvane"). A new multi-word answer is then carried by its first token: a tiny model completes
  "Drask" with "Falls" from the name alone. With first words shared by several entities the second answer token
  was looked up again from the context, which the edit did not change, and half the edits broke there.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lit_coupling.outputs import read_json, stable_hash, write_json

TRUTH_FORMAT = "lit_coupling.world_truth/1"


@dataclass(frozen=True)
class Relation:
    name: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]  # "The ... of {s} is {o}." — the object last (a prefix cloze), one word after {s}
    phrase: str  # the object as a noun phrase about the subject: "the birthplace of {}"
    question: str  # asks for the object: "Where was {} born?"


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "author",
            "work",
            "person",
            ("The author of {s} is {o}.", "The writer of {s} is {o}."),
            "the author of {}",
            "Who wrote {}?",
        ),
        Relation(
            "birthplace",
            "person",
            "city",
            ("The birthplace of {s} is {o}.", "The hometown of {s} is {o}."),
            "the birthplace of {}",
            "Where was {} born?",
        ),
        Relation(
            "employer",
            "person",
            "company",
            ("The employer of {s} is {o}.", "The company that employs {s} is {o}."),
            "the employer of {}",
            "Which company does {} work for?",
        ),
        Relation(
            "alma_mater",
            "person",
            "university",
            ("The alma mater of {s} is {o}.", "The university attended by {s} is {o}."),
            "the alma mater of {}",
            "Where did {} study?",
        ),
        Relation(
            "founder",
            "company",
            "person",
            ("The founder of {s} is {o}.", "The person who founded {s} is {o}."),
            "the founder of {}",
            "Who founded {}?",
        ),
        Relation(
            "headquarters",
            "company",
            "city",
            ("The headquarters city of {s} is {o}.", "The seat of {s} is {o}."),
            "the headquarters city of {}",
            "Where is {} headquartered?",
        ),
        Relation(
            "country",
            "city",
            "country",
            ("The country of {s} is {o}.", "The home country of {s} is {o}."),
            "the country of {}",
            "In which country is {}?",
        ),
        Relation(
            "location",
            "university",
            "city",
            ("The location of {s} is {o}.", "The home city of {s} is {o}."),
            "the home city of {}",
            "Where is {} located?",
        ),
        Relation(
            "founded",
            "university",
            "year",
            ("The founding year of {s} is {o}.", "The year of foundation of {s} is {o}."),
            "the founding year of {}",
            "When was {} established?",
        ),
    )
}

# 2-hop chains: the first relation's object is the second one's subject (the bridge entity).
COMPOSITIONS = (
    ("author", "birthplace"),
    ("author", "employer"),
    ("author", "alma_mater"),
    ("founder", "birthplace"),
    ("founder", "alma_mater"),
    ("birthplace", "country"),
    ("employer", "headquarters"),
    ("employer", "founder"),
    ("alma_mater", "founded"),
    ("alma_mater", "location"),
    ("headquarters", "country"),
    ("location", "country"),
)

# The shared last word of each entity type's names (a person's last name comes from a pool instead).
SUFFIXES = {
    "city": ("Falls", "Harbor", "Ridge", "Crossing", "Vale", "Haven"),
    "company": ("Works", "Holdings", "Systems", "Foundry", "Labs"),
    "university": ("Institute", "College", "Academy"),
    "work": ("Chronicle", "Saga", "Almanac", "Codex", "Ballad"),
}

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "th",
    "sh",
    "qu",
    "y",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "k")


@dataclass
class WorldSpec:
    """How big and how tangled the synthetic world is."""

    chains: int = 200
    """Number of 2-hop bridge records."""
    seed: int = 0
    """Seeds every choice: names, relations, sharing, templates, distractors."""
    distractors: int = 6
    """Distractor paragraphs per record (HotpotQA has 8 beside its 2 gold paragraphs)."""
    share: float = 0.3
    """Probability that a chain's bridge entity is one that another chain already uses."""
    countries: int = 8
    """Size of the country pool (the answers of `country` facts)."""
    name_sharing: int = 8
    """About how many people share a last name (the pool of last names is sized from the number of chains so that
    this holds). First words are never shared; the last words of places, companies, universities and works come
    from a few per type ("Falls", "Works", ...)."""


@dataclass
class Entity:
    name: str
    type: str
    gender: str = ""  # "f" or "m" for people (recorded in the truth; the sentences use no pronouns)


@dataclass
class Fact:
    id: str
    subject: str
    relation: str
    object: str
    template: int  # which of the relation's templates the paragraph uses

    def sentence(self, template: int | None = None) -> str:
        relation = RELATIONS[self.relation]
        return relation.templates[self.template if template is None else template].format(s=self.subject, o=self.object)

    def paraphrases(self) -> list[str]:
        return [self.sentence(t) for t in range(len(RELATIONS[self.relation].templates))]


@dataclass
class World:
    spec: WorldSpec
    entities: dict[str, Entity] = field(default_factory=dict)
    facts: list[Fact] = field(default_factory=list)
    chains: list[tuple[str, str]] = field(default_factory=list)  # (hop-1 fact id, hop-2 fact id)

    def facts_by_subject(self) -> dict[str, list[Fact]]:
        """Each entity's facts in order: its paragraph, one sentence per fact (one pass, not one per entity)."""
        about: dict[str, list[Fact]] = defaultdict(list)
        for fact in self.facts:
            about[fact.subject].append(fact)
        return about


class _NameMaker:
    """Invented words, and names of a fresh first word and a shared second word."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def stem(self, syllables: int = 2) -> str:
        while True:
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
            stem = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if stem not in self.used and 4 <= len(stem) <= 10:
                self.used.add(stem)
                return stem

    def pool(self, size: int) -> list[str]:
        return [self.stem() for _ in range(size)]

    def name(self, seconds: list[str] | tuple[str, ...]) -> str:
        """A fresh first word (it identifies the entity, so the name is new too) and one of `seconds`."""
        return f"{self.stem()} {self.rng.choice(seconds)}"


def generate_world(spec: WorldSpec) -> World:
    """The entities, facts and chains of a world (deterministic in `spec`)."""
    rng = random.Random(spec.seed)
    names = _NameMaker(rng)
    world = World(spec)
    countries = [names.stem() + rng.choice(("ia", "ora", "and", "esh")) for _ in range(spec.countries)]
    # A 2-hop chain brings about 0.8 new people: the last-name pool is sized so that about `name_sharing` share one.
    last_names = names.pool(max(3, round(0.8 * spec.chains / spec.name_sharing)))
    by_type: dict[str, list[str]] = defaultdict(list)
    relations_of: dict[str, set[str]] = defaultdict(set)

    def new_entity(kind: str) -> str:
        if kind == "country":
            return rng.choice(countries)
        if kind == "year":
            return str(rng.randint(1620, 1990))
        if kind == "person":
            name, gender = names.name(last_names), rng.choice("fm")
        else:
            name, gender = names.name(SUFFIXES[kind]), ""
        world.entities[name] = Entity(name, kind, gender)
        by_type[kind].append(name)
        return name

    def add_fact(subject: str, relation: str, obj: str) -> str:
        fact = Fact(
            f"f{len(world.facts):04d}", subject, relation, obj, rng.randrange(len(RELATIONS[relation].templates))
        )
        world.facts.append(fact)
        relations_of[subject].add(relation)
        return fact.id

    for country in countries:
        world.entities[country] = Entity(country, "country")
    for _ in range(spec.chains):
        r1, r2 = (RELATIONS[r] for r in rng.choice(COMPOSITIONS))
        head = new_entity(r1.subject_type)
        # The bridge: sometimes an entity other chains already pass through (their pieces then share it).
        reusable = [e for e in by_type[r1.object_type] if r2.name not in relations_of[e] and e != head]
        bridge = rng.choice(reusable) if reusable and rng.random() < spec.share else new_entity(r1.object_type)
        # The answer: an existing entity of the type half of the time (answers are shared too), never a loop.
        pool = [e for e in by_type[r2.object_type] if e not in (head, bridge)]
        answer = rng.choice(pool) if pool and rng.random() < 0.5 else new_entity(r2.object_type)
        world.chains.append((add_fact(head, r1.name, bridge), add_fact(bridge, r2.name, answer)))
    return world


def world_records(world: World) -> list[dict]:
    """HotpotQA records (original schema), one bridge record per chain, with distractor paragraphs."""
    rng = random.Random(world.spec.seed + 1)
    facts = {f.id: f for f in world.facts}
    about = world.facts_by_subject()
    # An entity's paragraph: one sentence per fact, each naming its subject (a relation-first sentence has no
    # pronoun form that keeps the subject right before the object; real HotpotQA exercises subject restoration).
    paragraphs = {name: [f.sentence() for f in facts_of] for name, facts_of in about.items()}
    titles = sorted(paragraphs)
    records = []
    for i, (first_id, second_id) in enumerate(world.chains):
        first, second = facts[first_id], facts[second_id]
        r1, r2 = RELATIONS[first.relation], RELATIONS[second.relation]
        gold = [first.subject, second.subject]
        others = [t for t in titles if t not in gold]
        context = gold + rng.sample(others, min(world.spec.distractors, len(others)))
        rng.shuffle(context)
        records.append(
            {
                "_id": record_id(world.spec, i),
                "question": r2.question.format(r1.phrase.format(first.subject)),
                "answer": second.object,
                "supporting_facts": [[fact.subject, about[fact.subject].index(fact)] for fact in (first, second)],
                "context": [[title, paragraphs[title]] for title in context],
                "type": "bridge",
                "level": "synthetic",
            }
        )
    return records


def world_texts(spec: WorldSpec, prefixes: tuple[str, ...] | None = None) -> Iterator[str]:
    """Endless text of the kind the embedded models are trained on: fact sentences behind the training prefixes.

    Round 0 is `spec`'s own world, every fact in every template behind every prefix (the injection data); round r
    is the world of seed `spec.seed + r` in the same form (new names, the same relations, templates and prefixes).
    Each round is shuffled (seeded). The MEMIT key covariance of the embedded models is estimated from it: their
    HotpotQA-shaped world file holds only a few thousand tokens, too few for a well-conditioned covariance.
    """
    from lit_coupling.data.facts import DEFAULT_PREFIXES

    prefixes = DEFAULT_PREFIXES if prefixes is None else prefixes
    for round_ in itertools.count():
        world = generate_world(replace(spec, seed=spec.seed + round_))
        texts = [
            f"{prefix} {sentence}" if prefix else sentence
            for fact in world.facts
            for sentence in fact.paraphrases()
            for prefix in prefixes
        ]
        random.Random(spec.seed + 7919 * (round_ + 1)).shuffle(texts)
        yield from texts


def record_id(spec: WorldSpec, index: int) -> str:
    return f"world-s{spec.seed}-{index:04d}"


def world_truth(world: World) -> dict:
    """The ground truth: entities, facts with every paraphrase, chains, and which pieces share which entity."""
    from lit_coupling.data.piece import piece_id

    facts = {f.id: f for f in world.facts}
    shared: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"subject_of": [], "answer_of": []})
    chains = []
    for i, (first_id, second_id) in enumerate(world.chains):
        hotpot_id = record_id(world.spec, i)
        ids = {kind: piece_id(hotpot_id, kind) for kind in ("hop1", "hop2", "question")}
        first, second = facts[first_id], facts[second_id]
        shared[first.subject]["subject_of"] += [ids["hop1"], ids["question"]]
        shared[first.object]["answer_of"].append(ids["hop1"])
        shared[second.subject]["subject_of"].append(ids["hop2"])
        shared[second.object]["answer_of"] += [ids["hop2"], ids["question"]]
        chains.append(
            {
                "hotpot_id": hotpot_id,
                "hop1": first_id,
                "hop2": second_id,
                "head": first.subject,
                "bridge": first.object,
                "answer": second.object,
                "pieces": ids,
            }
        )
    return {
        "format": TRUTH_FORMAT,
        "spec": asdict(world.spec),
        "relations": {
            name: {
                "subject_type": r.subject_type,
                "object_type": r.object_type,
                "templates": list(r.templates),
                "question": r.question,
            }
            for name, r in RELATIONS.items()
        },
        "entities": [asdict(e) for e in world.entities.values()],
        "facts": [{**asdict(f), "sentence": f.sentence(), "paraphrases": f.paraphrases()} for f in world.facts],
        "chains": chains,
        # Entities that link two or more pieces: the ground-truth coupling structure.
        "shared_entities": {
            name: links for name, links in shared.items() if len(links["subject_of"]) + len(links["answer_of"]) > 1
        },
    }


def truth_path(world_path: str | Path) -> Path:
    """world.json → world.truth.json (the sidecar sits beside the world)."""
    path = Path(world_path)
    return path.with_name(path.name.removesuffix(".json") + ".truth.json")


def load_truth(world_path: str | Path) -> dict | None:
    """The sidecar of a synthetic world, or None for any other HotpotQA file."""
    path = truth_path(world_path)
    return read_json(path) if path.exists() else None


def write_world(spec: WorldSpec, out: str | Path) -> tuple[Path, Path]:
    world = generate_world(spec)
    sidecar = truth_path(out)
    write_json(sidecar, world_truth(world))  # the sidecar first: a world file never lacks its truth
    return write_json(out, world_records(world)), sidecar


DEFAULT_WORLD = WorldSpec()


def default_world_file(spec: WorldSpec = DEFAULT_WORLD) -> Path:
    """The default world, written once into the cache under a name derived from its content."""
    from lit_coupling.cache import cache_dir

    world = generate_world(spec)
    records, truth = world_records(world), world_truth(world)
    path = cache_dir("worlds") / f"world-c{spec.chains}-s{spec.seed}-{stable_hash([records, truth])}.json"
    if not path.exists() or not truth_path(path).exists():
        write_json(truth_path(path), truth)
        write_json(path, records)
    return path


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lit-coupling make-world", description=__doc__.split("\n\n")[0])
    parser.add_class_arguments(WorldSpec, None)
    parser.add_argument(
        "--out",
        required=True,
        help="Where to write the world (HotpotQA JSON); the ground truth goes beside it as <name>.truth.json.",
    )
    args = parser.parse_args(argv)
    spec = WorldSpec(**{k: v for k, v in vars(args).items() if k in WorldSpec.__dataclass_fields__})
    if spec.chains < 1:
        print("lit-coupling make-world: --chains must be at least 1", file=sys.stderr)
        return 2
    world_file, sidecar = write_world(spec, args.out)
    print(f"wrote {world_file} ({spec.chains} chains) and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
