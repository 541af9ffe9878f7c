"""Sequence-level distillation data: a teacher language model answers a file of prompts.

``distill generate`` runs the teacher over prompts (``.txt``: one per line; ``.jsonl``: a
``prompt`` text or a chat ``messages`` list per line), batched, with the usual sampling settings,
and writes JSONL rows that distill (or any trainer) reads back as training data: ``prompt`` and
``response`` (``data.format: prompt_response``), or, for conversations and prompts answered inside
the chat template, ``messages`` with the answer appended (``data.format: chat``): the student
learns each answer in the context the teacher wrote it in. Next to the output, ``<out>.manifest.json`` records the teacher's
identity, the prompt file's digest, every generation setting and how far the run got.

Kill-safe: each batch's rows are appended with one write and flushed to disk before the manifest
records the new length; a rerun cuts the file back to that length and continues with the next
batch. Every batch samples from its own seed (the run's seed and its position), so a resumed run
writes exactly the file an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core.errors import DistillError
from distill.core.io import default_cache_dir, directory_digest, file_sha256, write_json

FORMAT = "distill-generated"
FORMAT_VERSION = 1


class GenerateSpec(BaseModel):
    """What ``distill generate`` does; every field but the output's name is recorded and must
    match for a rerun to resume."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(description="a local causal-LM directory, or builtin:SmolLM2-135M-Instruct")
    prompts: Path = Field(description=".txt (one prompt per line) or .jsonl (prompt or messages per line)")
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    chat: bool | None = Field(
        None, description="wrap prompts in the chat template (default: when the tokenizer has one)"
    )
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, ge=0, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    samples: int = Field(1, ge=1, description="responses per prompt")
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="prompts per generation call")
    max_prompt_tokens: int = Field(1024, gt=0, description="a longer prompt is refused, naming its line")
    dedupe: bool = Field(True, description="drop a response identical to an earlier one for the same prompt")
    drop_empty: bool = True
    drop_truncated: bool = Field(False, description="drop responses cut off by max_new_tokens")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _greedy_has_one_answer(self) -> GenerateSpec:
        if self.temperature == 0 and self.samples > 1:
            raise ValueError("samples > 1 needs temperature > 0 (greedy decoding gives one answer per prompt)")
        return self


@dataclass
class Prompt:
    """One prompt as read: its text or its conversation, and where it came from."""

    line: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class GenerationResult:
    path: Path
    rows: int
    prompts: int
    dropped: dict[str, int] = field(default_factory=dict)
    new_tokens: int = 0
    seconds: float = 0.0


