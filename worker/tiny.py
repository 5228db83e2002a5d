"""Tiny random-weight models built locally: for tests, benchmarks, and `ragq serve` when offline.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path as real
models, so everything but the weights is exercised. Their answers are gibberish.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Phi3Config,
    PreTrainedTokenizerFast,
    T5Config,
)

from worker.prompt import DEFAULT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-3's own chat format.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SHAPES = ("t5", "phi3")


def _training_texts() -> list[str]:
    faq = json.loads(resources.files("worker").joinpath("builtin_faq.json").read_text(encoding="utf-8"))
    texts = [DEFAULT_TEMPLATE]
    for course in faq:
        for doc in course["documents"]:
            texts += [doc["question"], doc["section"], doc["text"]]
    return texts


def build_tokenizer(vocab_size: int = 2000, *, add_eos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens for any input), trained on the built-in FAQ."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    if add_eos:
        # T5 ends every input with </s>.
        eos_id = tokenizer.token_to_id("</s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=512,
    )


def build_tiny_model(path: Path, shape: str = "t5", *, seed: int = 0) -> Path:
    """Build a tiny model of `shape` (`t5` or `phi3`) and `save_pretrained` it to `path`."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(add_eos=shape == "t5")
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<pad>", "</s>", "<s>")}
    if shape == "t5":
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=ids["<pad>"],
            eos_token_id=ids["</s>"],
            decoder_start_token_id=ids["<pad>"],
            tie_word_embeddings=False,
        )
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        tokenizer.chat_template = PHI3_CHAT_TEMPLATE
        tokenizer.model_max_length = 2048
        config = Phi3Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            original_max_position_embeddings=2048,
            pad_token_id=ids["<pad>"],
            eos_token_id=ids["</s>"],
            bos_token_id=ids["<s>"],
        )
        model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_tiny_model(path: Path, shape: str = "t5") -> Path:
    """Build the tiny model at `path` unless a previous run did."""
    if not (path / "config.json").exists():
        build_tiny_model(path, shape)
    return path
