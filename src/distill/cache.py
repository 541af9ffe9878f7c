"""An offline cache of teacher signals: run the teacher once, train students from disk.

Layout of a cache directory::

    manifest.json                 teacher identity, data fingerprint, k, dtype, shards and checksums
    shards/train-00000/values.npy     [n, *row_shape, k]  top-k logits (float16/bfloat16-as-uint16/int8/float32)
                       indices.npy    [n, *row_shape, k]  their classes (smallest unsigned type that fits)
                       logsumexp.npy  [n, *row_shape]     log-sum-exp of the full row at T = 1
                       tail.npy       [n, *row_shape]     log of the probability outside the top-k
                       offset.npy, scale.npy              per-row int8 scale (int8 only)
                       feature-<name>.npy                 tapped teacher features (float16, optional)

A row is one sample (``[batch, classes]`` logits) or one token position (``[batch, seq, vocab]``);
``row_shape`` is ``[]`` or ``[seq]``. Signals are temperature-free (raw logits at T = 1), so one
cache serves any temperature. Shards are ``.npy`` files read through ``numpy.memmap``: a cache
larger than RAM trains at page-cache speed, and ``np.load(allow_pickle=False)`` never unpickles.
Every file's sha256 is in the manifest; a damaged shard or a cache made for other data is
refused with a one-line error. Caching is resumable: shards are finished one at a time in
``<path>.partial`` and recorded in its ``progress.json``; a rerun continues after the last one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn

from ._version import __version__
from .data import DataBundle
from .errors import DistillError
from .inputs import Inputs, call_model, take, to_device
from .io import file_sha256, json_safe, write_json
from .losses import ModelOutputs
from .losses.base import logits_of
from .signals import QuantizedValues, TopKLogits, ValueDtype, index_dtype
from .taps import FeatureTaps

FORMAT = "distill-teacher-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MAX_OPEN_SHARDS = 64
LOGITS_FORMAT = "raw teacher logits at T=1: top-k values and indices, row log-sum-exp, log of the tail mass"


# ---------------------------------------------------------------------------- writing


def _split(data: DataBundle, name: str):
    return getattr(data, name)


def _teacher_rows(
    teacher: nn.Module, taps: FeatureTaps | None, x: Tensor, k: int, device: torch.device
) -> tuple[TopKLogits, dict[str, Tensor]]:
    with torch.no_grad():  # not inference_mode: feature taps read tensors' version counters
        if taps is None:
            logits, features = logits_of(call_model(teacher, to_device(x, device))), {}
        else:
            with taps.recording() as recorded:
                logits = logits_of(call_model(teacher, to_device(x, device)))
            features = {name: value.half().cpu() for name, value in recorded.items()}
    return TopKLogits.from_dense(logits.float(), k).to("cpu"), features  # only the top-k leave the device


def _shard_arrays(signals: TopKLogits, features: dict[str, Tensor], dtype: ValueDtype) -> dict[str, np.ndarray]:
    quantized = QuantizedValues.encode(signals.values, dtype)
    values = quantized.data
    if dtype == "bfloat16":  # numpy has no bfloat16: store the bits
        values = values.view(torch.int16)
    arrays = {
        "values": values.numpy(),
        "indices": signals.indices.numpy().astype(index_dtype(signals.vocab_size)),
        "logsumexp": signals.logsumexp.numpy().astype(np.float32),
        "tail": signals.tail.numpy().astype(np.float32),
    }
    if dtype == "int8":
        arrays["offset"] = quantized.offset.squeeze(-1).numpy().astype(np.float32)
        arrays["scale"] = quantized.scale.squeeze(-1).numpy().astype(np.float32)
    for name, value in features.items():
        arrays[f"feature-{name}"] = value.numpy().astype(np.float16)
    return arrays


def _write_shard(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write one shard into a temporary directory, fsync it, move it into place; return checksums."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checksums = {}
    for name, array in arrays.items():
        path = tmp / f"{name}.npy"
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        checksums[f"{name}.npy"] = file_sha256(path)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return checksums


def _verify_shard(directory: Path, checksums: dict[str, str]) -> str | None:
    """The first file of a shard that is missing or whose checksum differs, else None."""
    for name, digest in checksums.items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            return str(path)
    return None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _mismatch(identity: dict, other: dict | None) -> str | None:
    """The first identity field (teacher, data, k, dtype, ...) that differs, else None."""
    if other is None:
        return "manifest"
    for key, value in identity.items():
        if other.get(key) != value:
            return key
    return None


def write_cache(
    teacher: nn.Module,
    data: DataBundle,
    path: Path,
    *,
    identity: dict[str, Any],
    k: int,
    dtype: ValueDtype,
    features: list[str] | None = None,
    shard_rows: int = 1_000_000,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    console: Console | None = None,
    on_shard: Callable[[str, int], None] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Run ``teacher`` over every split of ``data`` once and store its top-k signals at ``path``.

    ``identity`` (teacher weights hash, data fingerprint, ...) goes into the manifest: an
    existing cache with the same identity and settings is reused, a different one is refused
    unless ``overwrite``. An interrupted run resumes from ``<path>.partial``; ``on_shard(split,
    shard)`` is called after each finished shard (raising there interrupts like a crash).
    ``info`` is recorded in the manifest without being part of the identity (e.g. where the
    teacher's weights were read from).
    """
    console = console or Console(quiet=True)
    device = torch.device(device)
    path = Path(path)
    features = list(features or [])
    probe = logits_of(_eval(teacher, take(data.train.x, slice(0, 1)), device))
    vocab, row_shape = probe.shape[-1], list(probe.shape[1:-1])
    rows_per_sample = int(np.prod(row_shape)) if row_shape else 1
    samples_per_shard = max(1, shard_rows // rows_per_sample)
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION, **identity, "k": min(k, vocab), "dtype": dtype,
        "features": features, "samples_per_shard": samples_per_shard, "batch_size": batch_size,
    }  # fmt: skip
    settings = json.loads(json.dumps(json_safe(settings)))  # compared with what JSON files give back

    if path.exists():
        if not path.is_dir():
            raise DistillError(f"cache.path: {path} is a file, not a cache directory")
        previous = _read_json(path / "manifest.json")
        differs = _mismatch(settings, previous)
        if differs is None and not overwrite:
            damaged = next(
                (bad for split in previous["splits"].values() for record in split["shards"]
                 if (bad := _verify_shard(path / "shards" / record["name"], record["files"])) is not None),
                None,
            )  # fmt: skip
            if damaged is not None:
                raise DistillError(
                    f"cache {path}: file {damaged} is damaged (checksum mismatch); pass --overwrite to rebuild it"
                )
            console.print(f"cache: {path} is up to date (same teacher, data and settings)")
            return path
        if differs is not None and not overwrite:
            raise DistillError(
                f"cache {path} was made with a different {differs}; pass --overwrite to rebuild it or choose another cache.path"
            )
        if previous is None and any(path.iterdir()):
            raise DistillError(f"{path} exists and is not a distill cache; choose another cache.path")

    partial = path.with_name(path.name + ".partial")
    progress_file = partial / "progress.json"
    progress = _read_json(progress_file) if partial.exists() else None
    if partial.exists() and (progress is None or _mismatch(settings, progress.get("settings")) is not None):
        if progress is None and any(p.name != "shards" for p in partial.iterdir()):
            raise DistillError(f"{partial} exists and is not an unfinished distill cache; move it away")
        console.print(f"cache: discarding {partial} (made with other settings)")
        shutil.rmtree(partial)
        progress = None
    if progress is None:
        progress = {"settings": settings, "shards": {}}
    elif progress["shards"]:
        console.print(f"cache: resuming {partial} ({len(progress['shards'])} shard(s) done)")

    taps = FeatureTaps(teacher, features, "teacher") if features else None
    teacher.to(device).eval()
    started = time.perf_counter()
    splits: dict[str, Any] = {}
    try:
        for split_name in SPLITS:
            split = _split(data, split_name)
            n = len(split)
            shards = []
            for shard, start in enumerate(range(0, n, samples_per_shard)):
                key = f"{split_name}-{shard:05d}"
                end = min(n, start + samples_per_shard)
                record = progress["shards"].get(key)
                if record is not None and _verify_shard(partial / "shards" / key, record["files"]) is None:
                    shards.append(record)
                    continue
                parts = [
                    _teacher_rows(teacher, taps, take(split.x, slice(i, min(end, i + batch_size))), k, device)
                    for i in range(start, end, batch_size)
                ]
                signals = TopKLogits(
                    torch.cat([p[0].values for p in parts]), torch.cat([p[0].indices for p in parts]),
                    torch.cat([p[0].logsumexp for p in parts]), torch.cat([p[0].tail for p in parts]), vocab,
                )  # fmt: skip
                missing = [name for name in features if name not in parts[0][1]]
                if missing:
                    raise DistillError(f"cache.features: teacher module {missing[0]!r} did not run in the forward pass")
                feats = {name: torch.cat([p[1][name] for p in parts]) for name in features}
                files = _write_shard(partial / "shards" / key, _shard_arrays(signals, feats, dtype))
                record = {"name": key, "start": start, "samples": end - start, "files": files}
                progress["shards"][key] = record
                write_json(progress_file, progress)
                shards.append(record)
                console.print(f"cache: {key}: {end - start} samples")
                if on_shard is not None:
                    on_shard(split_name, shard)
            splits[split_name] = {"samples": n, "shards": shards}
    finally:
        if taps is not None:
            taps.remove()

    feature_shapes = {
        name: list(np.load(partial / "shards" / "train-00000" / f"feature-{name}.npy", mmap_mode="r").shape[1:])
        for name in features
    }
    manifest = {
        **settings,
        **(info or {}),
        "vocab_size": vocab,
        "row_shape": row_shape,
        "index_dtype": str(index_dtype(vocab)),
        "logits": LOGITS_FORMAT,
        "feature_shapes": feature_shapes,
        "splits": splits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "distill_version": __version__,
        "seconds": time.perf_counter() - started,
    }
    write_json(partial / "manifest.json", manifest)
    progress_file.unlink()
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
    return path


