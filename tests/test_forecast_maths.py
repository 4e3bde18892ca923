"""The forecast of #19 against brute force on tiny random models (float64): every fact's full weight gradient of
log P and of the first-token margin, taken alone (no padding), in an inner product with an explicit dense ΔW; the
projected forecast against the explicit projection P_outᵀ G P_in of those full gradients; and the first order
against the real change under ε·ΔW as ε → 0."""

import pytest
import torch

from lit_coupling.editing.forecast import (
    exact_forecast,
    flip_score,
    load_or_build_cache,
    packed_gradient_factors,
    predicted_flip,
    project_update,
)
from lit_coupling.gradients.projection import kronecker_projection
from lit_coupling.models.adapters import ModelAdapter, bos_ids, ensure_padding
from lit_coupling.scoring import encode_cloze
from tests.tiny import CLOZES

LAYERS = [0, 1]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import save_tiny_model

    directory = save_tiny_model(tmp_path_factory.mktemp(f"forecast-{request.param}"), request.param, layers=3)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(directory)
    pad = ensure_padding(tok)
    bos = bos_ids(model.config, tok)
    clozes = [encode_cloze(tok, prompt, answer, bos) for _, prompt, answer in CLOZES]
    adapter = ModelAdapter(model, layers=LAYERS)
    gen = torch.Generator().manual_seed(1)
    updates = []
    for rank in (1, 3):  # one request, and a batch of three
        update = {}
        for layer in LAYERS:
            d_out, d_in = adapter.target(layer).shape
            update[layer] = (
                torch.randn(d_out, rank, generator=gen, dtype=torch.float64),
                torch.randn(d_in, rank, generator=gen, dtype=torch.float64) * 0.05,
            )
        updates.append(update)
    return dict(model=model, tok=tok, pad=pad, clozes=clozes, adapter=adapter, updates=updates)


def brute(model, adapter, prompt, answer, layer):
    """Full gradients (out, in) of log P(answer | prompt) and of the margin z_a − z_c (c: the top other token) for
    one layer's weight, from one unpadded sequence; also log P, the margin and c."""
    target = adapter.target(layer)
    weight = target.module.weight
    weight.requires_grad_(True)
    try:
        ids = torch.tensor([list(prompt) + list(answer)])
        logits = model(input_ids=ids).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        n = len(prompt)
        logp = sum(log_probs[t - 1, ids[0, t]] for t in range(n, ids.shape[1]))
        z = logits[n - 1]
        a = int(answer[0])
        others = z.detach().clone()
        others[a] = float("-inf")
        c = int(others.argmax())
        margin = z[a] - z[c]
        (g,) = torch.autograd.grad(logp, [weight], retain_graph=True)
        (gm,) = torch.autograd.grad(margin, [weight])
    finally:
        weight.requires_grad_(False)
    if target.transposed:
        g, gm = g.T, gm.T
    return g, gm, float(logp), float(margin), c


def test_exact_forecast_equals_full_gradient_inner_product(tiny):
    s = tiny
    forecast = exact_forecast(s["model"], s["adapter"], s["updates"], s["clozes"], s["pad"], batch_size=4)
    assert forecast.delta.shape == (2, len(LAYERS), len(s["clozes"]))
    for j, (prompt, answer) in enumerate(s["clozes"]):
        for li, layer in enumerate(LAYERS):
            g, gm, logp, margin, c = brute(s["model"], s["adapter"], prompt, answer, layer)
            assert forecast.logp[j].item() == pytest.approx(logp, rel=1e-9, abs=1e-9)
            assert forecast.margin[j].item() == pytest.approx(margin, rel=1e-9, abs=1e-9)
            assert int(forecast.competitor[j]) == c
            for e, update in enumerate(s["updates"]):
                u, v = update[layer]
                dense = u @ v.T  # explicit ΔW (out, in)
                want, want_m = (g * dense).sum().item(), (gm * dense).sum().item()
                assert abs(want) > 1e-8
                assert forecast.delta[e, li, j].item() == pytest.approx(want, rel=1e-8, abs=1e-10)
                assert forecast.margin_change[e, li, j].item() == pytest.approx(want_m, rel=1e-8, abs=1e-10)
            assert forecast.norm_sq[li, j].item() == pytest.approx((g * g).sum().item(), rel=1e-8)
        # the per-token terms add up to the per-layer values; the last answer token carries nothing
        for e in range(2):
            terms = forecast.terms_of(e, j)
            assert terms.shape == (len(prompt) + len(answer) - 1, len(LAYERS))
            assert torch.allclose(terms.sum(0), forecast.delta[e, :, j], rtol=1e-10, atol=1e-12)


def test_gradient_factors_give_gradsim_inner_products(tiny):
    """A cloze's own gradient as update factors: the forecast of it is ⟨g_i, g_j⟩ of the full gradients."""
    s = tiny
    factors = packed_gradient_factors(s["model"], s["adapter"], LAYERS, s["clozes"][:2], s["pad"])
    forecast = exact_forecast(s["model"], s["adapter"], factors, s["clozes"], s["pad"], batch_size=3)
    for i in range(2):
        for j in (0, 4, 7):
            for li, layer in enumerate(LAYERS):
                gi = brute(s["model"], s["adapter"], *s["clozes"][i], layer)[0]
                gj = brute(s["model"], s["adapter"], *s["clozes"][j], layer)[0]
                assert forecast.delta[i, li, j].item() == pytest.approx((gi * gj).sum().item(), rel=1e-8)