def read_prompts(spec: GenerateSpec) -> list[Prompt]:
    """The prompts of ``spec.prompts``; a bad line ends in one error naming the file and line."""
    path = spec.prompts
    if not path.is_file():
        raise DistillError(f"prompts: {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DistillError(f"prompts: {path} is not UTF-8 text (byte {err.start})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if path.suffix.lower() != ".jsonl":
        prompts = [Prompt(i, text=line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
    else:
        prompts = [_jsonl_prompt(line, f"{path}, line {i}", i, spec) for i, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DistillError(f"prompts: {path} holds no prompts")
    kinds = {p.messages is not None for p in prompts}
    if len(kinds) > 1:
        other = next(p for p in prompts if (p.messages is not None) != (prompts[0].messages is not None))
        raise DistillError(
            f"{path}, line {other.line}: a {'conversation' if other.messages is not None else 'plain prompt'} "
            f"among {'plain prompts' if other.messages is not None else 'conversations'}; use one kind per file"
        )
    return prompts


def _jsonl_prompt(line: str, where: str, number: int, spec: GenerateSpec) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DistillError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DistillError(f"{where}: expected an object with {spec.prompt_column!r} or {spec.messages_column!r}")
    messages = record.get(spec.messages_column)
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DistillError(f"{where}: {spec.messages_column!r} is not a list of {{role, content}} texts")
        while messages and messages[-1]["role"] == "assistant":  # the teacher writes the last answer anew
            messages = messages[:-1]
        if not messages:
            raise DistillError(f"{where}: the conversation has no turn before the assistant's")
        return Prompt(number, messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    prompt = record.get(spec.prompt_column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DistillError(
            f"{where}: no prompt text in {spec.prompt_column!r} and no {spec.messages_column!r} list "
            f"(set --prompt-column or --messages-column)"
        )
    return Prompt(number, text=prompt)


def prompt_ids(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    """The token ids the teacher continues: the chat template with a generation prompt for a
    conversation (or a plain prompt when ``chat``), else the text as the tokenizer encodes it."""
    if prompt.messages is not None or chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in recent transformers
    return list(tokenizer(prompt.text)["input_ids"])


def _identity(spec: GenerateSpec, teacher_dir: Path) -> dict[str, Any]:
    settings = spec.model_dump(mode="json", exclude={"teacher", "prompts"})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {
            "path": str(teacher_dir),
            "sha256": directory_digest(teacher_dir, default_cache_dir() / "digests.json"),
        },
        "prompts": {"path": str(spec.prompts), "sha256": file_sha256(spec.prompts)},
        "settings": settings,
    }


def _start(out: Path, manifest_path: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The progress to continue from: a fresh one, or the recorded one with the output cut back to
    the length the manifest vouches for (a batch half-written when the run was killed goes)."""
    fresh = {**identity, "prompts_done": 0, "bytes": 0, "rows": 0, "dropped": {}, "new_tokens": 0, "seconds": 0.0}
    previous = read_manifest(manifest_path)
    if out.exists() and previous is None and not overwrite:
        raise DistillError(f"{out} exists and has no {manifest_path.name}; move it away or pass --overwrite")
    if previous is not None and not overwrite:
        differs = next(
            (
                key
                for key in ("format_version", "teacher", "prompts", "settings")
                if _key(previous.get(key)) != _key(identity[key])
            ),
            None,
        )
        if differs is not None:
            what = {"teacher": "teacher", "prompts": "prompt file", "settings": "generation settings"}.get(
                differs, "format"
            )
            raise DistillError(
                f"{out} was generated with another {what}; pass --overwrite to start again or choose another --out"
            )
        size = out.stat().st_size if out.exists() else 0
        if size < previous["bytes"]:
            raise DistillError(f"{out} is shorter than {manifest_path.name} records; pass --overwrite to start again")
        with open(out, "ab") as handle:  # creates a missing (empty) output
            handle.truncate(previous["bytes"])
        return previous
    if out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    write_json(manifest_path, fresh)
    return fresh


def _key(value: Any) -> Any:
    """What must match for a rerun to resume: a teacher or prompt file by its digest (its path may
    be spelled another way, or the directory moved), anything else as recorded."""
    return value.get("sha256") if isinstance(value, dict) and "sha256" in value else value


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == FORMAT else None


def manifest_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


@torch.inference_mode()
def generate_dataset(
    spec: GenerateSpec,
    out: Path,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
) -> GenerationResult:
    """Write the teacher's responses to ``spec.prompts`` as JSONL at ``out`` (resuming an
    interrupted run). ``stop_after`` ends after that many batches of this call (for tests of
    resumption), as a kill would."""
    from distill.tasks.hf import HFSpec, load_causal_lm, resolve_model_dir
    from distill.tasks.text_data import load_tokenizer

    console = console or Console(quiet=True)
    out = Path(out)
    teacher_dir = resolve_model_dir(spec.teacher, "teacher")
    prompts = read_prompts(spec)
    tokenizer = load_tokenizer(teacher_dir, "teacher")
    chat = bool(tokenizer.chat_template) if spec.chat is None else spec.chat
    if (chat or any(p.messages for p in prompts)) and not tokenizer.chat_template:
        raise DistillError(f"teacher: the tokenizer in {teacher_dir} has no chat template for chat prompts")
    encoded = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt, chat)
        if len(ids) > spec.max_prompt_tokens:
            raise DistillError(
                f"{spec.prompts}, line {prompt.line}: the prompt has {len(ids)} tokens, more than "
                f"max_prompt_tokens {spec.max_prompt_tokens}"
            )
        encoded.append(ids)
    if out.resolve() == spec.prompts.resolve():
        raise DistillError(f"--out: {out} is the prompt file; write the answers elsewhere")
    manifest_path = manifest_path_for(out)
    model = load_causal_lm(HFSpec(path=str(teacher_dir), trust_remote_code=spec.trust_remote_code), "teacher").model
    model.eval()  # loaded before anything is written: a directory that is no model leaves no file behind
    identity = _identity(spec, teacher_dir)
    identity["settings"]["chat"] = chat  # as resolved: the rows' shape depends on it
    state = _start(out, manifest_path, identity, overwrite) | {"prompts_total": len(prompts)}
    write_json(manifest_path, state)
    if state["prompts_done"] >= len(prompts):
        console.print(f"generate: {out} is complete ({state['rows']} rows)")
        return _result(out, state)
    eos = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if state["prompts_done"]:
        console.print(f"generate: resuming {out} after {state['prompts_done']} of {len(prompts)} prompts")
    batches = 0
    with Progress(
        TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("prompts", total=len(prompts), completed=state["prompts_done"], speed="")
        while state["prompts_done"] < len(prompts) and (stop_after is None or batches < stop_after):
            start = state["prompts_done"]
            chosen = range(start, min(len(prompts), start + spec.batch_size))
            started = time.perf_counter()
            rows, dropped, new_tokens = _batch(model, tokenizer, spec, [prompts[i] for i in chosen],
                                               [encoded[i] for i in chosen], start, eos, pad, chat)  # fmt: skip
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
            with open(out, "ab") as handle:  # one write, on disk before the manifest vouches for it
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            seconds = time.perf_counter() - started
            state = {
                **state, "prompts_done": chosen.stop, "bytes": state["bytes"] + len(data), "rows": state["rows"] + len(rows),
                "dropped": {k: state["dropped"].get(k, 0) + dropped.get(k, 0) for k in {*state["dropped"], *dropped}},
                "new_tokens": state["new_tokens"] + new_tokens, "seconds": state["seconds"] + seconds,
            }  # fmt: skip
            write_json(manifest_path, state)
            batches += 1
            progress.update(task, completed=chosen.stop, speed=f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s")
    console.print(
        f"generate: {state['rows']} rows from {state['prompts_done']} of {len(prompts)} prompts in {out} "
        f"({state['new_tokens'] / max(state['seconds'], 1e-9):,.0f} new tokens/s)"
        + (
            f"; dropped {', '.join(f'{v} {k}' for k, v in sorted(state['dropped'].items()) if v)}"
            if any(state["dropped"].values())
            else ""
        )
    )
    return _result(out, state)


def _result(out: Path, state: dict[str, Any]) -> GenerationResult:
    return GenerationResult(
        out, state["rows"], state["prompts_done"], dict(state["dropped"]), state["new_tokens"], state["seconds"]
    )


def _stop_ids(tokenizer, model) -> list[int]:
    """Tokens that end a response: the model's end-of-sequence token(s) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise DistillError("teacher: neither the model nor its tokenizer names an end-of-sequence token")
    return ids


def _batch(model, tokenizer, spec: GenerateSpec, prompts: list[Prompt], encoded: list[list[int]], first: int,
           eos: list[int], pad: int, chat: bool) -> tuple[list[dict], dict[str, int], int]:  # fmt: skip
    """One generation call over ``prompts`` (left-padded), seeded by the batch's first prompt."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    torch.manual_seed(spec.seed * 1_000_003 + first)
    sampling = spec.temperature > 0
    out = model.generate(
        input_ids=input_ids, attention_mask=attention, max_new_tokens=spec.max_new_tokens, do_sample=sampling,
        temperature=spec.temperature if sampling else None, top_p=spec.top_p if sampling else None,
        top_k=spec.top_k if sampling else None, num_return_sequences=spec.samples, eos_token_id=eos,
        pad_token_id=pad,
    )  # fmt: skip
    new = out[:, width:]
    rows, dropped, new_tokens = [], {"duplicate": 0, "empty": 0, "truncated": 0}, 0
    for i, prompt in enumerate(prompts):
        seen: set[str] = set()
        for j in range(spec.samples):
            tokens = new[i * spec.samples + j].tolist()
            stop = next((n for n, t in enumerate(tokens) if t in eos), None)
            kept = tokens if stop is None else tokens[:stop]
            new_tokens += len(kept) + (stop is not None)
            finish = "stop" if stop is not None else "length"
            response = tokenizer.decode(kept, skip_special_tokens=True).strip()
            if spec.drop_empty and not response:
                dropped["empty"] += 1
                continue
            if spec.drop_truncated and finish == "length":
                dropped["truncated"] += 1
                continue
            if spec.dedupe and response in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(response)
            row: dict[str, Any] = {"index": first + i, "sample": j, "line": prompt.line}
            if prompt.messages is not None or chat:  # answered inside the chat template: kept as a conversation
                asked = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
                row["messages"] = [*asked, {"role": "assistant", "content": response}]
            else:
                row["prompt"] = prompt.text
                row["response"] = response
            row.update(finish=finish, new_tokens=len(kept))
            rows.append(row)
    return rows, dropped, new_tokens
