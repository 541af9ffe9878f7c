"""Sizes are checked before anything is allocated (issue: an absurd size killed the machine)."""

import resource
import time

import pytest
import torch
import yaml

from distill.cli import main
from distill.core.errors import DistillError
from distill.core.memory import Budget, _cgroup_available, _meminfo_available, available_memory, measure
from distill.pipeline.config import parse_config
from distill.tasks.image_data import DataSpec, load_data
from distill.tasks.models import MLP, CNNSpec, MLPSpec, SmallCNN, build_model

from conftest import tiny_config


def test_measure_sizes_a_model_on_the_meta_device_exactly():
    real = MLP((1, 8, 8), 10, MLPSpec(hidden=[16]))
    size = measure(lambda: MLP((1, 8, 8), 10, MLPSpec(hidden=[16])))
    assert size.activation_bytes == 0
    size = size.with_activations(real, torch.zeros(3, 1, 8, 8))
    assert size.params == sum(p.numel() for p in real.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
    assert size.weight_bytes == 4 * size.params
    # leaf outputs of one sample: Flatten 64, Linear 16, ReLU 16, head 10 (float32)
    assert size.activation_bytes == 4 * (64 + 16 + 16 + 10)
    assert size.peak_activation_bytes == 4 * 64
    assert size.largest_param == "features.1.weight"
    cnn = SmallCNN((1, 8, 8), 10, CNNSpec(channels=[4], hidden=0))
    cnn = measure(lambda: SmallCNN((1, 8, 8), 10, CNNSpec(channels=[4], hidden=0))).with_activations(
        cnn, torch.zeros(1, 1, 8, 8)
    )
    assert cnn.weight_bytes == 4 * (4 * 9 + 4 + 4 + 4 * 10 + 10) + 4 * (4 + 4) + 8  # + batch-norm buffers
    assert cnn.activation_bytes == 4 * (
        3 * 4 * 8 * 8 + 4 * 4 * 4 + 4 + 4 + 10
    )  # conv, bn, relu; pool; pool, flat, head


def test_a_huge_model_is_refused_before_a_byte_is_allocated(monkeypatch):
    monkeypatch.setattr("distill.tasks.models.available_memory", lambda: 16 * 2**30)  # the same on every machine
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DistillError, match=r"^student.hidden: the model has 8,534,444,935 parameters, 31.8 GiB"):
        build_model(MLPSpec(hidden=[113792599]), (1, 8, 8), 10, "student")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was allocated


