"""GradientModule + GradSimWriter on tiny GPT-2 (Conv1D) and LLaMA models against brute-force per-piece autograd."""

import functools
import json

import numpy as np
import pytest
import torch

from lit_coupling.data.datamodule import PiecesDataModule
from lit_coupling.data.piece import load_pieces
from lit_coupling.gradients.module import GradientModule
from lit_coupling.gradients.options import GradSimOptions
from lit_coupling.gradients.reduce import reduce_predict_job
from lit_coupling.gradients.writer import GradSimWriter
from lit_coupling.models.adapters import ModelAdapter
from lit_coupling.models.loading import load_model
from lit_coupling.models.options import ModelOptions
from lit_coupling.scoring import answer_logprobs, collate_clozes, forward_logits, score_batch
from lit_coupling.trainer import build_trainer
from tests.tiny import save_tiny_model, write_pieces


def gradsim(run_dir, model_dir, batch_size=3, writer_kwargs=None, logger=False, sort_by_length=True, **module_kwargs):
    """One predict job in this process, then the reduction, as the gradsim stage runs them; returns (coupling matrix,
    coupling_analysis.json). `module_kwargs` are ModelOptions and GradSimOptions fields."""
    model = {k: module_kwargs.pop(k) for k in list(module_kwargs) if k in ModelOptions.__dataclass_fields__}
    module = GradientModule(ModelOptions(model_path=str(model_dir), **model), GradSimOptions(**module_kwargs))
    writer = GradSimWriter(**{"output_dir": str(run_dir), **(writer_kwargs or {})})
    trainer = build_trainer(device="cpu", callbacks=[writer], enable_progress_bar=False, logger=logger)
    data = PiecesDataModule(str(run_dir), batch_size=batch_size, sort_by_length=sort_by_length)
    trainer.predict(module, datamodule=data, return_predictions=False)
    reduce_predict_job(trainer, module, writer, data.pieces)
    return np.load(run_dir / "coupling_matrix.npy"), json.loads((run_dir / "coupling_analysis.json").read_text())


@functools.cache
def brute_force(run_dir, model_dir, layers=None):
    """Per-piece gradients by autograd on the weights, float64, one piece at a time: (cosine matrix, gradients).
    Cached: the same run is asked for more than once, and nothing changes the arrays."""
    pieces, meta = load_pieces(run_dir)
    lm = load_model(str(model_dir), dtype="float64", device="cpu").model
    adapter = ModelAdapter(lm, layers=layers)
    weights = [adapter.targets[layer].module.weight for layer in adapter.layers]
    lm.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    grads = []
    for p in pieces:
        batch = collate_clozes([(p.prompt_ids, p.answer_ids)], meta["tokenizer"]["pad_id"])
        logp = answer_logprobs(forward_logits(lm, batch), batch["input_ids"], batch["answer_mask"]).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, weights)]))
    g = torch.stack(grads)
    norms = g.norm(dim=1)
    return (g @ g.T / torch.outer(norms, norms)).numpy(), g


@pytest.fixture(scope="module")
def truth(tiny_model_dir, tmp_path_factory):
    """family → (model dir, run dir with knowledge_pieces.json, brute-force float64 cosines)."""
    cache = {}

    def get(family):
        if family not in cache:
            model_dir = tiny_model_dir(family)
            run = tmp_path_factory.mktemp(f"pieces-{family}")
            write_pieces(run, model_dir)
            cache[family] = (model_dir, run, brute_force(run, model_dir)[0])
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "dtype,method,tolerance", [("float64", "ghost", 1e-10), ("float64", "gemm", 1e-10), ("float32", "auto", 1e-5)]
)
def test_exact_gradsim_matches_brute_force_autograd(truth, family, dtype, method, tolerance):
    model_dir, run, want = truth(family)
    got, analysis = gradsim(run, model_dir, dtype=dtype, exact_method=method)
    assert got.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert np.abs(got - want).max() <= tolerance
    assert analysis["model"]["family"] == family and analysis["model"]["dtype"] == dtype
    assert analysis["method"]["mode"] == "exact" and not analysis["zero_gradient_pieces"]
    if method != "auto":
        assert {v["method"] for v in analysis["per_layer"].values()} == {method}
    if method == "ghost":  # the batch mates, padding, batch size and order (file, not length) change nothing
        again, _ = gradsim(run, model_dir, batch_size=7, dtype=dtype, exact_method=method, sort_by_length=False)
        assert np.abs(again - want).max() <= tolerance


