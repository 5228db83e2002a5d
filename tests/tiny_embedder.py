"""A tiny random-weight sentence-transformers model, built locally as the tiny T5 is (`worker.tiny`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from worker.tiny import _training_texts

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_embedder(path: Path, seed: int = 0) -> Path:
    """A WordPiece tokenizer trained on the built-in FAQ and a 2-layer BERT with random weights, wrapped as a
    SentenceTransformer with mean pooling and saved to `path`: load it back with `SentenceTransformer(str(path))`."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as st_models
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers import models as st_models  # type: ignore[no-redef]

    torch.manual_seed(seed)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(_training_texts(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=fast.pad_token_id,
    )
    base = path.with_name(path.name + "-base")
    BertModel(config).save_pretrained(base)
    fast.save_pretrained(base)
    transformer = st_models.Transformer(str(base), max_seq_length=128)
    pooling = st_models.Pooling(config.hidden_size, pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))
    return path
