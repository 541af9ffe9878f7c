"""Atomic file writes, safe weight loading and content hashing.

Every file distill writes goes through a temporary file and ``os.replace`` so a crash
never leaves something that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from distill.core.errors import DistillError
from distill.core.layout import standard_layout


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:  # on disk before it is renamed into place
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it into place only if the block succeeds,
    so a failed export or conversion never leaves a half-written directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON readers (jq, browsers) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def save_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Save a model's weights as safetensors (atomically); return the file size in bytes."""
    with atomic_path(path) as tmp, standard_layout(model):
        save_model(model, str(tmp))
    return Path(path).stat().st_size


def load_weights(model: nn.Module, path: str | os.PathLike, field: str = "weights") -> nn.Module:
    """Load safetensors weights into ``model``; a wrong file or architecture is a DistillError
    naming ``field`` (the config field that points at the file)."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{field}: weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise DistillError(f"{field}: cannot read {path} ({err}); expected a .safetensors file") from err
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise DistillError(
            f"{field}: weights in {path} do not fit the configured model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; check the model spec"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise DistillError(
                f"{field}: weights in {path} do not fit the configured model: {key} is {shapes[key]} in the file "
                f"but {shape} in the model (different class count or architecture?)"
            )
    load_model(model, str(path), strict=True)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DistillError(f"{field}: weights in {path} hold NaN or infinite values ({key}); the file is unusable")
    return model


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Save a training checkpoint (tensors, numbers, strings only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise DistillError(f"cannot load checkpoint {path}: {type(err).__name__}; delete it to start over") from err


def hash_tensors(*tensors: torch.Tensor) -> str:
    """A sha256 fingerprint of tensor contents (dtype and shape included)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where trained teachers, teachers' test predictions and tokenised texts are kept between
    runs ($DISTILL_CACHE_DIR, or distill/ in $XDG_CACHE_HOME or ~/.cache)."""
    env = os.environ.get("DISTILL_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".gguf")


def directory_digest(
    directory: str | os.PathLike, memo: str | os.PathLike | None = None, skip: tuple[str, ...] = ()
) -> str:
    """A sha256 fingerprint of a model directory from its files' digests (names and contents, not
    tensors). With ``memo`` (a JSON file), a file whose size and modification time are unchanged
    is not read again: the second run with a 500 MB teacher costs a ``stat`` per file. Files whose
    names end with one of ``skip`` are left out (e.g. :data:`WEIGHT_SUFFIXES` for a tokenizer)."""
    directory = Path(directory).resolve()
    known: dict[str, Any] = {}
    if memo is not None and Path(memo).is_file():
        try:
            known = json.loads(Path(memo).read_text())
        except ValueError:
            known = {}  # a damaged memo is only a slower run
    digests, changed = {}, False
    files = (p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(skip))
    for file in sorted(files):
        stat = file.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = known.get(str(file))
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            entry, changed = {"stamp": stamp, "sha256": file_sha256(file)}, True
            known[str(file)] = entry
        digests[file.name] = entry["sha256"]
    if memo is not None and changed:
        Path(memo).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(memo)) as tmp:
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    return hash_json(digests)


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
