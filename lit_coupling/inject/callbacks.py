"""Side effects of knowledge injection: measuring recall (and stopping at the target), saving the model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lit_coupling.data.piece import KnowledgePiece
from lit_coupling.scoring import generated_exact_match, greedy_continuations


@torch.no_grad()
def greedy_recall(model, tokenizer, pieces: Sequence[KnowledgePiece], batch_size: int = 256) -> list[bool]:
    """Per piece: does greedy decoding from its prompt read as its answer (`scoring.generated_exact_match`)?"""
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        new_tokens = max(len(p.answer_ids) for p in batch) + 1  # one more: "Velmor Falls" ≠ "Velmor Fallsworth"
        generated = greedy_continuations(model, [p.prompt_ids for p in batch], new_tokens, tokenizer.pad_token_id)
        hits += [generated_exact_match(tokenizer, g, p.answer) for g, p in zip(generated, batch)]
    model.train(was_training)
    return hits


class RecallCallback(Callback):
    """Every `every_n_steps`, greedy exact-match recall of the pieces: logged, and training stops at `target`."""

    def __init__(
        self, every_n_steps: int = 50, target: float = 0.97, kinds: list[str] | None = None, verbose: bool = True
    ):
        """
        Args:
            every_n_steps: optimizer steps between two measurements (also measured when training ends).
            target: stop once this fraction of the target pieces is recalled.
            kinds: piece kinds the target applies to (default: the single-hop ones: hop1, hop2, compare).
            verbose: print one line per measurement.
        """
        self.every_n_steps, self.target, self.verbose = every_n_steps, target, verbose
        self.kinds = set(kinds or ("hop1", "hop2", "compare"))
        self.history: list[dict] = []
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and self._measured_at() != trainer.global_step:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._measured_at() != trainer.global_step:
            self.measure(trainer, pl_module, stop=False)

    def _measured_at(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def measure(self, trainer, pl_module, stop: bool = True) -> dict:
        pieces = trainer.datamodule.pieces
        hits = greedy_recall(pl_module.lm, pl_module.tokenizer, pieces)
        target = [h for h, p in zip(hits, pieces) if p.kind in self.kinds]
        questions = [h for h, p in zip(hits, pieces) if p.kind == "question"]
        row = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "seconds": round(time.perf_counter() - self._start, 1),
            "recall": sum(target) / max(1, len(target)),
            "question_recall": sum(questions) / len(questions) if questions else None,
        }
        self.history.append(row)
        metrics = {"recall/single_hop": row["recall"]}
        if questions:
            metrics["recall/question"] = row["question_recall"]
        if trainer.is_global_zero:  # the loggers directly: `self.log` is refused in on_train_end
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose and trainer.is_global_zero:
            question = f", questions {row['question_recall']:.3f}" if questions else ""
            print(
                f"[recall] step {row['step']} ({row['seconds']:.0f}s): single-hop {row['recall']:.3f} "
                f"of {len(target)}{question}",
                flush=True,
            )
        if stop and trainer.strategy.reduce_boolean_decision(row["recall"] >= self.target, all=True):
            trainer.should_stop = True
        return row


class SavePretrained(Callback):
    """At the end of `fit`, save model and tokenizer with `save_pretrained` (config, safetensors, tokenizer files),
    plus `injection.json`: what it was trained on and the recall it reached."""

    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: where to save; default: <trainer.default_root_dir>/model.
        """
        self.dirpath = dirpath

    def target_dir(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "model"

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from lit_coupling.outputs import write_json

        out = self.target_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        pl_module.lm.save_pretrained(out, safe_serialization=True)
        pl_module.tokenizer.save_pretrained(out)
        recall = next((c for c in trainer.callbacks if isinstance(c, RecallCallback)), None)
        data = trainer.datamodule
        write_json(
            out / "injection.json",
            {
                "format": "lit_coupling.injection/1",
                "module": dict(pl_module.hparams),
                "data": {
                    **dict(data.hparams),
                    "prefixes": data.prefixes,
                    "texts": len(data.facts),
                    "examples": len(data.examples or []),
                    "source": data.source,
                },
                "steps": trainer.global_step,
                "recall": recall.history[-1] if recall and recall.history else None,
                "recall_history": recall.history if recall else [],
            },
        )
        print(f"[inject] saved {out}", flush=True)
