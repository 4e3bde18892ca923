"""Synthetic but valid run directories in the documented formats (docs/outputs.md), for the analysis tests.

GradSim comes from random "gradients" that share a direction within a chain (so the matrix is a real cosine
matrix, and per-layer inner products add up to it); the ripple of edit i on piece j is planted as
|ΔlogP_j| = scale · exp(effect · |GradSim(i, j)| + edit effect + noise), with GradSim's sign. The analysis code
never sees `effect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KINDS = ("hop1", "hop2", "question")


def write_synthetic_run(
    directory: Path,
    *,
    effect: float = 3.0,
    n_chains: int = 10,
    n_edits: int = 12,
    n_layers: int = 3,
    width: int = 48,
    family: str = "gpt2",
    seed: int = 0,
    edit_spread: float = 0.3,
    noise: float = 0.5,
    countries: int = 3,
) -> Path:
    """`countries`: the final answers (hop 2, question) name one of this many shared entities, so facts of
    different chains are related too (a shared entity), as countries are in the default world."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = {
        "name": f"tiny-{family}",
        "family": family,
        "model_type": family,
        "parameters": 1_234_567,
        "num_layers": n_layers,
        "layers": list(range(n_layers)),
        "dtype": "float32",
    }

    pieces, chain_of = [], []
    vocab = np.arange(5, 300)
    for c in range(n_chains):
        bridge = [int(t) for t in rng.choice(vocab, 2)]  # hop 1's answer, inside hop 2's prompt
        final = [int(t) for t in rng.choice(vocab, 2)]
        ids = {
            "hop1": ([0, *rng.choice(vocab, 5).tolist()], bridge),
            "hop2": ([0, *bridge, *rng.choice(vocab, 3).tolist()], final),
            "question": ([0, *rng.choice(vocab, 6).tolist()], final),
        }
        for hop, kind in enumerate(KINDS, start=1):
            prompt_ids, answer_ids = ids[kind]
            pieces.append(
                {
                    "id": f"c{c}/{kind}",
                    "hotpot_id": f"c{c}",
                    "chain_id": f"c{c}",
                    "kind": kind,
                    "hop": 0 if kind == "question" else hop,
                    "prompt": f"prompt {c} {kind}",
                    "answer": f"answer {c} {kind}" if kind == "hop1" else f"country {c % countries}",
                    "subject": f"subject {c}",
                    "record_type": "bridge",
                    "links": [f"c{c}/{k}" for k in KINDS if k != kind],
                    "prompt_ids": [int(t) for t in prompt_ids],
                    "answer_ids": answer_ids,
                }
            )
            chain_of.append(c)
    n = len(pieces)
    chain_of = np.array(chain_of)
    _write_json(
        directory / "knowledge_pieces.json",
        {
            "format": "lit_coupling.knowledge_pieces/1",
            "model": model,
            "tokenizer": {"name_or_path": "synthetic", "pad_id": 1, "bos_ids": [0]},
            "source": {"path": "synthetic", "kind": "synthetic-world", "records_read": n_chains + 2},
            "seed": seed,
            "counts": {
                "records": n_chains + 2,
                "records_with_pieces": n_chains,
                "pieces": n,
                "by_kind": {k: n_chains for k in KINDS},
            },
            "skipped": {"answer span not found in the hop-2 sentence": 2},
            "pieces": pieces,
        },
    )

    # Gradients per layer: a chain direction plus a piece's own part, so same-chain GradSim is high.
    chain_directions = rng.normal(size=(n_layers, n_chains, width))
    grads = np.stack(
        [
            chain_directions[layer][chain_of] * rng.uniform(0.3, 1.5, size=(n, 1)) + rng.normal(size=(n, width))
            for layer in range(n_layers)
        ]
    )
    inner = np.einsum("lid,ljd->lij", grads, grads)
    total = inner.sum(0)
    coupling = total / np.sqrt(np.outer(np.diag(total), np.diag(total)))
    np.save(directory / "coupling_matrix.npy", coupling.astype(np.float32))
    np.savez(directory / "coupling_layers.npz", inner=inner, layers=np.arange(n_layers))
    hidden = rng.normal(size=(n_chains, 16))[chain_of] + rng.normal(size=(n, 16))
    np.save(directory / "piece_hidden.npy", hidden.astype(np.float32))
    _write_json(
        directory / "coupling_analysis.json",
        {
            "model": model,
            "method": {"mode": "exact", "accumulation_dtype": "float64"},
            "summary": {"mean_offdiagonal": float(coupling[~np.eye(n, dtype=bool)].mean())},
            "zero_gradient_pieces": [],
        },
    )

    logp_before = rng.uniform(-3.0, -0.05, size=n)
    experiments = []
    for e, i in enumerate(rng.choice(n, size=n_edits, replace=False)):
        # Magnitude with magnitude, sign with sign: |ΔlogP_j| grows with |GradSim(i, j)|, and ΔlogP_j takes
        # GradSim's sign (issue 13's conventions; the analysis is told neither).
        size = np.exp(effect * np.abs(coupling[i]) + rng.normal(0, edit_spread) + rng.normal(0, noise, size=n))
        sign = np.where(coupling[i] >= 0, 1.0, -1.0) if effect else rng.choice([-1.0, 1.0], size=n)
        delta = 0.05 * size * sign
        delta[i] = -rng.uniform(4, 8)  # the edit itself: its true answer falls
        after = logp_before + delta
        em_before, em_after = logp_before > np.log(0.5), after > np.log(0.5)
        experiments.append(
            {
                "edit_id": e,
                "source_index": int(i),
                "source_piece": pieces[i]["id"],
                "request": {
                    "prompt": pieces[i]["prompt"],
                    "subject": pieces[i]["subject"],
                    "target_true": pieces[i]["answer"],
                    "target_new": "something else",
                },
                "status": "ok",
                "error": None,
                "time_s": 0.1,
                "efficacy": {
                    "logp_true_before": float(logp_before[i]),
                    "logp_true_after": float(after[i]),
                    "success": bool(e % 5 != 4),
                    "generated_success": bool(e % 5 != 4),
                },
                "pieces": {
                    "logp_before": logp_before.tolist(),
                    "logp_after": after.tolist(),
                    "tf_em_before": em_before.tolist(),
                    "tf_em_after": em_after.tolist(),
                    "gen_em_before": em_before.tolist(),
                    "gen_em_after": (em_after & (size < 30)).tolist(),
                },
            }
        )
    experiments.append(
        {
            "edit_id": n_edits,
            "source_index": 0,
            "source_piece": pieces[0]["id"],
            "status": "failed",
            "error": "target optimisation diverged",
            "pieces": None,
        }
    )
    _write_json(
        directory / "ripple_experiments.json",
        {
            "format": "lit_coupling.ripple_experiments/1",
            "model": model,
            "seed": seed,
            "hparams": {
                "layers": [0, 1],
                "v_lr": 0.5,
                "v_num_grad_steps": 20,
                "clamp_norm_factor": 0.75,
                "kl_factor": 0.0625,
                "mom2_update_weight": 20000,
            },
            "covariance": {"corpus": "synthetic", "tokens": 1000},
            "piece_ids": [p["id"] for p in pieces],
            "experiments": experiments,
        },
    )
    return directory


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))


def planted_pairs(seed: int, *, rho: float, n_edits: int = 20, per_edit: int = 30, edit_spread: float = 0.5):
    """Pairs whose pooled (x, log y) is bivariate normal with correlation `rho`, with edit-level effects in
    both x and y (so pairs of one edit are dependent). Returns x, y = exp(...) > 0, edit ids."""
    rng = np.random.default_rng(seed)
    edits = np.repeat(np.arange(n_edits), per_edit)
    # x = edit shift + own part; y = rho·x + edit shift + own part, variances chosen so var x = var y = 1.
    x = np.sqrt(edit_spread) * rng.normal(size=n_edits)[edits] + np.sqrt(1 - edit_spread) * rng.normal(size=len(edits))
    rest = 1 - rho**2
    y = (
        rho * x
        + np.sqrt(rest * edit_spread) * rng.normal(size=n_edits)[edits]
        + np.sqrt(rest * (1 - edit_spread)) * rng.normal(size=len(edits))
    )
    return x, y, edits
