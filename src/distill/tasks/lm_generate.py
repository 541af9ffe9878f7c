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

Beside the rows, ``<out>.tokens/`` keeps each kept row's token ids exactly as the teacher saw and
wrote them (one shard per batch): a student with the teacher's tokenizer trains on those tokens, not
on a re-tokenisation of the decoded text. With ``signals: K`` each shard also holds the teacher's
top-K logits of every response token, taken from the logits generation computes anyway, so that
``distill cache`` can turn them into a teacher cache without running the teacher again ("word-level
+ sequence-level KD", Kim & Rush 2016).

Several processes (``--processes N``) take every N-th batch each; a finished batch is first a part
file under ``<out>.parts/`` and is appended to the output in prompt order, so N processes write
the same file as one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill.core.errors import DistillError
from distill.core.io import default_cache_dir, directory_digest, file_sha256, write_json
from distill.core.signals import TopKLogits, index_dtype

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
    signals: int = Field(
        0, ge=0, description="store the teacher's top-k logits of every response token (0: token ids only)"
    )
    trust_remote_code: bool = False
    device: str = Field("auto", description="auto (a GPU when there is one), cpu, cuda, cuda:1, ...; not recorded")

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
    from distill.tasks.text_data import tokenizer_digest

    settings = spec.model_dump(mode="json", exclude={"teacher", "prompts", "device"})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {
            "path": str(teacher_dir),
            "sha256": directory_digest(teacher_dir, default_cache_dir() / "digests.json"),
            "tokenizer_sha256": tokenizer_digest(teacher_dir),
        },
        "prompts": {"path": str(spec.prompts), "sha256": file_sha256(spec.prompts)},
        "settings": settings,
    }


