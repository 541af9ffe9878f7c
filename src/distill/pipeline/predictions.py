"""A teacher's test predictions, remembered between runs.

Why: every run scores its teacher on the test split, and on a small job that pass costs more
than anything else outside training (a 137k-parameter CNN on Fashion-MNIST's 10,000 test images:
about 1.5 s on 2 cores; a BERT teacher or a causal LM: minutes). Seeds, sweeps, tuning trials and
the runs of a chain score the same teacher on the same inputs again and again. Its predictions
(logits, embeddings or per-token scores) are kept under the cache directory, keyed by the weights'
sha256, the test split and the task, and checked on a few test samples each time they are used: a
forward() edited since they were stored gives other outputs there, and the whole pass is made again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.core.data import Split
from distill.core.io import atomic_path, hash_json, hash_tensors

PROBES = 32  # test samples predicted again to check remembered predictions (evenly spread over the split)
RTOL, ATOL = 1e-3, 1e-4  # batches of another size round differently; an edited model differs by far more

Predictions = TypeVar("Predictions")  # a tensor, or a dataclass of tensors (a language model's token scores)


def probe_index(n: int) -> Tensor:
    """The test samples a remembered prediction is checked on."""
    return torch.linspace(0, max(n - 1, 0), min(n, PROBES)).round().long().unique()


def remembered_predictions(
    model: nn.Module,
    weights_sha256: str,
    test: Split,
    predict: Callable[[nn.Module, Split], Predictions],
    cache_dir: Path,
    task: str,
) -> tuple[Predictions, bool]:
    """``predict(model, test)``, from the cache when an earlier run stored it for these weights
    and this split and the model still gives the same outputs on the probe samples; stored
    otherwise. Returns the predictions and whether they were remembered."""
    key = hash_json({"weights": weights_sha256, "test": hash_tensors(*test.tensors()), "task": task})
    path = cache_dir / "predictions" / f"{key[:24]}.safetensors"
    stored = _load(path)
    if stored is not None:
        index = probe_index(len(test))
        fresh = predict(model, test.subset(index))
        if _agree(_tensors(fresh), stored, index, len(test)):
            return _rebuild(stored, like=fresh), True
    predictions = predict(model, test)
    try:
        with atomic_path(path) as tmp:
            save_file({name: t.contiguous() for name, t in _tensors(predictions).items()}, str(tmp))
    except OSError:
        pass  # a read-only or full cache folder costs the next run this pass again, never this run
    return predictions, False


def _tensors(predictions) -> dict[str, Tensor]:
    """Predictions as named tensors: a tensor alone, or a dataclass's fields that are set."""
    if isinstance(predictions, Tensor):
        return {"tensor": predictions}
    return {f.name: v for f in dataclasses.fields(predictions) if (v := getattr(predictions, f.name)) is not None}


def _rebuild(stored: dict[str, Tensor], like):
    """The stored tensors in the shape of ``like`` (the probe's predictions, of the same kind)."""
    if isinstance(like, Tensor):
        return stored["tensor"]
    return dataclasses.replace(like, **{f.name: stored.get(f.name) for f in dataclasses.fields(like)})


def _agree(fresh: dict[str, Tensor], stored: dict[str, Tensor], index: Tensor, n: int) -> bool:
    """The probe's predictions match the stored rows: the same fields and shapes, and every
    floating-point field within tolerance (integer fields such as a top-1 token may flip on a tie)."""
    if fresh.keys() != stored.keys() or any(len(t) != n for t in stored.values()):
        return False
    for name, value in fresh.items():
        kept = stored[name][index]
        if value.shape != kept.shape or value.dtype != kept.dtype:
            return False
        if value.is_floating_point() and not torch.allclose(value, kept, rtol=RTOL, atol=ATOL, equal_nan=True):
            return False
    return True


def _load(path: Path) -> dict[str, Tensor] | None:
    """The stored tensors, or None when there are none or the file is unreadable (made again)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
