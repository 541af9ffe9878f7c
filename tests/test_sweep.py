"""`distill sweep`: Pareto marking and ordering on constructed numbers, and an end-to-end sweep."""

import json

import pytest
import yaml
from rich.console import Console

from distill.cli import main
from distill.pipeline.config import parse_config
from distill.tasks.models import MLPSpec
from distill.workflows.common import load_with_section, parse_section
from distill.workflows.sweep import SweepSpec, budget_guide, mark_fronts, ordered, run_sweep, sweep_students

from conftest import tiny_config


def _point(label, acc, latency, size, params):
    return {"label": label, "score": acc, "ranking": acc, "latency_ms": latency, "size_bytes": size, "size_kib": size / 1024,
            "params": params}  # fmt: skip


POINTS = [
    _point("A", 0.80, 1.0, 100, 100),
    _point("B", 0.85, 2.0, 300, 300),
    _point("C", 0.84, 3.0, 200, 200),  # beaten on latency by B (more accurate and faster); smaller than B
    _point("D", 0.85, 2.0, 400, 300),  # ties B on accuracy and latency (both stay on that front); larger than B
    _point("E", 0.70, 0.5, 50, 50),
    _point("F", 0.70, 0.6, 60, 60),  # beaten on both by E
]


def test_pareto_fronts_on_constructed_numbers():
    points = [dict(p) for p in POINTS]
    mark_fronts(points)
    latency = {p["label"] for p in points if p["front_latency"]}
    size = {p["label"] for p in points if p["front_size"]}
    assert latency == {"A", "B", "D", "E"}
    assert size == {"A", "B", "C", "E"}


def test_table_order_is_parameters_then_latency():
    assert [p["label"] for p in ordered(POINTS)] == ["E", "F", "A", "C", "B", "D"]
    swapped = [_point("slow", 0.9, 5.0, 10, 10), _point("fast", 0.9, 1.0, 10, 10)]
    assert [p["label"] for p in ordered(swapped)] == ["fast", "slow"]


def test_budget_guide_lists_the_front_cheapest_first():
    points = [dict(p) for p in POINTS]
    mark_fronts(points)
    assert budget_guide(points, "latency_ms", "front_latency", "ms") == [
        "0.5 ms → E (70.00%)",
        "1 ms → A (80.00%)",
        "2 ms → B (85.00%)",
        "2 ms → D (85.00%)",
    ]


def test_students_from_widths_and_duplicates(tmp_path):
    config = parse_config(tiny_config(tmp_path))  # student: mlp [16]
    spec = parse_section(
        {"students": [{"arch": "mlp", "hidden": [64, 32]}], "widths": [0.25, 2]}, "sweep", SweepSpec, "x"
    )
    assert sweep_students(config, spec) == [MLPSpec(hidden=[64, 32]), MLPSpec(hidden=[4]), MLPSpec(hidden=[32])]
    duplicate = parse_section({"students": [{"arch": "mlp", "hidden": [8]}], "widths": [0.5]}, "sweep", SweepSpec, "x")
    with pytest.raises(Exception, match=r"sweep: students 1 and 2 are the same model \(mlp\[8\]\)"):
        sweep_students(config, duplicate)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    raw = tiny_config(tmp, **{"train.epochs": 2})
    raw["output"].pop("name")
    raw["sweep"] = {"widths": [2, 0.5], "students": [{"arch": "mlp", "hidden": [12, 12]}]}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    config, spec = load_with_section(path, [], "sweep", SweepSpec)
    return run_sweep(config, spec, console=Console(quiet=True), cache_dir=tmp / "cache"), config


def test_sweep_table_is_ordered_and_marks_the_fronts(sweep_run):
    result, config = sweep_run
    students = result.summary["students"]
    assert [p["label"] for p in students] == ["mlp[8]", "mlp[12,12]", "mlp[32]"]  # 610, 1,066, 2,410 parameters
    assert [p["params"] for p in students] == sorted(p["params"] for p in students)
    for p in students:  # the marks agree with the definition, on the sweep's own numbers
        for cost, flag in (("latency_ms", "front_latency"), ("size_bytes", "front_size")):
            beaten = any(
                q["score"] >= p["score"] and q[cost] <= p[cost] and (q["score"] > p["score"] or q[cost] < p[cost])
                for q in students
            )
            assert p[flag] is (not beaten)
        assert set(p["latency_by_batch"]) == {"1", "16"} and p["latency_ms"] == p["latency_by_batch"]["1"]
        assert p["over_scratch"] == pytest.approx(100 * (p["score"] - p["scratch_score"]))  # points
    assert any(p["front_latency"] for p in students) and any(p["front_size"] for p in students)


def test_sweep_shares_one_teacher_and_writes_its_report(sweep_run):
    result, _ = sweep_run
    run = result.run_dir
    assert run.name == "tiny-sweep" and not run.with_name("tiny-sweep.partial").exists()
    teachers = {
        json.loads(p.read_text())["models"]["teacher"]["weights_sha256"]
        for p in (run / "students").glob("*/metrics.json")
    }
    assert len(teachers) == 1 and len(list((run / "students").glob("*/student.safetensors"))) == 3
    for name in ("sweep.json", "pareto.png", "report.md", "report.html", "config.yaml"):
        assert (run / name).stat().st_size > 0
    report = (run / "report.md").read_text()
    assert "sorted by parameter count, smallest first" in report and "★" in report
    assert all(line in report for line in result.summary["verdict"])
    html = (run / "report.html").read_text()
    assert 'id="sweep"' in html and "data:image/png;base64," in html and "<script" not in html


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({}, "sweep: list students or widths"),
        ({"widths": [0]}, "sweep.widths.0: Input should be greater than 0"),
        ({"students": [{"arch": "rnn"}]}, "sweep.students.0"),
        ({"widths": [1], "depth": 3}, "sweep.depth: Extra inputs are not permitted"),
    ],
)
def test_bad_sweep_sections_are_one_line_errors(tmp_path, capsys, sweep, message):
    raw = tiny_config(tmp_path)
    raw["sweep"] = sweep
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_widths_of_a_factory_student_are_an_error(tmp_path, capsys):
    raw = tiny_config(tmp_path, student={"arch": "factory", "factory": "torch.nn:Identity"})
    raw["sweep"] = {"widths": [2]}
    path = tmp_path / "factory.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 2
    assert "sweep.widths: widths can only be scaled for the built-in cnn and mlp models" in capsys.readouterr().err
