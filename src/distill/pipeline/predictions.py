"""A teacher's test predictions, remembered between runs.

Why: every run scores its teacher on the test split, and on a small job that pass costs more
than anything else outside training (a 137k-parameter CNN on Fashion-MNIST's 10,000 test images:
about 1.5 s on 2 cores; a BERT teacher: minutes). Seeds, sweeps, tuning trials and the runs of a
chain score the same teacher on the same inputs again and again. Its logits are kept under the
cache directory, keyed by the weights' sha256, the test inputs and the task, and checked on a few
test samples each time they are used: a forward() edited since they were stored gives other
outputs there, and the whole pass is made again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.core.data import Split
from distill.core.inputs import Inputs, take
from distill.core.io import atomic_path, hash_json, hash_tensors

PROBES = 32  # test samples predicted again to check remembered logits (evenly spread over the split)
RTOL, ATOL = 1e-3, 1e-4  # batches of another size round differently; an edited model differs by far more


def probe_index(n: int) -> Tensor:
    """The test samples a remembered prediction is checked on."""
    return torch.linspace(0, max(n - 1, 0), min(n, PROBES)).round().long().unique()


def remembered_predictions(
    model: nn.Module,
    weights_sha256: str,
    test: Split,
    predict: Callable[[nn.Module, Inputs], Tensor],
    cache_dir: Path,
    task: str,
) -> tuple[Tensor, bool]:
    """``predict(model, test.x)``, from the cache when an earlier run stored it for these weights
    and inputs and the model still gives the same outputs on the probe samples; stored otherwise.
    Returns the logits and whether they were remembered."""
    key = hash_json({"weights": weights_sha256, "test": hash_tensors(*test.tensors()), "task": task})
    path = cache_dir / "predictions" / f"{key[:24]}.safetensors"
    stored = _load(path)
    if stored is not None and len(stored) == len(test):
        index = probe_index(len(test))
        fresh = predict(model, take(test.x, index))
        if fresh.shape == stored[index].shape and torch.allclose(fresh, stored[index], rtol=RTOL, atol=ATOL):
            return stored, True
    logits = predict(model, test.x)
    try:
        with atomic_path(path) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
    except OSError:
        pass  # a read-only or full cache folder costs the next run this pass again, never this run
    return logits, False


def _load(path: Path) -> Tensor | None:
    """The stored logits, or None when there are none or the file is unreadable (made again)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["logits"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
