"""End-to-end runs on sklearn digits: outputs, teacher cache, resume, and CLI behaviour."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distill.cli import main
from distill.pipeline.config import parse_config
from distill.pipeline.experiment import run_experiment, scratch_setup
from distill.tasks.image_data import load_data
from distill.tasks.models import MLP, MLPSpec

from conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    config = parse_config(tiny_config(tmp))
    return run_experiment(config, cache_dir=tmp / "cache"), config, tmp


def test_run_writes_a_complete_run_directory(finished_run):
    result, _, tmp = finished_run
    run = result.run_dir
    assert run == tmp / "runs" / "tiny" and not (tmp / "runs" / "tiny.partial").exists()
    for name in (
        "config.yaml",
        "metrics.json",
        "report.md",
        "curves.png",
        "tradeoff.png",
        "student.safetensors",
        "scratch.safetensors",
    ):
        assert (run / name).stat().st_size > 0, name
    student = MLP((1, 8, 8), 10, MLPSpec(hidden=[16]))
    student.load_state_dict(load_file(run / "student.safetensors"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert "| distilled student |" in (run / "report.md").read_text()


def test_metrics_are_consistent(finished_run):
    metrics = finished_run[0].metrics
    models = metrics["models"]
    teacher, scratch, distilled = models["teacher"], models["scratch"], models["distilled"]
    assert teacher["test_acc"] > 0.8 and distilled["test_acc"] > 0.5
    assert teacher["agreement"] == 1.0 and teacher["retention"] == 1.0
    assert distilled["retention"] == pytest.approx(distilled["test_acc"] / teacher["test_acc"])
    gap = (distilled["test_acc"] - scratch["test_acc"]) / (teacher["test_acc"] - scratch["test_acc"])
    assert distilled["gap_closed"] == pytest.approx(gap)
    assert distilled["params"] == 8 * 8 * 16 + 16 + 16 * 10 + 10
    assert distilled["compression"] == pytest.approx(teacher["params"] / distilled["params"])
    assert set(distilled["latency_ms"]) == {"1", "16"} and all(v > 0 for v in distilled["latency_ms"].values())
    assert distilled["speedup"]["1"] == pytest.approx(teacher["latency_ms"]["1"] / distilled["latency_ms"]["1"])
    assert metrics["data"]["train_labeled"] == metrics["data"]["train"]
    # every model trained the configured number of epochs and was chosen on validation
    for role in ("teacher", "scratch", "distilled"):
        history = metrics["training"][role]["history"]
        assert len(history) == 3
        assert metrics["training"][role]["best_val_acc"] == max(e["val_acc"] for e in history)
    assert set(metrics["training"]["distilled"]["history"][0]["terms"]) == {"kd", "ce"}


def test_second_run_reuses_the_cached_teacher(finished_run, capsys):
    result, config, tmp = finished_run
    config = config.model_copy(deep=True)
    config.output.name = "again"
    config.baseline = False
    second = run_experiment(config, cache_dir=tmp / "cache")
    assert "reusing cached teacher" in capsys.readouterr().out
    assert second.metrics["models"]["teacher"]["test_acc"] == result.metrics["models"]["teacher"]["test_acc"]
    # the teacher's test logits were remembered by the first run, not computed again
    assert (result.metrics["teacher_predictions_remembered"], second.metrics["teacher_predictions_remembered"]) == (
        False,
        True,
    )
    assert second.metrics["models"]["teacher"]["calibration"] == result.metrics["models"]["teacher"]["calibration"]
    remembered = "test predictions were remembered from an earlier run"
    assert remembered in (second.run_dir / "report.md").read_text()
    assert remembered not in (result.run_dir / "report.md").read_text()
    assert "scratch" not in second.metrics["models"]
    # same seed, same data: the distilled student is reproduced exactly
    assert second.metrics["models"]["distilled"]["test_acc"] == result.metrics["models"]["distilled"]["test_acc"]


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = run_experiment(parse_config(tiny_config(tmp_path, **{"output.name": "full"})))

    def interrupt(role, epoch):
        if role == "distilled" and epoch == 2:
            raise KeyboardInterrupt

    config = parse_config(tiny_config(tmp_path, **{"output.name": "cut"}))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, on_epoch_end=interrupt)
    assert (tmp_path / "runs" / "cut.partial" / "distilled" / "checkpoint.pt").exists()
    assert not (tmp_path / "runs" / "cut").exists()
    resumed = run_experiment(config, resume=True)
    full = load_file(uninterrupted.run_dir / "student.safetensors")
    again = load_file(resumed.run_dir / "student.safetensors")
    assert full.keys() == again.keys()
    for key in full:
        assert torch.equal(full[key], again[key]), key
    assert resumed.metrics["training"]["distilled"] == uninterrupted.metrics["training"]["distilled"] | {
        "seconds": resumed.metrics["training"]["distilled"]["seconds"],
        "history": [
            a | {"seconds": b["seconds"]}
            for a, b in zip(
                uninterrupted.metrics["training"]["distilled"]["history"],
                resumed.metrics["training"]["distilled"]["history"],
                strict=True,
            )
        ],
    }


def write_config(tmp_path, **changes):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **changes)))
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.epochs": 0}, "train.epochs: Input should be greater than 0"),
        ({"student.arch": "factory", "student.hidden": None}, "student.factory: Field required"),
        ({"data.source": "npz", "data.path": "missing.npz"}, "missing.npz does not exist"),
        (
            {"student": {"arch": "factory", "factory": "nonexistent_pkg.models:make"}},
            "student.factory: cannot import module 'nonexistent_pkg.models'",
        ),
        (
            {"teacher": {"kind": "checkpoint", "path": "nope.safetensors", "model": {"arch": "mlp"}}},
            "teacher.path: weights file",
        ),
    ],
)
def test_cli_rejects_bad_input_with_one_line_and_no_run_directory(tmp_path, capsys, changes, message):
    path = write_config(tmp_path, **changes)
    code, out, err = run_cli(capsys, "run", str(path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("distill: error:") and message in err, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()


def test_class_count_mismatch_between_teacher_and_data(tmp_path, capsys):
    teacher = MLP((1, 8, 8), 7, MLPSpec(hidden=[12]))
    save_file(teacher.state_dict(), tmp_path / "teacher7.safetensors")
    path = write_config(
        tmp_path,
        teacher={"kind": "checkpoint", "path": "teacher7.safetensors", "model": {"arch": "mlp", "hidden": [12]}},
    )
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == 2 and err.count("\n") == 1
    assert "teacher.path: weights in" in err and "head.weight is [7, 12] in the file but [10, 12] in the model" in err
    assert not (tmp_path / "runs").exists()


def test_cli_runs_with_a_checkpoint_teacher_and_refuses_to_overwrite(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = MLP((1, 8, 8), 10, MLPSpec(hidden=[32]))
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    path = write_config(
        tmp_path,
        teacher={"kind": "checkpoint", "path": "teacher.safetensors", "model": {"arch": "mlp", "hidden": [32]}},
    )
    code, out, err = run_cli(capsys, "run", str(path), "--set", "train.epochs=1", "--set", "baseline=false")
    assert code == 0, err
    assert "distilled student" in out and (tmp_path / "runs" / "tiny" / "metrics.json").exists()
    code, _, err = run_cli(capsys, "run", str(path), "--set", "train.epochs=1")
    assert code == 2 and "already exists; pass --overwrite" in err


def test_module_entry_point_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: digits}\n")
    done = subprocess.run([sys.executable, "-m", "distill", "run", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "teacher: Field required" in done.stderr and "Traceback" not in done.stderr
    listing = subprocess.run([sys.executable, "-m", "distill", "methods"], capture_output=True, text=True)
    assert listing.returncode == 0 and "kd" in listing.stdout and "temperature" in listing.stdout


def test_label_budget_gives_a_fair_scratch_baseline(tmp_path):
    config = parse_config(tiny_config(tmp_path, **{"data.labeled": 200}))
    result = run_experiment(config)
    metrics = result.metrics
    assert metrics["data"]["train_labeled"] == 200 and metrics["data"]["train"] > 1000
    # the scratch student sees only the 200 labeled samples (4 batches a pass), for as many steps as the
    # distilled student: each of its 3 epochs is several passes over them
    data = load_data(config.data).with_label_budget(200)
    scratch_data, passes = scratch_setup(data, config)
    assert len(scratch_data.train) == 200 and scratch_data.train.labeled == 200
    assert passes == round(-(-metrics["data"]["train"] // 64) / 4)
    assert len(metrics["training"]["scratch"]["history"]) == 3
    assert len(metrics["training"]["distilled"]["history"]) == 3
    assert len(metrics["training"]["teacher"]["history"]) == 3


def test_demo_config_runs_quick_on_any_fashion_mnist_directory(tmp_path, capsys, fake_fashion, monkeypatch):
    monkeypatch.setenv("DISTILL_FASHION_MNIST", str(fake_fashion))
    code, out, err = run_cli(capsys, "demo", "--quick", "--out", str(tmp_path / "runs"), "--set", "data.labeled=100")
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "demo-quick" / "metrics.json").read_text())
    assert metrics["data"]["train"] == 270 and metrics["data"]["train_labeled"] == 100
    assert "distilled student" in out and "scratch student" in out


def test_overwrite_only_ever_replaces_run_directories(tmp_path, capsys):
    precious = tmp_path / "runs" / "tiny"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    path = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(path), "--overwrite")
    assert code == 2 and "is not a distill run directory" in err
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_metrics_json_is_strict_json(tmp_path):
    from distill.core.io import write_json

    write_json(tmp_path / "m.json", {"gap": float("nan"), "nested": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "gap": None,
        "nested": [1.0, None],
    }


def test_a_failing_user_factory_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "badfactory.py").write_text(
        "def make(in_shape, num_classes):\n    raise RuntimeError('out of ideas')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, student={"arch": "factory", "factory": "badfactory:make"})
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == 2 and "student.factory: calling badfactory:make failed: RuntimeError: out of ideas" in err


def test_metrics_name_the_task_and_its_primary_metric(finished_run):
    metrics = finished_run[0].metrics
    assert metrics["task"] == "image_classification"
    assert metrics["primary_metric"] == {"name": "accuracy", "higher_is_better": True, "percent": True}
    for model in metrics["models"].values():
        assert model["metrics"] == {"accuracy": model["test_acc"]} and model["score"] == model["test_acc"]


def test_scores_where_lower_is_better_read_the_right_way_round():
    """Reports follow the primary metric's direction: a perplexity that falls is a gain."""
    from distill.pipeline.experiment import retention
    from distill.report.markdown import format_score, score_gain, table_rows, verdict

    assert retention(0.8, 0.9) == pytest.approx(0.8 / 0.9) and retention(0.0, 0.9) == 0.0
    assert retention(12.0, 10.0, higher_is_better=False) == pytest.approx(10 / 12)
    metrics = {
        "primary_metric": {"name": "perplexity", "higher_is_better": False, "percent": False},
        "latency_batch_sizes": [1],
        "models": {
            role: {"score": value, "params": 1, "size_bytes": 1, "latency_ms": {"1": 1.0}, "speedup": {"1": 1.0}}
            for role, value in (("teacher", 10.0), ("scratch", 20.0), ("distilled", 15.0))
        },
    }
    assert score_gain(15.0, 20.0, metrics) == 5.0 and format_score(15.0, metrics) == "15.0000"
    assert verdict(metrics) == (
        "Distillation helped: the distilled student beats the same student trained from scratch by 5.0000 in "
        "perplexity (lower is better)."
    )
    header, rows = table_rows(metrics)
    assert header[1] == "test perplexity" and [r[1] for r in rows] == ["10.0000", "20.0000", "15.0000"]
