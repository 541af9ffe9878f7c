import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

# Locally, hypothesis draws fresh cases every run (and replays failures from .hypothesis/); in CI
# (CI set, as .ci/run does) the cases are fixed, so that a red build always means a change broke it.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own teacher cache and a fixed thread count."""
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    """A directory with the four Fashion-MNIST IDX files holding small synthetic data."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "fmnist"
    directory.mkdir()
    for part, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 50, (n, 28, 28)) + (labels[:, None, None] * 20)
        write_idx(directory / f"{part}-images-idx3-ubyte", images.clip(0, 255))
        write_idx(directory / f"{part}-labels-idx1-ubyte", labels)
    return directory


def tiny_config(tmp_path: Path, **changes) -> dict:
    """A complete experiment on sklearn digits that trains in seconds."""
    config = {
        "seed": 0,
        "data": {"source": "digits"},
        "teacher": {
            "kind": "train",
            "model": {"arch": "cnn", "channels": [16, 32], "hidden": 32},
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.05},
        },
        "student": {"arch": "mlp", "hidden": [16]},
        "distill": {"alpha": 0.7, "temperature": 2.0},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.05},
        "eval": {"latency_repeats": 2, "latency_batch_sizes": [1, 16]},
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config
