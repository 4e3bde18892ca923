"""Train a small byte-level BPE tokenizer locally (no hub) and wrap it as a HF fast tokenizer.

Used for the embedded tiny models and by tests that build models from a config. Byte-level, so any text
tokenises; offsets are exact, so clozes split at real token boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable

# Special tokens per convention: GPT-2 has one <|endoftext|> for BOS/EOS/pad; LLaMA has <s>, </s>, <unk>.
SPECIALS = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2000, style: str = "gpt2", min_frequency: int = 1):
    """A `PreTrainedTokenizerFast` trained on `texts` (GPT-2-style byte-level BPE, leading-space words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[style]
    special_list = list(dict.fromkeys(specials.values()))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_list,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials, model_max_length=1024)
    fast.pad_token = specials["eos_token"]
    fast.padding_side = "right"
    return fast
