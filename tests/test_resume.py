"""Exact resume after SIGKILL (issue 6): a run killed at an arbitrary step, or in the middle of
writing a file, and continued with ``distill run CONFIG --resume`` ends with the same weights, bit
for bit, as an uninterrupted run; and what the killed run leaves behind is never half-written.

Each run is a real ``distill`` process (tests/resume_driver.py: the CLI, plus a SIGKILL at a chosen
training step or write). The runs are started two at a time from one module fixture; the tests then
check what each scenario left after the kill and after the resume.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from distill.tasks.models import CNNSpec, SmallCNN

DRIVER = Path(__file__).with_name("resume_driver.py")
TEMP_FILE = re.compile(r"^\..+\.[^.]+\.tmp$")  # distill.core.io.atomic_path's temporary files: .<name>.<random>.tmp

# 256 training samples in batches of 32: 8 steps an epoch, 3 epochs a phase. With a label budget of 128 the
# scratch student makes 2 passes over its 128 labeled samples an epoch (8 steps too). Steps of one process:
# scratch 1-24, hint stage 25-32 (1 epoch), distilled 33-56.
CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {"source": "npz", "path": "digits.npz", "limit_train": 256, "labeled": 128},  # sklearn's digits
    "teacher": {
        "kind": "checkpoint",
        "path": "teacher.safetensors",
        "model": {"arch": "cnn", "channels": [8, 16], "hidden": 0},
    },
    "student": {"arch": "mlp", "hidden": [16], "dropout": 0.1},  # dropout: the RNG state matters
    "distill": {
        "terms": [
            {"type": "kd", "weight": 0.7, "temperature": 2.0},
            {"type": "ce", "weight": 0.3},
            {"type": "hint", "weight": 0.5, "student": "features", "teacher": "features.0", "stage_epochs": 1},
        ]
    },
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "eval": {"latency_repeats": 1, "latency_batch_sizes": [1]},
    "output": {"dir": "runs", "name": "reference"},
}
# A teacher trained (and cached) by distill: 2 epochs of 8 steps, then the distilled student (steps 17-40).
TRAINED_TEACHER = {
    **CONFIG,
    "teacher": {
        "kind": "train",
        "model": {"arch": "cnn", "channels": [8, 16], "hidden": 0},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    },
    "distill": {"alpha": 0.7, "temperature": 2.0},
    "baseline": False,
    "output": {"dir": "runs", "name": "reference-teacher"},
}

# Augmented views with mixup (issue 16), every label, no baseline: the distilled student's steps are 1-24.
AUGMENTED = {
    **CONFIG,
    "data": {**{k: v for k, v in CONFIG["data"].items() if k != "labeled"}, "augment": {"crop": 1, "mixup": 0.5}},
    "distill": {"alpha": 0.7, "temperature": 2.0},
    "baseline": False,
    "output": {"dir": "runs", "name": "reference-augmented"},
}

SCRATCH, STAGE, DISTILLED, TEACHER = ("ce",), ("hint",), ("ce", "hint", "kd"), ("ce",)


@dataclass
class Scenario:
    config: str  # "exp.yaml", "teacher.yaml" or "augmented.yaml"
    kill: dict[str, str]  # environment for the driver
    died_in: tuple | None  # for step kills: (terms of the phase, epoch index, student or teacher)
    phases: dict[str, object]  # state of each phase directory after the kill: "done", "started" or checkpoint epoch
    temp_file: str | None = None  # the half-written temporary file a kill in a write leaves (directory/name)


SCENARIOS = {
    # scratch epoch 2, step 5 (its second pass over the labeled samples): resumes from the epoch-1 checkpoint
    "scratch-epoch-2": Scenario("exp.yaml", {"DISTILL_TEST_KILL_STEP": "13"}, (SCRATCH, 1, "student"), {"scratch": 1}),
    # FitNets' hint-only stage, which trains the adapter: no checkpoint yet, the stage starts over
    "hint-stage": Scenario(
        "exp.yaml",
        {"DISTILL_TEST_KILL_STEP": "29"},
        (STAGE, 0, "student"),
        {"scratch": "done", "stage-hint": "started"},
    ),
    # distilled epoch 1: no checkpoint of this phase yet; the earlier phases are reused, not retrained
    "distilled-epoch-1": Scenario(
        "exp.yaml",
        {"DISTILL_TEST_KILL_STEP": "36"},
        (DISTILLED, 0, "student"),
        {"scratch": "done", "stage-hint": "done", "distilled": "started"},
    ),
    # distilled epoch 3, step 5: student, adapter, optimiser, schedule and RNG come from the epoch-2 checkpoint
    "distilled-epoch-3": Scenario(
        "exp.yaml",
        {"DISTILL_TEST_KILL_STEP": "53"},
        (DISTILLED, 2, "student"),
        {"scratch": "done", "stage-hint": "done", "distilled": 2},
    ),
    # half-way through writing the distilled student's epoch-2 checkpoint (the 6th checkpoint written)
    "writing-a-checkpoint": Scenario(
        "exp.yaml",
        {"DISTILL_TEST_KILL_WRITE": "checkpoint.pt:6"},
        None,
        {"scratch": "done", "stage-hint": "done", "distilled": 1},
        temp_file="distilled/.checkpoint.pt.",
    ),
    # half-way through exporting the distilled student
    "writing-the-student": Scenario(
        "exp.yaml",
        {"DISTILL_TEST_KILL_WRITE": "student.safetensors:1"},
        None,
        {"scratch": "done", "stage-hint": "done", "distilled": "done"},
        temp_file=".student.safetensors.",
    ),
    # teacher training (epoch 2, step 3), in the teacher cache: resumed from the cache's epoch-1 checkpoint
    "teacher-epoch-2": Scenario("teacher.yaml", {"DISTILL_TEST_KILL_STEP": "11"}, (TEACHER, 1, "teacher"), {}),
    # in the middle of an augmented epoch (epoch 2, step 5): its views and mixing partners replay from the epoch-1 checkpoint
    "augmented-epoch-2": Scenario(
        "augmented.yaml", {"DISTILL_TEST_KILL_STEP": "13"}, (("ce", "kd"), 1, "student"), {"distilled": 1}
    ),
}
REFERENCES = {"exp.yaml": "reference", "teacher.yaml": "reference-teacher", "augmented.yaml": "reference-augmented"}

# fixed and tested below: the RNG state after a reused finished phase (hint stage) is restored, and a crash's
# half-written temporary file never reaches the finished run directory


@dataclass
class Outcome:
    name: str
    killed: Done | None = None
    note: dict = field(default_factory=dict)
    phases: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # files that are half-written, or should not be there
    temp_files: list[str] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)  # what output.dir held after the kill
    cache: list[str] = field(default_factory=list)  # what the teacher cache held after the kill
    resumed: Done | None = None


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs distill in processes forked from ``resume_driver.py --serve`` servers, one job per server at a time."""

    def __init__(self, workdir: Path, servers: int) -> None:
        self.workdir, self.jobs, self.idle = workdir, 0, queue.Queue()
        for _ in range(servers):
            self.idle.put(
                subprocess.Popen(
                    [sys.executable, str(DRIVER), "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )

    def __call__(self, config: str, name: str, *args: str, env: dict | None = None) -> Done:
        """``distill run CONFIG --set output.name=NAME --quiet ARGS``, with its own teacher cache."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_TEST_")}
        environment |= {
            "DISTILL_CACHE_DIR": str(self.workdir / f"cache-{name}"),
            "DISTILL_TEST_LIGHT_REPORTS": "1",
            "DISTILL_TEST_KILL_NOTE": str(self.workdir / f"{name}.note.json"),
            **(env or {}),
        }
        server = self.idle.get()
        try:
            self.jobs += 1
            out, err = (self.workdir / f"{name}.{self.jobs}.{stream}" for stream in ("out", "err"))
            argv = ["run", config, "--set", f"output.name={name}", "--quiet", *args]
            job = {"argv": argv, "cwd": str(self.workdir), "env": environment, "stdout": str(out), "stderr": str(err)}
            server.stdin.write(json.dumps(job) + "\n")
            server.stdin.flush()
            returncode = json.loads(server.stdout.readline())["returncode"]
        finally:
            self.idle.put(server)
        return Done(returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        while not self.idle.empty():
            server = self.idle.get()
            server.stdin.close()
            server.wait(timeout=30)


def inspect_file(path: Path) -> str | None:
    """None if ``path`` is a complete file of its kind, else what is wrong with it."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(), parse_constant=lambda c: 1 / 0)
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".safetensors":
            assert load_file(path)
        elif path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(state, dict) and (path.name != "checkpoint.pt" or "epoch" in state)
        else:
            return f"{path}: unexpected file"
    except Exception as err:  # noqa: BLE001 - any failure means a half-written file
        return f"{path}: does not load ({type(err).__name__}: {err})"
    return None


def phase_state(directory: Path) -> object:
    if (directory / "model.safetensors").is_file() and (directory / "history.json").is_file():
        return "done"
    if (directory / "checkpoint.pt").is_file():
        return torch.load(directory / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
    return "started"


def kill_and_resume(distill: Runner, name: str, scenario: Scenario) -> Outcome:
    workdir, outcome = distill.workdir, Outcome(name)
    outcome.killed = distill(scenario.config, name, env=scenario.kill)
    note = workdir / f"{name}.note.json"
    outcome.note = json.loads(note.read_text()) if note.exists() else {}
    runs, cache = workdir / "runs", workdir / f"cache-{name}"
    outcome.run_dirs = [n for n in (name, f"{name}.partial") if (runs / n).exists()]
    outcome.cache = sorted(p.name for p in (cache / "teachers").iterdir()) if (cache / "teachers").exists() else []
    for root in (runs / f"{name}.partial", cache):
        for path in sorted(root.rglob("*")) if root.exists() else []:
            if path.is_dir():
                continue
            relative = str(path.relative_to(root))
            if TEMP_FILE.match(path.name):
                outcome.temp_files.append(relative)
            elif problem := inspect_file(path):
                outcome.problems.append(problem)
    partial = runs / f"{name}.partial"
    outcome.phases = (
        {p.name: phase_state(p) for p in sorted(partial.iterdir()) if p.is_dir()} if partial.exists() else {}
    )
    outcome.resumed = distill(scenario.config, name, "--resume")
    return outcome


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, Outcome]]:
    workdir = tmp_path_factory.mktemp("resume")
    digits = load_digits()
    np.savez(workdir / "digits.npz", x=digits.images[:, None] / 16.0, y=digits.target)  # no sklearn import per run
    torch.manual_seed(0)
    teacher = SmallCNN((1, 8, 8), 10, CNNSpec(channels=[8, 16], hidden=0))  # untrained: only the weights matter here
    save_file(teacher.state_dict(), workdir / "teacher.safetensors")
    (workdir / "exp.yaml").write_text(yaml.safe_dump(CONFIG))
    (workdir / "teacher.yaml").write_text(yaml.safe_dump(TRAINED_TEACHER))
    (workdir / "augmented.yaml").write_text(yaml.safe_dump(AUGMENTED))
    distill = Runner(workdir, servers=2)  # two processes of one thread each on the 2-core machine
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            references = {config: pool.submit(distill, config, name) for config, name in REFERENCES.items()}
            outcomes = {name: pool.submit(kill_and_resume, distill, name, s) for name, s in SCENARIOS.items()}
            for config, future in references.items():
                done = future.result()
                assert done.returncode == 0, f"reference run of {config} failed:\n{done.stdout}\n{done.stderr}"
            return workdir, {name: future.result() for name, future in outcomes.items()}
    finally:
        distill.close()


def final_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.suffix == ".safetensors"}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_kill_happened_where_intended(runs, name):
    _, outcomes = runs
    outcome, scenario = outcomes[name], SCENARIOS[name]
    assert outcome.killed.returncode == -9, f"not killed:\n{outcome.killed.stdout}\n{outcome.killed.stderr}"
    if scenario.died_in is not None:
        terms, epoch, model = scenario.died_in
        assert tuple(outcome.note["terms"]) == terms
        assert outcome.note["teacher"] == (model == "student" and terms != SCRATCH)
        assert outcome.note["params"] == (1442 if model == "teacher" else 1210)  # the CNN teacher or the MLP student
        assert int(outcome.note["progress"]) == epoch and outcome.note["progress"] % 1 > 0  # in mid-epoch
    assert outcome.phases == scenario.phases


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_killed_run_leaves_no_half_written_file(runs, name):
    _, outcomes = runs
    outcome, scenario = outcomes[name], SCENARIOS[name]
    assert outcome.problems == []
    assert outcome.run_dirs == [f"{name}.partial"]  # never the final directory of an unfinished run
    if scenario.temp_file is None:  # killed between writes: no temporary file either
        assert outcome.temp_files == []
    else:  # killed in a write: only the temporary file it was writing, named as one
        assert len(outcome.temp_files) == 1 and outcome.temp_files[0].startswith(scenario.temp_file)
    if scenario.config == "teacher.yaml":  # killed while training the teacher: the cache holds no teacher yet
        assert len(outcome.cache) == 1 and outcome.cache[0].endswith(".partial")
        assert outcome.phases == {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(runs, name):
    workdir, outcomes = runs
    outcome, scenario = outcomes[name], SCENARIOS[name]
    resumed = outcome.resumed
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout}\n{resumed.stderr}"
    reference, run = workdir / "runs" / REFERENCES[scenario.config], workdir / "runs" / name
    assert run.is_dir() and not (workdir / "runs" / f"{name}.partial").exists()
    expected = final_files(reference)
    assert set(expected) >= {"student.safetensors"}
    assert (scenario.config == "exp.yaml") == ({"adapters.safetensors", "scratch.safetensors"} <= set(expected))
    got = final_files(run)
    assert got.keys() == expected.keys()
    for file_name, content in expected.items():
        assert got[file_name] == content, f"{file_name} differs from the uninterrupted run's"
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert ours["models"]["teacher"]["weights_sha256"] == theirs["models"]["teacher"]["weights_sha256"]
    for role, training in theirs["training"].items():
        if training is None:
            assert ours["training"][role] is None
            continue
        without_time = lambda t: [{k: v for k, v in e.items() if k != "seconds"} for e in t["history"]]  # noqa: E731
        assert without_time(ours["training"][role]) == without_time(training), role
        assert ours["training"][role]["best_epoch"] == training["best_epoch"], role


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.temp_file])
def test_a_resumed_run_directory_holds_no_leftover_of_the_crash(runs, name):
    workdir, _ = runs
    leftovers = [p.name for p in (workdir / "runs" / name).rglob("*") if TEMP_FILE.match(p.name)]
    assert leftovers == []
