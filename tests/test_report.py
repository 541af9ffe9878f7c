"""report.html in a real headless browser, `distill compare`, and run tracking."""

import json
import shutil
from pathlib import Path

import pytest

from distill.cli import main
from distill.pipeline.config import parse_config
from distill.pipeline.experiment import run_experiment
from distill.report.compare import comparison, pareto_front

from conftest import tiny_config

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    first = run_experiment(parse_config(tiny_config(tmp)), cache_dir=tmp / "cache")
    second = run_experiment(
        parse_config(tiny_config(tmp, **{"output.name": "wide", "student.hidden": [48], "distill.alpha": 0.5})),
        cache_dir=tmp / "cache",
    )
    return first, second


def test_report_holds_every_section_and_embeds_its_images(runs):
    html = (runs[0].run_dir / "report.html").read_text()
    for section in ("Summary", "Training", "Per class", "Calibration", "Config"):
        assert f"<h2>{section}</h2>" in html
    assert html.count('src="data:image/png;base64,') == 5
    assert "http://" not in html and "https://" not in html and "<script" not in html  # opens offline


def test_calibration_is_recorded_for_every_model(runs):
    for m in runs[0].metrics["models"].values():
        bins = m["calibration"]["bins"]
        assert sum(b["count"] for b in bins) == runs[0].metrics["data"]["test"]
        ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / sum(
            b["count"] for b in bins
        )
        assert m["calibration"]["ece"] == pytest.approx(ece)
        assert len(m["per_class_agreement"]) == 10


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (make test installs them)",
)
def test_report_renders_in_headless_chromium(runs, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,2400",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        run = runs[0]
        driver.get((run.run_dir / "report.html").as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        rows = driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
        cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        assert [c[0] for c in cells] == ["teacher", "scratch student", "distilled student"]
        for row, role in zip(cells, ("teacher", "scratch", "distilled"), strict=True):
            assert row[1] == f"{100 * metrics['models'][role]['test_acc']:.2f}%"
            assert row[5] == f"{metrics['models'][role]['params']:,}"
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert len(images) == 5 and all(done and width > 0 for done, width in images)
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        driver.quit()


def test_pareto_front_marks_undominated_models():
    points = [
        {"ranking": 0.9, "latency_ms": 10.0},
        {"ranking": 0.8, "latency_ms": 1.0},
        {"ranking": 0.7, "latency_ms": 2.0},  # slower and worse than the second
        {"ranking": 0.9, "latency_ms": 12.0},  # as good as the first, but slower
    ]
    pareto_front(points)
    assert [p["on_front"] for p in points] == [True, True, False, False]


def test_compare_refuses_runs_scored_on_different_metrics(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[1].run_dir, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["primary_metric"] = {"name": "spearman", "higher_is_better": True, "percent": False}
    (other / "metrics.json").write_text(json.dumps(metrics))
    from distill.core.errors import DistillError

    with pytest.raises(DistillError, match=r"score different metrics \(accuracy in .*, spearman in other\)"):
        comparison([runs[0].run_dir, other])


def test_compare_prints_one_table_and_writes_a_report(runs, tmp_path, capsys):
    out = tmp_path / "compare.html"
    assert main(["compare", str(runs[0].run_dir), str(runs[1].run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "wide" in printed and "★" in printed
    points, batch, scoring = comparison([runs[0].run_dir, runs[1].run_dir])
    assert scoring["primary_metric"] == {"name": "accuracy", "higher_is_better": True, "percent": True}
    assert batch == "1" and sum(p["role"] == "teacher" for p in points) == 1  # the shared teacher appears once
    assert len(points) == 5 and any(p["on_front"] for p in points)
    html = out.read_text()
    assert '<table id="comparison">' in html and "data:image/png;base64," in html
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a finished distill run" in capsys.readouterr().err


def test_tensorboard_tracking(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_experiment(parse_config(tiny_config(tmp_path, **{"output.tracker": "tensorboard"})))
    events = list((result.run_dir / "tracking").rglob("events.out.tfevents*"))
    assert events
    scalars = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"distilled/loss", "distilled/kd", "distilled/val_acc", "scratch/ce"} <= scalars


def test_a_missing_tracker_package_is_reported_before_the_run(tmp_path, monkeypatch):
    import importlib.util

    from distill.core.errors import DistillError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(DistillError, match="output.tracker: mlflow is not installed"):
        run_experiment(parse_config(tiny_config(tmp_path, **{"output.tracker": "mlflow"})))
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_incomplete_metrics_and_counts_a_run_once(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    metrics = json.loads((runs[0].run_dir / "metrics.json").read_text())
    del metrics["models"]["distilled"]["latency_ms"]
    (broken / "metrics.json").write_text(json.dumps(metrics))
    assert main(["compare", str(broken), "--out", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err
    assert "is not a complete distill metrics file" in err and err.count("\n") == 1
    points, _, _ = comparison([runs[0].run_dir, runs[0].run_dir])
    assert len(points) == 3


def test_user_text_is_shown_literally_in_figures(runs):
    from distill.report.plots import per_class_figure

    metrics = json.loads((runs[0].run_dir / "metrics.json").read_text())
    metrics["class_names"] = [f"$cost_{i}" for i in range(10)]  # would be maths to matplotlib
    figure = per_class_figure(metrics)
    figure.canvas.draw()


def test_mlflow_tracking_stays_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run_experiment(parse_config(tiny_config(tmp_path, **{"output.tracker": "mlflow"})))
    logged = {p.parent.name + "/" + p.name for p in (result.run_dir / "tracking" / "mlruns").glob("*/*/metrics/*/*")}
    assert {"distilled/kd", "distilled/val_acc", "scratch/ce"} <= logged
    assert not (tmp_path / "mlruns").exists()  # nothing written to the working directory


def test_latency_timing_keeps_to_its_time_budget():
    """A slow model at a big batch gets fewer timed rounds (never fewer than 7), a fast one all of them."""
    import time as clock

    from torch import nn

    from distill.core.evaluate import MIN_ROUNDS, measure_latencies

    class Slow(nn.Module):
        calls = 0

        def forward(self, x):
            Slow.calls += 1
            clock.sleep(0.02)
            return x

    Slow.calls = 0
    started = clock.perf_counter()
    measure_latencies({"slow": Slow()}, (3,), 4, repeats=30, max_seconds=0.2)
    timed = Slow.calls
    assert clock.perf_counter() - started < 0.2 + 0.5  # the budget, plus the warm-up
    assert MIN_ROUNDS <= timed - 2 <= 11  # 2 warm-up passes (>= 2 and >= 10 ms), then about 0.2 s / 20 ms rounds
    Slow.calls = 0
    measure_latencies({"slow": Slow()}, (3,), 4, repeats=30, max_seconds=None)
    assert Slow.calls - 2 == 30
