"""Tiny, random Hugging Face encoders and a made-up three-topic corpus for the text tests."""

from __future__ import annotations

import random
from pathlib import Path

TOPICS = {
    "animals": "cat dog horse cow sheep bird fish mouse lion tiger",
    "food": "bread cheese apple pear soup rice bean cake milk egg",
    "sport": "ball goal team run race swim jump score coach match",
}
COMMON = "the a and of to in is it was on with for at by this"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    words = sorted({w for text in TOPICS.values() for w in text.split()} | set(COMMON.split()))
    return SPECIALS + words


def tokenizer(directory: Path, extra: list[str] | None = None):
    """A WordPiece tokenizer over the corpus's words, saved in ``directory``."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    words = vocabulary() + (extra or [])
    tok = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def bert_config(num_labels: int = 3, layers: int = 4, hidden: int = 16, heads: int = 2, vocab: int | None = None):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab or len(vocabulary()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def teacher_dir(directory: Path, seed: int = 0, head: bool = True, **config) -> Path:
    """A random BERT classifier (or a bare encoder, ``head=False``) with the corpus tokenizer."""
    import torch
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cls = BertForSequenceClassification if head else BertModel
    cls(bert_config(**config)).save_pretrained(directory)
    tokenizer(directory)
    return directory


def corpus(directory: Path, per_class: int = 30, seed: int = 0, length: int = 12) -> Path:
    """``directory/<topic>/<i>.txt``: texts mixing a topic's words with common ones."""
    rng = random.Random(seed)
    for topic, words in TOPICS.items():
        folder = directory / topic
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = rng.randint(4, length)
            text = " ".join(rng.choice(words.split() if rng.random() < 0.6 else COMMON.split()) for _ in range(n))
            (folder / f"{i:03d}.txt").write_text(text)
    return directory
