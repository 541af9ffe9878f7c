"""Language-modelling data: documents packed into fixed-length blocks, prompt/response pairs, or
chat conversations, tokenised into ``input_ids`` / ``attention_mask`` with next-token labels.

Every row is one sequence; ``labels[t]`` is the token at ``t + 1`` (-1 where nothing is
predicted) and ``mask[t]`` says whether position ``t`` counts: every position of a packed block,
the response tokens of a prompt/response pair or the assistant turns of a chat, never padding.
The mask reaches every term, the cache and the distributed share weighting through ``Split.mask``.

Documents are split into train / val / test before packing (by ``split_seed``), so no document
is in two splits. Bad input ends in one line naming the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.core.data import UNLABELED, DataBundle, Split
from distill.core.errors import DistillError
from distill.tasks.text_data import (
    TextDataSpec,
    _decode,
    _read_records,
    load_tokenizer,
    read_texts,
    resolve_tokenizer_dir,
    tokenizer_digest,
)


def read_documents(spec: TextDataSpec, path: Path | None, field: str) -> list[Any]:
    """Texts (format ``text``), ``(prompt, response)`` pairs, or message lists (``chat``)."""
    if spec.format == "text":
        if spec.source in ("bbc_news", "text_folder", "hf_disk"):
            return read_texts(path, spec, field).texts
        if path is None:
            raise DistillError(f"{field}: data.source {spec.source} needs data.path")
        if spec.source == "text_file" or path.suffix.lower() == ".txt":
            return _read_plain(path, field)
        return _read_records(path, spec, field, labeled=False).texts
    if spec.source not in ("jsonl", "text_file") or path is None or path.suffix.lower() != ".jsonl":
        raise DistillError(f"data.format: {spec.format} data are read from a .jsonl file (data.source: jsonl)")
    import json

    rows = []
    for i, line in enumerate(_decode(path.read_bytes(), str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DistillError(f"{where}: not JSON ({err.msg})") from None
        rows.append(
            _prompt_pair(record, spec, where) if spec.format == "prompt_response" else _chat(record, spec, where)
        )
    if not rows:
        raise DistillError(f"{field}: {path} holds no rows")
    return rows


def _read_plain(path: Path, field: str) -> list[str]:
    """A ``.txt`` file: documents separated by blank lines."""
    if not path.is_file():
        raise DistillError(f"{field}: {path} is not a file")
    text = _decode(path.read_bytes(), str(path))
    documents = [part.strip() for part in text.replace("\r\n", "\n").split("\n\n") if part.strip()]
    if not documents:
        raise DistillError(f"{field}: {path} holds no text")
    return documents


def _text_value(record: dict, column: str, where: str, what: str) -> str:
    value = record.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DistillError(f"{where}: no {what} text in column {column!r} (set data.{what}_column)")
    return value


def _prompt_pair(record: object, spec: TextDataSpec, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise DistillError(f"{where}: expected an object with {spec.prompt_column!r} and {spec.response_column!r}")
    return (
        _text_value(record, spec.prompt_column, where, "prompt"),
        _text_value(record, spec.response_column, where, "response"),
    )


def _chat(record: object, spec: TextDataSpec, where: str) -> list[dict[str, str]]:
    messages = record.get(spec.messages_column) if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DistillError(
            f"{where}: no list of messages in column {spec.messages_column!r} (set data.messages_column)"
        )
    for j, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DistillError(f"{where}: message {j} is not {{role: ..., content: ...}} with text values")
    if not any(m["role"] == "assistant" for m in messages):
        raise DistillError(f"{where}: the conversation has no assistant message; nothing would be learned from it")
    return messages


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """The beginning-of-text token if the tokenizer puts one before every text itself (Llama's
    does, SmolLM2's does not): documents start the way the model saw them in training."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def pack_documents(tokenizer, documents: list[str], block_length: int) -> list[list[int]]:
    """Documents tokenised, joined by the end-of-text token and cut into blocks of
    ``block_length + 1`` tokens that overlap by one (a block's inputs are its first
    ``block_length`` tokens and its labels the last ``block_length``); the remainder is dropped."""
    separator, bos = tokenizer.eos_token_id, _bos(tokenizer)
    stream: list[int] = []
    for document in documents:
        stream.extend(bos)
        stream.extend(_ids(tokenizer, document))
        if separator is not None:
            stream.append(separator)
    return [stream[i : i + block_length + 1] for i in range(0, len(stream) - block_length, block_length)]


def _pair_tokens(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ end of text) and where the response starts."""
    head = _bos(tokenizer) + _ids(tokenizer, prompt)
    tail = _ids(tokenizer, response) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return head + tail, len(head)


def _chat_tokens(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the conversation under the tokenizer's chat template and the spans of the
    assistant's turns (found by rendering the conversation up to each turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"{where}: the tokenizer has no chat template; use data.format: prompt_response")

    def render(upto: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=generation_prompt)
        return _ids(tokenizer, text)

    ids = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render(messages[:i], True))
            upto = render(messages[: i + 1], False)  # rendered once: its length is the turn's end
            end = len(upto)
            if ids[:end] != upto or start > end:
                raise DistillError(f"{where}: the chat template does not render turns as prefixes; use prompt_response")
            spans.append((start, end))
    return ids, spans


@dataclass(frozen=True)
class TokenRow:
    """A row given as token ids (``distill generate`` keeps the teacher's own): the prompt's ids
    and the response's, the loss on the response."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]


def _rows(tokenizer, documents: list[Any], spec: TextDataSpec, where: str) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of every row and, per token, whether it is a target (predicted, counted)."""
    if spec.format == "text":
        blocks = pack_documents(tokenizer, documents, spec.block_length or spec.max_length)
        return blocks, [[True] * len(b) for b in blocks]
    rows, targets = [], []
    for i, item in enumerate(documents):
        if isinstance(item, TokenRow):
            ids, spans = [*item.prompt, *item.response], [(len(item.prompt), len(item.prompt) + len(item.response))]
        elif spec.format == "prompt_response":
            ids, start = _pair_tokens(tokenizer, *item)
            spans = [(start, len(ids))]
        else:
            ids, spans = _chat_tokens(tokenizer, item, f"{where}, row {i + 1}")
            spans = spans[-1:] if spec.chat_turns == "last" else spans
        target = [False] * len(ids)
        for start, end in spans:
            target[start:end] = [True] * (end - start)
        ids, target = ids[: spec.max_length + 1], target[: spec.max_length + 1]
        if not any(target[1:]):
            raise DistillError(
                f"{where}, row {i + 1}: the prompt fills all {spec.max_length} tokens and leaves none of the "
                f"response; raise data.max_length or shorten the prompt"
            )
        rows.append(ids)
        targets.append(target)
    return rows, targets


def to_split(rows: list[list[int]], targets: list[list[bool]], pad_id: int) -> Split:
    """Inputs are each row but its last token; ``labels[t]`` is token ``t + 1`` where that token is a
    target (else -1); ``mask`` = the positions with a label. Rows are padded to the longest."""
    width = max((len(r) - 1 for r in rows), default=1)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), UNLABELED, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        length = len(row) - 1
        ids[i, :length] = torch.tensor(row[:-1])
        attention[i, :length] = 1
        following = torch.tensor(row[1:])
        wanted = torch.tensor(target[1:], dtype=torch.bool)
        labels[i, :length] = torch.where(wanted, following, torch.full_like(following, UNLABELED))
    return Split({"input_ids": ids, "attention_mask": attention}, labels, labels >= 0)


def split_documents(spec: TextDataSpec, documents: list[Any] | None = None) -> tuple[list, list, list]:
    """The train / val / test documents (texts, pairs, conversations or token rows), split by
    ``split_seed`` before any packing: no document is in two splits."""
    documents = documents or read_documents(spec, spec.path, "data.path")
    rng = np.random.default_rng(spec.split_seed)
    if spec.test_path is not None:
        test_docs = read_documents(spec, spec.test_path, "data.test_path")
        train_docs = documents
    else:
        order = rng.permutation(len(documents))
        cut = int(round(len(order) * spec.test_fraction))
        test_docs, train_docs = [documents[i] for i in order[:cut]], [documents[i] for i in order[cut:]]
    order = rng.permutation(len(train_docs))
    n_val = int(round(len(order) * spec.val_fraction))
    return [train_docs[i] for i in order[n_val:]], [train_docs[i] for i in order[:n_val]], test_docs


def load_lm_data(spec: TextDataSpec) -> DataBundle:
    """Read, split by document, tokenise and pack: the same splits for every run with the same
    ``split_seed``."""
    if spec.tokenizer is None:
        raise DistillError("data.tokenizer: no tokenizer; set data.tokenizer or use a Hugging Face teacher")
    generated, teacher_rows = None, None
    if spec.source == "generated":
        spec, generated, teacher_rows = _generated(spec)
    tokenizer = load_tokenizer(spec.tokenizer)
    train_docs, val_docs, test_docs = split_documents(spec, teacher_rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    splits = {}
    for name, docs in (("train", train_docs), ("val", val_docs), ("test", test_docs)):
        rows, targets = _rows(tokenizer, docs, spec, f"data ({name} split)")
        limit = spec.limit_train if name == "train" else spec.limit_eval
        if limit is not None:
            rows, targets = rows[:limit], targets[:limit]
        if not rows and name != "val":
            raise DistillError(
                f"data.path: the {name} split holds no {'block' if spec.format == 'text' else 'row'} of "
                f"{(spec.block_length or spec.max_length)} tokens; give more text or lower data.block_length"
            )
        splits[name] = to_split(rows, targets, pad) if rows else _empty_split(spec)
    name = "bbc_news" if spec.source == "bbc_news" and spec.path is None else Path(spec.path or "texts").stem
    return DataBundle(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(tokenizer),
        class_names=[],
        normalize="none",
        info={
            "tokenizer": str(resolve_tokenizer_dir(spec.tokenizer)),
            "tokenizer_sha256": tokenizer_digest(resolve_tokenizer_dir(spec.tokenizer)),
            "max_length": spec.max_length,
            "block_length": spec.block_length or spec.max_length,
            "format": spec.format,
            "tokens": {name: int(split.mask.sum()) for name, split in splits.items()},
            **({"generated_by": generated} if generated else {}),
        },
    )


def _generated(spec: TextDataSpec) -> tuple[TextDataSpec, dict, list[TokenRow] | None]:
    """A ``distill generate`` output read as prompt/response (or chat) JSONL, the loss on the
    teacher's answers; its manifest must be there, and the run records which teacher wrote it.
    With the teacher's tokenizer the rows are the token ids the teacher saw and wrote (kept
    beside the output), not a re-tokenisation of the decoded text; another tokenizer reads the text."""
    import json

    from distill.tasks.lm_generate import manifest_path_for, read_manifest, read_token_shards, token_rows

    if spec.path is None:
        raise DistillError("data.path: data.source generated needs the JSONL `distill generate` wrote")
    manifest = manifest_path_for(spec.path)
    recorded = read_manifest(manifest)
    if recorded is None:
        raise DistillError(
            f"data.path: {spec.path} has no readable {manifest.name}; is it `distill generate` output? "
            f"(other JSONL: data.source jsonl)"
        ) from None
    rows, teacher = recorded.get("rows"), recorded.get("teacher")
    done, total = recorded.get("prompts_done"), recorded.get("prompts_total")
    if done != total:
        raise DistillError(
            f"data.path: {spec.path} answers {done} of {total} prompts; finish it by running the same "
            f"`distill generate` command again"
        )
    if not rows:
        raise DistillError(f"data.path: {spec.path} holds no rows (every answer was dropped)")
    first = json.loads(spec.path.read_text().splitlines()[0])
    kind = "chat" if "messages" in first else "prompt_response"
    columns = {"prompt_column": "prompt", "response_column": "response", "messages_column": "messages"}
    columns["chat_turns"] = "last"  # earlier assistant turns came with the prompt: only the last is the teacher's
    same_tokenizer = (teacher or {}).get("tokenizer_sha256") == tokenizer_digest(resolve_tokenizer_dir(spec.tokenizer))
    shards = read_token_shards(spec.path, recorded) if same_tokenizer else None
    teacher_rows = [TokenRow(tuple(p), tuple(r)) for p, r in token_rows(shards)] if shards else None
    info = {
        "teacher": teacher, "rows": rows, "tokens": "teacher's" if teacher_rows else "re-tokenised text",
        "signals": recorded.get("settings", {}).get("signals", 0) if teacher_rows else 0,
    }  # fmt: skip
    return spec.model_copy(update={"source": "jsonl", "format": kind, **columns}), info, teacher_rows


def _empty_split(spec: TextDataSpec) -> Split:
    width = spec.block_length or spec.max_length
    zeros = torch.zeros((0, width), dtype=torch.long)
    return Split({"input_ids": zeros, "attention_mask": zeros.clone()}, zeros.clone(), zeros.bool())
