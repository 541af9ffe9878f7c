"""``python tests/resume_driver.py ARGS...`` runs ``distill ARGS...`` (its CLI, in this process) and
kills the process with SIGKILL at a chosen point: the crash that tests/test_resume.py recovers from.

``python tests/resume_driver.py --serve`` imports distill once and then runs jobs read from stdin, one JSON
object a line (``argv``, ``cwd``, ``env``, ``stdout``, ``stderr``: files for the output), each in a process
forked from it, answering each with a line ``{"returncode": ...}`` (-9 for a SIGKILL). The same runs, without
paying distill's imports (about 2.5 s of CPU) for every one.

Environment:
- ``DISTILL_TEST_KILL_STEP=N``: die at the start of the N-th training step of this process (steps are
  counted over every phase: each ``Distiller`` forward with labels, in training mode, with gradients).
- ``DISTILL_TEST_KILL_WRITE=NAME:K``: die in the K-th atomic write of a file called NAME, after only half
  of the temporary file is on disk and before it is renamed into place (a crash in the middle of a write).
- ``DISTILL_TEST_KILL_NOTE=PATH``: where to note, as JSON, where the process died.
- ``DISTILL_TEST_LIGHT_REPORTS=1``: write placeholders (atomically, as distill writes any file) instead of the
  plots and the HTML report, which take longer than the tiny training runs (tests/test_report.py tests those).

Every run uses one CPU thread, so that runs are comparable bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from distill.cli import main
from distill.core.distiller import Distiller


def die(**note) -> None:
    target = os.environ.get("DISTILL_TEST_KILL_NOTE")
    if target:
        Path(target).write_text(json.dumps(note))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(limit: int) -> None:
    forward = Distiller.forward
    steps = 0

    def counting_forward(self, *args, **kwargs):
        nonlocal steps
        if self.training and torch.is_grad_enabled() and kwargs.get("labels") is not None:
            steps += 1
            if steps == limit:
                die(
                    step=steps,
                    terms=sorted(self.terms.keys()),
                    progress=self.progress,
                    teacher=self.teacher is not None,
                    params=sum(p.numel() for p in self.student.parameters()),
                )
        return forward(self, *args, **kwargs)

    Distiller.forward = counting_forward


def light_reports() -> None:
    import distill.pipeline.experiment as experiment
    from distill.core.io import write_text

    def plots(run_dir, metrics, histories) -> None:
        for name in ("curves.png", "tradeoff.png"):
            write_text(Path(run_dir) / name, "placeholder")

    def html(path, *args, **kwargs) -> None:
        write_text(path, "<!doctype html><title>placeholder</title>")

    for name, stub in (("write_plots", plots), ("write_html_report", html)):
        if not hasattr(experiment, name):  # renamed: patching nothing would make the tests slow, silently
            raise AttributeError(
                f"distill.pipeline.experiment has no {name} to replace; update resume_driver.light_reports"
            )
        setattr(experiment, name, stub)


def kill_in_write(name: str, limit: int) -> None:
    replace = os.replace
    writes = 0

    def dying_replace(src, dst, *args, **kwargs):
        nonlocal writes
        if Path(dst).name == name:
            writes += 1
            if writes == limit:
                size = Path(src).stat().st_size
                os.truncate(src, size // 2)  # half of the file reached the disk
                die(write=writes, file=str(dst), tmp=str(src), size=size)
        return replace(src, dst, *args, **kwargs)

    os.replace = dying_replace


def run(argv: list[str]) -> int:
    if os.environ.get("DISTILL_TEST_LIGHT_REPORTS"):
        light_reports()
    if os.environ.get("DISTILL_TEST_KILL_STEP"):
        kill_at_step(int(os.environ["DISTILL_TEST_KILL_STEP"]))
    if os.environ.get("DISTILL_TEST_KILL_WRITE"):
        file_name, _, count = os.environ["DISTILL_TEST_KILL_WRITE"].rpartition(":")
        kill_in_write(file_name, int(count))
    return main(argv)


def child(job: dict) -> None:
    code = 1
    try:
        signal.alarm(job.get("timeout", 120))  # a hung run dies (SIGALRM) rather than hanging the tests
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, target in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        code = run(job["argv"])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, as an uncaught exception would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import distill.pipeline.experiment  # noqa: F401 - the heavy imports, once, before any fork (and before torch runs)

    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(run(sys.argv[1:]))