def _start(out: Path, manifest_path: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The progress to continue from: a fresh one, or the recorded one with the output cut back to
    the length the manifest vouches for (a batch half-written when the run was killed goes)."""
    fresh = {
        **identity, "prompts_done": 0, "bytes": 0, "rows": 0, "dropped": {}, "new_tokens": 0, "seconds": 0.0,
        "token_shards": [],
    }  # fmt: skip
    previous = read_manifest(manifest_path)
    if out.exists() and previous is None and not overwrite:
        raise DistillError(f"{out} exists and has no {manifest_path.name}; move it away or pass --overwrite")
    if previous is not None and not overwrite:
        differs = next(
            (
                key
                for key in ("format_version", "teacher", "prompts", "settings")
                if _key(_with_defaults(key, previous.get(key))) != _key(identity[key])
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
    for stale in (tokens_dir_for(out), parts_dir_for(out)):  # another run's batches
        shutil.rmtree(stale, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    write_json(manifest_path, fresh)
    return fresh


def _with_defaults(key: str, value: Any) -> Any:
    """Recorded settings with the defaults of settings added since (an older output resumes)."""
    return {"signals": 0, **value} if key == "settings" and isinstance(value, dict) else value


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


def tokens_dir_for(out: Path) -> Path:
    """Where the rows' token ids (and the teacher's top-k logits, when stored) live."""
    return out.with_name(out.name + ".tokens")


def parts_dir_for(out: Path) -> Path:
    """Finished batches not yet appended to the output (several processes finish out of order)."""
    return out.with_name(out.name + ".parts")


@torch.inference_mode()
def generate_dataset(
    spec: GenerateSpec,
    out: Path,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
) -> GenerationResult:
    """Write the teacher's responses to ``spec.prompts`` as JSONL at ``out`` (resuming an
    interrupted run). ``stop_after`` ends after that many batches of this call (for tests of
    resumption), as a kill would. In a run of ``world`` processes (``barrier`` waits for all of
    them) process ``rank`` generates batches ``rank``, ``rank + world``, ...; process 0 alone
    writes the output and the manifest."""
    from distill.tasks.hf import HFSpec, load_causal_lm, resolve_model_dir
    from distill.tasks.text_data import load_tokenizer

    console = console or Console(quiet=True)
    if world > 1 and barrier is None:
        raise ValueError("generate_dataset: several processes need a barrier")
    barrier = barrier or (lambda: None)
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
    device = _device(spec.device, int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else None)
    model = load_causal_lm(HFSpec(path=str(teacher_dir), trust_remote_code=spec.trust_remote_code), "teacher").model
    model.to(device).eval()  # loaded before anything is written: a directory that is no model leaves no file behind
    identity = _identity(spec, teacher_dir)
    identity["settings"]["chat"] = chat  # as resolved: the rows' shape depends on it
    if rank == 0:
        state = _start(out, manifest_path, identity, overwrite) | {"prompts_total": len(prompts)}
        write_json(manifest_path, state)
    barrier()  # the output is cut back (or started) before any process adds a batch
    state = read_manifest(manifest_path) or {}
    if state.get("prompts_done", 0) >= len(prompts):
        console.print(f"generate: {out} is complete ({state['rows']} rows)")
        return _result(out, state)
    eos = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if state["prompts_done"]:
        console.print(f"generate: resuming {out} after {state['prompts_done']} of {len(prompts)} prompts")
    parts = parts_dir_for(out)
    starts = range(state["prompts_done"], len(prompts), spec.batch_size)
    mine = [first for number, first in enumerate(starts) if number % world == rank]
    if stop_after is not None:
        mine = mine[:stop_after]
    started_all = time.perf_counter()
    with Progress(
        TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("prompts", total=len(prompts), completed=state["prompts_done"], speed="")
        for first in mine:
            chosen = range(first, min(len(prompts), first + spec.batch_size))
            if not _part_done(parts, first):  # a part finished before a kill is kept
                started = time.perf_counter()
                batch = _batch(model, tokenizer, spec, [prompts[i] for i in chosen],
                               [encoded[i] for i in chosen], first, eos, pad, chat, device)  # fmt: skip
                _write_part(out, first, batch, time.perf_counter() - started)
            if rank == 0:
                state = _merge(out, manifest_path, state, spec.batch_size, len(prompts))
            done = state["prompts_done"] if rank == 0 else chosen.stop
            rate = state["new_tokens"] / max(state["seconds"], 1e-9) if rank == 0 else 0.0
            progress.update(task, completed=done, speed=f"{rate:,.0f} tokens/s" if rate else "")
    barrier()  # every process's parts are written
    if rank == 0:
        state = _merge(out, manifest_path, state, spec.batch_size, len(prompts))
        wall = time.perf_counter() - started_all
        console.print(
            f"generate: {state['rows']} rows from {state['prompts_done']} of {len(prompts)} prompts in {out} "
            f"({state['new_tokens'] / max(state['seconds'], 1e-9):,.0f} new tokens/s per process, {wall:.0f} s)"
            + (
                f"; dropped {', '.join(f'{v} {k}' for k, v in sorted(state['dropped'].items()) if v)}"
                if any(state["dropped"].values())
                else ""
            )
        )
    barrier()
    return _result(out, read_manifest(manifest_path) or state)


def _device(name: str, local_rank: int | None) -> torch.device:
    """``auto``: this process's GPU when there is one (process ``local_rank`` of several takes
    GPU ``local_rank``), else the CPU."""
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise DistillError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if torch.cuda.is_available():
        return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class _Batch:
    """One generation call's kept rows, what was dropped, and the token shard's arrays."""

    rows: list[dict]
    dropped: dict[str, int]
    new_tokens: int
    arrays: dict[str, np.ndarray]


def _part_name(first: int) -> str:
    return f"b-{first:09d}"


def _part_done(parts: Path, first: int) -> bool:
    return (parts / f"{_part_name(first)}.json").is_file()


def _write_part(out: Path, first: int, batch: _Batch, seconds: float) -> None:
    """The batch as files that appear whole or not at all: the token shard, then the rows and
    their counts (the ``.json`` last: its presence means the part is complete)."""
    name = _part_name(first)
    shard = tokens_dir_for(out) / name
    tmp = shard.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for key, array in batch.arrays.items():
        path = tmp / f"{key}.npy"
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        files[path.name] = file_sha256(path)
    shutil.rmtree(shard, ignore_errors=True)
    os.replace(tmp, shard)
    parts = parts_dir_for(out)
    parts.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in batch.rows).encode("utf-8")
    meta = {"first": first, "rows": len(batch.rows), "dropped": batch.dropped, "new_tokens": batch.new_tokens,
            "seconds": seconds, "shard": {"name": name, "rows": len(batch.rows), "files": files}}  # fmt: skip
    for path, content in ((parts / f"{name}.jsonl", data), (parts / f"{name}.json", json.dumps(meta).encode())):
        tmp_file = path.with_name(f".{path.name}.tmp")
        with open(tmp_file, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_file, path)


def _merge(out: Path, manifest_path: Path, state: dict[str, Any], batch_size: int, total: int) -> dict[str, Any]:
    """Append every finished batch that comes next in prompt order to the output: one write,
    on disk before the manifest vouches for it; then the part is deleted."""
    parts = parts_dir_for(out)
    while state["prompts_done"] < total and _part_done(parts, state["prompts_done"]):
        name = _part_name(state["prompts_done"])
        meta = json.loads((parts / f"{name}.json").read_text())
        data = (parts / f"{name}.jsonl").read_bytes()
        with open(out, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        dropped = meta["dropped"]
        state = {
            **state, "prompts_done": min(total, state["prompts_done"] + batch_size),
            "bytes": state["bytes"] + len(data), "rows": state["rows"] + meta["rows"],
            "dropped": {k: state["dropped"].get(k, 0) + dropped.get(k, 0) for k in {*state["dropped"], *dropped}},
            "new_tokens": state["new_tokens"] + meta["new_tokens"], "seconds": state["seconds"] + meta["seconds"],
            "token_shards": [*state.get("token_shards", []), meta["shard"]],
        }  # fmt: skip
        write_json(manifest_path, state)
        for suffix in (".json", ".jsonl"):
            (parts / f"{name}{suffix}").unlink()
    if state["prompts_done"] >= total:
        shutil.rmtree(parts, ignore_errors=True)
    return state


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
           eos: list[int], pad: int, chat: bool, device: torch.device) -> _Batch:  # fmt: skip
    """One generation call over ``prompts`` (left-padded), seeded by the batch's first prompt."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    torch.manual_seed(spec.seed * 1_000_003 + first)
    sampling = spec.temperature > 0
    recorder = _StepSignals(model, spec.signals, len(tokenizer)) if spec.signals else None
    rows_in_head = model.get_output_embeddings().weight.shape[0]
    extra = {"suppress_tokens": list(range(len(tokenizer), rows_in_head))} if len(tokenizer) < rows_in_head else {}
    try:
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=spec.max_new_tokens,
            do_sample=sampling,
            temperature=spec.temperature if sampling else None,
            top_p=spec.top_p if sampling else None,
            top_k=spec.top_k if sampling else None,
            num_return_sequences=spec.samples,
            eos_token_id=eos,
            pad_token_id=pad,
            **extra,
        )  # fmt: skip  (a padded vocabulary's rows belong to no token: never generated)
    finally:
        if recorder is not None:
            recorder.remove()
    new = generated[:, width:].cpu()
    signals = recorder.arrays(new) if recorder is not None else None
    rows, dropped, new_tokens = [], {"duplicate": 0, "empty": 0, "truncated": 0}, 0
    kept_rows: list[tuple[int, list[int]]] = []  # (sequence, its response ids incl. the stop token)
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
            kept_rows.append((i * spec.samples + j, tokens if stop is None else tokens[: stop + 1]))
    arrays = _token_arrays([encoded[r // spec.samples] for r, _ in kept_rows], [ids for _, ids in kept_rows])
    if signals is not None:
        steps = [(r, len(ids)) for r, ids in kept_rows]
        arrays |= {
            name: np.concatenate([value[r, :n] for r, n in steps]) if steps else value[:0, 0]
            for name, value in signals.items()
        }  # a batch whose answers were all dropped keeps the arrays' shapes, with no rows
    return _Batch(rows, dropped, new_tokens, arrays)


def _token_arrays(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Ragged id lists as flat arrays with offsets (row ``r``: ``ids[offsets[r]:offsets[r + 1]]``)."""
    arrays = {}
    for name, lists in (("prompt", prompt_ids), ("response", response_ids)):
        arrays[f"{name}_ids"] = np.array([t for ids in lists for t in ids], dtype=np.int64)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum([len(ids) for ids in lists])]).astype(np.int64)
    return arrays


class _StepSignals:
    """The teacher's top-k raw logits (T = 1) at every step generation takes, reduced as it goes.

    A forward hook on the model sees each step's last-position logits (what
    ``output_logits=True`` would keep in full, ``[sequences, vocabulary]`` per step) and keeps
    only their top k, log-sum-exp and tail mass; the next call's input is the token just chosen,
    which gives the teacher's log-probability of it. Columns past the tokenizer's vocabulary (a
    padded embedding matrix) are cut first, as the training teacher does."""

    def __init__(self, model: torch.nn.Module, k: int, vocab: int) -> None:
        self.k, self.vocab = k, vocab
        self.parts: dict[str, list[torch.Tensor]] = {
            n: [] for n in ("values", "indices", "logsumexp", "tail", "chosen")
        }
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's logits and log-sum-exp
        self._handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise DistillError("generate --signals: the model was called without input_ids; generate without --signals")
        self._resolve(ids[:, -1])
        logits = output.logits[:, -1, : self.vocab].float()
        top = TopKLogits.from_dense(logits, self.k)
        for name in ("values", "indices", "logsumexp", "tail"):
            self.parts[name].append(getattr(top, name).cpu())
        self._pending = (logits, top.logsumexp)

    def _resolve(self, chosen: torch.Tensor) -> None:
        if self._pending is not None:
            logits, logsumexp = self._pending
            picked = logits.gather(-1, chosen.to(logits.device).unsqueeze(-1)).squeeze(-1)
            self.parts["chosen"].append((picked - logsumexp).cpu())
            self._pending = None

    def remove(self) -> None:
        self._handle.remove()

    def arrays(self, new: torch.Tensor) -> dict[str, np.ndarray]:
        """``[sequences, steps, ...]`` arrays for the generated tokens ``new``."""
        self._resolve(new[:, len(self.parts["chosen"])])  # the last step's token is in no later call
        stacked = {name: torch.stack(values, 1) for name, values in self.parts.items()}
        return {
            "values": stacked["values"].half().numpy(),
            "indices": stacked["indices"].numpy().astype(index_dtype(self.vocab)),
            "logsumexp": stacked["logsumexp"].numpy(),
            "tail": stacked["tail"].numpy(),
            "label_logprob": stacked["chosen"].numpy(),
        }


def read_token_shards(
    out: Path, manifest: dict[str, Any], field: str = "data.path"
) -> list[dict[str, np.ndarray]] | None:
    """The token shards of a finished ``distill generate`` output, in row order, each checked
    against the manifest's sha256; None for an output written before tokens were kept."""
    shards = manifest.get("token_shards")
    if not shards or sum(shard["rows"] for shard in shards) != manifest.get("rows") or not tokens_dir_for(out).is_dir():
        return None  # written before tokens were kept, or copied without them: the text is read
    loaded = []
    for shard in shards:
        directory = tokens_dir_for(out) / shard["name"]
        arrays = {}
        for name, digest in shard["files"].items():
            path = directory / name
            if not path.is_file() or file_sha256(path) != digest:
                raise DistillError(
                    f"{field}: {path} is missing or damaged (checksum mismatch); run `distill generate` again "
                    f"with --overwrite"
                )
            arrays[name.removesuffix(".npy")] = np.load(path, mmap_mode="r", allow_pickle=False)
        loaded.append(arrays)
    return loaded


def token_rows(shards: list[dict[str, np.ndarray]]) -> list[tuple[list[int], list[int]]]:
    """Every row's (prompt ids, response ids) as the teacher saw and wrote them."""
    rows = []
    for arrays in shards:
        prompts, responses = arrays["prompt_offsets"], arrays["response_offsets"]
        for r in range(len(prompts) - 1):
            rows.append(
                (
                    arrays["prompt_ids"][prompts[r] : prompts[r + 1]].tolist(),
                    arrays["response_ids"][responses[r] : responses[r + 1]].tolist(),
                )
            )
    return rows
