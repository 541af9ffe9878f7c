"""Run tracking through Accelerate's trackers: TensorBoard or MLflow, when installed; off by default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from distill.core.errors import DistillError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def check_tracker(kind: str) -> None:
    """Fail before training when the chosen tracker's package is missing."""
    if kind != "none" and not any(importlib.util.find_spec(name) for name in PACKAGES[kind]):
        raise DistillError(f"output.tracker: {kind} is not installed; `pip install {kind}` or set output.tracker: none")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as ``a.b.c`` keys with scalar values, as trackers' hyper-parameter views want."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return flat


class RunTracker:
    """Per-epoch values and final metrics of one run, sent to the configured tracker (if any)."""

    def __init__(self, kind: str, directory: Path, name: str, config: dict[str, Any]) -> None:
        self._accelerator = None
        if kind == "none":
            return
        check_tracker(kind)
        from accelerate import Accelerator

        directory.mkdir(parents=True, exist_ok=True)
        if kind == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            # Accelerate's MLflow tracker ignores project_dir: keep MLflow's files in the run too
            import mlflow

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow ≥ 3.x asks for this opt-in
            mlflow.set_tracking_uri((directory / "mlruns").resolve().as_uri())
        self._accelerator = Accelerator(log_with=kind, project_dir=str(directory))
        self._accelerator.init_trackers(name, config=flatten(config))

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        if self._accelerator is not None:
            self._accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)

    def finish(self) -> None:
        """Flush and close the trackers (not ``end_training``, which would also tear down a
        distributed process group the caller may still use)."""
        if self._accelerator is not None:
            for tracker in self._accelerator.trackers:
                tracker.finish()
            self._accelerator = None
