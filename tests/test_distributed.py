"""Distributed (2 CPU processes, gloo, through Accelerate), gradient accumulation, mixed precision."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.cli import _without_processes, main
from distill.core.errors import DistillError
from distill.pipeline.config import parse_config
from distill.pipeline.experiment import cache_teacher, run_experiment

from conftest import tiny_config

# an MLP student has no batch-norm, so 2 processes follow exactly the gradient of 1
STUDENT = {"arch": "mlp", "hidden": [32]}


def _write_config(tmp_path: Path, name: str, **changes) -> Path:
    config = tiny_config(tmp_path, student=STUDENT, **{"output.name": name}, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def _launch(config: Path, processes: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    completed = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(config), "--processes", str(processes), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Batch 51 over 1294 samples: the last global batch (19) splits 10 / 9, so the shares differ
    and the loss weighting by share size is exercised. A second pair runs from a teacher cache:
    each process looks up its own shard of indices."""
    batch = {"train.batch_size": 51}
    one = _write_config(tmp_path, "one", **batch)
    assert main(["run", str(one), "--quiet"]) == 0  # also trains and caches the teacher
    _launch(_write_config(tmp_path, "two", **batch), 2)
    cache = cache_teacher(parse_config(tiny_config(tmp_path, **batch, **{"cache.k": 10, "cache.dtype": "float32"})))
    cached = {"teacher": {"kind": "cache", "path": str(cache)}, "baseline": False, **batch}
    assert main(["run", str(_write_config(tmp_path, "cached-one", **cached)), "--quiet"]) == 0
    _launch(_write_config(tmp_path, "cached-two", **cached), 2)

    runs = tmp_path / "runs"
    metrics = {
        name: json.loads((runs / name / "metrics.json").read_text())
        for name in ("one", "two", "cached-one", "cached-two")
    }
    for first, second, roles in (
        ("one", "two", ("scratch", "distilled")),
        ("cached-one", "cached-two", ("distilled",)),
    ):
        m1, m2 = metrics[first], metrics[second]
        for role in roles:
            file = "student.safetensors" if role == "distilled" else "scratch.safetensors"
            w1, w2 = _weights(runs / first, file), _weights(runs / second, file)
            for key in w1:  # tolerance: the order of floating-point sums differs, nothing else
                assert torch.allclose(w1[key], w2[key], atol=1e-5), (
                    second,
                    role,
                    key,
                    float((w1[key] - w2[key]).abs().max()),
                )
            assert m2["models"][role]["test_acc"] == pytest.approx(m1["models"][role]["test_acc"], abs=1 / 359)
            h1, h2 = m1["training"][role]["history"], m2["training"][role]["history"]
            assert [e["loss"] for e in h2] == pytest.approx([e["loss"] for e in h1], rel=1e-4)
            assert [e["train_acc"] for e in h2] == pytest.approx([e["train_acc"] for e in h1], abs=1e-3)
    assert (
        metrics["two"]["models"]["teacher"]["weights_sha256"] == metrics["one"]["models"]["teacher"]["weights_sha256"]
    )
    assert not list(runs.glob("*.partial"))  # every run finished and moved into place


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 32 per step follow the same path as one batch of 64 (1294 samples: the
    last step of an epoch has a single, smaller micro-batch)."""
    base = {"student": STUDENT, "baseline": False}
    big = run_experiment(parse_config(tiny_config(tmp_path, **base, **{"output.name": "big"})))
    small = tiny_config(
        tmp_path, **base, **{"output.name": "acc", "train.batch_size": 32, "train.grad_accumulation": 2}
    )
    accumulated = run_experiment(parse_config(small))
    w_big = _weights(big.run_dir, "student.safetensors")
    w_acc = _weights(accumulated.run_dir, "student.safetensors")
    for key in w_big:
        assert torch.allclose(w_big[key], w_acc[key], atol=1e-5), key


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    base = {"student": STUDENT, "baseline": False}
    fp32 = run_experiment(parse_config(tiny_config(tmp_path, **base, **{"output.name": "fp32"})))
    bf16 = run_experiment(
        parse_config(tiny_config(tmp_path, **base, **{"output.name": "bf16", "train.mixed_precision": "bf16"}))
    )
    a, b = (r.metrics["models"]["distilled"]["test_acc"] for r in (fp32, bf16))
    assert abs(a - b) < 0.05 and b > 0.8
    assert fp32.metrics["training"]["distilled"]["history"] != bf16.metrics["training"]["distilled"]["history"]


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    config = parse_config(tiny_config(tmp_path, **{"train.mixed_precision": "fp16"}))
    with pytest.raises(DistillError, match="train.mixed_precision: fp16 needs a CUDA GPU"):
        run_experiment(config)


def test_processes_flag_is_stripped_for_the_workers():
    assert _without_processes(["run", "c.yaml", "--processes", "2", "--quiet"]) == ["run", "c.yaml", "--quiet"]
    assert _without_processes(["run", "--processes=4", "c.yaml"]) == ["run", "c.yaml"]


def test_bad_config_fails_before_any_process_starts(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **{"train.lr": -1})))
    assert main(["run", str(path), "--processes", "2"]) == 2
    assert "train.lr" in capsys.readouterr().err


def _torchrun_driver(config: Path, *args: str, kill_step: int | None = None) -> int:
    """``distill run CONFIG`` in 2 processes through tests/resume_driver.py (one thread each, so
    that runs are comparable bit for bit), optionally killing both at training step ``kill_step``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "DISTILL_TEST_LIGHT_REPORTS": "1"}
    env.pop("DISTILL_TEST_KILL_STEP", None)
    if kill_step is not None:
        env["DISTILL_TEST_KILL_STEP"] = str(kill_step)
    driver = Path(__file__).parent / "resume_driver.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver)]
    completed = subprocess.run(
        [*command, "run", str(config), "--quiet", *args], capture_output=True, text=True, env=env, timeout=300
    )
    return completed.returncode