def _eval(model: nn.Module, x: Inputs, device: torch.device) -> object:
    model.to(device).eval()
    with torch.inference_mode():
        return call_model(model, to_device(x, device))


# ---------------------------------------------------------------------------- reading


class _Shard:
    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.arrays = {
            name.removesuffix(".npy"): np.load(directory / name, mmap_mode="r", allow_pickle=False) for name in files
        }


class CachedTeacher:
    """Teacher signals read from a cache directory written by :func:`write_cache`.

    ``lookup(index)`` returns the teacher's outputs for training samples ``index`` as
    ``ModelOutputs`` whose logits are :class:`~distill.signals.TopKLogits`; the Distiller uses
    it in place of a teacher model. ``verify=True`` checks every shard's sha256 on opening.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, field: str = "teacher.path") -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            hint = " (an interrupted `distill cache`: run it again to finish)" if self._is_partial() else ""
            raise DistillError(f"{field}: {self.path} is not a teacher cache (no manifest.json){hint}")
        manifest = _read_json(self.path / "manifest.json")
        if manifest is None or manifest.get("format") != FORMAT:
            raise DistillError(f"{field}: {self.path}/manifest.json is not a distill teacher-cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DistillError(
                f"{field}: cache {self.path} has format version {manifest.get('format_version')}, this distill "
                f"reads {FORMAT_VERSION}; rebuild it with `distill cache`"
            )
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.k: int = manifest["k"]
        self.dtype: ValueDtype = manifest["dtype"]
        self.features: list[str] = manifest["features"]
        self.samples_per_shard: int = manifest["samples_per_shard"]
        self._field = field
        self._records: dict[str, list[dict]] = {split: info["shards"] for split, info in manifest["splits"].items()}
        self._open: OrderedDict[tuple[str, int], _Shard] = OrderedDict()  # memory maps, least recently used first
        for split, records in self._records.items():
            for number, record in enumerate(records):
                directory = self.path / "shards" / record["name"]
                if verify:
                    bad = _verify_shard(directory, record["files"])
                    if bad is not None:
                        raise DistillError(
                            f"{field}: cache file {bad} is missing or damaged (checksum mismatch); rebuild the cache with "
                            f"`distill cache --overwrite`"
                        )
                if number == 0:
                    self._shard(split, 0)  # fails early on a file numpy cannot read

    def _shard(self, split: str, number: int) -> _Shard:
        """Shard ``number`` of ``split``, memory-mapped on first use. At most ``MAX_OPEN_SHARDS``
        stay mapped (each map holds a file descriptor per array), so huge caches stay under the
        process's file limit."""
        key = (split, number)
        shard = self._open.get(key)
        if shard is None:
            directory = self.path / "shards" / self._records[split][number]["name"]
            try:
                shard = _Shard(directory, self._records[split][number]["files"])
            except (OSError, ValueError) as err:
                raise DistillError(f"{self._field}: cannot read cache shard {directory}: {err}") from None
            self._open[key] = shard
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(key)
        return shard

    def _is_partial(self) -> bool:
        return self.path.with_name(self.path.name + ".partial").is_dir()

    def __len__(self) -> int:
        return self.manifest["splits"]["train"]["samples"]

    @property
    def teacher(self) -> dict[str, Any]:
        """What the manifest records about the teacher (weights hash, parameters, model spec)."""
        return {**self.manifest.get("teacher", {}), **self.manifest.get("teacher_facts", {})}

    def model_spec(self) -> Any:
        """The teacher's architecture (a model spec) as the manifest records it; None if it does not."""
        from pydantic import TypeAdapter

        from .models import ModelSpec

        recorded = self.teacher.get("model")
        return None if recorded is None else TypeAdapter(ModelSpec).validate_python(recorded)

    def check_data(self, data: DataBundle, field: str = "teacher.path") -> None:
        """Refuse a cache made for other data: signals for sample i must be about sample i."""
        if self.manifest.get("data") != data.fingerprint:
            raise DistillError(
                f"{field}: cache {self.path} was made for different data (fingerprint differs from data: "
                f"{data.name}, {len(data.train)} train samples); rebuild it with `distill cache` for this config"
            )
        if self.vocab_size != data.num_classes:
            raise DistillError(
                f"{field}: cache {self.path} holds {self.vocab_size} classes but the data has {data.num_classes}"
            )

    def check_features(self, names: list[str]) -> None:
        missing = [name for name in names if name not in self.features]
        if missing:
            raise DistillError(
                f"teacher: the cache at {self.path} holds no features of teacher module {missing[0]!r} "
                f"(it holds {self.features or 'none'}); rebuild it with cache.features: [{missing[0]}]"
            )

    def bytes_per_row(self) -> float:
        """Stored bytes of the logit signals per row (sample or token), features excluded."""
        info = self.manifest["splits"]["train"]
        rows = info["samples"] * max(1, int(np.prod(self.manifest["row_shape"] or [1])))
        total = sum(
            (self.path / "shards" / record["name"] / name).stat().st_size
            for record in info["shards"]
            for name in record["files"]
            if not name.startswith("feature-")
        )
        return total / rows

    def _gather(self, split: str, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows ``index`` of the arrays ``names``, across shards; the shard arithmetic is done
        once for all arrays, and a batch within one shard is a plain fancy index."""
        shard_of, local = np.divmod(index, self.samples_per_shard)
        if len(index) and shard_of.min() == shard_of.max():
            arrays = self._shard(split, int(shard_of[0])).arrays
            return {name: arrays[name][local] for name in names}
        first = self._shard(split, 0).arrays
        out = {name: np.empty((len(index), *first[name].shape[1:]), dtype=first[name].dtype) for name in names}
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            arrays = self._shard(split, int(shard)).arrays
            for name in names:
                out[name][chosen] = arrays[name][local[chosen]]
        return out

    def lookup(self, index: Tensor, *, split: str = "train", device: torch.device | str | None = None) -> ModelOutputs:
        """The teacher's outputs for samples ``index`` of ``split`` (:class:`~distill.losses.base.TeacherSignals`)."""
        idx = index.detach().cpu().numpy().astype(np.int64)
        n = self.manifest["splits"][split]["samples"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"cache {self.path} holds {n} {split} samples; index {int(idx.max())} is out of range")
        names = ["values", "indices", "logsumexp", "tail"] + (["offset", "scale"] if self.dtype == "int8" else [])
        rows = self._gather(split, idx, names + [f"feature-{name}" for name in self.features])
        raw = torch.from_numpy(rows["values"])
        if self.dtype == "bfloat16":
            values = raw.view(torch.bfloat16).float()
        elif self.dtype == "int8":
            offset = torch.from_numpy(rows["offset"]).unsqueeze(-1)
            scale = torch.from_numpy(rows["scale"]).unsqueeze(-1)
            values = QuantizedValues(raw, "int8", offset, scale).decode()
        else:
            values = raw.float()
        signals = TopKLogits(
            values,
            torch.from_numpy(rows["indices"].astype(np.int64)),
            torch.from_numpy(rows["logsumexp"]),
            torch.from_numpy(rows["tail"]),
            self.vocab_size,
        )
        features = {name: torch.from_numpy(rows[f"feature-{name}"]).float() for name in self.features}
        if device is not None:
            signals = signals.to(device)
            features = {name: value.to(device) for name, value in features.items()}
        return ModelOutputs(logits=signals, features=features)

    def split_logits(self, split: str) -> TopKLogits:
        """The cached signals of a whole split (for the teacher's metrics on val / test)."""
        n = self.manifest["splits"][split]["samples"]
        return self.lookup(torch.arange(n), split=split).logits
