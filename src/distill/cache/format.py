"""An offline cache of teacher signals: run the teacher once, train students from disk.

Layout of a cache directory::

    manifest.json                 teacher identity, data fingerprint, k, dtype, shards and checksums
    shards/train-00000/values.npy     [n, *row_shape, k]  top-k logits (float16/bfloat16-as-uint16/int8/float32)
                       indices.npy    [n, *row_shape, k]  their classes (smallest unsigned type that fits)
                       logsumexp.npy  [n, *row_shape]     log-sum-exp of the full row at T = 1
                       tail.npy       [n, *row_shape]     log of the probability outside the top-k
                       offset.npy, scale.npy              per-row int8 scale (int8 only)
                       feature-<name>.npy                 tapped teacher features (float16, optional)
                       positions.npy, mask.npy            packed shards only (see below)
    shards/test-00000/label_logprob.npy  [m]              packed held-out shards: the teacher's
                                                          log-probability of each next token

A row is one sample (``[batch, classes]`` logits) or one token position (``[batch, seq, vocab]``);
``row_shape`` is ``[]`` or ``[seq]``. With per-position rows and a mask (token data with padding)
a shard is *packed*: the signal arrays hold only the positions that count, ``[m, k]``, in sample
order; ``positions.npy`` says where each sample's rows start and ``mask.npy`` which positions they
are. Padding is never stored; a lookup fills it with a uniform row that every term masks out. Signals are temperature-free (raw logits at T = 1), so one
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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.core.io import file_sha256
from distill.core.signals import QuantizedValues, TopKLogits, ValueDtype, index_dtype

FORMAT = "distill-teacher-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
LOGITS_FORMAT = "raw teacher logits at T=1: top-k values and indices, row log-sum-exp, log of the tail mass"


def write_shard(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
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


def verify_shard(directory: Path, checksums: dict[str, str]) -> str | None:
    """The first file of a shard that is missing or whose checksum differs, else None."""
    for name, digest in checksums.items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            return str(path)
    return None


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def mismatch(identity: dict, other: dict | None) -> str | None:
    """The first identity field (teacher, data, k, dtype, ...) that differs, else None."""
    if other is None:
        return "manifest"
    for key, value in identity.items():
        if other.get(key) != value:
            return key
    return None


def shard_arrays(signals: TopKLogits, features: dict[str, Tensor], dtype: ValueDtype) -> dict[str, np.ndarray]:
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


def pack_positions(keep: Tensor) -> dict[str, np.ndarray]:
    """What locates a packed shard's rows: ``positions`` ([samples + 1], where each sample's kept
    positions start in the packed arrays) and ``mask`` ([samples, seq], which positions they are)."""
    counts = keep.sum(1).numpy().astype(np.int64)
    return {"positions": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), "mask": keep.numpy()}


def padding_row(vocab: int, k: int, dtype: ValueDtype) -> dict[str, np.ndarray]:
    """The stored arrays of one row that stands in for a position that was not stored (padding):
    a uniform distribution, finite everywhere, so that masked-out terms stay exactly zero."""
    arrays = shard_arrays(TopKLogits.from_dense(torch.zeros(1, vocab), k), {}, dtype)
    return {name: array[0] for name, array in arrays.items()}
