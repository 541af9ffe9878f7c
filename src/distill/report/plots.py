"""Matplotlib figures of a run: training curves, trade-offs, per-class accuracy, calibration.

Each function returns a figure; ``save_png`` writes one atomically and ``png_data_uri`` embeds
one in a self-contained HTML page.
"""

from __future__ import annotations

import base64
import io as _io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402

from distill.core.io import atomic_path  # noqa: E402

COLORS = {"teacher": "tab:gray", "random": "tab:purple", "scratch": "tab:blue", "distilled": "tab:orange"}
TITLES = {
    "teacher": "teacher",
    "random": "random-init student",
    "scratch": "scratch student",
    "distilled": "distilled student",
}


def _text(label: str) -> str:
    """User text (class and run names) shown literally: matplotlib would parse $...$ as maths."""
    return str(label).replace("$", r"\$")


def _num(value: float | None) -> float:
    return float("nan") if value is None else value


def _color(role: str) -> str:
    return COLORS.get(role, "tab:green")


def _title(role: str) -> str:
    return TITLES.get(role, role)


def _fixed_layout(
    fig: Figure,
    *,
    left: float = 0.75,
    right: float = 0.15,
    bottom: float = 0.55,
    top: float = 0.35,
    between: float = 0.85,
) -> None:
    """Margins and gaps between panels in inches, set without measuring any text.

    Why not ``tight_layout``: it draws every label once more just to place it, about 0.08 s a
    figure here, and a run draws five. A run's figures have short, known labels, so fixed
    margins hold them; figures with the user's text in them keep ``tight_layout``."""
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    panel_width = (width - left - right - (cols - 1) * between) / cols
    panel_height = (height - top - bottom - (rows - 1) * between) / rows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=between / panel_width,
        hspace=between / panel_height,
    )


def save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def png_data_uri(fig: Figure) -> str:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def score_axis(primary: dict[str, Any] | None) -> tuple[float, str]:
    """How the primary metric is drawn: (scale, name); accuracy as a percentage."""
    primary = {"name": "accuracy", "percent": True} | (primary or {})
    name = primary["name"].replace("_", " ")
    return (100.0, f"{name} (%)") if primary["percent"] else (1.0, name)