def test_batches_are_drawn_by_length_and_carry_their_piece_positions(truth):
    _, run, _ = truth("gpt2")
    data = PiecesDataModule(str(run), batch_size=4)
    batches = list(data.predict_dataloader())
    index = torch.cat([b["index"] for b in batches]).tolist()
    lengths = torch.cat([b["lengths"] for b in batches])
    assert sorted(index) == list(range(len(data.pieces))) and index != sorted(index)
    assert bool((lengths[1:] >= lengths[:-1]).all())
    for b in batches:
        for row, i in enumerate(b["index"].tolist()):
            piece = data.pieces[i]
            assert b["input_ids"][row, : int(b["lengths"][row])].tolist() == piece.prompt_ids + piece.answer_ids


def test_outputs_per_layer_hidden_states_and_layer_subsets(truth):
    model_dir, run, _ = truth("gpt2")
    got, analysis = gradsim(run, model_dir, dtype="float64", layers="1")
    want, g = brute_force(run, model_dir, layers="1")
    assert np.abs(got - want).max() < 1e-10 and analysis["model"]["layers"] == [1]
    # all layers: per-layer inner products add up to the Gram matrix of the concatenated gradient
    gradsim(run, model_dir, dtype="float64")
    _, g_all = brute_force(run, model_dir)
    layers = np.load(run / "coupling_layers.npz")
    assert layers["inner"].shape == (2, 10, 10) and layers["layers"].tolist() == [0, 1]
    assert np.abs(layers["inner"][1] - (g @ g.T).numpy()).max() < 1e-10
    assert np.abs(layers["inner"].sum(0) - (g_all @ g_all.T).numpy()).max() < 1e-10
    # piece_hidden: final hidden state (after the final norm) at the last prompt token
    pieces, meta = load_pieces(run)
    lm = load_model(str(model_dir), dtype="float64", device="cpu").model
    hidden = np.load(run / "piece_hidden.npy")
    for i in (0, 5):
        ids = torch.tensor([pieces[i].prompt_ids + pieces[i].answer_ids])
        with torch.no_grad():
            h = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, len(pieces[i].prompt_ids) - 1]
        assert np.abs(hidden[i] - h.numpy()).max() < 1e-10
    batch = collate_clozes([(p.prompt_ids, p.answer_ids) for p in pieces], meta["tokenizer"]["pad_id"])
    assert np.abs(layers["logp"] - score_batch(lm, batch)["logp"].numpy()).max() < 1e-10
    assert not (run / "gradsim_shards").exists()  # removed after the reduction
    s = analysis["summary"]
    assert s["pairs"] == 45 and "same_chain" in s and s["same_chain"]["pairs"] == 5


def test_projected_error_shrinks_as_k_grows_and_full_rank_is_exact(truth):
    model_dir, run, want = truth("gpt2")  # c_proj is 128 → 32
    off = ~np.eye(len(want), dtype=bool)
    errors = []
    for k_in, k_out in [(2, 2), (8, 8), (32, 16)]:
        seed_errors = []
        for seed in range(3):
            got, analysis = gradsim(
                run, model_dir, dtype="float64", mode="projected", k_in=k_in, k_out=k_out, projection_seed=seed
            )
            seed_errors.append(np.abs(got - want)[off].mean())
        errors.append(np.mean(seed_errors))
    assert errors[0] > errors[1] > errors[2], errors
    assert analysis["method"]["k_in"] == 32 and analysis["method"]["projection_seed"] == 2
    got, analysis = gradsim(run, model_dir, dtype="float64", mode="projected", k_in=128, k_out=32)
    assert np.abs(got - want).max() < 1e-10  # k ≥ the layer's dims: the identity
    assert analysis["method"]["effective_dims"] == {"0": [32, 128], "1": [32, 128]}


