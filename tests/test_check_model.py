"""`lit-coupling check-model` on tiny models of several families, saved like hub models, and on bad inputs."""

import subprocess
import sys

import pytest

from lit_coupling.check_model import main
from tests.conftest import shared_path


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt", "qwen2", "falcon"])
def test_supported_families(family, tiny_model_dir, capsys):
    assert main([str(tiny_model_dir(family))]) == 0
    out = capsys.readouterr().out
    assert f"({family})" in out and "smoke test" in out and "all finite" in out
    assert "memory" in out and "parameters" in out


def test_gpt2_with_the_real_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", "gpt2"))
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main([str(tmp_path), "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "Conv1D stored (128, 32) = (in, out); read as (out, in) = (32, 128)" in out
    assert "transformer.h.1.mlp.c_proj" in out and "transformer.h.0.mlp.c_proj" not in out


def test_list_prints_the_families(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.{}.mlp.c_proj" in out and "model.layers.{}.mlp.down_proj" in out


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lit_coupling", "check-model", *args],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_empty_directory(tmp_path):
    result = _cli(str(tmp_path))
    assert result.returncode == 2
    assert "holds no config.json" in result.stderr and "Traceback" not in result.stderr


def test_non_causal_model(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2, vocab_size=50)).save_pretrained(
        tmp_path
    )
    result = _cli(str(tmp_path))
    assert result.returncode == 2
    assert "is not a causal language model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_encoders_and_encoder_decoders_are_refused(kind, tmp_path):
    """AutoModelForCausalLM would load BERT as BertLMHeadModel; an encoder must still be refused, by name."""
    import transformers as T

    if kind == "bert":
        T.BertModel(
            T.BertConfig(
                num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=50
            )
        ).save_pretrained(tmp_path)
        expected = "it is BertModel (model_type 'bert'), an encoder"
    else:
        T.T5ForConditionalGeneration(
            T.T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=50)
        ).save_pretrained(tmp_path)
        expected = "it is T5ForConditionalGeneration (model_type 't5'), an encoder–decoder"
    result = _cli(str(tmp_path))
    assert result.returncode == 2
    assert "is not a causal language model" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


def test_every_stage_refuses_an_encoder(tmp_path):
    """The stages load through load_config (the pieces stage reads only config and tokenizer) or load_model."""
    from transformers import BertConfig, BertModel

    from lit_coupling.models.loading import ModelLoadError, load_config, load_model

    BertModel(
        BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=50)
    ).save_pretrained(tmp_path)
    for load in (load_config, load_model):
        with pytest.raises(ModelLoadError, match=r"not a causal language model: it is BertModel"):
            load(str(tmp_path))


def test_model_without_an_mlp_output_projection(tmp_path):
    from transformers import AutoModelForCausalLM, OlmoConfig

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["some text here"] * 5, vocab_size=270)
    config = OlmoConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=16,
        num_attention_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    result = _cli(str(tmp_path))
    assert result.returncode == 2
    assert "no MLP output projection found" in result.stderr and "--target_pattern" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_id_says_what_to_do():
    result = _cli("meta-llama/Llama-2-7b-hf")
    assert result.returncode == 2
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in result.stderr
    assert "Traceback" not in result.stderr
