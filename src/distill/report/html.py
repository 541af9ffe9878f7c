"""A self-contained ``report.html``: one file, images embedded, no scripts, opens offline."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from distill.core.io import write_text
from distill.report.markdown import (
    ROLE_TITLES,
    format_percent,
    latency_samples_text,
    score,
    score_gain,
    speed_notes,
    table_rows,
    training_warnings,
    validation_note,
    verdict,
)
from distill.report.plots import (
    curves_figure,
    per_class_figure,
    png_data_uri,
    reliability_figure,
    term_curves_figure,
    tradeoff_figure,
)

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d0d0; padding: .3rem .6rem; text-align: right; }
th { background: #f3f3f5; } td:first-child, th:first-child { text-align: left; }
.verdict { font-size: 1.05rem; padding: .6rem .9rem; border-radius: 6px; background: #eef6ee; }
.verdict.bad { background: #fbeeee; }
img { max-width: 100%; } pre { background: #f6f6f8; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.muted { color: #666; font-size: .85rem; } .sample { border: 1px solid #ddd; padding: .6rem; margin: .6rem 0; }
"""


def _table(header: list[str], rows: list[list[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def score_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every score the task reports, per model (for tasks without classes, e.g. embeddings)."""
    names = sorted({name for m in metrics["models"].values() for name in m.get("metrics", {})})
    rows = [
        [ROLE_TITLES.get(r, r)] + [f"{m['metrics'].get(n, float('nan')):.4f}" for n in names]
        for r, m in metrics["models"].items()
    ]
    return ["model", *names], rows


def render_html(
    metrics: dict[str, Any], histories: dict[str, list[dict]], config_yaml: str, pngs: dict[str, bytes] | None = None
) -> str:
    """The report page. ``pngs`` may hold the already rendered ``curves`` and ``tradeoff``
    figures (report.md's PNG files), which are then embedded instead of drawn again."""
    pngs = pngs or {}

    def figure(name: str, draw) -> str:
        if name in pngs:
            return "data:image/png;base64," + base64.b64encode(pngs[name]).decode()
        return png_data_uri(draw())

    models, data = metrics["models"], metrics["data"]
    header, rows = table_rows(metrics)
    helped = (
        "scratch" in models and score_gain(score(models["distilled"]) or 0, score(models["scratch"]) or 0, metrics) > 0
    )
    classified = all("per_class_acc" in m for m in models.values())  # embedding models have no classes
    class_rows = [
        [name]
        + [format_percent(m["per_class_acc"][c]) for m in models.values()]
        + [format_percent(m["per_class_agreement"][c]) for role, m in models.items() if role != "teacher"]
        for c, name in enumerate(metrics["class_names"] if classified else [])
    ]
    class_header = (
        ["class"]
        + [f"acc: {ROLE_TITLES[r]}" for r in models]
        + [f"agreement: {ROLE_TITLES[r]}" for r in models if r != "teacher"]
    )
    calibration_rows = [
        [ROLE_TITLES[r], format_percent(m["calibration"]["ece"]), format_percent(m["test_acc"])]
        for r, m in models.items()
        if classified
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">',
        f"<title>distill report: {escape(metrics['name'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>distill report: {escape(metrics['name'])}</h1>",
        f'<p class="muted">{escape(metrics.get("created", ""))} · distill {escape(metrics.get("distill_version", ""))} · '
        f"trained on {escape(metrics.get('device', ''))} in {metrics.get('seconds', 0):.0f} s · "
        f"objective: {escape(metrics.get('objective', ''))}</p>",
        f'<p class="verdict{"" if helped else " bad"}">{escape(verdict(metrics))}</p>',
        *[f'<p class="verdict bad">Warning: {escape(w)}</p>' for w in training_warnings(metrics)],
        "<h2>Summary</h2>",
        _table(header, rows, "summary"),
        f'<p class="muted">Test split: {data["test"]} samples of {escape(data["name"])}; training on {data["train"]} '
        f"samples ({data['train_labeled']} labeled), validation {data['val']}. Retention = student / teacher "
        f"score; gap closed = (distilled − scratch) / (teacher − scratch); latency = median of "
        f"{latency_samples_text(metrics)} timed CPU samples with {metrics['latency_threads']} thread(s). "
        f"{escape(validation_note(data))}</p>",
        *[f"<p>{escape(note)}</p>" for note in speed_notes(metrics)],
        _image(figure("tradeoff", lambda: tradeoff_figure(metrics)), "accuracy against size and latency"),
        "<h2>Training</h2>",
        _image(
            figure("curves", lambda: curves_figure(histories, metrics.get("primary_metric"))),
            "training loss and validation accuracy",
        ),
        "<p>Every loss term, unweighted, per epoch:</p>",
        _image(png_data_uri(term_curves_figure(histories)), "loss terms per epoch"),
    ]
    if metrics.get("pruning") and "pruning" in pngs:  # drawn from pruning.json by the run
        parts += [
            "<h2>Pruning</h2>",
            f"<p>{escape(metrics['pruning']['summary'])}.</p>",
            _image(figure("pruning", lambda: None), "what the pruned student kept"),
        ]
    if classified:
        parts += [
            "<h2>Per class</h2>",
            _image(png_data_uri(per_class_figure(metrics)), "per-class accuracy and agreement"),
            _table(class_header, class_rows, "per-class"),
            "<h2>Calibration</h2>",
            "<p>Expected calibration error (15 equal-width confidence bins): how far confidence is from accuracy.</p>",
            _table(["model", "ECE", "test acc"], calibration_rows, "calibration"),
            _image(png_data_uri(reliability_figure(metrics)), "reliability diagrams"),
        ]
    else:
        parts += ["<h2>Scores</h2>", _table(*score_table(metrics), "scores")]
    samples = metrics.get("samples") or []
    if samples:  # language models: generations side by side
        parts.append("<h2>Sample generations</h2>")
        for sample in samples:
            cells = "".join(f"<p><b>{escape(key)}</b>: {escape(str(value))}</p>" for key, value in sample.items())
            parts.append(f'<div class="sample">{cells}</div>')
    parts += ["<h2>Config</h2>", f"<pre>{escape(config_yaml)}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_html_report(
    path: Path,
    metrics: dict[str, Any],
    histories: dict[str, list[dict]],
    config_yaml: str,
    pngs: dict[str, bytes] | None = None,
) -> None:
    write_text(path, render_html(metrics, histories, config_yaml, pngs))
