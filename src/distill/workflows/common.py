"""Shared plumbing of the commands that run many experiments: ``distill chain``, ``sweep`` and ``tune``.

Each command reads the usual experiment config plus a section of its own (``chain:``,
``sweep:`` or ``tune:``) from the same YAML file, and writes one run directory, built in
``<name>.partial`` and moved into place only when complete (like a single run). Experiments
inside it are ordinary run directories; with ``--resume`` the finished ones are reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from rich.console import Console

from distill.core.errors import DistillError
from distill.core.io import write_text
from distill.pipeline.config import (
    WORKFLOW_SECTIONS,
    ExperimentConfig,
    apply_override,
    config_to_dict,
    format_validation_error,
    parse_config,
    read_yaml,
    run_identity,
)
from distill.pipeline.experiment import RunResult, run_experiment
from distill.pipeline.rundir import finish_dir, prepare_dir  # noqa: F401 - chain, sweep and tune import them from here

Section = TypeVar("Section", bound=BaseModel)

# ---------------------------------------------------------------------------- configs


def parse_section(raw: Any, key: str, model: type[Section], source: str) -> Section:
    """Validate section ``key`` of a config; errors name the field as ``key.field``."""
    wrapper = create_model(f"{key}_section", __config__=ConfigDict(extra="ignore"), **{key: (model, ...)})
    raw = {} if raw is None else raw
    try:
        return getattr(wrapper.model_validate({key: raw}), key)
    except ValidationError as err:
        raise DistillError(format_validation_error(err, source, {key: raw})) from None


def load_with_section(
    path: str | os.PathLike, overrides: list[str] | None, key: str, model: type[Section]
) -> tuple[ExperimentConfig, Section]:
    """The experiment config in ``path`` and its section ``key``; ``--set key.field=value``
    overrides reach the section, all others the experiment. Other commands' sections are
    ignored. Without ``output.name`` the run directory is named ``<file stem>-<key>``."""
    path = Path(path)
    raw = read_yaml(path)
    section: Any = None
    if isinstance(raw, dict):
        sections = {name: raw.pop(name) for name in WORKFLOW_SECTIONS if name in raw}
        section = sections.get(key)
    ours = [o for o in overrides or [] if o.partition("=")[0].strip().split(".")[0] == key]
    rest = [o for o in overrides or [] if o not in ours]
    if ours:
        holder = {key: section if isinstance(section, dict) else {}}
        for assignment in ours:
            apply_override(holder, assignment)
        section = holder[key]
    config = parse_config(raw, str(path), rest, base=path.parent)
    if config.output.name is None:
        config.output.name = f"{path.stem}-{key}"
    return config, parse_section(section, key, model, str(path))


def derive(config: ExperimentConfig, source: str, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with top-level sections replaced (pydantic models or plain data),
    validated again."""
    raw = config_to_dict(config)
    for key, value in changes.items():
        raw[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return parse_config(raw, source)


def teacher_model(config: ExperimentConfig) -> Any:
    """The teacher's architecture (a model spec), also for a cached teacher whose cache records
    it; None when a cache does not."""
    spec = getattr(config.teacher, "model", None)
    if spec is not None:
        return spec
    from distill.cache import CachedTeacher

    return CachedTeacher(config.teacher.path, verify=False).model_spec()


# ---------------------------------------------------------------------------- run directories


def run_or_reuse(
    config: ExperimentConfig, *, resume: bool, console: Console, cache_dir: Path | None = None
) -> RunResult:
    """Run one experiment; with ``resume``, a finished run of the same config is reused."""
    final = config.output.dir / (config.output.name or "run")
    metrics_file, saved = final / "metrics.json", final / "config.yaml"
    if resume and metrics_file.is_file() and saved.is_file():
        previous = yaml.safe_load(saved.read_text())
        if isinstance(previous, dict) and run_identity(previous) == run_identity(config_to_dict(config)):
            console.print(f"[dim]{final.name}: already finished, reusing {final}[/]")
            return RunResult(final, json.loads(metrics_file.read_text()))
    return run_experiment(config, resume=resume, overwrite=True, console=console, cache_dir=cache_dir)


def relocate_text(directory: Path, old: Path, new: Path, names: tuple[str, ...]) -> None:
    """Replace the absolute path ``old`` by ``new`` in the named text files under ``directory``
    (paths written while a run was built in its ``.partial`` directory)."""
    from html import escape

    for name in names:
        for file in directory.rglob(name):
            text = file.read_text(encoding="utf-8")
            updated = text.replace(str(old), str(new)).replace(escape(str(old)), escape(str(new)))
            if updated != text:
                write_text(file, updated)


# ---------------------------------------------------------------------------- the commands