def test_first_order_is_the_limit_of_the_real_change(tiny):
    """(log P(W + εΔW) − log P(W)) / ε → the exact forecast as ε → 0, and the error shrinks like ε (ε ≥ 1e-3: the
    LLaMA rotary tables are float32 even in a float64 model, so smaller ε drowns in their rounding)."""
    s = tiny
    forecast = exact_forecast(s["model"], s["adapter"], s["updates"][:1], s["clozes"], s["pad"], batch_size=16)
    predicted = forecast.total()[0]
    errors = []
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            for layer, (u, v) in s["updates"][0].items():
                s["adapter"].target(layer).add_(eps * (u @ v.T))
        after = exact_forecast(s["model"], s["adapter"], s["updates"][:1], s["clozes"], s["pad"], 16).logp
        with torch.no_grad():
            for layer, (u, v) in s["updates"][0].items():
                s["adapter"].target(layer).add_(-eps * (u @ v.T))
        errors.append(((after - forecast.logp) / eps - predicted).abs().max().item())
    assert errors[1] < errors[0] / 4
    assert errors[1] < 1e-2 * predicted.abs().max().item()


def test_projected_forecast_equals_explicit_projection(tiny, tmp_path):
    s = tiny
    k_in, k_out = 8, 6
    cache, path, found = load_or_build_cache(
        tmp_path, "tiny", s["model"], s["adapter"], LAYERS, s["clozes"], s["pad"], k_in, k_out, seed=3, batch_size=4
    )
    assert not found and path.exists()
    again, _, found = load_or_build_cache(
        tmp_path, "tiny", s["model"], s["adapter"], LAYERS, s["clozes"], s["pad"], k_in, k_out, seed=3
    )
    assert found and torch.equal(again.g[LAYERS[0]], cache.g[LAYERS[0]])
    shapes = {layer: s["adapter"].target(layer).shape for layer in LAYERS}
    projections = cache.projections(shapes)
    for e, update in enumerate(s["updates"]):
        delta, margin = cache.forecast(update, projections)
        for j, (prompt, answer) in enumerate(s["clozes"]):
            for li, layer in enumerate(LAYERS):
                g, gm, *_ = brute(s["model"], s["adapter"], prompt, answer, layer)
                d_out, d_in = shapes[layer]
                p_in, p_out = kronecker_projection(d_in, d_out, k_in, k_out, 3, layer, dtype=torch.float64)
                u, v = update[layer]
                pg, pgm, pdw = p_out.T @ g @ p_in, p_out.T @ gm @ p_in, p_out.T @ (u @ v.T) @ p_in
                assert torch.allclose(cache.g[layer][j].double(), pg.flatten(), rtol=1e-6, atol=1e-9)
                assert torch.allclose(project_update(u, v, p_in, p_out), pdw.flatten(), rtol=1e-10, atol=1e-12)
                assert delta[li, j].item() == pytest.approx((pg * pdw).sum().item(), rel=1e-6, abs=1e-9)
                assert margin[li, j].item() == pytest.approx((pgm * pdw).sum().item(), rel=1e-6, abs=1e-9)


def test_projection_is_unbiased_and_exact_at_full_k(tiny, tmp_path):
    """k ≥ the layer's dimensions: the identity projection, so the projected forecast is the exact one."""
    s = tiny
    d_out, d_in = s["adapter"].target(0).shape
    cache, *_ = load_or_build_cache(
        tmp_path, "tiny", s["model"], s["adapter"], LAYERS, s["clozes"], s["pad"], max(d_in, 256), max(d_out, 256)
    )
    exact = exact_forecast(s["model"], s["adapter"], s["updates"], s["clozes"], s["pad"])
    projections = cache.projections({layer: s["adapter"].target(layer).shape for layer in LAYERS})
    for e, update in enumerate(s["updates"]):
        delta, margin = cache.forecast(update, projections)
        assert torch.allclose(delta, exact.delta[e], rtol=1e-6, atol=1e-9)
        assert torch.allclose(margin, exact.margin_change[e], rtol=1e-6, atol=1e-9)


def test_flip_prediction():
    margin = torch.tensor([2.0, 2.0, -1.0, -1.0, 0.5])
    change = torch.tensor([-3.0, -1.0, 2.0, 0.5, 0.0])
    assert predicted_flip(margin, change).tolist() == [True, False, True, False, False]
    assert flip_score(margin, change).tolist() == [1.0, -1.0, 1.0, -0.5, -0.5]


def test_a_restricted_cache_is_a_smaller_projection(tiny, tmp_path):
    """The leading block of a k = 8×6 cache, rescaled, is the forecast under the cut and rescaled projections."""
    s = tiny
    cache, *_ = load_or_build_cache(
        tmp_path, "tiny", s["model"], s["adapter"], LAYERS, s["clozes"], s["pad"], 8, 6, seed=5
    )
    small = cache.restricted(4, 3)
    shapes = {layer: s["adapter"].target(layer).shape for layer in LAYERS}
    projections = small.projections(shapes)
    delta, _ = small.forecast(s["updates"][1], projections)
    for li, layer in enumerate(LAYERS):
        d_out, d_in = shapes[layer]
        p_in, p_out = kronecker_projection(d_in, d_out, 8, 6, 5, layer, dtype=torch.float64)
        p_in, p_out = p_in[:, :4] * 2**0.5, p_out[:, :3] * 2**0.5
        assert torch.allclose(projections[layer][0], p_in) and torch.allclose(projections[layer][1], p_out)
        u, v = s["updates"][1][layer]
        for j in (0, 5):
            g = brute(s["model"], s["adapter"], *s["clozes"][j], layer)[0]
            want = ((p_out.T @ g @ p_in) * (p_out.T @ (u @ v.T) @ p_in)).sum().item()
            assert delta[li, j].item() == pytest.approx(want, rel=1e-6, abs=1e-9)
