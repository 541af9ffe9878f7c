"""`distill chain`: automatic assistant sizes, stage bookkeeping, the verdict and config errors."""

import json
import math

import pytest
import yaml
from rich.console import Console

from distill.cli import main
from distill.core.errors import DistillError
from distill.core.io import file_sha256
from distill.tasks.models import CNNSpec, MLPSpec
from distill.workflows.chain import ChainSpec, chain_verdict, run_chain
from distill.workflows.common import load_with_section
from distill.workflows.sizing import assistant_specs, param_count

from conftest import tiny_config

FASHION = (1, 28, 28)
DIGITS = (1, 8, 8)
PAIRS = {
    "demo teacher to a 66x smaller cnn": (
        CNNSpec(channels=[32, 64, 128], hidden=128),
        CNNSpec(channels=[4, 8], hidden=16, pool=3),
        FASHION,
    ),
    "deeper student than teacher": (
        CNNSpec(channels=[64, 64], hidden=64),
        CNNSpec(channels=[2, 2, 4], hidden=8),
        DIGITS,
    ),
    "mlp": (MLPSpec(hidden=[256, 128]), MLPSpec(hidden=[16]), DIGITS),
}


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("pair", PAIRS)
def test_automatic_assistants_lie_strictly_between_geometrically_spaced(pair, count):
    teacher, student, shape = PAIRS[pair]
    specs = assistant_specs(teacher, student, count, shape, 10)
    p_teacher, p_student = param_count(teacher, shape, 10), param_count(student, shape, 10)
    counts = [param_count(spec, shape, 10) for spec in specs]
    assert len(specs) == count
    # chain order, from the teacher's side: every size strictly between its neighbours
    sizes = [p_teacher, *counts, p_student]
    assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert all(type(spec) is type(teacher) for spec in specs)
    # geometric spacing in parameters: assistant i (from the student) near P_s (P_t / P_s)^(i / (k + 1))
    for i, actual in enumerate(reversed(counts), start=1):
        target = p_student * (p_teacher / p_student) ** (i / (count + 1))
        assert abs(math.log(actual / target)) < math.log(1.25), (actual, target)


def test_assistants_take_the_architecture_nearest_in_depth():
    teacher, student, shape = PAIRS["demo teacher to a 66x smaller cnn"]
    large, small = assistant_specs(teacher, student, 2, shape, 10)
    assert (len(large.channels), large.pool) == (3, teacher.pool)  # depth 3: shaped like the teacher
    assert (len(small.channels), small.pool) == (2, student.pool)  # depth 2: pools like the student


def test_automatic_sizes_that_cannot_fit_are_one_line_errors():
    small, smaller = CNNSpec(channels=[2, 4], hidden=8), CNNSpec(channels=[2, 4], hidden=6)
    with pytest.raises(DistillError, match=r"chain.assistants: cannot fit 8 assistant\(s\)"):
        assistant_specs(small, smaller, 8, DIGITS, 10)
    with pytest.raises(DistillError, match="not larger than the student"):
        assistant_specs(smaller, small, 1, DIGITS, 10)
    with pytest.raises(DistillError, match="same built-in arch"):
        assistant_specs(small, MLPSpec(hidden=[4]), 1, DIGITS, 10)


