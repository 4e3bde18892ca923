"""MEMIT hyperparameters: the shipped sets in `lit_coupling/resources/memit/` (= `configs/memit/`, symlinks), and
the rule that derives a set for any other model.

A set is chosen by the loaded model's family and shape (never its name). A model with no set of its own gets
one
derived from its family's published set: the same band of relative depth, and λ scaled by the key dimension,
because
λ·C weighs against K Kᵀ, whose size grows with the key dimension (a 512-dim tiny GPT-2 needs λ ≈
20000·512/6400).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from lit_coupling.editing.requests import check_fact_token
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
    mom2_shrinkage: str | float = "ledoit-wolf"
    """C → (1−α)C + α·tr(C)/d·I: ledoit-wolf (α from C's sampling noise, → 0 for a big corpus), none, or α."""
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
        check_fact_token(self.fact_token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemitHparams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"unknown MEMIT hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def read_hparams_file(path: str | Path) -> MemitHparams:
    """A YAML of hyperparameters: either a `lit-coupling predict` config (model.init_args.memit) or the bare
    set."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"MEMIT hyperparameter file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from error
    block = doc.get("model", {}).get("init_args", {}).get("memit", doc) if isinstance(doc, dict) else None
    if not isinstance(block, dict) or "layers" not in block:
        raise UserError(
            f"{path}: no MEMIT hyperparameters (expected model.init_args.memit or a mapping with layers)"
        )
    return MemitHparams.from_dict(block)


def shipped_hparams() -> dict[str, MemitHparams]:
    """The shipped sets (lit_coupling/resources/memit/ = configs/memit/), by file stem."""
    if not CONFIG_DIR.is_dir():
        raise UserError(f"{CONFIG_DIR} is missing (a broken install): pass --memit.hparams FILE")
    return {p.stem: read_hparams_file(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def derive_layers(published: MemitHparams, num_layers: int) -> list[int]:
    """The published band of relative depth, mapped onto a model with `num_layers` blocks (at least one
    layer)."""
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
    """The set to use for the adapter's model: given, read from a file, or `auto`; `layers` overrides its
    layers."""
    from lit_coupling.models.adapters import parse_layers

    if isinstance(spec, MemitHparams):
        hp = spec
    elif isinstance(spec, dict):
        hp = MemitHparams.from_dict(spec)
    elif spec in (None, "", "auto"):
        key_dim = adapter.target(adapter.num_layers - 1).shape[1]
        hp = select_hparams(
            adapter.model_type, adapter.d_model, adapter.num_layers, key_dim, adapter.family.name
        )
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
