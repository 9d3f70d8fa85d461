"""Tiny, randomly initialised LMs, tokenizers and encoders built from configs on the spot.

No hub is ever contacted: the tokenizer is a byte-level BPE trained here on a few
sentences. These power the test suite and the untrained demo; they are also a quick
way for a user to smoke-test a pipeline before pointing it at real weights.
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a red circle on a blue background.",
    "a green square next to a yellow triangle.",
    "What colour is the shape? red",
    "What shape is it? a star",
    "Output: a small purple diamond in the corner.",
    "Question: how many shapes are there? Answer: two",
    "This is a picture of a cat wearing sunglasses.",
    "Three elephants walking in the savanna.",
]

FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "qwen2", "mistral")


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on CORPUS, with <s> / </s> and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_lm_config(family: str, vocab_size: int, *, hidden: int = 64, layers: int = 4, heads: int = 4):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads // 2,
                              max_position_embeddings=512, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads // 2,
                                max_position_embeddings=512, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads // 2,
                              max_position_embeddings=512, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=512,
                            pad_token_id=None, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, max_position_embeddings=512, **common)
    raise ValueError(f"unknown LM family {family!r}; choose from {', '.join(FAMILIES)}")


def save_tiny_lm(directory: str | Path, family: str = "llama", *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random causal LM and its tokenizer with save_pretrained; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    lm_config = tiny_lm_config(family, 2, **sizes)  # vocab set below
    lm_config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    # AutoTokenizer may pick a family-specific class that adds tokens (Qwen2 adds its pad),
    # so the LM gets one row per token of the tokenizer as it will be loaded.
    lm_config.vocab_size = len(AutoTokenizer.from_pretrained(directory))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(directory)
    return directory
