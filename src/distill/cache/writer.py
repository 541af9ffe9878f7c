"""Writing a cache: the teacher runs once over every split; shards are finished one at a time."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor, nn

from distill._version import __version__
from distill.cache.format import (
    FORMAT,
    FORMAT_VERSION,
    LOGITS_FORMAT,
    SPLITS,
    mismatch,
    pack_positions,
    read_json,
    shard_arrays,
    verify_shard,
    write_shard,
)
from distill.cache.generated import GeneratedSignals
from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.fold import folded_batch_norms
from distill.core.inputs import Inputs, call_model, take, to_device
from distill.core.io import json_safe, write_json
from distill.core.losses.base import logits_of
from distill.core.signals import TopKLogits, ValueDtype, index_dtype
from distill.core.taps import FeatureTaps


def _split(data: DataBundle, name: str):
    return getattr(data, name)


class Views:
    """``settings["count"]`` augmented views of every training image, made by ``augment`` (an
    :class:`~distill.tasks.augment.ImageAugment`); ``settings`` identify them in the manifest."""

    def __init__(self, augment: Any, settings: dict[str, Any]) -> None:
        self.augment, self.settings, self.count = augment, settings, int(settings["count"])

    def split(self, train: Split) -> _ViewSplit:
        return _ViewSplit(self, train)


class _ViewSplit:
    """The views as a split: row ``r`` is view ``r // samples`` of image ``r % samples``."""

    mask = None

    def __init__(self, views: Views, train: Split) -> None:
        self.views, self.train = views, train
        self.x = self  # take(split.x, rows) asks for rows through __getitem__
        self.y = train.y.repeat(views.count)

    def __len__(self) -> int:
        return self.views.count * len(self.train)

    def __getitem__(self, rows: slice) -> Tensor:
        images, parts = len(self.train), []
        start, stop, _ = rows.indices(len(self))
        index = torch.arange(start, stop)
        for view in torch.unique(index // images).tolist():
            chosen = index[index // images == view] % images
            parts.append(self.views.augment(self.train.x[chosen], chosen, view, self.train.x)[0])
        return torch.cat(parts)


LOGITS_BUDGET = 512 * 2**20
"""Bytes of float32 logits one teacher batch may produce: a language model's batch of 128 blocks
of 128 tokens over a 49,152-entry vocabulary would make 3.2 GB, and its top-k selection several
copies (10.8 GB peak measured), so per-position rows run in smaller batches."""


def _teacher_rows(
    teacher: nn.Module | GeneratedSignals,
    taps: FeatureTaps | None,
    x: Tensor,
    k: int,
    device: torch.device,
    labels: Tensor | None = None,
    all_labels: Tensor | None = None,
) -> tuple[TopKLogits, dict[str, Tensor], Tensor | None]:
    """The teacher's top-k signals and tapped features for inputs ``x``, and with ``labels`` its
    log-probability of each label (0 where there is none): what scores a teacher known only by its
    cache exactly (a language model's perplexity needs the next token's probability even where it
    is outside the top k). Signals stored by ``distill generate`` are looked up instead (by the
    samples' tokens and ``all_labels``)."""
    if isinstance(teacher, GeneratedSignals):
        signals, label_logprobs = teacher.rows(x, all_labels, k)
        return signals, {}, (label_logprobs.masked_fill(labels < 0, 0.0) if labels is not None else None)
    with torch.no_grad():  # not inference_mode: feature taps read tensors' version counters
        if taps is None:
            logits, features = logits_of(call_model(teacher, to_device(x, device))), {}
        else:
            with taps.recording() as recorded:
                logits = logits_of(call_model(teacher, to_device(x, device)))
            features = {name: value.half().cpu() for name, value in recorded.items()}
        short = logits.shape[1] if logits.dim() == 3 else None
        if short is not None and all_labels is not None and all_labels.dim() == 2 and short < all_labels.shape[1]:
            # the model skipped columns that are padding in every row: pad them (and per-position
            # features) back to the split's width; padding is never counted
            wide = all_labels.shape[1]
            logits = torch.nn.functional.pad(logits, (0, 0, 0, wide - short))
            features = {
                name: torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, wide - short))
                if value.dim() >= 3 and value.shape[1] == short else value
                for name, value in features.items()
            }  # fmt: skip
        signals = TopKLogits.from_dense(logits.float(), k)
        label_logprobs = None
        if labels is not None:
            y = labels.to(logits.device)
            picked = logits.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1).float() - signals.logsumexp
            label_logprobs = picked.masked_fill(y < 0, 0.0).cpu()
    return signals.to("cpu"), features, label_logprobs  # only the top-k leave the device


