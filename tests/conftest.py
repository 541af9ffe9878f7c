import base64
import functools
import gzip
import json
import os
import re
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis.errors import UnsatisfiedAssumption

# `make test` (and CI) draws the same hypothesis cases on every run and every machine (a fixed seed
# per test, no example database), so that a red suite always means a change broke something.
# `make fuzz` (DISTILL_FUZZ=1) draws fresh cases; each failure it finds is written to
# tests/fuzz_regressions.json, which the suite replays as explicit examples from then on.
FUZZING = bool(os.environ.get("DISTILL_FUZZ"))
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("fuzz", derandomize=False, database=None, report_multiple_bugs=False)
settings.load_profile("fuzz" if FUZZING else "fixed")
REGRESSIONS = Path(__file__).with_name("fuzz_regressions.json")
_FAILURES: dict[str, dict] = {}  # test -> the arguments of its last failing call (hypothesis' minimal example)


def encode(value):
    """Generated arguments as JSON: bytes, tuples and arrays tagged, so that they decode exactly."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"$array": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "$bytes" in value:
            return base64.b64decode(value["$bytes"])
        if "$tuple" in value:
            return tuple(decode(v) for v in value["$tuple"])
        if "$array" in value:
            return np.asarray(value["$array"], dtype=value["dtype"]).reshape(value["shape"])
        return {k: decode(v) for k, v in value.items()}
    return value


def recorded(*fixtures: str):
    """Under ``make fuzz``, remember the generated arguments of a failing call (not ``fixtures``);
    hypothesis calls the test last with its minimal failing example, which is what gets saved."""

    def decorate(test):
        @functools.wraps(test)
        def wrapper(*args, **kwargs):
            try:
                return test(*args, **kwargs)
            except UnsatisfiedAssumption:
                raise
            except BaseException:
                if FUZZING:
                    generated = {k: v for k, v in kwargs.items() if k not in fixtures}
                    _FAILURES[test.__name__] = {"test": test.__name__, "args": encode(generated)}
                raise

        return wrapper

    return decorate


def recorded_regressions() -> list[dict]:
    return json.loads(REGRESSIONS.read_text()) if REGRESSIONS.exists() else []


def pytest_sessionfinish(session, exitstatus):
    if not _FAILURES:
        return
    known = recorded_regressions()
    new = [case for case in _FAILURES.values() if case not in known]
    if new:
        REGRESSIONS.write_text(json.dumps(known + new, indent=1) + "\n")
        print(f"\nfuzz: {len(new)} new failing case(s) recorded in {REGRESSIONS}; `make test` replays them")


def data_segment_bytes() -> int:
    match = re.search(r"^VmData:\s+(\d+)\s*kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


@pytest.fixture(scope="module")
def memory_limit():
    """Allocations beyond 4 GiB more than the process holds now fail (RLIMIT_DATA) instead of
    filling the machine: a size bug is a failing test with its input, not an OOM kill."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_segment_bytes() + 4 * 2**30
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


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
