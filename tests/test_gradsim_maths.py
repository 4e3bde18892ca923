"""The GradSim maths on small tensors: ghost and GEMM inner products, projection, cosines, blockwise reduction."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_coupling.gradients.cosine import (
    NonFiniteGradient,
    cosine_from_inner,
    gradsim_over_layers,
    load_layer_inner,
    summarise,
)
from lit_coupling.gradients.inner import choose_method, gemm_inner, ghost_inner, piece_gradients
from lit_coupling.gradients.options import GradSimOptions
from lit_coupling.gradients.projection import kronecker_projection, project_gradients
from lit_coupling.gradients.reduce import ReduceSettings, layer_gram, reduce_gradsim, reduce_shards
from lit_coupling.gradients.shards import ShardSet, ShardWriter


def packed(tokens, d_in=12, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = int(sum(tokens))
    return (
        torch.randn(rows, d_in, generator=g, dtype=torch.float64),
        torch.randn(rows, d_out, generator=g, dtype=torch.float64),
        torch.tensor(tokens),
    )


def explicit_gradients(x, d, tokens):
    out, start = [], 0
    for t in tokens.tolist():
        out.append(sum(torch.outer(d[s], x[s]) for s in range(start, start + t)))
        start += t
    return torch.stack(out)


def test_ghost_and_gemm_match_explicit_gradients():
    x_a, d_a, t_a = packed([3, 1, 5])
    x_b, d_b, t_b = packed([2, 4], seed=1)
    g_a, g_b = explicit_gradients(x_a, d_a, t_a), explicit_gradients(x_b, d_b, t_b)
    want = torch.einsum("iok,jok->ij", g_a, g_b)
    assert torch.allclose(ghost_inner(x_a, d_a, t_a, x_b, d_b, t_b), want, atol=1e-12, rtol=0)
    assert torch.allclose(piece_gradients(x_a, d_a, t_a), g_a, atol=1e-12, rtol=0)
    assert torch.allclose(
        gemm_inner(piece_gradients(x_a, d_a, t_a), piece_gradients(x_b, d_b, t_b)), want, atol=1e-12, rtol=0
    )


def test_cost_model_prefers_ghost_for_short_prompts_and_gemm_for_long_ones():
    # GPT-2 small c_proj: 3072 → 768, crossover T* ≈ sqrt(3072·768/3840) ≈ 25
    assert choose_method([10] * 256, 3072, 768, pieces_per_block=64) == "ghost"
    assert choose_method([200] * 256, 3072, 768, pieces_per_block=64) == "gemm"


def test_projection_is_seeded_identity_when_wide_and_unbiased():
    p1 = kronecker_projection(12, 5, 4, 3, seed=7, layer=2)
    p2 = kronecker_projection(12, 5, 4, 3, seed=7, layer=2)
    p3 = kronecker_projection(12, 5, 4, 3, seed=7, layer=3)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2)) and not torch.equal(p1[0], p3[0])
    assert p1[0].shape == (12, 4) and p1[1].shape == (5, 3)
    # k ≥ dim: the identity, so the projected inner products are the exact ones
    x, d, _ = packed([4, 4])
    mask = torch.ones(2, 4, dtype=torch.bool)
    p_in, p_out = kronecker_projection(12, 5, 64, 64, seed=0, layer=0, dtype=torch.float64)
    g = project_gradients(x.view(2, 4, 12), d.view(2, 4, 5), mask, p_in, p_out)
    exact = ghost_inner(x, d, torch.tensor([4, 4]), x, d, torch.tensor([4, 4]))
    assert torch.allclose(g @ g.T, exact, atol=1e-12)
    # unbiased: the average over many seeds approaches the exact inner products
    estimates = []
    for seed in range(400):
        p_in, p_out = kronecker_projection(12, 5, 3, 2, seed=seed, layer=0, dtype=torch.float64)
        g = project_gradients(x.view(2, 4, 12), d.view(2, 4, 5), mask, p_in, p_out)
        estimates.append(g @ g.T)
    mean, spread = torch.stack(estimates).mean(0), torch.stack(estimates).std(0) / 20
    assert ((mean - exact).abs() < 4 * spread).all()


def test_projection_masks_padding():
    x, d, _ = packed([6])
    x, d = x.view(1, 6, 12), d.view(1, 6, 5)
    p_in, p_out = kronecker_projection(12, 5, 4, 3, seed=0, layer=0, dtype=torch.float64)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    garbage = d.clone()
    garbage[:, 4:] = 1e6
    assert torch.allclose(
        project_gradients(x, garbage, mask, p_in, p_out),
        project_gradients(x[:, :4], d[:, :4], mask[:, :4], p_in, p_out),
    )


def test_zero_gradients_are_flagged_never_nan():
    g = np.array([[1.0, 2.0], [0.0, 0.0], [2.0, -1.0]])
    cos, zero = cosine_from_inner(g @ g.T)
    assert zero.tolist() == [False, True, False]
    assert np.isfinite(cos).all() and (cos[1] == 0).all() and (cos[:, 1] == 0).all()
    assert cos[0, 0] == 1.0 and abs(cos[0, 2]) < 1e-15
    with pytest.raises(NonFiniteGradient, match="non-finite"):
        cosine_from_inner(np.array([[np.inf, 0.0], [0.0, 1.0]]))


def test_layer_subsets_use_the_concatenated_gradient(tmp_path):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(3, 6, 10)) * np.array([1.0, 5.0, 0.1])[:, None, None]  # layers of different scales
    inner = np.einsum("lik,ljk->lij", grads, grads)
    layers = np.array([2, 4, 7])
    cos, _ = gradsim_over_layers(inner, layers, [2, 7])
    concat = np.concatenate([grads[0], grads[2]], axis=1)
    norms = np.linalg.norm(concat, axis=1)
    assert np.allclose(cos, concat @ concat.T / np.outer(norms, norms), atol=1e-12)
    np.savez(tmp_path / "coupling_layers.npz", inner=inner, layers=layers)
    loaded, loaded_layers = load_layer_inner(tmp_path)
    assert np.array_equal(loaded, inner) and loaded_layers.tolist() == [2, 4, 7]
    with pytest.raises(Exception, match="not part of the GradSim run"):
        gradsim_over_layers(inner, layers, [3])


def test_summary_statistics_over_pairs():
    cos = np.array([[1.0, 0.5, -0.1], [0.5, 1.0, 0.3], [-0.1, 0.3, 1.0]])
    s = summarise(cos, np.zeros(3, bool), chain_ids=["a", "a", "b"])
    assert s["pairs"] == 3 and abs(s["mean"] - 0.7 / 3) < 1e-12 and s["max"] == 0.5 and s["min"] == -0.1
    assert s["same_chain"] == {"pairs": 1, "mean": 0.5} and abs(s["other_chain"]["mean"] - 0.1) < 1e-12


def write_fake_shards(shard_dir, tokens, assignment, layers=(0, 3), d_in=12, d_out=5, seed=0):
    """Shards of `len(tokens)` pieces split over ranks by `assignment` (a rank per piece), as GradSimWriter would."""
    x, d, t = packed(tokens, d_in, d_out, seed)
    offsets = np.concatenate([[0], np.cumsum(tokens)])
    world = max(assignment) + 1
    for rank in range(world):
        writer = ShardWriter(shard_dir, rank, world, "token")
        for i in [i for i, r in enumerate(assignment) if r == rank]:
            rows = slice(offsets[i], offsets[i + 1])
            writer.append(
                {
                    "index": torch.tensor([i]),
                    "tokens": t[i : i + 1],
                    "logp": torch.tensor([-float(i)]),
                    "hidden": torch.full((1, 4), float(i)),
                    "x": [x[rows] * (li + 1) for li in range(len(layers))],
                    "d": [d[rows] for _ in layers],
                },
                list(layers),
            )
        writer.close(list(layers), 4)
    return x, d, t


@pytest.mark.parametrize("method", ["ghost", "gemm"])
def test_blockwise_reduction_over_ranks_matches_one_block(tmp_path, method):
    tokens = [3, 1, 5, 2, 4, 2, 6, 1, 3]
    assignment = [0, 1, 0, 1, 0, 1, 0, 1, 0]  # DDP's interleaved split; rank 1 ends up with fewer pieces
    x, d, t = write_fake_shards(tmp_path / "shards", tokens, assignment)
    shards = ShardSet(tmp_path / "shards", 2, "token")
    g = explicit_gradients(x, d, t)
    want = torch.einsum("iok,jok->ij", g, g).numpy()
    # a budget of a few hundred bytes forces many big blocks, row blocks and column chunks
    tiny = ReduceSettings(
        GradSimOptions(exact_method=method, reduce_memory_gb=600 / 2**30), block_tokens=4, column_tokens=5
    )
    got, how = layer_gram(shards, 0, tiny, torch.float64)
    order = np.argsort(shards.index)
    assert how["method"] == method
    assert np.allclose(got[np.ix_(order, order)], want, atol=1e-12, rtol=0)
    doc = reduce_shards(
        shards, tmp_path, len(tokens), tiny, torch.float64, {"model": {}, "method": {}}, chain_ids=list("aabbccdde")
    )
    inner = np.load(tmp_path / "coupling_layers.npz")["inner"]
    assert np.allclose(inner[0], want, atol=1e-12) and np.allclose(inner[1], 4 * want, atol=1e-11)
    cos = np.load(tmp_path / "coupling_matrix.npy")
    norms = np.sqrt(np.diag(5 * want))
    assert np.allclose(cos, 5 * want / np.outer(norms, norms), atol=1e-12)
    assert np.load(tmp_path / "piece_hidden.npy")[:, 0].tolist() == list(range(len(tokens)))
    assert np.load(tmp_path / "coupling_layers.npz")["logp"].tolist() == [-float(i) for i in range(len(tokens))]
    assert abs(doc["per_layer"]["0"]["gradient_norm_share"] - 0.2) < 1e-9


@pytest.mark.parametrize("method,keep", [("ghost", False), ("gemm", True), ("auto", False)])
def test_reduce_gradsim_gives_the_cosines_of_the_explicit_gradients(tmp_path, method, keep):
    """The N×N reduction the gradsim stage calls after the predict job, on its own: random X and D split over three
    ranks, against cosines of the explicit per-piece gradients summed over both layers (float64)."""
    from types import SimpleNamespace

    tokens = [2, 4, 1, 3, 5, 2, 1]
    x, d, t = write_fake_shards(tmp_path / "shards", tokens, [0, 1, 2, 0, 1, 2, 0], seed=7)
    g = explicit_gradients(x, d, t)
    layer_inner = torch.einsum("iok,jok->ij", g, g)
    total = layer_inner + 4 * layer_inner  # layer 3's shards hold 2·X: four times layer 0's inner products
    want = (total / torch.outer(total.diagonal().sqrt(), total.diagonal().sqrt())).numpy()
    pieces = [SimpleNamespace(id=f"p{i}", chain_id="ab"[i % 2]) for i in range(len(tokens))]
    settings = ReduceSettings(
        GradSimOptions(exact_method=method, keep_shards=keep, progress=False), block_tokens=3, column_tokens=4
    )
    analysis, files = reduce_gradsim(
        ShardSet(tmp_path / "shards", 3, "token"),
        tmp_path,
        settings,
        torch.float64,
        {"model": {}, "method": {"mode": "exact"}},
        pieces,
    )
    assert np.allclose(np.load(tmp_path / "coupling_matrix.npy"), want, atol=1e-12, rtol=0)
    assert sorted(Path(f).name for f in files) == sorted(
        ["coupling_matrix.npy", "coupling_layers.npz", "piece_hidden.npy", "coupling_analysis.json"]
    )
    assert all(Path(f).exists() for f in files)
    assert analysis["pieces"]["count"] == len(tokens) and analysis["zero_gradient_pieces"] == []
    off = ~np.eye(len(tokens), dtype=bool)
    assert analysis["summary"]["mean"] == pytest.approx(want[off].mean(), abs=1e-12)
    assert (tmp_path / "shards").exists() == keep


def test_reduction_refuses_missing_pieces(tmp_path):
    write_fake_shards(tmp_path / "shards", [2, 2, 2], [0, 0, 0])
    with pytest.raises(RuntimeError, match="3 predictions for 4 pieces"):
        reduce_shards(ShardSet(tmp_path / "shards", 1, "token"), tmp_path, 4, ReduceSettings(), torch.float64, {})
    with pytest.raises(RuntimeError, match="another run"):
        ShardSet(tmp_path / "shards", 1, "other-token")
