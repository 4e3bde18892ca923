"""Settings of the MEMIT ripple stage (`run --memit.*`, and the MemitModule's init arguments)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemitOptions:
    hparams: str = "auto"
    """A YAML of MEMIT hyperparameters, or auto: configs/memit/ by model family and shape (derived when
    absent)."""
    layers: str | None = None
    """Edit layers, overriding the hyperparameter file: '13-17', '4,5,6'."""
    cov_corpus: str = "hotpot"
    """Key-statistics corpus: hotpot (the HotpotQA context paragraphs), a .txt file, or
    hf:NAME[:CONFIG][:SPLIT]."""
    cov_tokens: int = 100_000
    """Corpus tokens (key vectors) per layer covariance; cached by (model, layer, corpus, tokens)."""
    stats_dir: str | None = None
    """Key-statistics cache (default $LIT_COUPLING_CACHE/memit_stats or ~/.cache/lit_coupling/memit_stats)."""
    batch_size: int = 128
    """Pieces per batch when scoring ripple (every piece is scored and decoded greedily before and after each
    edit: on small models the per-batch overhead of generation dominates, 32 → 128 made the stage 3× faster)."""
    on_edit_error: str = "record"
    """record (a failed edit is written with its error, the run goes on) or raise."""
    progress: bool = True
    """Show progress bars."""
