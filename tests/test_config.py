"""Config validation: every mistake is one line naming the field."""

import pytest
import yaml

from distill.core.errors import DistillError
from distill.pipeline.config import config_to_dict, load_config, parse_config

from conftest import tiny_config


def error_of(raw, overrides=None) -> str:
    with pytest.raises(DistillError) as info:
        parse_config(raw, "cfg.yaml", overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_config_resolves_hinton_terms(tmp_path):
    config = parse_config(tiny_config(tmp_path))
    terms = config.distill.resolved_terms()
    assert [(t.type, t.weight, t.params) for t in terms] == [
        ("kd", 0.7, {"temperature": 2.0}),
        ("ce", pytest.approx(0.3), {}),
    ]


def test_alpha_one_drops_the_label_term(tmp_path):
    terms = parse_config(tiny_config(tmp_path, **{"distill.alpha": 1.0})).distill.resolved_terms()
    assert [t.type for t in terms] == ["kd"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train.epochz": 3}, "train.epochz: Extra inputs are not permitted"),
        ({"train.lr": "fast"}, "train.lr: Input should be a valid number"),
        ({"train.lr": -1}, "train.lr: Input should be greater than 0"),
        ({"distill.alpha": 1.5}, "distill.alpha: Input should be less than or equal to 1"),
        (
            {"student.arch": "resnet"},
            "student.arch: Input should be one of 'cnn', 'mlp', 'factory', 'hf', 'from_teacher', 'hf_config' (got 'resnet')",
        ),
        ({"teacher.model.channels": [8, 0]}, "teacher.model.channels.1: Input should be greater than 0"),
        ({"student.hidden": "wide"}, "student.hidden: Input should be a valid list"),
        ({"data.source": "cifar"}, "data.source: Input should be"),
        (
            {"teacher.kind": "magic"},
            "teacher.kind: Input should be one of 'train', 'checkpoint', 'cache', 'hf' (got 'magic')",
        ),
        ({"output.name": ".."}, "output.name: must name a directory inside output.dir"),
        ({"eval.latency_batch_sizes": []}, "eval.latency_batch_sizes: List should have at least 1 item"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"data.image_size": [0, 4]}, "data.image_size.0: Input should be greater than 0"),
        ({"distill": {"terms": [{"type": "kd", "weight": 0}]}}, "every weight is 0"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, expected):
    assert expected in error_of(tiny_config(tmp_path, **change))


def test_missing_sections_are_named(tmp_path):
    raw = tiny_config(tmp_path)
    del raw["student"]
    assert "cfg.yaml: student: Field required" in error_of(raw)


def test_terms_are_checked_against_the_registry(tmp_path):
    raw = tiny_config(tmp_path)
    del raw["distill"]
    raw["distill"] = {"terms": [{"type": "kd", "weight": 0.5, "temperature": 2}, {"type": "fitnet"}]}
    assert (
        "unknown loss term 'fitnet'; available: at, ce, distilbert_cosine, dkd, embed_cosine, embed_mse, forward_kl, "
        "hint, jsd, kd, minilm_attention, minilm_relation, pkt, reverse_kl, rkd_angle, rkd_distance, sp, "
        "tinybert_attention, tinybert_embedding, tinybert_hidden, tv" in error_of(raw)
    )
    raw["distill"] = {"terms": [{"type": "kd", "temprature": 2}]}
    assert "distill.terms.0.temprature: Extra inputs are not permitted" in error_of(raw)
    raw["distill"] = {"terms": [{"type": "kd"}], "alpha": 0.5}
    assert "either alpha/temperature or an explicit terms list" in error_of(raw)
    raw["distill"] = {"terms": [{"type": "kd", "weight": 0.5, "temperature": 1}, {"type": "kd", "weight": 0.5}]}
    assert "names must be unique" in error_of(raw)


def test_overrides_parse_yaml_values(tmp_path):
    config = parse_config(
        tiny_config(tmp_path), overrides=["train.epochs=7", "student.hidden=[4, 8]", "distill.alpha=1"]
    )
    assert config.train.epochs == 7 and config.student.hidden == [4, 8] and config.distill.alpha == 1.0
    assert "expected key=value" in error_of(tiny_config(tmp_path), ["train.epochs"])
    assert "train.epochs: Input should be a valid integer" in error_of(tiny_config(tmp_path), ["train.epochs=many"])


def test_set_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "exp.yaml").write_text(
        "data: {source: npz, path: in_file.npz}\nteacher: {kind: train, model: {arch: mlp}}\nstudent: {arch: mlp}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_config(config_dir / "exp.yaml").data.path == config_dir / "in_file.npz"
    assert load_config(config_dir / "exp.yaml", ["data.path=mine.npz"]).data.path == tmp_path / "mine.npz"


def test_files_relative_paths_and_yaml_errors(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {source: digits\nteacher: [")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(DistillError, match="expected a mapping"):
        load_config(listing)
    good = tmp_path / "sub" / "exp.yaml"
    good.parent.mkdir()
    good.write_text(
        "data: {source: npz, path: arrays.npz}\nteacher: {kind: checkpoint, path: t.safetensors, model: {arch: mlp}}\nstudent: {arch: mlp}\n"
    )
    config = load_config(good)
    assert config.data.path == good.parent / "arrays.npz"
    assert config.teacher.path == good.parent / "t.safetensors"
    assert config.output.name == "exp"


@pytest.mark.parametrize(
    "distill",
    [
        {"alpha": 0.5, "temperature": 3.0},
        {"terms": [{"type": "kd", "weight": 0.5, "temperature": 3.0}, {"type": "ce", "weight": 0.5}]},
    ],
)
def test_a_saved_config_parses_back_to_the_same_config(tmp_path, distill):
    config = parse_config(tiny_config(tmp_path, distill=distill))
    again = parse_config(config_to_dict(config))
    assert again == config
    assert again.distill.resolved_terms() == config.distill.resolved_terms()


def test_run_configs_may_hold_the_workflow_sections(tmp_path):
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path)))
    raw = tiny_config(tmp_path)
    raw.update(sweep={"students": [{"arch": "mlp"}]}, tune={"trials": 3}, chain={"assistants": 1})
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "all.yaml") == load_config(tmp_path / "plain.yaml")
    with pytest.raises(DistillError, match="sweeps: Extra inputs"):  # a misspelt section is still refused
        parse_config({**tiny_config(tmp_path), "sweeps": {}})


