"""Settings of the MEMIT ripple stage (`run --memit.*`, and the MemitModule's init arguments)."""

from __future__ import annotations

from dataclasses import dataclass

from lit_coupling.editing.hparams import MemitHparams

TRACED = "traced"  # --memit.layers traced: the edit band chosen by causal tracing (editing/tracing.py)


@dataclass
class MemitOptions:
    hparams: MemitHparams | str = "auto"
    """A YAML of MEMIT hyperparameters, or auto: configs/memit/ by model family and shape (derived when absent); in a
    predict config, the hyperparameters themselves (a mapping)."""
    layers: str | None = None
    """Edit layers, overriding the hyperparameter file: '13-17', '4,5,6', or traced: the window of consecutive
    layers (as many as the hyperparameters' set) whose MLP has the highest causal-tracing indirect effect on facts
    the model knows and that are not edited (docs/memit.md, "Layers for a model without a published set")."""
    cov_corpus: str = "hotpot"
    """Key-statistics corpus: hotpot (the HotpotQA context paragraphs), a .txt file, or hf:NAME[:CONFIG][:SPLIT]."""
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
    """Show progress: bars with an ETA on a terminal, one line per step in a log (scoring before and after each
    edit, each edit's target optimisation, one line per finished edit)."""
    known: str = "generated"
    """Which facts count as known before editing; edit sources are drawn only from known ones: generated (the
    default: greedy decoding of the prompt reads as the answer), teacher_forced (every answer token is the top
    choice), top1_first_token, or any (no filter)."""
    edit_source: str = "pieces"
    """Where the edits come from: pieces (single-fact pieces with same-type counterfactuals) or counterfact:PATH
    (CounterFact's requested rewrites, original or flat schema; the pieces are then the ripple's targets, and the
    efficacy, paraphrase and neighbourhood scores of Meng et al. 2022 are reported beside the ripple)."""
    editor: str = "memit"
    """memit, or ft: the positive control, FT-L style constrained gradient ascent on the new answer at the same edit
    layers (lit_coupling/editing/finetune.py)."""
    ft_steps: int = 1
    """ft editor: gradient steps (1: the first-order control)."""
    ft_lr: float = 1.0
    """ft editor: step size on Σ log P(new answer tokens | prompt)."""
    ft_max_norm: float = 0.05
    """ft editor: ‖ΔW‖_F over the edit layers ≤ ft_max_norm · ‖W‖_F."""
    batch_size_edits: int = 1
    """Requests per MEMIT edit: 1 (the default) edits one request at a time; B > 1 makes B requests one mass edit
    and measures their joint ripple (each request's record carries memit.batch)."""

    def validate(self) -> None:
        """Refuse bad values before any stage computes (a MEMIT run on a large model takes hours)."""
        from pathlib import Path

        from lit_coupling import errors as E

        if not isinstance(self.hparams, MemitHparams):
            E.check_text("memit.hparams", self.hparams, optional=False)
        if isinstance(self.hparams, str) and self.hparams != "auto" and not Path(self.hparams).expanduser().is_file():
            raise E.bad_setting(
                "memit.hparams",
                self.hparams,
                "auto or a YAML file of MEMIT hyperparameters",
                "No such file: check the path (configs/memit/ holds the shipped sets)",
            )
        if self.layers != TRACED:
            E.check_layer_spec("memit.layers", self.layers)
        E.check_text("memit.cov_corpus", self.cov_corpus, optional=False)
        corpus = self.cov_corpus
        if corpus != "hotpot" and not corpus.startswith("hf:") and not Path(corpus).expanduser().is_file():
            found = "That is a directory, not a file" if Path(corpus).expanduser().is_dir() else "No such file"
            raise E.bad_setting(
                "memit.cov_corpus",
                corpus,
                "hotpot, a .txt/.json/.jsonl file, or hf:NAME[:CONFIG][:SPLIT]",
                f"{found}: check the path",
            )
        stats = Path(self.stats_dir).expanduser() if self.stats_dir is not None else None
        if stats is not None and stats.exists() and not stats.is_dir():  # else found after minutes of covariance
            raise E.bad_setting("memit.stats_dir", self.stats_dir, "a directory", "That is a file: check the path")
        E.check_int(
            "memit.cov_tokens",
            self.cov_tokens,
            1,
            hint="it is the number of corpus tokens the key covariance of each edit layer is estimated "
            "from (100000 is the default)",
        )
        E.check_int("memit.batch_size", self.batch_size, 1)
        E.check_choice("memit.on_edit_error", self.on_edit_error, ("record", "raise"))
        E.check_choice("memit.known", self.known, ("generated", "teacher_forced", "top1_first_token", "any"))
        source = self.edit_source
        if source != "pieces" and not (isinstance(source, str) and source.startswith("counterfact:")):
            raise E.bad_setting("memit.edit_source", source, "pieces or counterfact:PATH")
        if source.startswith("counterfact:") and not Path(source.partition(":")[2]).expanduser().is_file():
            raise E.bad_setting(
                "memit.edit_source", source, "pieces or counterfact:PATH", f"No such file: {source.partition(':')[2]}"
            )
        E.check_choice("memit.editor", self.editor, ("memit", "ft"))
        E.check_int("memit.ft_steps", self.ft_steps, 1)
        E.check_int("memit.batch_size_edits", self.batch_size_edits, 1)
        if self.batch_size_edits > 1 and self.editor != "memit":
            raise E.bad_setting(
                "memit.batch_size_edits",
                self.batch_size_edits,
                "1 with the ft editor",
                "batched edits are MEMIT's mass editing",
            )
        E.check_float("memit.ft_lr", self.ft_lr, 0, low_open=True)
        E.check_float("memit.ft_max_norm", self.ft_max_norm, 0, low_open=True)
        E.check_choice("memit.known", self.known, ("generated", "teacher_forced", "top1_first_token", "any"))
        source = self.edit_source
        if source != "pieces" and not (
            source.startswith("counterfact:") and Path(source.removeprefix("counterfact:")).expanduser().is_file()
        ):
            raise E.bad_setting(
                "memit.edit_source",
                source,
                "pieces or counterfact:PATH (a CounterFact JSON file)",
                "No such file: check the path" if source.startswith("counterfact:") else "",
            )
