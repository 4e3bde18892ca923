"""MEMIT hyperparameters: the shipped sets in `lit_coupling/resources/memit/` (= `configs/memit/`, symlinks), and
the rule that derives a set for any other model.

A set is chosen by the loaded model's family and shape (never its name). A model with no set of its own gets one derived
from its family's published set: the same band of relative depth, and λ scaled by the key dimension, because λ·C weighs
against K Kᵀ, whose size grows with the key dimension (a 512-dim tiny GPT-2 needs λ ≈ 20000·512/6400).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from lit_coupling.errors import UserError

# Package data (pyproject.toml), so an installed copy has them; configs/memit/*.yaml link here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "resources" / "memit"

# Which published set a family derives from when it has no set of its own (GPT-2 → GPT-2 XL, GPT-J → GPT-J,
# everything with a gated Linear MLP → LLaMA-2-7B).
DERIVE_FROM = {"gpt2": "gpt2-xl", "gptj": "gpt-j-6b"}
DEFAULT_DERIVE_FROM = "llama-2-7b"


@dataclass
class MemitHparams:
    """Hyperparameters of one MEMIT edit (names follow the public implementation)."""

    layers: list[int] = field(default_factory=list)
    """Edit layers (their MLP output projections); the last one is where the target vectors are optimised."""
    v_lr: float = 0.5
    """Adam learning rate of the target-vector optimisation."""
    v_num_grad_steps: int = 20
    """At most this many forward passes of the target-vector optimisation (steps − 1 updates)."""
    v_weight_decay: float = 0.5
    """Weight of ‖δ‖/‖h‖² in the target-vector loss (the public code's form: ‖δ‖ not squared, ‖h‖ squared)."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ is clamped to this times ‖h‖, h the hidden state being moved."""
    kl_factor: float = 0.0625
    """Weight of KL(p_edited ‖ p_before) on "{subject} is a": keeps the subject's other predictions."""
    mom2_update_weight: float = 20000.0
    """λ: weight of the key covariance C against the new keys in (λC + KKᵀ)⁻¹K."""
    mom2_shrinkage: str | float = "none"
    """C → (1−α)C + α·tr(C)/d·I. none: the published algorithm (every shipped set); ledoit-wolf (α from C's
    sampling noise, → 0 for a big corpus) or a number α: an explicit deviation, measured in docs/memit.md."""
    early_stop_loss: float = 5e-2
    """Stop optimising a target vector once its loss falls below this."""
    context_prefixes: int = 5
    """Generated context prefixes (seeded) the target and keys are averaged over, besides the bare prompt."""
    context_prefix_tokens: int = 10
    """Length of each generated prefix, in tokens."""
    fact_token: str = "subject_last"
    """Where keys are read and the target vector is written: subject_last (published for every model), subject_first,
    or subject_first_after_last (the token right after the subject) — the public implementation's strategies."""
    model_type: str | None = None
    """HF model_type these values were set for (used by `auto` to pick a set)."""
    d_model: int | None = None
    """Hidden size they were set for."""
    num_layers: int | None = None
    """Number of blocks they were set for."""
    key_dim: int | None = None
    """Input width of the MLP output projection they were set for (λ scales with it)."""
    source: str = ""
    """published (and where) or derived (and how): said in every output that uses them."""

    def __post_init__(self):
        from lit_coupling.editing.requests import check_fact_token  # requests pulls torch: only when used

        check_fact_token(self.fact_token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemitHparams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown MEMIT hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def read_hparams_file(path: str | Path) -> MemitHparams:
    """A YAML of hyperparameters: either a `lit-coupling predict` config (model.init_args.memit.hparams) or the bare
    set."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"MEMIT hyperparameter file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from error
    block = doc.get("model", {}).get("init_args", {}).get("memit", doc) if isinstance(doc, dict) else None
    if isinstance(block, dict) and isinstance(block.get("hparams"), dict):  # MemitModule's `memit` (MemitOptions)
        block = block["hparams"]
    if not isinstance(block, dict) or "layers" not in block:
        raise UserError(
            f"{path}: no MEMIT hyperparameters (expected model.init_args.memit.hparams or a mapping with layers)"
        )
    return MemitHparams.from_dict(block)


def shipped_hparams() -> dict[str, MemitHparams]:
    """The shipped sets (lit_coupling/resources/memit/ = configs/memit/), by file stem."""
    if not CONFIG_DIR.is_dir():
        raise UserError(f"{CONFIG_DIR} is missing (a broken install): pass --memit.hparams FILE")
    return {p.stem: read_hparams_file(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def derive_layers(published: MemitHparams, num_layers: int) -> list[int]:
    """The published band of relative depth, mapped onto a model with `num_layers` blocks (at least one layer)."""
    n = published.num_layers
    lo = math.floor(min(published.layers) / n * num_layers + 0.5)
    hi = math.floor(max(published.layers) / n * num_layers + 0.5)
    lo, hi = min(lo, num_layers - 1), min(max(hi, lo), num_layers - 1)
    return list(range(lo, hi + 1))


def derive_hparams(
    published: MemitHparams, name: str, model_type: str, d_model: int, num_layers: int, key_dim: int
) -> MemitHparams:
    lam = published.mom2_update_weight * key_dim / published.key_dim
    return replace(
        published,
        layers=derive_layers(published, num_layers),
        mom2_update_weight=round(lam, 1),
        model_type=model_type,
        d_model=d_model,
        num_layers=num_layers,
        key_dim=key_dim,
        source=(
            f"derived from {name} ({published.source.split(';')[0]}): layers at the same relative depth "
            f"{min(published.layers)}-{max(published.layers)}/{published.num_layers}, "
            f"λ scaled by key dimension {key_dim}/{published.key_dim}"
        ),
    )


def select_hparams(
    model_type: str, d_model: int, num_layers: int, key_dim: int, family: str | None = None
) -> MemitHparams:
    """`auto`: the shipped set made for this shape, else one derived from the family's published set."""
    sets = shipped_hparams()
    for hp in sets.values():
        if (hp.model_type, hp.d_model, hp.num_layers, hp.key_dim) == (
            model_type,
            d_model,
            num_layers,
            key_dim,
        ):
            return hp
    name = DERIVE_FROM.get(family or model_type, DEFAULT_DERIVE_FROM)
    if name not in sets:
        raise UserError(
            f"no MEMIT hyperparameters for {model_type} (d_model {d_model}, {num_layers} layers) and "
            f"{CONFIG_DIR}/{name}.yaml to derive them from is missing: pass --memit.hparams FILE"
        )
    return derive_hparams(sets[name], name, model_type, d_model, num_layers, key_dim)


def resolve_hparams(
    spec: MemitHparams | dict | str | None, adapter, layers: str | list[int] | None = None
) -> MemitHparams:
    """The set to use for the adapter's model: given, read from a file, or `auto`; `layers` overrides its layers."""
    from lit_coupling.models.adapters import parse_layers

    if isinstance(spec, MemitHparams):
        hp = spec
    elif isinstance(spec, dict):
        hp = MemitHparams.from_dict(spec)
    elif spec in (None, "", "auto"):
        key_dim = adapter.target(adapter.num_layers - 1).shape[1]
        hp = select_hparams(adapter.model_type, adapter.d_model, adapter.num_layers, key_dim, adapter.family.name)
    else:
        hp = read_hparams_file(spec)
    if layers is not None:
        hp = replace(
            hp,
            layers=parse_layers(layers, adapter.num_layers),
            source=f"{hp.source}; layers overridden by the user",
        )
    if not hp.layers:
        raise UserError("MEMIT needs at least one edit layer")
    return replace(hp, layers=parse_layers(list(hp.layers), adapter.num_layers))


# --- deviations from the paper ----------------------------------------------------------------------------

# The published sets, value for value (MEMIT's hparams/MEMIT/*.json; LLaMA-2-7B from EasyEdit), and the algorithm's
# own settings every set shares: no covariance shrinkage, keys at the subject's last token, 5 generated context
# prefixes of 10 tokens. `deviations` compares a set against the one its family derives from.
PAPER: dict[str, dict[str, Any]] = {
    "gpt2-xl": {
        "layers": [13, 14, 15, 16, 17],
        "v_lr": 0.5,
        "v_num_grad_steps": 20,
        "v_weight_decay": 0.5,
        "clamp_norm_factor": 0.75,
        "kl_factor": 0.0625,
        "mom2_update_weight": 20000.0,
    },
    "gpt-j-6b": {
        "layers": [3, 4, 5, 6, 7, 8],
        "v_lr": 0.5,
        "v_num_grad_steps": 25,
        "v_weight_decay": 0.5,
        "clamp_norm_factor": 0.75,
        "kl_factor": 0.0625,
        "mom2_update_weight": 15000.0,
    },
    "llama-2-7b": {
        "layers": [4, 5, 6, 7, 8],
        "v_lr": 0.5,
        "v_num_grad_steps": 25,
        "v_weight_decay": 1e-3,
        "clamp_norm_factor": 4.0,
        "kl_factor": 0.0625,
        "mom2_update_weight": 15000.0,
    },
}
PAPER_ALGORITHM: dict[str, Any] = {
    "mom2_shrinkage": "none",
    "fact_token": "subject_last",
    "early_stop_loss": 0.05,
    "context_prefixes": 5,
    "context_prefix_tokens": 10,
}
# The reference estimates C from mom2_n_samples = 100,000 Wikipedia *texts* (about 44M key vectors).
PAPER_COV_TEXTS = 100_000

_WHY = {
    "mom2_shrinkage": "shrinkage of C towards tr(C)/d·I, an explicit option; Ledoit-Wolf changed ΔW by 54-75% on "
    "the embedded models with a 4k-token covariance and by 5-26% with 100k tokens (docs/memit.md)",
    "fact_token": "the embedded tiny models recall a fact at the token after the subject, not at its last token "
    '(causal tracing, docs/benchmarks.md "Where the facts live")',
}


def paper_set_name(hp: MemitHparams) -> str:
    """The published set `hp` derives from (its source names it), else its family's (as `select_hparams` derives)."""
    named = [name for name in PAPER if f"from {name}" in hp.source]
    return named[0] if named else DERIVE_FROM.get(hp.model_type or "", DEFAULT_DERIVE_FROM)


def deviations(hp: MemitHparams, covariance: dict | None = None) -> list[str]:
    """Every way this MEMIT run departs from the paper, each with its reason: the list docs/memit.md explains.

    `covariance`: the run's covariance record (corpus, tokens, texts), for the corpus deviation.
    """
    name = paper_set_name(hp)
    paper = {**PAPER[name], **PAPER_ALGORITHM}
    published = hp.source.startswith("published")
    found: list[str] = []
    if not published:
        found.append(f"hyperparameters not published for this model: {hp.source}")
    for key, want in paper.items():
        have = getattr(hp, key)
        if key == "mom2_shrinkage" and str(have).lower() in ("none", "0", "0.0"):
            continue
        if have == want or (isinstance(want, float) and isinstance(have, (int, float)) and float(have) == want):
            continue
        if not published and key in PAPER[name]:
            continue  # a derived set's own values: said once, by its source, above
        why = _WHY.get(key, "")
        found.append(f"{key} = {have!r} (the paper: {want!r})" + (f": {why}" if why else ""))
    if covariance:
        texts, tokens = covariance.get("texts"), covariance.get("tokens")
        found.append(
            f"key covariance from {tokens if tokens is not None else covariance.get('tokens_requested')} "
            f"tokens ({texts if texts is not None else '?'} texts) of {covariance.get('corpus')!r}; the "
            f"paper uses {PAPER_COV_TEXTS:,} Wikipedia texts (mom2_n_samples counts texts, cov_tokens "
            f"counts tokens)"
        )
    return found