def test_every_packaged_demo_config_loads_and_names_its_task():
    from importlib import resources

    from distill.cli import DEMOS

    tasks = {}
    for which, (file, quick, _) in DEMOS.items():
        with resources.as_file(resources.files("distill") / "configs" / file) as path:
            tasks[which] = load_config(path, quick).task
    assert tasks == {"image": "image_classification", "text": "text_classification", "lm": "causal_lm"}


def test_a_language_model_distils_by_forward_kl_at_t1_unless_told_otherwise():
    from distill.pipeline.config import ExperimentConfig

    base = {
        "task": "causal_lm",
        "data": {"source": "text_file", "path": "x.txt"},
        "teacher": {"kind": "hf", "path": "t"},
        "student": {"from_teacher": {"layers": [0]}},
    }
    (term,) = ExperimentConfig.model_validate(base).distill.resolved_terms()
    assert (term.type, term.weight, term.params) == ("forward_kl", 1.0, {"temperature": 1.0})
    told = ExperimentConfig.model_validate(base | {"distill": {"alpha": 0.5}}).distill.resolved_terms()
    assert [(t.type, t.weight) for t in told] == [("kd", 0.5), ("ce", 0.5)]
    image = ExperimentConfig.model_validate(
        {
            "data": {"source": "digits"},
            "teacher": {"kind": "train", "model": {"arch": "mlp"}},
            "student": {"arch": "mlp"},
        }
    )
    assert [(t.type, t.weight) for t in image.distill.resolved_terms()] == [("kd", 0.9), ("ce", pytest.approx(0.1))]