def test_a_killed_two_process_run_with_dropout_resumes_exactly(tmp_path):
    """Dropout draws differ between processes when their shares differ (batch 51: 26 / 25 rows), so
    each process's random state must be checkpointed, not process 0's for all."""
    changes = {"train.batch_size": 51, "baseline": False}
    student = {"arch": "mlp", "hidden": [32], "dropout": 0.3}
    configs = {}
    for name in ("whole", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(
            yaml.safe_dump(tiny_config(tmp_path, student=student, **{"output.name": name}, **changes))
        )
    assert _torchrun_driver(configs["whole"]) == 0  # also trains and caches the teacher
    steps_per_epoch = -(-1294 // 51)
    assert _torchrun_driver(configs["killed"], kill_step=2 * steps_per_epoch + 5) != 0  # mid epoch 3 of 3
    assert not (tmp_path / "runs" / "killed").exists()
    assert _torchrun_driver(configs["killed"], "--resume") == 0
    whole = _weights(tmp_path / "runs" / "whole", "student.safetensors")
    resumed = _weights(tmp_path / "runs" / "killed", "student.safetensors")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), (key, float((whole[key] - resumed[key]).abs().max()))
    # the exported student is the best epoch's; the history shows the resumed epoch 3 itself
    histories = [
        json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["training"]["distilled"]["history"]
        for name in ("whole", "killed")
    ]
    assert [(e["loss"], e["train_acc"], e["val_acc"]) for e in histories[0]] == [
        (e["loss"], e["train_acc"], e["val_acc"]) for e in histories[1]
    ]


def test_two_processes_match_one_under_a_label_budget(tmp_path):
    """With 300 of 1294 training labels, each share of a batch holds a different number of
    labeled rows; ce averages over those, so the processes' values are weighted by their labeled
    counts (summed over processes every step), not by share size, to follow one process exactly."""
    changes = {"train.batch_size": 51, "data.labeled": 300, "baseline": False}
    one = _write_config(tmp_path, "one", **changes)
    assert main(["run", str(one), "--quiet"]) == 0
    _launch(_write_config(tmp_path, "two", **changes), 2)
    runs = tmp_path / "runs"
    w1, w2 = _weights(runs / "one", "student.safetensors"), _weights(runs / "two", "student.safetensors")
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), (key, float((w1[key] - w2[key]).abs().max()))
    h1, h2 = (
        json.loads((runs / n / "metrics.json").read_text())["training"]["distilled"]["history"] for n in ("one", "two")
    )
    assert [e["loss"] for e in h2] == pytest.approx([e["loss"] for e in h1], rel=1e-4)


def test_two_processes_match_one_with_augmented_and_mixed_images(tmp_path):
    """Each view depends on (seed, image, epoch) alone, so the global batch is augmented alike in
    every process before it is split; mixed rows with an unlabeled partner leave ce's mean, and the
    processes' values are weighted by the rows each keeps."""
    augment = {"crop": 1, "flip": True, "mixup": 0.4, "cutmix": 1.0}
    changes = {"train.batch_size": 51, "data.labeled": 600, "baseline": False, "data.augment": augment}
    assert main(["run", str(_write_config(tmp_path, "one", **changes)), "--quiet"]) == 0
    _launch(_write_config(tmp_path, "two", **changes), 2)
    runs = tmp_path / "runs"
    w1, w2 = _weights(runs / "one", "student.safetensors"), _weights(runs / "two", "student.safetensors")
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), (key, float((w1[key] - w2[key]).abs().max()))


def test_a_failing_process_ends_the_launch_with_one_line_errors(tmp_path):
    """A worker's error reaches the user as its own line and exit code 2, not as torchrun's
    traceback; a process waiting for a failed one says so in one line."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def launch(config: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "distill", "run", str(config), "--processes", "2", "--quiet"]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    diverging = _write_config(tmp_path, "nan", **{"train.lr": 1e30, "baseline": False})
    first = launch(diverging)  # every process: the loss becomes non-finite
    assert first.returncode == 2
    lines = [line for line in first.stderr.splitlines() if line.strip()]
    assert lines and all(
        line.startswith("distill: error: distilled: loss term 'kd' became non-finite") for line in lines
    )
    second = launch(diverging)  # process 0 refuses the unfinished run; process 1 waits for it at a barrier
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert "Traceback" not in second.stderr
    assert any(line.startswith("distill: error: an unfinished run exists") for line in lines)
    assert all(line.startswith("distill: error:") for line in lines)


@pytest.mark.parametrize(
    "flags",
    [[], ["--fsdp"], ["--fsdp", "--resume"]],
    ids=["ddp", "fsdp", "fsdp-resumed"],
)
def test_two_processes_weight_tokens_like_one_process(tmp_path, flags):
    """A keyword-input token model with padding: each process's share holds a different number of
    tokens; weighted by the tokens each term averages over (Batch.mask), 2 processes follow 1.
    With FSDP the student is sharded (the teacher is not: the driver checks it stays whole, frozen
    and in eval mode), gathered for checkpoints and unwrapped at the end; a run stopped after its
    first epoch and resumed from the checkpoint (full weights, optimiser state gathered from the
    shards) ends where an uninterrupted one does."""
    driver = Path(__file__).with_name("token_driver.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    done = subprocess.run([sys.executable, str(driver), str(one)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
        str(two),
        *flags,
    ]
    done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