def write_cache(
    teacher: nn.Module | GeneratedSignals,
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
    views: Views | None = None,
) -> Path:
    """Run ``teacher`` over every split of ``data`` once and store its top-k signals at ``path``.

    ``identity`` (teacher weights hash, data fingerprint, ...) goes into the manifest: an
    existing cache with the same identity and settings is reused, a different one is refused
    unless ``overwrite``. An interrupted run resumes from ``<path>.partial``; ``on_shard(split,
    shard)`` is called after each finished shard (raising there interrupts like a crash).
    ``info`` is recorded in the manifest without being part of the identity (e.g. where the
    teacher's weights were read from). With ``views`` the cache also holds a split ``views``:
    the teacher on ``views.count`` augmented views of every training image, row ``view × samples
    + image`` (FKD: students then train on augmented images with the teacher's exact targets).
    """
    console = console or Console(quiet=True)
    device = torch.device(device)
    path = Path(path)
    features = list(features or [])
    if isinstance(teacher, GeneratedSignals):  # token rows: [batch, seq, vocab]
        vocab, row_shape = teacher.vocab_size, list(data.train.y.shape[1:])
    else:
        probe = logits_of(_eval(teacher, take(data.train.x, slice(0, 1)), device))
        vocab, row_shape = probe.shape[-1], list(probe.shape[1:-1])
        if row_shape and data.train.y.dim() == 2:  # per position: the split's width, not the probe's length
            row_shape = list(data.train.y.shape[1:])
    rows_per_sample = int(np.prod(row_shape)) if row_shape else 1
    # per-position rows with a mask: only the positions that count are stored (padding never is)
    packed = bool(row_shape) and data.train.mask is not None
    samples_per_shard = max(1, shard_rows // rows_per_sample)
    per_sample = rows_per_sample * vocab * 4  # bytes of float32 logits per sample
    teacher_batch = max(1, min(batch_size, LOGITS_BUDGET // per_sample))
    if teacher_batch < batch_size and not isinstance(teacher, GeneratedSignals):
        console.print(
            f"cache: teacher batches of {teacher_batch} (not {batch_size}): each sample makes "
            f"{per_sample / 2**20:.0f} MiB of logits"
        )
    if views is not None and (packed or row_shape):
        raise DistillError("data.augment: views are cached for image classifiers only")
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION, **identity, "k": min(k, vocab), "dtype": dtype,
        "features": features, "samples_per_shard": samples_per_shard, "batch_size": batch_size,
        **({"views": views.settings} if views is not None else {}),
    }  # fmt: skip
    settings = json.loads(json.dumps(json_safe(settings)))  # compared with what JSON files give back

    if path.exists():
        if not path.is_dir():
            raise DistillError(f"cache.path: {path} is a file, not a cache directory")
        previous = read_json(path / "manifest.json")
        differs = mismatch(settings, previous)
        if differs is None and not overwrite:
            damaged = next(
                (bad for split in previous["splits"].values() for record in split["shards"]
                 if (bad := verify_shard(path / "shards" / record["name"], record["files"])) is not None),
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
    progress = read_json(progress_file) if partial.exists() else None
    if partial.exists() and (progress is None or mismatch(settings, progress.get("settings")) is not None):
        if progress is None and any(p.name != "shards" for p in partial.iterdir()):
            raise DistillError(f"{partial} exists and is not an unfinished distill cache; move it away")
        console.print(f"cache: discarding {partial} (made with other settings)")
        shutil.rmtree(partial)
        progress = None
    if progress is None:
        progress = {"settings": settings, "shards": {}}
    elif progress["shards"]:
        console.print(f"cache: resuming {partial} ({len(progress['shards'])} shard(s) done)")

    if isinstance(teacher, GeneratedSignals) and (features or k > teacher.k):
        raise DistillError(
            f"cache: the generated data stores the teacher's top-{teacher.k} logits and no features; "
            f"set cache.k <= {teacher.k} and no cache.features, or cache from the live teacher"
        )
    taps = FeatureTaps(teacher, features, "teacher") if features else None
    if isinstance(teacher, nn.Module):
        teacher.to(device).eval()
        if taps is None:  # only its outputs are stored: a copy with batch norms folded in computes them sooner
            teacher = folded_batch_norms(teacher, to_device(take(data.train.x, slice(0, 2)), device))
    started = time.perf_counter()
    splits: dict[str, Any] = {}
    try:
        for split_name in (*SPLITS, "views") if views is not None else SPLITS:
            split = views.split(data.train) if split_name == "views" else _split(data, split_name)
            n = len(split)
            shards = []
            for shard, start in enumerate(range(0, n, samples_per_shard)):
                key = f"{split_name}-{shard:05d}"
                end = min(n, start + samples_per_shard)
                record = progress["shards"].get(key)
                if record is not None and verify_shard(partial / "shards" / key, record["files"]) is None:
                    shards.append(record)
                    continue
                scored = packed and split_name != "train"  # the teacher's own scores on held-out text
                parts = [
                    _teacher_rows(
                        teacher, taps, take(split.x, slice(i, min(end, i + teacher_batch))), k, device,
                        split.y[i : min(end, i + teacher_batch)] if scored else None,
                        split.y[i : min(end, i + teacher_batch)],
                    )
                    for i in range(start, end, teacher_batch)
                ]  # fmt: skip
                signals = TopKLogits(
                    torch.cat([p[0].values for p in parts]), torch.cat([p[0].indices for p in parts]),
                    torch.cat([p[0].logsumexp for p in parts]), torch.cat([p[0].tail for p in parts]), vocab,
                )  # fmt: skip
                missing = [name for name in features if name not in parts[0][1]]
                if missing:
                    raise DistillError(f"cache.features: teacher module {missing[0]!r} did not run in the forward pass")
                feats = {name: torch.cat([p[1][name] for p in parts]) for name in features}
                keep = split.mask[start:end].bool() if packed else None
                arrays = shard_arrays(signals if keep is None else signals.select(keep), feats, dtype)
                if keep is not None:
                    arrays.update(pack_positions(keep))
                if scored:
                    arrays["label_logprob"] = torch.cat([p[2] for p in parts])[keep].numpy().astype(np.float32)
                files = write_shard(partial / "shards" / key, arrays)
                record = {"name": key, "start": start, "samples": end - start, "files": files}
                progress["shards"][key] = record
                write_json(progress_file, progress)
                shards.append(record)
                console.print(f"cache: {key}: {end - start} samples")
                if on_shard is not None:
                    on_shard(split_name, shard)
            rows = int(split.mask.sum()) if packed and split.mask is not None else n * rows_per_sample
            splits[split_name] = {"samples": n, "rows": rows, "shards": shards}
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
        "packed": packed,
        # held-out splits store the teacher's log-probability of each label (not shards resumed from
        # a cache begun by an older distill)
        "label_logprobs": packed
        and all("label_logprob.npy" in r["files"] for name in ("val", "test") for r in splits[name]["shards"]),
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
