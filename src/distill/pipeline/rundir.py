"""Run directories: built in ``<dir>/<name>.partial`` and moved into place only when complete.

Shared by ``distill run`` and ``distill chain | sweep | tune``: a failed or interrupted command
never leaves something that looks finished, and only directories distill wrote are replaced.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from distill.core.errors import DistillError
from distill.core.io import write_text
from distill.pipeline.config import OutputSpec, run_identity


def run_dir_paths(output: OutputSpec) -> tuple[Path, Path]:
    """The run directory and the ``.partial`` directory it is built in."""
    final = output.dir / (output.name or "run")
    return final, final.with_name(final.name + ".partial")


def is_run_dir(path: Path, *markers: str) -> bool:
    """Only directories distill wrote (a config.yaml and the given markers) may be replaced."""
    return path.is_dir() and all((path / name).is_file() for name in ("config.yaml", *markers))


def prepare_dir(
    output: OutputSpec,
    saved: dict[str, Any],
    marker: str,
    resume: bool,
    overwrite: bool,
    console: Console,
    resumable: bool = True,
) -> tuple[Path, Path]:
    """The final and ``.partial`` directories of a command's run; the partial one exists on
    return and holds ``config.yaml`` (``saved``). ``marker`` is the file only a finished run has;
    ``resumable`` says whether the command offers ``--resume``. With both ``resume`` and
    ``overwrite`` (the demo), an unfinished run of the same config resumes, another starts over."""
    if output.dir.exists() and not output.dir.is_dir():
        raise DistillError(f"output.dir: {output.dir} is a file, not a directory")
    final, partial = run_dir_paths(output)
    saved_config = partial / "config.yaml"
    if final.exists():
        if not overwrite:
            raise DistillError(f"run directory {final} already exists; pass --overwrite or choose another output.name")
        if not is_run_dir(final, marker):
            raise DistillError(
                f"{final} exists and is not a distill run directory of this kind; choose another output.name"
            )
    if partial.exists():
        if not is_run_dir(partial):
            raise DistillError(f"{partial} exists and is not a distill run directory; move it away")
        try:
            previous = yaml.safe_load(saved_config.read_text())
        except (OSError, yaml.YAMLError):
            previous = None
        same = isinstance(previous, dict) and run_identity(previous) == run_identity(saved)
        if resume and same:
            console.print(f"resuming {partial}")
        elif overwrite:
            shutil.rmtree(partial)
        elif resume:
            raise DistillError(
                f"--resume: the config differs from the one {partial} was started with ({saved_config}); use the same config"
            )
        else:
            options = "pass --resume to continue it or --overwrite to start over" if resumable else "pass --overwrite"
            raise DistillError(f"an unfinished run exists at {partial}; {options}")
    elif resume and not overwrite:
        console.print(f"[dim]--resume: nothing to resume at {partial}, starting a new run[/]")
    partial.mkdir(parents=True, exist_ok=True)
    write_text(saved_config, yaml.safe_dump(saved, sort_keys=False))
    return final, partial


def finish_dir(partial: Path, final: Path) -> None:
    """Move a complete run into place (replacing an older one only after it is complete)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
