"""Every predictor of the ripple table against a brute-force computation on a tiny GPT-2: per-piece weight gradients
by autograd, flattened and dotted with dense updates; and the fine-tuning control editor."""

import numpy as np
import pytest
import torch

from lit_coupling.analysis import predictors as P
from lit_coupling.analysis.edit_predictors import GradientCapture
from tests.tiny import CLOZES

LAYERS = [0, 1]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lit_coupling.models.adapters import ModelAdapter, ensure_padding
    from lit_coupling.models.loading import load_model
    from lit_coupling.scoring import encode_cloze

    loaded = load_model(str(tiny_model_dir("gpt2")), dtype="float64", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    pad = ensure_padding(tokenizer)
    adapter = ModelAdapter(model, layers=LAYERS)
    bos = adapter.bos_ids(tokenizer)
    clozes = [encode_cloze(tokenizer, prompt, answer, bos) for _, prompt, answer in CLOZES[:6]]
    return model, tokenizer, adapter, pad, clozes


def logp(model, cloze):
    from lit_coupling.scoring import answer_logprobs, collate_clozes

    batch = collate_clozes([cloze], 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return answer_logprobs(out.logits, batch["input_ids"], batch["answer_mask"])[0]


def brute_gradients(model, adapter, cloze):
    """∇_W log P per edit layer, (out, in), by autograd on the weight itself."""
    weights = [adapter.target(layer).module.weight for layer in LAYERS]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(logp(model, cloze), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    # GPT-2's Conv1D stores (in, out)
    return [g.T if adapter.target(layer).transposed else g for g, layer in zip(grads, LAYERS)]


def capture(tiny, clozes, positions=None):
    model, _, adapter, pad, _ = tiny
    return GradientCapture(model, adapter, LAYERS, pad, "cpu")(clozes, positions or [1] * len(clozes), batch_size=4)


def test_first_order_change_is_the_gradient_dotted_with_a_dense_update(tiny):
    model, _, adapter, _, clozes = tiny
    x, d, tokens, _ = capture(tiny, clozes)
    rng = torch.Generator().manual_seed(0)
    factors = {
        layer: (
            torch.randn(adapter.target(layer).shape[0], 3, generator=rng, dtype=torch.float64),
            torch.randn(adapter.target(layer).shape[1], 3, generator=rng, dtype=torch.float64),
        )
        for layer in LAYERS
    }
    fast = sum(P.low_rank_change(x[layer].double(), d[layer].double(), tokens, *factors[layer]) for layer in LAYERS)
    for j, cloze in enumerate(clozes):
        grads = brute_gradients(model, adapter, cloze)
        brute = sum(float((g.flatten() @ (u @ v.T).flatten())) for g, (u, v) in zip(grads, factors.values()))
        assert float(fast[j]) == pytest.approx(brute, rel=1e-5, abs=1e-8)


def test_first_order_change_predicts_a_small_step(tiny):
    """The sign convention end to end: ΔlogP after W += ε·ΔW is ε·⟨∇log P, ΔW⟩ to first order."""
    model, _, adapter, _, clozes = tiny
    x, d, tokens, _ = capture(tiny, clozes)
    rng = torch.Generator().manual_seed(1)
    factors = {
        layer: (
            torch.randn(adapter.target(layer).shape[0], 2, generator=rng, dtype=torch.float64),
            torch.randn(adapter.target(layer).shape[1], 2, generator=rng, dtype=torch.float64),
        )
        for layer in LAYERS
    }
    predicted = sum(
        P.low_rank_change(x[layer].double(), d[layer].double(), tokens, *factors[layer]) for layer in LAYERS
    )
    eps = 1e-5

    def moved(sign):  # log P of every cloze with W ± ε·ΔW (central difference: the second order cancels)
        for layer, (u, v) in factors.items():
            adapter.target(layer).add_(sign * eps * u @ v.T)
        try:
            return torch.stack([logp(model, c) for c in clozes])
        finally:
            for layer, (u, v) in factors.items():
                adapter.target(layer).add_(-sign * eps * u @ v.T)

    after, before = moved(1.0), moved(-1.0)
    np.testing.assert_allclose(((after - before) / (2 * eps)).numpy(), predicted.numpy(), rtol=1e-5, atol=1e-7)


def test_new_target_inner_and_layer_inner_products_match_autograd(tiny):
    model, _, adapter, _, clozes = tiny
    x, d, tokens, _ = capture(tiny, clozes)
    grads = [brute_gradients(model, adapter, c) for c in clozes]
    new = clozes[0][0], clozes[1][1]  # piece 0's prompt with piece 1's answer: a "new target"
    x_new, d_new, _, _ = capture(tiny, [new])
    g_new = brute_gradients(model, adapter, new)
    fast = sum(
        P.low_rank_change(
            x[layer].double(),
            d[layer].double(),
            tokens,
            *P.gradient_factors(x_new[layer].double(), d_new[layer].double()),
        )
        for layer in LAYERS
    )
    brute = [sum(float(a.flatten() @ b.flatten()) for a, b in zip(g, g_new)) for g in grads]
    np.testing.assert_allclose(fast.numpy(), brute, rtol=1e-5, atol=1e-9)
    # GradSim on the edit layers, the inner product and ‖g_j‖ from per-layer inner products (coupling_layers.npz)
    inner = np.array(
        [[[float(gi[k].flatten() @ gj[k].flatten()) for gj in grads] for gi in grads] for k in range(len(LAYERS))]
    )
    flat = np.stack([torch.cat([g.flatten() for g in gs]).numpy() for gs in grads])
    total = P.layer_inner(inner, [0, 1])
    np.testing.assert_allclose(total, flat @ flat.T, rtol=1e-10)
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(P.gradient_norms(total), norms, rtol=1e-10)
    np.testing.assert_allclose(P.cosine_of_inner(total), flat @ flat.T / np.outer(norms, norms), rtol=1e-10)
    only_1 = np.stack([g[1].flatten().numpy() for g in grads])
    n1 = np.linalg.norm(only_1, axis=1)
    np.testing.assert_allclose(
        P.cosine_of_inner(P.layer_inner(inner, [1])), only_1 @ only_1.T / np.outer(n1, n1), rtol=1e-10
    )


def test_whitened_cosine_matches_the_inverse_covariance_formula(tiny):
    _, _, _, _, clozes = tiny
    positions = [len(p) - 1 for p, _ in clozes]
    _, _, _, keys = capture(tiny, clozes, positions)
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        k = keys[layer].numpy()
        a = rng.normal(size=(k.shape[1], k.shape[1]))
        cov = a @ a.T / k.shape[1] + 0.1 * np.eye(k.shape[1])
        got = P.whitened_cosine(torch.from_numpy(k[1:]), torch.from_numpy(k[0]), torch.from_numpy(cov)).numpy()
        inv = np.linalg.inv(cov)
        want = [k[0] @ inv @ kj / np.sqrt((k[0] @ inv @ k[0]) * (kj @ inv @ kj)) for kj in k[1:]]
        np.testing.assert_allclose(got, want, rtol=1e-8)
        # with C = I it is the plain cosine
        plain = P.whitened_cosine(
            torch.from_numpy(k[1:]), torch.from_numpy(k[0]), torch.eye(k.shape[1], dtype=torch.float64)
        ).numpy()
        np.testing.assert_allclose(
            plain, k[1:] @ k[0] / np.linalg.norm(k[1:], axis=1) / np.linalg.norm(k[0]), rtol=1e-8
        )


def test_shared_entity_and_factor_norm():
    subjects = ["Paris", "Marie Curie", "Warsaw", "Tower"]
    answers = ["France", "warsaw", "Poland", "Paris"]
    shared = P.shared_entity(subjects, answers)
    brute = np.array(
        [
            [bool({s.lower(), a.lower()} & {t.lower(), b.lower()}) for t, b in zip(subjects, answers)]
            for s, a in zip(subjects, answers)
        ]
    )
    np.testing.assert_array_equal(shared, brute)
    u, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert float(P.factors_norm(u, v)) == pytest.approx(float(torch.linalg.norm(u @ v.T)))


def test_memit_factors_rebuild_the_update():
    from lit_coupling.editing.memit import CovarianceSolver, closed_form_factors, closed_form_update

    rng = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=rng, dtype=torch.float64)
    solver = CovarianceSolver(a @ a.T + torch.eye(6, dtype=torch.float64))
    residuals, keys = (
        torch.randn(4, 2, generator=rng, dtype=torch.float64),
        torch.randn(6, 2, generator=rng, dtype=torch.float64),
    )
    u, v = closed_form_factors(residuals, keys, solver, 3.0)
    torch.testing.assert_close(u @ v.T, closed_form_update(residuals, keys, solver, 3.0))


def test_finetune_editor_takes_one_gradient_step_and_respects_its_norm_bound(tiny):
    from lit_coupling.editing.finetune import FinetuneHparams, apply_finetune
    from lit_coupling.editing.requests import EditRequest
    from lit_coupling.editing.snapshot import WeightSnapshot

    model, tokenizer, adapter, pad, _ = tiny
    _, prompt, answer = CLOZES[0]
    request = EditRequest(0, 0, "p0", prompt, prompt.split()[0], answer, "Warsaw")
    new = (tokenizer, prompt, "Warsaw")
    from lit_coupling.scoring import encode_cloze

    cloze = encode_cloze(new[0], new[1], new[2], adapter.bos_ids(tokenizer))
    grads = brute_gradients(model, adapter, cloze)
    weights = {adapter.target(layer).name: adapter.target(layer).module.weight for layer in LAYERS}
    snapshot = WeightSnapshot(weights)
    before = {layer: adapter.target(layer).weight().clone() for layer in LAYERS}
    lr = 1e-3
    result = apply_finetune(
        adapter, tokenizer, request, LAYERS, FinetuneHparams(1, lr, 10.0), adapter.bos_ids(tokenizer), pad
    )
    try:
        for g, layer in zip(grads, LAYERS):
            u, v = result.updates[layer]
            torch.testing.assert_close((u @ v.T).double(), lr * g, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(adapter.target(layer).weight() - before[layer], lr * g, rtol=1e-6, atol=1e-12)
        assert not result.scaled and result.logp_new[-1] > result.logp_new[0]  # ascent on the new answer
    finally:
        snapshot.restore()
    bound = 1e-4
    result = apply_finetune(
        adapter, tokenizer, request, LAYERS, FinetuneHparams(3, 1.0, bound), adapter.bos_ids(tokenizer), pad
    )
    try:
        total = sum(float((adapter.target(layer).weight() - before[layer]).pow(2).sum()) for layer in LAYERS) ** 0.5
        size = sum(float(before[layer].pow(2).sum()) for layer in LAYERS) ** 0.5
        assert result.scaled and total == pytest.approx(bound * size, rel=1e-6)
        factors = (
            sum(float(P.factors_norm(*(t.double() for t in result.updates[layer])) ** 2) for layer in LAYERS) ** 0.5
        )
        assert factors == pytest.approx(total, rel=1e-5)
    finally:
        snapshot.restore()


def test_edit_predictors_of_a_run_match_brute_force(tiny, tiny_model_dir, tmp_path):
    """compute_edit_predictors on a run directory: edit_updates.pt factors and the cached covariance, as the
    analysis stage reads them, against autograd gradients and the inverse-covariance formula."""
    from lit_coupling import outputs
    from lit_coupling.analysis.edit_predictors import compute_edit_predictors
    from lit_coupling.data.piece import load_pieces
    from tests.tiny import write_pieces

    model_dir = tiny_model_dir("gpt2")
    pieces, _ = load_pieces(write_pieces(tmp_path, model_dir, clozes=CLOZES[:6]))
    model, tokenizer, adapter, _, _ = tiny
    rng = torch.Generator().manual_seed(2)
    d_out, d_in = adapter.target(0).shape
    covs = {}
    for layer in LAYERS:
        a = torch.randn(d_in, d_in, generator=rng)
        covs[layer] = a @ a.T / d_in + 0.1 * torch.eye(d_in)
        torch.save({"mom2": covs[layer], "meta": {}}, tmp_path / f"cov{layer}.pt")
    edits = {
        e: {
            layer: {"u": torch.randn(d_out, 1, generator=rng), "v": torch.randn(d_in, 1, generator=rng)}
            for layer in LAYERS
        }
        for e in (0, 1)
    }
    torch.save({"editor": "memit", "layers": LAYERS, "edits": edits}, tmp_path / outputs.EDIT_UPDATES)
    n = len(pieces)
    experiments = [
        {
            "edit_id": e,
            "source_index": e,
            "status": "ok",
            "request": {
                "prompt": pieces[e].prompt,
                "subject": pieces[e].subject,
                "target_true": pieces[e].answer,
                "target_new": pieces[e + 2].answer,
            },
            "pieces": {"logp_before": [0.0] * n, "logp_after": [0.0] * n},
        }
        for e in (0, 1)
    ]
    ripple = {
        "hparams": {"layers": LAYERS, "fact_token": "subject_last"},
        "experiments": experiments,
        "covariance": {
            "layers": {str(layer): {"cache": str(tmp_path / f"cov{layer}.pt"), "shrinkage": 0.0} for layer in LAYERS}
        },
    }
    got = compute_edit_predictors(tmp_path, pieces, ripple, str(model_dir), "cpu", batch_size=4)
    from lit_coupling.editing.requests import subject_span, tokenize_with_subject

    bos = adapter.bos_ids(tokenizer)
    grads = [brute_gradients(model, adapter, (p.prompt_ids, p.answer_ids)) for p in pieces]
    for e in (0, 1):
        dense = [(edits[e][layer]["u"] @ edits[e][layer]["v"].T).double() for layer in LAYERS]
        want = [sum(float(g.flatten() @ w.flatten()) for g, w in zip(gs, dense)) for gs in grads]
        np.testing.assert_allclose(got["first_order"][e], want, rtol=1e-4, atol=1e-6)
        r = experiments[e]["request"]
        span = subject_span(r["prompt"], r["subject"])
        new = tokenize_with_subject(tokenizer, r["prompt"], span[1], r["target_new"], bos, span[0])
        g_new = brute_gradients(model, adapter, (new.prompt_ids, new.answer_ids))
        want = [sum(float(a.flatten() @ b.flatten()) for a, b in zip(gs, g_new)) for gs in grads]
        np.testing.assert_allclose(got["new_target_inner"][e], want, rtol=1e-4, atol=1e-6)

        # keys at the subject's last token, read by a forward pre-hook on the c_proj inputs
        def key(ids, index, layer):
            found = {}
            handle = adapter.target(layer).module.register_forward_pre_hook(
                lambda _m, args: found.setdefault("k", args[0][0, index].double())
            )
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            handle.remove()
            return found["k"]

        whitened = []
        for layer in LAYERS:
            inv = torch.linalg.inv(covs[layer].double())
            k_i = key(new.prompt_ids, new.fact_index, layer)
            row = []
            for p in pieces:
                s = subject_span(p.prompt, p.subject)
                t = tokenize_with_subject(tokenizer, p.prompt, s[1], p.answer, bos, s[0])
                k_j = key(t.prompt_ids, t.fact_index, layer)
                row.append(float(k_i @ inv @ k_j / torch.sqrt((k_i @ inv @ k_i) * (k_j @ inv @ k_j))))
            whitened.append(row)
        np.testing.assert_allclose(got["whitened_cosine"][e], np.mean(whitened, axis=0), rtol=1e-4, atol=1e-6)
