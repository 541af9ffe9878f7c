"""Bringing your own models and settings (issue: what a newcomer hit beside torchdistill)."""

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distill.cli import main
from distill.core.errors import DistillError
from distill.report.markdown import verdict
from distill.tasks.image_data import DataSpec, Normalization, load_data

from conftest import tiny_config

MODELS_PY = """
from torch import nn


def student(num_classes=10):
    # no in_shape parameter: distill passes only what the signature takes
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, num_classes))


def teacher(num_classes, in_shape, width=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1] * in_shape[-2], width), nn.ReLU(),
                         nn.Linear(width, num_classes))
"""


def run(capsys, path, *extra):
    capsys.readouterr()
    code = main(["run", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path, config, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_factories_beside_the_config_import_without_pythonpath(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mymodels.py").write_text(MODELS_PY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the working directory nor sys.path holds mymodels.py
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    config = tiny_config(
        tmp_path,
        student={"arch": "factory", "factory": "mymodels:student"},
        teacher={
            "kind": "train",
            "model": {"arch": "factory", "factory": "mymodels:teacher", "kwargs": {"width": 20}},
            "train": {"epochs": 2, "batch_size": 64},
        },
    )
    code, out, err = run(capsys, write(folder, config), "--set", "train.epochs=1")
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["models"]["distilled"]["params"] == 64 * 24 + 24 + 24 * 10 + 10
    assert metrics["models"]["teacher"]["params"] == 64 * 20 + 20 + 20 * 10 + 10  # in_shape and kwargs reached it
    assert str(tmp_path) not in "".join(sys.path)


def test_a_missing_factory_module_says_where_it_looked(tmp_path, capsys):
    config = tiny_config(tmp_path, student={"arch": "factory", "factory": "nowhere_to_be_found:student"})
    code, _, err = run(capsys, write(tmp_path, config))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"looked in {tmp_path}" in err and "put nowhere_to_be_found.py beside the config" in err


def test_val_fraction_zero_trains_on_every_sample_and_keeps_the_last_epoch(tmp_path, capsys):
    with_val = load_data(DataSpec(source="digits"))
    without = load_data(DataSpec(source="digits", val_fraction=0))
    assert len(without.val) == 0 and len(without.train) == len(with_val.train) + len(with_val.val)
    assert torch.equal(without.test.y, with_val.test.y)  # the test split does not move
    config = tiny_config(tmp_path, data={"source": "digits", "val_fraction": 0})
    code, out, err = run(capsys, write(tmp_path, config))
    assert code == 0, err
    assert "no validation split (data.val_fraction: 0)" in out
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["val"] == 0 and metrics["data"]["train"] == len(without.train)
    for role in ("teacher", "scratch", "distilled"):
        assert metrics["training"][role]["best_epoch"] == 3 and metrics["training"][role]["best_val_acc"] is None
    assert "No validation split (data.val_fraction: 0)" in (run_dir / "report.md").read_text()


def test_fixed_normalisation_reaches_teacher_students_and_cache(tmp_path, capsys):
    raw = load_data(DataSpec(source="digits", normalize="none"))
    fixed = load_data(DataSpec(source="digits", normalize=Normalization(mean=[0.5], std=[0.25])))
    assert raw.train.x.min() == 0 and raw.train.x.max() == 1  # digits scaled to [0, 1], untouched
    assert torch.allclose(fixed.train.x, (raw.train.x - 0.5) / 0.25) and torch.allclose(
        fixed.test.x, (raw.test.x - 0.5) / 0.25
    )
    assert fixed.mean == [0.5] and fixed.std == [0.25] and fixed.summary()["normalisation"]["setting"] == "fixed"
    with pytest.raises(DistillError, match=r"^data.normalize.mean: 3 value\(s\), but the inputs have 1 channel\(s\)"):
        load_data(DataSpec(source="digits", normalize=Normalization(mean=[0.5] * 3, std=[0.25] * 3)))

    # a checkpoint teacher trained on these statistics: the run and the cache use them, and record them
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    save_file({f"{k}": v for k, v in teacher.state_dict().items()}, tmp_path / "t.safetensors")
    (tmp_path / "tmodels.py").write_text(
        "from torch import nn\n\ndef t():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    sys.modules.pop("tmodels", None)
    normalize = {"mean": [0.5], "std": [0.25]}
    config = tiny_config(
        tmp_path,
        data={"source": "digits", "normalize": normalize},
        teacher={"kind": "checkpoint", "path": "t.safetensors", "model": {"arch": "factory", "factory": "tmodels:t"}},
    )
    path = write(tmp_path, config)
    capsys.readouterr()
    assert main(["cache", str(path)]) == 0
    manifest = json.loads((tmp_path / "runs" / "tiny-teacher-cache" / "manifest.json").read_text())
    assert manifest["data_summary"]["normalisation"] == {"mean": [0.5], "std": [0.25], "setting": "fixed"}
    assert manifest["data"] == fixed.fingerprint  # a cache of other statistics is refused
    code, _, err = run(capsys, path)
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["data"]["normalisation"]["setting"] == "fixed"
    logits = teacher(fixed.test.x)  # the teacher saw the fixed statistics
    assert metrics["models"]["teacher"]["test_acc"] == pytest.approx(
        float((logits.argmax(-1) == fixed.test.y).float().mean())
    )


WARNING = "is at chance level after epoch 1"


@pytest.mark.parametrize(("lr", "warned"), [(80.0, True), (0.05, False)])
def test_a_student_that_learns_nothing_gets_a_warning(tmp_path, capsys, lr, warned):
    config = tiny_config(tmp_path, **{"train.lr": lr, "train.schedule": "constant"})
    code, out, err = run(capsys, write(tmp_path, config))
    assert code == 0, err  # the run goes on
    assert (f"warning: distilled {WARNING}" in out) is warned, out
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert (WARNING in report) is warned
    if warned:
        assert "likely causes: a learning rate too high or too low" in report


def metrics_with(teacher: float, scratch: float, distilled: float) -> dict:
    return {
        "models": {
            "teacher": {"test_acc": teacher},
            "scratch": {"test_acc": scratch},
            "distilled": {"test_acc": distilled},
        }
    }


def test_the_verdict_names_a_weak_teacher():
    text = verdict(metrics_with(0.7149, 0.7272, 0.6827))
    assert text.startswith("Distillation did not help here: the distilled student is 4.45 points below")
    assert "The teacher is weak: at 71.49% it is below the student trained from scratch (72.72%)" in text
    assert "barely above" in verdict(metrics_with(0.7300, 0.7272, 0.70))
    assert "weak" not in verdict(metrics_with(0.90, 0.80, 0.79))  # a good teacher that did not help
    assert "weak" not in verdict(metrics_with(0.70, 0.72, 0.75))  # it helped: nothing to explain