def test_the_budget_reads_meminfo_and_cgroup_limits(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable:   1000 kB\n")
    assert _meminfo_available(tmp_path / "meminfo") == 1000 * 1024
    (tmp_path / "memory.max").write_text("5000\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert _cgroup_available(tmp_path) == 4000
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_available(tmp_path) is None
    assert 0 < available_memory() < 2**50


def test_the_budget_message_names_field_size_budget_and_how_to_change_it():
    with pytest.raises(DistillError) as err:
        Budget(2 * 2**30, "set by max_memory").check(3 * 2**30, "train.batch_size", "a training step at batch 9")
    assert str(err.value) == (
        "train.batch_size: a training step at batch 9 needs about 3.0 GiB, more than the memory budget of 2.0 GiB "
        "(set by max_memory); make it smaller, or set another budget with --max-memory (e.g. --max-memory 8GB) "
        "or max_memory: in the config"
    )
    Budget(2 * 2**30, "").check(2 * 2**30, "x", "y")  # exactly the budget fits
    Budget(None, "").check(10**30, "x", "y")  # unknown budget: nothing is refused


def run_cli(capsys, tmp_path, argv, **changes):
    config = tiny_config(tmp_path, **changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    started = time.perf_counter()
    code = main([argv[0], str(path), *argv[1:]])
    seconds = time.perf_counter() - started
    return code, capsys.readouterr().err, seconds


ABSURD = {
    "huge hidden": ({"student": {"arch": "mlp", "hidden": [113792599]}}, [], "student.hidden: training"),
    "huge channels": (
        {"student": {"arch": "cnn", "channels": [100_000, 100_000]}},
        [],
        "student.channels: training 90,014,101,418 parameters",
    ),
    "huge teacher": ({"teacher.model": {"arch": "mlp", "hidden": [2**28]}}, [], "teacher.model.hidden: training"),
    "huge latency batch": ({"eval.latency_batch_sizes": [10**9]}, [], "eval.latency_batch_sizes: a forward pass at"),
    "huge training batch": (
        {"student": {"arch": "cnn", "channels": [512, 512]}, "train.batch_size": 10**9},
        ["--max-memory", "200MB"],
        "train.batch_size: a training step at batch 1294",
    ),
    "huge cache batch": (
        {"teacher.model": {"arch": "cnn", "channels": [256, 256]}, "cache.batch_size": 10**9},
        ["--max-memory", "100MB"],
        "cache.batch_size: a forward pass at batch 1294",
    ),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_sizes_end_in_one_line_within_a_second(tmp_path, capsys, case):
    changes, extra, message = ABSURD[case]
    command = "cache" if "cache" in case else "run"
    load_data(DataSpec(source="digits"))  # imports done: the second is the command's own
    extra = extra or ["--max-memory", "16GiB"]  # the same budget on every machine
    code, err, seconds = run_cli(capsys, tmp_path, [command, *extra], **changes)
    assert code == 2 and err.startswith(f"distill: error: {message}") and len(err.splitlines()) == 1, err
    assert "more than the memory budget of" in err and "--max-memory" in err
    assert seconds < 1.0, seconds
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_the_same_settings_pass_under_a_budget_that_fits(tmp_path, capsys, monkeypatch):
    """The cache-batch case above with a small cache batch passes every check (and then starts)."""
    import distill.pipeline.experiment as experiment

    def started(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "obtain_teacher", started)
    changes = {"teacher.model": {"arch": "cnn", "channels": [256, 256]}, "cache.batch_size": 64}
    code, err, _ = run_cli(capsys, tmp_path, ["cache", "--max-memory", "100MB"], **changes)
    assert code == 130 and "interrupted" in err  # every check passed: the teacher was about to be obtained


def test_max_memory_is_a_config_setting_and_bad_values_are_one_line(tmp_path, capsys):
    assert parse_config(tiny_config(tmp_path, max_memory="8GB")).max_memory == 8 * 10**9
    assert parse_config(tiny_config(tmp_path, max_memory="6GiB")).max_memory == 6 * 2**30
    code, err, _ = run_cli(capsys, tmp_path, ["run", "--max-memory", "lots"])
    assert code == 2 and err.startswith("distill: error: ") and "max_memory" in err and len(err.splitlines()) == 1


def test_a_run_resumes_under_another_budget(tmp_path):
    from distill.pipeline.config import config_to_dict, run_identity

    a = config_to_dict(parse_config(tiny_config(tmp_path, max_memory="8GB")))
    b = config_to_dict(parse_config(tiny_config(tmp_path, max_memory="16GB")))
    assert a != b and run_identity(a) == run_identity(b)


def test_the_fuzz_tests_run_under_a_memory_limit(memory_limit):
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        torch.empty(5 * 2**30, dtype=torch.uint8)
    assert available_memory() <= 4 * 2**30 + 2**20


def test_an_absurd_image_size_is_refused_before_resizing(tmp_path, monkeypatch):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (4, 4), color=i).save(tmp_path / "imgs" / label / f"{i}.png")
    monkeypatch.setattr("distill.tasks.image_data.available_memory", lambda: 2**30)
    with pytest.raises(DistillError, match=r"^data.image_size: 20 images of 100000×100000 pixels need about 1.5 TiB"):
        load_data(DataSpec(source="folder", path=tmp_path / "imgs", image_size=(100_000, 100_000)))
    assert load_data(DataSpec(source="folder", path=tmp_path / "imgs", image_size=(6, 6))).input_shape == (1, 6, 6)


def test_input_bytes_count_one_sample_in_the_inputs_own_dtypes():
    from distill.core.memory import input_bytes

    assert input_bytes(torch.zeros(2, 1, 8, 8)) == 4 * 64  # float32 images
    tokens = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.bool)}
    assert input_bytes(tokens) == 8 * 16 + 16  # int64 ids and a bool mask, not float32 pixels