def _chain_config(tmp_path, chain: dict, **changes) -> tuple:
    raw = tiny_config(
        tmp_path,
        **{
            "student": {"arch": "cnn", "channels": [2, 4], "hidden": 8},
            "train.epochs": 2,
            **changes,
        },
    )
    raw["output"].pop("name")
    raw["chain"] = chain
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    path = _chain_config(tmp, {"assistants": 2, "assistant_train": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    config, spec = load_with_section(path, [], "chain", ChainSpec)
    return run_chain(config, spec, console=Console(quiet=True), cache_dir=tmp / "cache"), config


def test_each_stage_distils_from_the_previous_stages_student(chain_run):
    result, config = chain_run
    run = result.run_dir
    assert run.name == "tiny-chain" and not run.with_name("tiny-chain.partial").exists()
    stages = result.summary["stages"]
    assert [s["dir"] for s in stages] == ["stage1-assistant1", "stage2-assistant2", "stage3-student"]
    assert stages[0]["teacher_sha256"] == result.summary["teacher"]["weights_sha256"]
    for previous, stage in zip(stages, stages[1:], strict=False):
        # stage k's teacher weights are exactly stage k-1's student weights, on disk and in its config
        student_file = run / previous["dir"] / "student.safetensors"
        assert stage["teacher_sha256"] == previous["weights_sha256"] == file_sha256(student_file)
        teacher = yaml.safe_load((run / stage["dir"] / "config.yaml").read_text())["teacher"]
        assert teacher["kind"] == "checkpoint" and teacher["path"] == str(student_file.resolve())
        metrics = json.loads((run / stage["dir"] / "metrics.json").read_text())
        assert metrics["models"]["teacher"]["weights_sha256"] == previous["weights_sha256"]
        assert metrics["models"]["teacher"]["params"] == previous["params"]
    # sizes shrink along the chain; the direct run starts from the same teacher
    assert [result.summary["teacher"]["params"], *(s["params"] for s in stages)] == sorted(
        [result.summary["teacher"]["params"], *(s["params"] for s in stages)], reverse=True
    )
    direct = json.loads((run / "direct" / "metrics.json").read_text())
    assert direct["models"]["teacher"]["weights_sha256"] == result.summary["teacher"]["weights_sha256"]


def test_the_student_gets_the_same_budget_in_the_chain_and_directly(chain_run):
    result, config = chain_run
    student, (direct, scratch) = result.summary["stages"][-1], result.summary["baselines"]
    assert direct["role"] == "student, direct KD" and scratch["role"] == "student, scratch"
    assert student["params"] == direct["params"] == scratch["params"] == param_count(config.student, DIGITS, 10)
    assert student["epochs"] == direct["epochs"] == config.train.epochs == 2
    assert [s["epochs"] for s in result.summary["stages"][:-1]] == [1, 1]  # chain.assistant_train
    # only the direct run trains the scratch baseline (it would be the same student again)
    final_stage = json.loads((result.run_dir / "stage3-student" / "metrics.json").read_text())
    assert "scratch" not in final_stage["models"]


def test_chain_report_shows_the_chain_beside_direct_distillation(chain_run):
    result, _ = chain_run
    run = result.run_dir
    for name in ("chain.json", "chain.png", "report.md", "config.yaml"):
        assert (run / name).stat().st_size > 0
    report = (run / "report.md").read_text()
    assert result.summary["verdict"] in report
    for role in ("assistant 1", "assistant 2", "student, via the chain", "student, direct KD", "student, scratch"):
        assert f"| {role} |" in report
    assert ".partial" not in "".join(p.read_text() for p in run.rglob("*.yaml"))
    assert json.loads((run / "chain.json").read_text())["stages"] == result.summary["stages"]


def test_a_second_chain_needs_overwrite(chain_run, capsys):
    result, _ = chain_run
    path = result.run_dir.parent.parent / "tiny.yaml"
    assert main(["chain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists; pass --overwrite" in err


def _summary(chain: float, direct: float, scratch: float, chain_val: float | None = None) -> dict:
    entry = lambda role, acc, val=None: {"role": role, "score": acc, "val_score": acc if val is None else val}  # noqa: E731
    return {
        "stages": [entry("assistant 1", 0.9), entry("student, via the chain", chain, chain_val)],
        "baselines": [entry("student, direct KD", direct), entry("student, scratch", scratch)],
    }


def test_chain_verdict_says_plainly_whether_the_chain_helped():
    assert chain_verdict(_summary(0.85, 0.83, 0.80)).startswith("The chain via 1 assistant helped: +2.00 points")
    assert chain_verdict(_summary(0.82, 0.83, 0.80)).startswith("The chain via 1 assistant did not help: -1.00")
    assert "inconclusive" in chain_verdict(_summary(0.84, 0.83, 0.80, chain_val=0.82))
    worse = chain_verdict(_summary(0.78, 0.79, 0.80))
    assert "did not help" in worse and "Neither beats the same student trained from scratch (80.00%" in worse


@pytest.mark.parametrize(
    ("chain", "field"),
    [
        ({"assistants": 0}, "chain.assistants: Input should be greater than or equal to 1"),
        ({"colour": "red"}, "chain.colour: Extra inputs are not permitted"),
        ({"assistant_models": [{"arch": "cnn", "channels": [0]}]}, "chain.assistant_models.0.channels.0"),
        (
            {"assistants": 2, "assistant_models": [{"arch": "mlp"}]},
            "chain: assistants is 2 but assistant_models lists 1",
        ),
        ({"assistant_train": {"lr": -1}}, "chain.assistant_train.lr"),
        ({"assistants": 40}, "chain.assistants: Input should be less than or equal to 8"),
    ],
)
def test_bad_chain_sections_are_one_line_errors(tmp_path, capsys, chain, field):
    path = _chain_config(tmp_path, chain)
    assert main(["chain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "runs").exists()


def test_automatic_sizes_need_matching_archs_before_any_run(tmp_path, capsys):
    path = _chain_config(tmp_path, {"assistants": 1}, student={"arch": "mlp", "hidden": [16]})
    assert main(["chain", str(path), "--set", "chain.direct=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chain.assistants: automatic assistant sizes need" in err
    assert not (tmp_path / "runs").exists()


def test_every_stage_pair_is_checked_before_anything_trains(tmp_path, capsys):
    terms = [
        {"type": "kd", "weight": 1.0},
        {"type": "hint", "weight": 1.0, "student": "features.1.0", "teacher": "features.1.0"},
    ]
    chain = {"assistant_models": [{"arch": "mlp", "hidden": [8]}]}  # an MLP has no conv block features.1.0
    path = _chain_config(tmp_path, chain, distill={"terms": terms})
    assert main(["chain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "features.1.0" in err, err
    assert not (tmp_path / "runs").exists()
