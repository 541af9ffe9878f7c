"""Tiny, random Llama models and a word-level tokenizer with a chat template for the LM tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny_text import COMMON, TOPICS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def words() -> list[str]:
    return sorted({w for text in TOPICS.values() for w in text.split()} | set(COMMON.split()))


def lm_tokenizer(
    directory: Path, chat_template: str = CHAT_TEMPLATE, extra: list[str] | None = None, reverse: bool = False
):
    """A word-level tokenizer (split on spaces) over the corpus words, saved in ``directory``
    (``reverse``: the same words numbered in the opposite order: other token ids, same size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ordered = words()[::-1] if reverse else words()
    vocab = {token: i for i, token in enumerate(SPECIALS + ordered + (extra or []))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def llama_config(layers: int = 4, hidden: int = 16, heads: int = 4, kv_heads: int = 2, vocab: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or len(SPECIALS) + len(words()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def llama_dir(directory: Path, seed: int = 0, **config) -> Path:
    """A random Llama causal LM with the corpus tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(**config)).save_pretrained(directory)
    lm_tokenizer(directory)
    return directory


def documents(count: int = 60, seed: int = 0, length: int = 20) -> list[str]:
    """Texts that stay on one topic, so a model can learn something in a few steps."""
    rng = random.Random(seed)
    topics = list(TOPICS.values())
    out = []
    for i in range(count):
        topic = topics[i % len(topics)].split()
        out.append(
            " ".join(rng.choice(topic) if rng.random() < 0.7 else rng.choice(COMMON.split()) for _ in range(length))
        )
    return out


def text_file(path: Path, count: int = 60, seed: int = 0) -> Path:
    path.write_text("\n\n".join(documents(count, seed)) + "\n")
    return path


def prompt_file(path: Path, count: int = 30) -> Path:
    docs = documents(count)
    rows = [{"prompt": " ".join(d.split()[:6]), "response": " ".join(d.split()[6:12])} for d in docs]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def chat_file(path: Path, count: int = 30) -> Path:
    docs = documents(count)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "the a"},
                {"role": "user", "content": " ".join(d.split()[:5])},
                {"role": "assistant", "content": " ".join(d.split()[5:9])},
                {"role": "user", "content": " ".join(d.split()[9:12])},
                {"role": "assistant", "content": " ".join(d.split()[12:15])},
            ]
        }
        for d in docs
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
