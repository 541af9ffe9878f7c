"""``distill compare RUN_DIR...``: one table across runs and a report with the accuracy–latency front."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.core.errors import DistillError
from distill.core.io import write_text
from distill.report.markdown import ROLE_TITLES, format_percent, format_score, primary_metric, score, score_label
from distill.report.plots import front_figure, png_data_uri

HEADER = ["run", "model", "test score", "retention", "gap closed", "params", "ms", "speed-up", "front"]


def load_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's metrics, checked for everything the comparison reads."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        batches = [str(b) for b in metrics["latency_batch_sizes"]]
        for role, m in metrics["models"].items():
            for key in ("score", "params", "size_bytes"):
                if not isinstance(score(m) if key == "score" else m[key], (int, float)):
                    raise TypeError(f"models.{role}.{key}")
            if any(not isinstance(m[k][b], (int, float)) for k in ("latency_ms", "speedup") for b in batches):
                raise TypeError(f"models.{role} latency")
        metrics["models"]["teacher"]  # noqa: B018 - every run has one
    except FileNotFoundError:
        raise DistillError(f"{run_dir} is not a finished distill run (no metrics.json)") from None
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
        KeyError,
        TypeError,
        AttributeError,
        OSError,
    ) as err:
        raise DistillError(f"{path} is not a complete distill metrics file ({type(err).__name__}: {err})") from None
    return metrics


def pareto_front(
    points: list[dict[str, Any]], cost: str = "latency_ms", flag: str = "on_front", gain: str = "ranking"
) -> None:
    """Set ``p[flag]`` on the points no other point beats: at least as good on both ``gain``
    (higher is better: the primary metric, negated when lower is better) and ``cost`` (lower is
    better, latency by default), and strictly better on one."""
    for p in points:
        p[flag] = not any(
            q[gain] >= p[gain] and q[cost] <= p[cost] and (q[gain] > p[gain] or q[cost] < p[cost]) for q in points
        )


def comparison(run_dirs: list[Path]) -> tuple[list[dict[str, Any]], str]:
    """One point per model per run (a teacher shared by runs appears once), front marked."""
    unique = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))  # a run named twice counts once
    runs = [(d.name, load_run(d)) for d in unique]
    batches = set.intersection(*(set(str(b) for b in m["latency_batch_sizes"]) for _, m in runs))
    if not batches:
        raise DistillError("the runs share no latency batch size; compare runs timed at a common batch size")
    batch = str(min(int(b) for b in batches))
    metrics_of = {primary_metric(m)["name"]: name for name, m in runs}
    if len(metrics_of) > 1:
        named = ", ".join(f"{metric} in {name}" for metric, name in metrics_of.items())
        raise DistillError(f"the runs score different metrics ({named}); compare runs of one task")
    sign = 1 if primary_metric(runs[0][1])["higher_is_better"] else -1
    points, seen_teachers = [], set()
    for name, metrics in runs:
        for role, m in metrics["models"].items():
            if role == "teacher":
                key = m.get("weights_sha256") or (m["params"], score(m), m["size_bytes"])
                if key in seen_teachers:
                    continue
                seen_teachers.add(key)
            points.append({
                "run": name, "role": role, "label": f"{name}: {ROLE_TITLES.get(role, role)}",
                "score": score(m), "ranking": sign * score(m), "retention": m.get("retention"), "gap_closed": m.get("gap_closed"),
                "params": m["params"], "latency_ms": m["latency_ms"][batch], "speedup": m["speedup"][batch],
            })  # fmt: skip
    pareto_front(points)
    return points, batch, {"primary_metric": primary_metric(runs[0][1])}


def header(scoring: dict[str, Any], batch: str) -> list[str]:
    """The table's columns, the score named after the runs' primary metric."""
    names = {"test score": f"test {score_label(scoring)}", "ms": f"ms @{batch}"}
    return [names.get(column, column) for column in HEADER]


def rows(points: list[dict[str, Any]], scoring: dict[str, Any]) -> list[list[str]]:
    return [
        [p["run"], ROLE_TITLES.get(p["role"], p["role"]), format_score(p["score"], scoring), format_percent(p["retention"]),
         format_percent(p["gap_closed"]), f"{p['params']:,}", f"{p['latency_ms']:.2f}", f"{p['speedup']:.1f}×",
         "★" if p["on_front"] else ""]
        for p in sorted(points, key=lambda p: (-p["ranking"], p["latency_ms"]))
    ]  # fmt: skip


def write_comparison(
    path: Path, points: list[dict[str, Any]], batch: str, scoring: dict[str, Any] | None = None
) -> None:
    scoring = scoring or {}
    metric = primary_metric(scoring)["name"].replace("_", " ")
    head = "".join(f"<th>{escape(h)}</th>" for h in header(scoring, batch))
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows(points, scoring))
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>distill comparison</title><link rel="icon" href="data:,">
<style>body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; font-size: .9rem; }} th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; }}
th {{ background: #f3f3f5; }} img {{ max-width: 100%; }}</style></head><body>
<h1>distill comparison of {len({p["run"] for p in points})} runs</h1>
<p>★ marks models on the {escape(metric)}–latency front: no other model is both better and faster
(CPU latency at batch {escape(batch)}).</p>
<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<img src="{png_data_uri(front_figure(points, batch, scoring.get("primary_metric")))}" alt="{escape(metric)} against latency">
</body></html>
"""
    write_text(path, html)


def compare(run_dirs: list[Path], out: Path, console: Console) -> list[dict[str, Any]]:
    points, batch, scoring = comparison(run_dirs)
    table = Table(title=f"distill compare: {len(run_dirs)} runs (latency at batch {batch})", title_justify="left")
    for column in header(scoring, batch):
        table.add_column(column, justify="left" if column in ("run", "model") else "right")
    for row in rows(points, scoring):
        table.add_row(*row)
    console.print(table)
    write_comparison(out, points, batch, scoring)
    console.print(f"[dim]comparison report: {out}[/]")
    return points