def curves_figure(histories: dict[str, list[dict]], primary: dict[str, Any] | None = None) -> Figure:
    """Training loss and the primary validation metric against the fraction of each model's schedule
    (so a scratch student with many short passes and a distilled one line up)."""
    scale, label = score_axis(primary)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for role, history in histories.items():
        if not history:
            continue
        x = [e["epoch"] / len(history) for e in history]
        ax_loss.plot(x, [_num(e["loss"]) for e in history], marker="o", color=_color(role), label=_text(_title(role)))
        name = (primary or {}).get("name", "accuracy")
        values = [(e.get("val_metrics") or {}).get(name, e["val_acc"]) for e in history]
        ax_acc.plot(x, [scale * _num(v) for v in values], marker="o", color=_color(role), label=_text(_title(role)))
    ax_loss.set(xlabel="fraction of training", ylabel="training loss (weighted sum of terms)", title="training loss")
    ax_acc.set(
        xlabel="fraction of training", ylabel=f"validation {label}", title=f"validation {label.removesuffix(' (%)')}"
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _fixed_layout(fig)
    return fig


def term_curves_figure(histories: dict[str, list[dict]]) -> Figure:
    """Every loss term of every trained model, per epoch (unweighted values)."""
    roles = [role for role, history in histories.items() if history]
    fig, axes = plt.subplots(1, max(1, len(roles)), figsize=(4.2 * max(1, len(roles)), 3.6), squeeze=False)
    for ax, role in zip(axes[0], roles, strict=False):
        history = histories[role]
        epochs = [e["epoch"] for e in history]
        for term in history[0]["terms"]:
            ax.plot(epochs, [_num(e["terms"][term]) for e in history], marker=".", label=_text(term))
        ax.set(title=_text(_title(role)), xlabel="epoch", ylabel="loss term (unweighted)", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _fixed_layout(fig, left=1.0, between=1.1)  # log-axis labels such as 6×10⁻¹ are wide
    return fig


def tradeoff_figure(metrics: dict[str, Any]) -> Figure:
    batch = str(metrics["latency_batch_sizes"][0])
    scale, label = score_axis(metrics.get("primary_metric"))
    name = label.removesuffix(" (%)")
    fig, (ax_params, ax_latency) = plt.subplots(1, 2, figsize=(10, 3.8))
    for role, m in metrics["models"].items():
        for ax, x in ((ax_params, m["params"]), (ax_latency, m["latency_ms"][batch])):
            ax.scatter(
                [x], [scale * m.get("score", m.get("test_acc"))], s=60, color=_color(role), label=_title(role), zorder=3
            )
    ax_params.set(xscale="log", xlabel="parameters", ylabel=f"test {label}", title=f"{name} vs size")
    ax_latency.set(
        xscale="log",
        xlabel=f"CPU latency at batch {batch} (ms)",
        ylabel=f"test {label}",
        title=f"{name} vs latency",
    )
    for ax in (ax_params, ax_latency):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _fixed_layout(fig)
    return fig


def per_class_figure(metrics: dict[str, Any]) -> Figure:
    """Per-class test accuracy of every model, and each student's agreement with the teacher."""
    names = metrics["class_names"]
    models = metrics["models"]
    width = 0.8 / len(models)
    fig, (ax_acc, ax_agree) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for i, (role, m) in enumerate(models.items()):
        xs = [c + (i - (len(models) - 1) / 2) * width for c in range(len(names))]
        ax_acc.bar(xs, [100 * (a or 0) for a in m["per_class_acc"]], width, color=_color(role), label=_title(role))
        if role != "teacher":
            ax_agree.bar(
                xs, [100 * (a or 0) for a in m["per_class_agreement"]], width, color=_color(role), label=_title(role)
            )
    ax_acc.set(ylabel="test accuracy (%)", title="per-class accuracy")
    ax_agree.set(ylabel="agreement with teacher (%)", title="per-class top-1 agreement with the teacher")
    ax_agree.set_xticks(range(len(names)), [_text(n) for n in names], rotation=30, ha="right", fontsize=8)
    for ax in (ax_acc, ax_agree):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def reliability_figure(metrics: dict[str, Any]) -> Figure:
    """Reliability diagrams: accuracy against confidence per bin, with each model's ECE."""
    models = metrics["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), squeeze=False)
    for ax, (role, m) in zip(axes[0], models.items(), strict=True):
        bins = m["calibration"]["bins"]
        edges = [b["lower"] for b in bins] + [bins[-1]["upper"]]
        centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
        accs = [_num(b["accuracy"]) if b["count"] else 0.0 for b in bins]
        ax.bar(
            centers, accs, width=edges[1] - edges[0], color=_color(role), edgecolor="black", alpha=0.8, label="accuracy"
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{_text(_title(role))}\nECE {100 * _num(m['calibration']['ece']):.2f}%", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    _fixed_layout(fig, top=0.6, between=0.7)
    return fig


def front_figure(points: list[dict[str, Any]], batch: str, primary: dict[str, Any] | None = None) -> Figure:
    """The primary metric against latency for models of several runs, the Pareto front highlighted."""
    scale, label = score_axis(primary)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in points:
        marker = "*" if p["on_front"] else "o"
        ax.scatter(p["latency_ms"], scale * p["score"], s=140 if p["on_front"] else 50, marker=marker,
                   color=_color(p["role"]), edgecolor="black" if p["on_front"] else None, zorder=3)  # fmt: skip
        ax.annotate(
            _text(p["label"]),
            (p["latency_ms"], scale * p["score"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["latency_ms"])
    ax.plot([p["latency_ms"] for p in front], [scale * p["score"] for p in front], "k--", linewidth=1, label="front")
    ax.set(xscale="log", xlabel=f"CPU latency at batch {batch} (ms)", ylabel=f"test {label}",
           title=f"{label.removesuffix(' (%)')}–latency front (★ = on the front)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def chain_figure(summary: dict[str, Any]) -> Figure:
    """The test score against parameters along a teacher-assistant chain, with direct KD and scratch."""
    scale, label = score_axis(summary.get("primary_metric"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    path = [summary["teacher"], *summary["stages"]]
    ax.plot([e["params"] for e in path], [scale * _num(e["score"]) for e in path], "-o", color="tab:orange",
            label="chain (each stage distilled from the one before)", zorder=3)  # fmt: skip
    styles = {"student, direct KD": ("*", "tab:green", 160), "student, scratch": ("X", "tab:blue", 90)}
    for entry in summary["baselines"]:
        marker, color, size = styles.get(entry["role"], ("o", "tab:gray", 60))
        ax.scatter(entry["params"], scale * _num(entry["score"]), marker=marker, color=color, s=size,
                   label=_text(entry["role"]), zorder=4)  # fmt: skip
    for entry in path:
        ax.annotate(_text(f"{entry['role']}\n{entry['model']}"), (entry["params"], scale * _num(entry["score"])),
                    fontsize=7, xytext=(5, -14), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", xlabel="parameters", ylabel=f"test {label}", title="teacher → assistants → student")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def sweep_figure(
    points: list[dict[str, Any]],
    batch: str,
    teacher: dict[str, Any] | None = None,
    primary: dict[str, Any] | None = None,
) -> Figure:
    """The primary metric against latency and against size for a family of students; ★ marks each front."""
    scale, label = score_axis(primary)
    name = label.removesuffix(" (%)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("latency_ms", "front_latency", f"CPU latency at batch {batch} (ms)", f"{name}–latency front"),
              ("size_kib", "front_size", "size on disk (KiB)", f"{name}–size front"))  # fmt: skip
    for ax, (key, flag, xlabel, title) in zip(axes, panels, strict=True):
        for p in points:
            on = p[flag]
            ax.scatter(p[key], scale * _num(p["score"]), marker="*" if on else "o", s=160 if on else 45,
                       color="tab:orange" if on else "tab:blue", edgecolor="black" if on else None, zorder=3)  # fmt: skip
            ax.annotate(_text(p["label"]), (p[key], scale * _num(p["score"])), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        front = sorted((p for p in points if p[flag]), key=lambda p: p[key])
        ax.plot([p[key] for p in front], [scale * _num(p["score"]) for p in front], "k--", linewidth=1, label="front")
        if teacher is not None and teacher.get(key) is not None:
            ax.scatter(teacher[key], scale * _num(teacher["score"]), marker="D", color="tab:gray", s=50,
                       label="teacher (reference)", zorder=3)  # fmt: skip
        ax.set(xscale="log", xlabel=xlabel, ylabel=f"test {label} of the distilled student", title=f"{title} (★)")
        ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # plain numbers, few labels: a sweep spans little
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def pruning_figure(record: dict[str, Any]) -> Figure:
    """What a pruned student kept (``pruning.json``): each teacher layer's importance with the kept
    ones marked, the heads' importance per layer, and the hidden channels' sorted importance with
    the cut."""
    importance, kept_layers = record["importance"], set(record["kept_layers"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    layers = importance["layers"]
    axes[0].bar(
        range(len(layers)), layers, color=["tab:orange" if i in kept_layers else "tab:gray" for i in range(len(layers))]
    )
    axes[0].set(xlabel="teacher layer", ylabel="block influence", title="layers (orange: kept)")
    heads = importance["heads"]
    image = axes[1].imshow(heads, aspect="auto", cmap="viridis")
    for j, i in enumerate(record["kept_layers"]):
        for h in record["kept"]["heads"][j]:
            axes[1].plot(h, i, marker=".", color="white", markersize=4)
    axes[1].set(xlabel="head", ylabel="teacher layer", title="attention heads (dots: kept)")
    for axis in (axes[1].xaxis, axes[1].yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[1], fraction=0.046)
    hidden = sorted(importance["hidden"], reverse=True)
    axes[2].plot(range(len(hidden)), hidden, color="tab:blue")
    axes[2].axvline(
        record["hidden_size"] - 0.5, color="tab:orange", linestyle="--", label=f"kept {record['hidden_size']}"
    )
    axes[2].set(xlabel="hidden channel (by importance)", ylabel="mean |activation|", title="hidden channels")
    axes[2].legend()
    method = importance.get("method", "importance")
    fig.suptitle(_text(f"pruned by {method}" + ("" if method == "importance" else " (scores drawn, not measured)")))
    fig.tight_layout()
    return fig
