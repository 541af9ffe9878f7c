"""Text encoders: all-MiniLM-L6-v2 fine-tuned on BBC News, students cut from it, three arms.

The teacher is `distill demo text`'s (fine-tuned once, then cached). For every seed, student
depth (layers kept) and layer choice (every k-th, or `auto`: the layers with the most block
influence), one run gives the labels-only arm (the same cut fine-tuned on labels alone: same
initial weights, steps and data) and the KD arm (kd + ce); a second run adds TinyBERT's
hidden-state and attention terms. `--label-budget N` adds a run where the students keep N labels
and learn the rest from the teacher. CPU latency is measured at batch 32 for `--latency-length`
tokens (the bar: ≥ 97% of the teacher's accuracy at ≥ 3× its speed).

    python benchmarks/text.py                               # seed 0, 2 layers, every-3rd and auto
    python benchmarks/text.py --seeds 0 1 2 --layers 1 2 3  # the full grid (about 2 hours here)
    python benchmarks/text.py --seeds 0 1 2 --layers 1 3 --select every --parts cut --only-tinybert

Needs the `text` extra. Prints a table and writes JSON (default: benchmarks/results/text.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill.core.evaluate import measure_latencies
from distill.pipeline.config import load_config
from distill.pipeline.experiment import default_cache_dir, obtain_teacher, run_experiment, seeded_model
from distill.tasks import get_task

from _common import fmt, machine, summary, write_results

TINYBERT = [
    "distill.terms=[{type: kd, weight: 0.9, temperature: 2}, {type: ce, weight: 0.1}, "
    "{type: tinybert_hidden, weight: 1.0}, {type: tinybert_attention, weight: 1.0}]"
]


def rule(layers: int, select: str, teacher_layers: int = 6) -> str:
    if select == "auto":
        return f"student={{from_teacher: {{layers: auto, count: {layers}}}}}"
    return f"student={{from_teacher: {{every: {teacher_layers // layers}}}}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--select", nargs="+", choices=("every", "auto"), default=["every", "auto"])
    parser.add_argument("--no-tinybert", action="store_true", help="skip the kd + TinyBERT arm")
    parser.add_argument("--only-tinybert", action="store_true", help="cut students: the kd + TinyBERT arm alone")
    parser.add_argument(
        "--parts", nargs="+", choices=("cut", "random", "budget", "embedding", "latency"),
        default=["cut", "random", "budget", "latency"],
        help="cut: students cut from the teacher; random: the same architecture from random init (labels only "
        "and kd); budget: the label-budget arm; embedding: sentence-embedding students of the packaged MiniLM "
        "on BBC sentences (cut every 3rd layer, and a narrower one of hidden size 192), scored against it; latency: teacher ÷ student CPU latency per depth (run it on an "
        "idle machine)",
    )  # fmt: skip
    parser.add_argument("--label-budget", type=int, default=100, help="0: skip the label-budget arm")
    parser.add_argument("--latency-length", type=int, default=256)
    parser.add_argument("--embedding-epochs", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text.json"))
    args = parser.parse_args()
    console = Console()
    rows: dict[str, list[dict]] = {}
    with (
        resources.as_file(resources.files("distill") / "configs" / "demo_text.yaml") as demo,
        tempfile.TemporaryDirectory() as tmp,
    ):

        def run(name: str, *changes: str) -> dict:
            config = load_config(demo, [f"output.dir={tmp}", f"output.name=run{len(runs)}", *changes, *args.overrides])
            metrics = run_experiment(config, console=Console(quiet=True)).metrics
            runs.append({"arm": name, "changes": list(changes), "metrics": metrics})
            m = metrics["models"]
            console.print(
                f"{name}: teacher {100 * m['teacher']['score']:.2f}"
                + (f"  labels only {100 * m['scratch']['score']:.2f}" if "scratch" in m else "")
                + f"  distilled {100 * m['distilled']['score']:.2f}  ({metrics['seconds']:.0f} s)"
            )
            return metrics

        runs: list[dict] = []
        embeddings: list[dict] = []
        for seed in args.seeds:
            for layers in args.layers if "random" in args.parts else []:
                key = f"{layers} layer{'s' if layers > 1 else ''}, random init"
                console.rule(f"seed {seed}: {key}")
                m = run(f"{key}: kd", f"seed={seed}", f"student={{arch: hf_config, num_hidden_layers: {layers}}}")
                rows.setdefault(f"{key}: labels only", []).append(m["models"]["scratch"])
                rows.setdefault(f"{key}: kd", []).append(m["models"]["distilled"])
                rows.setdefault("teacher", []).append(m["models"]["teacher"])
            for layers in args.layers if "cut" in args.parts else []:
                for select in args.select:
                    key = f"{layers} layer{'s' if layers > 1 else ''}, {select}"
                    console.rule(f"seed {seed}: {key}")
                    base = [f"seed={seed}", rule(layers, select)]
                    if not args.only_tinybert:
                        m = run(f"{key}: kd", *base)
                        rows.setdefault(f"{key}: labels only", []).append(m["models"]["scratch"])
                        rows.setdefault(f"{key}: kd", []).append(m["models"]["distilled"])
                    if not args.no_tinybert:
                        m = run(f"{key}: kd + tinybert", *base, "baseline=false", *TINYBERT)
                        rows.setdefault(f"{key}: kd + TinyBERT", []).append(m["models"]["distilled"])
                    rows.setdefault("teacher", []).append(m["models"]["teacher"])
            if "embedding" in args.parts:
                # BBC sentences (each article split after the splits are drawn), the packaged MiniLM as it
                # ships; a cut student, and a narrower one (half the width) through a PCA-initialised projection
                common = [
                    f"seed={seed}", "task=text_embedding", "teacher={kind: hf, path: 'builtin:all-MiniLM-L6-v2'}",
                    "baseline=false", "data.unit=sentence", "data.max_length=64", f"train.epochs={args.embedding_epochs}",
                    "train.lr=5.0e-4", "eval.onnx=false",
                ]  # fmt: skip
                students = {
                    f"{args.layers[0]} layers, every": (
                        rule(args.layers[0], "every"), "distill.terms=[{type: embed_cosine}, {type: embed_mse}]",
                    ),
                    f"{args.layers[0]} layers, hidden 192 (random init)": (
                        f"student={{arch: hf_config, num_hidden_layers: {args.layers[0]}, hidden_size: 192, "
                        "num_attention_heads: 6, intermediate_size: 768}",
                        "distill.terms=[{type: embed_cosine, init: pca}, {type: embed_mse, init: pca}]",
                    ),
                }  # fmt: skip
                for key, changes in students.items():
                    console.rule(f"seed {seed}: sentence embeddings, {key}")
                    m = run(f"embedding: {key}", *common, *changes)
                    rows.setdefault(f"{key}: embedding (spearman)", []).append(m["models"]["distilled"])
                    embeddings.append({"student": key, **m["models"]})
            if args.label_budget and "budget" in args.parts:
                layers = args.layers[0]
                key = f"{layers} layers, every, {args.label_budget} labels"
                console.rule(f"seed {seed}: {key}")
                m = run(key, f"seed={seed}", rule(layers, "every"), f"data.labeled={args.label_budget}")
                rows.setdefault(f"{key}: labels only", []).append(m["models"]["scratch"])
                rows.setdefault(f"{key}: kd", []).append(m["models"]["distilled"])

        latency = measure_speed(demo, args, console) if "latency" in args.parts else {}
    teacher = sum(r["score"] for r in rows["teacher"]) / len(rows["teacher"]) if "teacher" in rows else 1.0
    table = Table(title=f"BBC News test accuracy (%), {len(args.seeds)} seed(s), mean ± std")
    for column in ("student", "test acc", "retention", "params", f"speed-up @32×{args.latency_length}"):
        table.add_column(column, justify="left" if column == "student" else "right")
    results = {}
    for name, models in rows.items():
        scores = [m["score"] for m in models]
        layers = "teacher" if name == "teacher" else name.split(" layer")[0]
        speed = latency.get(layers)
        table.add_row(
            name, fmt(scores), "—" if "embedding" in name else f"{100 * (sum(scores) / len(scores)) / teacher:.1f}%", f"{models[0]['params']:,}",
            "1.0×" if name == "teacher" else (f"{speed:.1f}×" if speed else "—"),
        )  # fmt: skip
        results[name] = {"test_acc": summary(scores), "params": models[0]["params"], "speedup": speed}
    console.print(table)
    for models in embeddings:
        d, t = models["distilled"]["metrics"], models["teacher"]["metrics"]
        console.print(
            f"embedding student ({models['student']}): spearman {d['spearman']:.4f}, recall@10 "
            f"{d['recall_at_10']:.4f}, linear probe {d['linear_probe']:.4f} (teacher {t['linear_probe']:.4f})"
        )
    write_results(
        args.out,
        {
            "benchmark": "text",
            "seeds": args.seeds,
            "layers": args.layers,
            "select": args.select,
            "label_budget": args.label_budget,
            "latency": {"batch": 32, "length": args.latency_length, "speedup": latency},
            "machine": machine(),
            "results": results,
            "runs": runs,
        },  # fmt: skip
        console,
    )
    return 0


def measure_speed(demo: Path, args, console: Console) -> dict[str, float]:
    """Teacher ÷ student CPU latency at batch 32 and ``--latency-length`` tokens, per student depth."""
    config = load_config(demo, args.overrides)
    task = get_task(config.task)
    data = task.load_data(config.data)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
    ids = torch.randint(1000, 20000, (32, args.latency_length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = {"teacher": teacher}
    for layers in args.layers:
        spec = load_config(demo, [rule(layers, "every"), *args.overrides]).student
        models[str(layers)] = seeded_model(spec, data, 0, "student", task, teacher)
    ms = measure_latencies(models, (args.latency_length,), 32, repeats=7, inputs=inputs)
    console.print(f"latency @32×{args.latency_length}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items()))
    return {layers: ms["teacher"] / ms[layers] for layers in ms if layers != "teacher"}


if __name__ == "__main__":
    sys.exit(main())
