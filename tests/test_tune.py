"""`distill tune`: the search never reads the test split, settings reach the config, pruning, verdicts, errors."""

import csv

import optuna
import pytest
import yaml
from rich.console import Console

import distill.workflows.tune as tune_module
from distill.cli import main
from distill.core.errors import DistillError
from distill.pipeline.config import load_config, parse_config
from distill.tasks import ImageClassification
from distill.tasks.image_data import load_data
from distill.train.loop import EpochLog
from distill.workflows.common import load_with_section, parse_section
from distill.workflows.tune import (
    PruneSpec,
    SpaceSpec,
    TuneSpec,
    apply_settings,
    config_settings,
    make_pruner,
    pruning_hook,
    run_tune,
    search_space,
    tune_verdict,
)

from conftest import tiny_config

TERMS = [{"type": "kd", "weight": 0.5, "temperature": 2.0}, {"type": "ce", "weight": 0.5}]


class Untouchable:
    """Stands in for the test split: reading its inputs or labels fails the test (its size, a
    count the teacher cache records in its metadata, is all that may be asked)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name):
        raise AssertionError(f"the tuner read the test split ({name})")


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    raw = tiny_config(tmp, **{"data.labeled": 400, "train.epochs": 4})
    raw["output"].pop("name")
    raw["tune"] = {"trials": 5, "epochs": 2, "seed": 3, "prune": {"startup_trials": 1, "warmup_epochs": 0}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    config, spec = load_with_section(path, [], "tune", TuneSpec)
    touched = []

    def load_without_test(data_spec):
        data = load_data(data_spec)
        data.fingerprint  # noqa: B018 - the teacher cache key hashes every split's content; nothing else may read test
        data.test = Untouchable(len(data.test))
        touched.append(data)
        return data

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageClassification, "load_data", lambda self, data_spec: load_without_test(data_spec))
        result = run_tune(config, spec, console=Console(quiet=True), cache_dir=tmp / "cache")
    assert touched, "the tuner loads its data through its task's load_data"
    return result, config, spec


def test_the_tuner_never_reads_the_test_split(tune_run):
    result, _, _ = tune_run
    # every trial, the scratch baseline and the teacher ran with the test split poisoned
    assert result.summary["states"]["complete"] >= 1
    assert result.summary["data"] == {"name": "digits", "train": 1294, "train_labeled": 400, "val": 144}
    assert "test_acc" not in result.run_dir.joinpath("tune.json").read_text()


def test_tune_writes_a_runnable_best_config_and_a_trials_table(tune_run):
    result, config, spec = tune_run
    run, summary = result.run_dir, result.summary
    assert run.name == "tiny-tune" and not run.with_name("tiny-tune.partial").exists()
    best = load_config(run / "best.yaml")  # a complete config `distill run` accepts
    assert best == apply_settings(config, summary["best"]["params"]).model_copy(
        update={"output": best.output}
    )  # the found settings, nothing else changed
    assert best.train.epochs == config.train.epochs == 4 and best.output.name == "tiny-tune-best"
    assert best.train.lr == pytest.approx(config.train.lr * summary["best"]["params"]["lr_scale"])
    assert best.distill.alpha == pytest.approx(summary["best"]["params"]["alpha"])
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == spec.trials == len(summary["trials"])
    assert {r["state"] for r in rows} <= {"complete", "pruned", "failed"}
    assert rows[0]["note"] == "the config's own settings" and float(rows[0]["alpha"]) == config.distill.alpha
    complete = [r for r in summary["trials"] if r["state"] == "complete"]
    assert summary["best"]["val_score"] == max(r["val_score"] for r in complete)
    assert all(r["epochs"] == 2 for r in complete)  # tune.epochs per trial
    report = (run / "report.md").read_text()
    assert all(line in report for line in summary["verdict"])
    assert f"{100 * summary['scratch_val_score']:.2f}%" in report and "the test split is never read" in report


def test_the_search_is_reproducible_with_the_sampler_seed(tune_run):
    result, config, spec = tune_run
    import optuna

    ranges = search_space(config, spec.space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=2))
    study.enqueue_trial(config_settings(config, ranges))
    sampled = []
    for _ in range(3):
        trial = study.ask()
        sampled.append({name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in ranges.items()})
        study.tell(trial, 0.5)
    assert [r["params"] for r in result.summary["trials"][:2]] == sampled[:2]


def test_pruning_hook_stops_a_lagging_trial():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    trial = study.ask()
    hook = pruning_hook(trial)
    log = lambda epoch, acc: EpochLog(epoch, 1.0, {}, acc, acc, 1.0, 0.1, 0.0)  # noqa: E731
    hook(log(1, 0.7))  # good enough: goes on
    with pytest.raises(optuna.TrialPruned):
        hook(log(2, 0.5))
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.7, 2: 0.5}


def test_median_pruning_spares_the_warmup_epochs():
    study = optuna.create_study(direction="maximize", pruner=make_pruner(PruneSpec(startup_trials=1, warmup_epochs=1)))
    log = lambda epoch, acc: EpochLog(epoch, 1.0, {}, acc, acc, 1.0, 0.1, 0.0)  # noqa: E731
    good = study.ask()
    for epoch in (1, 2, 3):
        pruning_hook(good)(log(epoch, 0.9))
    study.tell(good, 0.9)
    lagging = study.ask()
    hook = pruning_hook(lagging)
    hook(log(1, 0.2))  # far behind, but epoch 1 is a warm-up epoch
    with pytest.raises(optuna.TrialPruned):
        hook(log(2, 0.2))
    assert isinstance(make_pruner(None), optuna.pruners.NopPruner)


def test_search_space_follows_the_objective(tmp_path):
    hinton = parse_config(tiny_config(tmp_path))
    assert set(search_space(hinton, SpaceSpec())) == {"temperature", "alpha", "lr_scale"}
    assert set(search_space(hinton, SpaceSpec(alpha=None, lr_scale=None))) == {"temperature"}
    terms = parse_config(tiny_config(tmp_path, distill={"terms": TERMS}))
    ranges = search_space(terms, SpaceSpec())
    assert set(ranges) == {"temperature", "lr_scale", "weight.kd", "weight.ce"}
    assert (ranges["weight.kd"].low, ranges["weight.kd"].high, ranges["weight.kd"].log) == (0.05, 5.0, True)
    with pytest.raises(DistillError, match="tune.space.alpha: the config lists distill.terms"):
        search_space(terms, SpaceSpec(alpha={"low": 0, "high": 1}))
    with pytest.raises(DistillError, match="tune.space.weights: no term named 'hint'"):
        search_space(terms, SpaceSpec(weights={"hint": {"low": 0, "high": 1}}))
    with pytest.raises(DistillError, match="tune.space.weights: the config's objective is alpha"):
        search_space(hinton, SpaceSpec(weights={"kd": {"low": 0, "high": 1}}))


def test_settings_reach_every_term_and_the_learning_rate(tmp_path):
    config = parse_config(tiny_config(tmp_path, distill={"terms": TERMS}))
    tuned = apply_settings(config, {"weight.kd": 0.8, "weight.ce": 0.3, "temperature": 6.0, "lr_scale": 2.0})
    assert [(t.key, t.weight, t.params.get("temperature")) for t in tuned.distill.terms] == [
        ("kd", 0.8, 6.0),
        ("ce", 0.3, None),
    ]
    assert tuned.train.lr == pytest.approx(2 * config.train.lr)
    assert tuned.student == config.student and tuned.data == config.data
    ranges = search_space(config, SpaceSpec())
    assert config_settings(config, ranges) == {"lr_scale": 1.0, "temperature": 2.0, "weight.kd": 0.5, "weight.ce": 0.5}
    assert (
        config_settings(
            config, {**ranges, "temperature": parse_section({"low": 3, "high": 5}, "r", tune_module.Range, "x")}
        )
        is None
    )


def _summary(best: float, scratch: float, own: float | None, best_trial: int = 4, val: int = 6000) -> dict:
    return {
        "best": {"val_score": best, "settings": "T=2 alpha=0.5 lr=0.1", "trial": best_trial},
        "scratch_val_score": scratch,
        "config_settings": {"settings": "T=4 alpha=0.9 lr=0.05", "tried": own is not None, "val_score": own},
        "data": {"val": val},
    }


def test_verdict_says_plainly_when_distillation_did_not_help():
    helped, versus_own = tune_verdict(_summary(0.85, 0.80, 0.83))
    assert helped.startswith("Distillation helped on validation") and "+5.00 points over" in helped
    # +0.4 points on 6,000 validation samples is within chance (±0.73 at 80%): no clear gain
    unclear = tune_verdict(_summary(0.804, 0.80, 0.78))[0]
    assert unclear.startswith("Distillation did not clearly help on validation") and "±0.73 points" in unclear
    assert tune_verdict(_summary(0.804, 0.80, 0.78, val=100_000))[0].startswith("Distillation helped")
    assert versus_own == "The config's own settings (T=4 alpha=0.9 lr=0.05) scored 83.00%; the tuned ones +2.00 points."
    failed, _ = tune_verdict(_summary(0.79, 0.80, 0.78))
    assert failed.startswith("Distillation did not help on validation") and "1.00 points below" in failed
    assert "level with" in tune_verdict(_summary(0.80, 0.80, 0.78))[0]
    assert "No trial beat the config's own settings" in tune_verdict(_summary(0.85, 0.80, 0.85, best_trial=0))[1]
    assert "outside the search ranges" in tune_verdict(_summary(0.85, 0.80, None))[1]


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"trials": 0}, "tune.trials: Input should be greater than 0"),
        ({"trials": None}, "tune: set a budget: trials, timeout or both"),
        ({"space": {"alpha": {"low": 1, "high": 0}}}, "tune.space.alpha: high (0.0) must be greater than low (1.0)"),
        (
            {"space": {"temperature": {"low": 0, "high": 4, "log": True}}},
            "tune.space.temperature: a log range needs low > 0",
        ),
        ({"sampler": "random"}, "tune.sampler: Extra inputs are not permitted"),
        ({"space": {"weights": {"kd": {"low": 0, "high": 1}}}}, "tune.space.weights: the config's objective is alpha"),
    ],
)
def test_bad_tune_sections_are_one_line_errors(tmp_path, capsys, tune, message):
    raw = tiny_config(tmp_path)
    raw["tune"] = tune
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_overrides_reach_the_tune_section(tmp_path):
    raw = tiny_config(tmp_path)
    raw["tune"] = {"trials": 3}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    config, spec = load_with_section(path, ["tune.trials=7", "tune.space.alpha=null", "train.lr=0.1"], "tune", TuneSpec)
    assert spec.trials == 7 and spec.space.alpha is None and config.train.lr == 0.1
    assert config.output.name == "tiny"  # given in the file: kept
