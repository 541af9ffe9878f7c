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
from pathlib import Path

import numpy as np

from distill.core.io import file_sha256

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
