import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_coupling.models.adapters import FAMILIES, AdapterError, ModelAdapter, parse_layers
from tests.tiny import tiny_config

EXPECTED = {
    "gpt2": ("gpt2", "transformer.h.1.mlp.c_proj", True),
    "llama": ("llama", "model.layers.1.mlp.down_proj", False),
    "mistral": ("mistral", "model.layers.1.mlp.down_proj", False),
    "qwen2": ("qwen2", "model.layers.1.mlp.down_proj", False),
    "gemma": ("gemma", "model.layers.1.mlp.down_proj", False),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers.1.mlp.dense_4h_to_h", False),
    "gptj": ("gptj", "transformer.h.1.mlp.fc_out", False),
    "opt": ("opt", "model.decoder.layers.1.fc2", False),
    "falcon": ("falcon", "transformer.h.1.mlp.dense_4h_to_h", False),
    "phi": ("phi", "model.layers.1.mlp.fc2", False),
    "bloom": ("bloom", "transformer.h.1.mlp.dense_4h_to_h", False),
}


def build(family: str, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64, **overrides)).eval()


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_from_config_and_targets(family):
    name, target, transposed = EXPECTED[family]
    adapter = ModelAdapter(build(family))
    assert adapter.family.name == name and adapter.fallback_reason is None
    assert adapter.num_layers == 2 and adapter.layers == [0, 1]
    assert adapter.target_names[-1] == target
    t = adapter.targets[1]
    assert t.transposed is transposed
    d_out, d_in = t.shape
    assert d_out == adapter.d_model and d_in > d_out
    assert adapter.final_norm is not None and adapter.embedding is not None
    assert adapter.block_class.__name__ in adapter.no_split_modules


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt"])
def test_structural_fallback_finds_the_same_module(family):
    model = build(family)
    known = ModelAdapter(model).target_names
    model.config.model_type = "mystery-lm"  # the name says nothing; the structure does
    adapter = ModelAdapter(model)
    assert adapter.family.name == "unknown" and "not in the family table" in adapter.fallback_reason
    assert adapter.target_names == known


def test_family_is_not_read_from_the_name():
    model = build("llama")
    model.name_or_path = "gpt2-xl-but-really-llama"
    assert ModelAdapter(model).family.name == "llama"


def test_override_pattern_and_layers():
    adapter = ModelAdapter(build("gpt2", n_layer=4), layers="1-2", target_pattern="transformer.h.{}.mlp.c_fc")
    assert adapter.layers == [1, 2]
    assert adapter.target_names == ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"]
    with pytest.raises(AdapterError, match="no MLP output projection at"):
        ModelAdapter(build("gpt2"), target_pattern="transformer.h.{}.mlp.nope")
    with pytest.raises(AdapterError, match="needs a"):
        ModelAdapter(build("gpt2"), target_pattern="transformer.h.0.mlp.c_proj")


def test_no_mlp_output_projection_is_a_clear_error():
    import transformers as T

    # An architecture outside the table whose MLP is narrower than the model: nothing maps wide → model width.
    config = T.OlmoConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=16, num_attention_heads=2,
                          vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match="no MLP output projection found"):
        ModelAdapter(model)


def test_parse_layers():
    assert parse_layers(None, 6) == list(range(6))
    assert parse_layers("all", 6) == list(range(6))
    assert parse_layers("1-3", 6) == [1, 2, 3]
    assert parse_layers("0,5,-1", 6) == [0, 5]
    assert parse_layers([2, 2, 1], 6) == [1, 2]
    with pytest.raises(AdapterError, match="out of range"):
        parse_layers("7", 6)
    with pytest.raises(AdapterError, match="cannot read"):
        parse_layers("x", 6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_update_through_the_adapter_is_w_plus_delta_in_out_in_orientation(family):
    """W ← W + ΔW with ΔW (out, in): the module's output moves by exactly x ΔWᵀ, for Conv1D and Linear alike."""
    model = build(family).double()
    target = ModelAdapter(model).targets[0]
    d_out, d_in = target.shape
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    delta = torch.randn(d_out, d_in, dtype=torch.float64)
    before = target.module(x)
    w_before = target.weight().clone()
    target.add_(delta)
    after = target.module(x)
    torch.testing.assert_close(after - before, x @ delta.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(target.weight(), w_before + delta, rtol=0, atol=0)
    # and the (out, in) view is how the module computes: y = x Wᵀ + b
    bias = target.module.bias if target.module.bias is not None else 0
    torch.testing.assert_close(after, x @ target.weight().T + bias, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected \\(out, in\\)"):
        target.add_(delta.T)


def test_bos_convention_comes_from_the_table():
    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c d e f"] * 5, vocab_size=280, style="llama")
    assert ModelAdapter(build("llama")).bos_ids(tok) == [tok.bos_token_id]
    assert ModelAdapter(build("gpt2")).bos_ids(tok) == []


def test_every_family_row_is_complete():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) >= 7
    for f in FAMILIES:
        assert f.blocks and f.mlp_out and f.embed and f.final_norm and f.model_types
        assert f.weight_layout in ("in_out", "out_in")