def test_summary_numbers_go_to_the_loggers(truth):
    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):
        name, version = "recorder", 0
        metrics: dict = {}

        def log_metrics(self, metrics, step=None):
            self.metrics.update(metrics)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    model_dir, run, _ = truth("gpt2")
    recorder = Recorder()
    _, analysis = gradsim(run, model_dir, dtype="float32", logger=recorder)
    assert recorder.metrics["gradsim/mean"] == pytest.approx(analysis["summary"]["mean"])
    assert recorder.metrics["gradsim/zero_gradient_pieces"] == 0 and "gradsim/reduce_s" in recorder.metrics


def test_zero_gradients_are_flagged_end_to_end(tmp_path):
    """An MLP whose input projection is zero feeds X = gelu(0) = 0 to c_proj: every gradient there is zero."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "model", "gpt2")
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        lm.transformer.h[1].mlp.c_fc.weight.zero_()
        lm.transformer.h[1].mlp.c_fc.bias.zero_()
    lm.save_pretrained(model_dir)
    write_pieces(tmp_path, model_dir, repeat=1)
    got, analysis = gradsim(tmp_path, model_dir, dtype="float32", layers="1")
    assert np.isfinite(got).all() and (got == 0).all()
    assert len(analysis["zero_gradient_pieces"]) == 10 and analysis["summary"]["pieces_with_gradient"] == 0


def test_pieces_of_another_tokenizer_are_refused(truth, tmp_path):
    model_dir, run, _ = truth("gpt2")
    doc = json.loads((run / "knowledge_pieces.json").read_text())
    doc["pieces"][0]["answer_ids"] = [10_000]
    (tmp_path / "knowledge_pieces.json").write_text(json.dumps(doc))
    with pytest.raises(Exception, match="tokenised for another model"):
        gradsim(tmp_path, model_dir, dtype="float32")


def test_bfloat16_weights_accumulate_in_float32(truth):
    """The bf16 path (a GPU's default) on CPU: shards keep bf16 bits, inner products are accumulated in fp32."""
    model_dir, run, want = truth("llama")
    got, analysis = gradsim(run, model_dir, dtype="bfloat16")
    assert analysis["method"]["weight_dtype"] == "bfloat16" and analysis["method"]["accumulation_dtype"] == "float32"
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.02  # bf16 activations: ~3 significant digits (seen: 2e-3)


def test_answer_window_scores_like_the_full_sequence(truth):
    """The LM head on the answer window only (logits_to_keep) gives the log-probabilities of the full logits."""
    from lit_coupling.scoring import answer_window

    model_dir, run, _ = truth("llama")
    pieces, meta = load_pieces(run)
    short = (pieces[0].prompt_ids[:1], pieces[6].answer_ids)  # a 1-token prompt beside long answers
    batch = collate_clozes([short] + [(p.prompt_ids, p.answer_ids) for p in pieces], meta["tokenizer"]["pad_id"])
    lm = load_model(str(model_dir), dtype="float64", device="cpu").model
    window = answer_window(batch)
    with torch.no_grad():
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kept = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window).logits
    assert kept.shape[1] == window.shape[1] < full.shape[1]
    want = answer_logprobs(full, batch["input_ids"], batch["answer_mask"])
    got = answer_logprobs(kept, batch["input_ids"].gather(1, window), batch["answer_mask"].gather(1, window))
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
