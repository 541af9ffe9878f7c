"""Sequence-level and on-policy distillation of SmolLM2-135M-Instruct (``benchmarks/lm.py --parts seq``).

The same teacher, every-5th-layer student, seed and held-out BBC News blocks as the token-level
arms. Prompts are the openings (first ``--prompt-words`` words) of training articles, one per
training row; the teacher continues each with ``--new-tokens`` tokens (``distill generate
--signals 32``, sampled at T = 1), which makes rows of about 128 tokens, the token-level arms'
block length: the same number of sequences per step and the same number of steps. Arms:

- (b) LM loss only and (c) forward KL from the live teacher, on the BBC blocks themselves (one run);
- (f) sequence-level: the LM loss on the teacher's continuations only;
- (g) sequence-level + token-level: LM loss + forward KL from the top-32 logits stored while
  generating (a cache made from them: the teacher does not run again);
- (h) on-policy: λ = 0.5 of the batches are the student's own continuations, scored by the live
  teacher with JSD(0.5) (the other half the teacher's continuations), as in GKD.

Every student is then scored on the held-out BBC blocks (perplexity, agreement with the teacher)
and by how plausible the teacher finds its own samples: 32 held-out openings, 64 tokens sampled at
T = 1, the teacher's mean log-probability per sampled token (higher: more teacher-like; the
teacher's own samples and the untrained cut student bracket it). Wall time per arm counts the
generation it needs; the teacher's generation throughput is measured at batch 1, 8 and 32.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from _common import mean_std

EVERY_5TH = "student={from_teacher: {every: 5}}"
SEQ_ARMS: dict[str, tuple[str, list[str], bool]] = {  # key: (name, overrides, from the stored-logit cache)
    "seq": ("(f) sequence-level only", ["distill.terms=[{type: ce}]"], False),
    "seq_kd": ("(g) sequence + token level (stored logits)",
               ["distill.terms=[{type: ce, weight: 0.5}, {type: forward_kl, weight: 0.5}]", "cache.k=32"], True),
    "on_policy": ("(h) on-policy λ=0.5, JSD(0.5)",
                  ["distill.terms=[{type: jsd, beta: 0.5}]", "distill.on_policy={fraction: 0.5, max_new_tokens: 80}"],
                  False),
}  # fmt: skip


def _bbc(overrides: list[str]):
    from lm import _config

    return _config([EVERY_5TH, *overrides])


def write_prompts(path: Path, rows: int, words: int, split: str = "train") -> Path:
    """The openings of ``rows`` articles of the BBC ``split`` (the demo config's document split)."""
    from distill.tasks.lm_data import split_documents

    config = _bbc([])
    train, _, test = split_documents(config.data)
    documents = train if split == "train" else test
    lines = [" ".join(text.split()[:words]) for text in documents[:rows]]
    path.write_text("\n".join(lines) + "\n")
    return path


def generate(prompts: Path, out: Path, new_tokens: int, batch: int, signals: int, seed: int) -> dict:
    """The teacher's continuations, as ``distill generate`` writes them; seconds and peak memory."""
    from lm import _peak_mib

    from distill.tasks.lm_generate import GenerateSpec, generate_dataset

    spec = GenerateSpec(
        teacher="builtin:SmolLM2-135M-Instruct", prompts=prompts, chat=False, max_new_tokens=new_tokens,
        temperature=1.0, seed=seed, batch_size=batch, signals=signals, device="cpu",
    )  # fmt: skip
    started = time.perf_counter()
    result = generate_dataset(spec, out, overwrite=True)
    return {
        "seconds": time.perf_counter() - started, "rows": result.rows, "new_tokens": result.new_tokens,
        "tokens_per_second": result.new_tokens / max(result.seconds, 1e-9), "peak_mib": _peak_mib(),
        "bytes": out.stat().st_size, "token_bytes": sum(f.stat().st_size for f in out.with_name(out.name + ".tokens").rglob("*.npy")),
    }  # fmt: skip


def throughput(prompts: Path, batch: int, new_tokens: int, tmp: Path) -> dict:
    """Teacher generation speed at one batch size (greedy), over ``max(batch, 4)`` prompts."""
    lines = prompts.read_text().splitlines()[: max(batch, 4)]
    subset = tmp / f"throughput{batch}.txt"
    subset.write_text("\n".join(lines) + "\n")
    from distill.tasks.lm_generate import GenerateSpec, generate_dataset

    spec = GenerateSpec(teacher="builtin:SmolLM2-135M-Instruct", prompts=subset, chat=False,
                        max_new_tokens=new_tokens, temperature=0, batch_size=batch, device="cpu")  # fmt: skip
    result = generate_dataset(spec, tmp / f"throughput{batch}.jsonl", overwrite=True)
    return {"batch": batch, "prompts": len(lines), "new_tokens": result.new_tokens, "seconds": result.seconds,
            "tokens_per_second": result.new_tokens / result.seconds}  # fmt: skip


@torch.inference_mode()
def plausibility(model, teacher, prompts: torch.Tensor, new_tokens: int, seed: int) -> float:
    """The teacher's mean log-probability (nats) of the tokens ``model`` samples at T = 1 after
    ``prompts`` (``[n, p]`` ids, no padding), up to and including an end-of-text token."""
    generator_model = getattr(model, "model", model)
    teacher_model = getattr(teacher, "model", teacher)
    torch.manual_seed(seed)
    eos = generator_model.generation_config.eos_token_id
    out = generator_model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=True,
        temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eos if isinstance(eos, int) else eos[0],
    )  # fmt: skip
    new = out[:, prompts.shape[1] :]
    stops = {eos} if isinstance(eos, int) else set(eos)
    counted = torch.ones_like(new, dtype=torch.bool)
    for row in range(len(new)):
        ends = [i for i, t in enumerate(new[row].tolist()) if t in stops]
        if ends:
            counted[row, ends[0] + 1 :] = False
    logits = teacher_model(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, prompts.shape[1] - 1 : -1]
    logp = logits.float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    return float(logp[counted].mean())


def score(models: dict, seed: int, new_tokens: int = 64, prompts: int = 32, prompt_tokens: int = 32) -> dict:
    """Each model on the held-out BBC blocks: metrics against the teacher and plausibility."""
    from distill.pipeline.experiment import default_cache_dir, obtain_teacher
    from distill.tasks import get_task

    config = _bbc([f"seed={seed}"])
    task = get_task(config.task)
    data = task.load_data(config.data)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), default_cache_dir())
    test = data.test
    reference = task.predict(teacher, test.x, labels=test.y)
    openings = test.x["input_ids"][:prompts, :prompt_tokens]
    own = task.metrics(reference, test, reference)
    out = {
        "teacher": {
            **{k: float(v) for k, v in own.items()},
            "plausibility": plausibility(teacher, teacher, openings, new_tokens, seed),
        }
    }
    for name, model in models.items():
        model = model(config, data, teacher) if callable(model) else model
        metrics = task.metrics(task.predict(model, test.x, labels=test.y, reference=reference), test, reference)
        out[name] = {
            **{k: float(v) for k, v in metrics.items()},
            "plausibility": plausibility(model, teacher, openings, new_tokens, seed),
        }
    return out


def _student_from(run_dir: Path, role: str):
    """A builder of the run's ``role`` student (the every-5th cut with the run's trained weights)."""

    def build(config, data, teacher):
        from safetensors.torch import load_file

        from distill.pipeline.experiment import seeded_model
        from distill.tasks import get_task

        model = seeded_model(config.student, data, config.seed, "student", get_task(config.task), teacher)
        file = run_dir / ("student.safetensors" if role == "distilled" else f"{role}.safetensors")
        missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
        assert not unexpected and set(missing) <= {"model.model.embed_tokens.weight"}, (missing, unexpected)  # tied
        return model.eval()

    return build


def run_seq_arm(key: str, overrides: list[str], data_path: str | None, generation_seconds: float) -> dict:
    """One arm in this (fresh) process: its run, then its students scored on BBC."""
    from lm import _peak_mib

    from distill.pipeline.experiment import cache_teacher, run_experiment

    started = time.perf_counter()
    config = _bbc(overrides)
    extra: dict = {}
    if key == "seq_kd":
        begun = time.perf_counter()
        path = cache_teacher(config, overwrite=True, console=Console(quiet=True))
        extra = {"cache_seconds": time.perf_counter() - begun,
                 "cache_from": json.loads((path / "manifest.json").read_text()).get("signals_from")}  # fmt: skip
        assert extra["cache_from"] == "distill generate", extra  # the stored logits, not a teacher run
        config = _bbc([*overrides, f"teacher={{kind: cache, path: '{path}'}}"])
    result = run_experiment(config, console=Console(quiet=True))
    run_seconds = time.perf_counter() - started
    roles = ["scratch", "distilled"] if key == "token" else ["distilled"]
    scores = score({role: _student_from(result.run_dir, role) for role in roles}, config.seed)
    training = result.metrics["training"]
    return {
        "key": key, "overrides": overrides, "run_seconds": run_seconds, "generation_seconds": generation_seconds,
        "train_seconds": {r: sum(e["seconds"] for e in training[r]["history"]) for r in training if training[r]},
        "scores": scores, "peak_mib": _peak_mib(), "run_metrics": result.metrics["models"], **extra,
    }  # fmt: skip


def untrained_scores(seed: int) -> dict:
    from distill.pipeline.experiment import seeded_model
    from distill.tasks import get_task

    def cut(config, data, teacher):
        return seeded_model(config.student, data, config.seed, "student", get_task(config.task), teacher).eval()

    return score({"untrained": cut}, seed)


def seq_part(console: Console, seeds: list[int], blocks: int, words: int, new_tokens: int, batch: int,
             only: list[str], save=lambda runs: None) -> dict:  # fmt: skip
    from lm import in_fresh_process

    runs, throughputs = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prompts = write_prompts(tmp / "prompts.txt", blocks + 10, words)  # 10 rows become the run's test split
        console.rule("teacher generation throughput (greedy, 64 new tokens)")
        for size in (1, 8, 32):
            measured = in_fresh_process(throughput, prompts, size, 64, tmp)
            throughputs.append(measured)
            console.print(
                f"batch {size}: {measured['tokens_per_second']:,.1f} new tokens/s ({measured['prompts']} prompts)"
            )
        for seed in seeds:
            out = tmp / f"generated-{seed}.jsonl"
            console.rule(f"seed {seed}: the teacher continues {blocks + 10} article openings")
            gen = in_fresh_process(generate, prompts, out, new_tokens, batch, 32, seed)
            console.print(
                f"{gen['rows']} rows, {gen['new_tokens']:,} new tokens in {gen['seconds']:.0f} s "
                f"({gen['tokens_per_second']:,.1f} tokens/s with top-32 logits), {gen['token_bytes'] / 2**20:.1f} MiB stored, "
                f"peak {gen['peak_mib']:,.0f} MiB"
            )
            base = [f"seed={seed}", f"output.dir={tmp}"]
            generated = [f"data={{source: generated, path: '{out}', val_fraction: 0.0, test_fraction: {10 / (blocks + 10)}}}",
                         "baseline=false", f"cache.path={tmp / f'cache-{seed}'}"]  # fmt: skip
            console.rule(f"seed {seed}: the untrained cut")
            untrained = in_fresh_process(untrained_scores, seed)
            runs.append({"key": "untrained", "seed": seed, "scores": untrained, "generation": gen})
            arms = [
                (
                    "token",
                    "(b) lm loss only / (c) forward KL (live), BBC blocks",
                    [*base, f"data.limit_train={blocks}", "baseline=true", "distill.terms=[{type: forward_kl}]"],
                    0.0,
                )
            ]
            arms += [(k, name, [*base, *generated, *changes], gen["seconds"]) for k, (name, changes, _) in SEQ_ARMS.items()]  # fmt: skip
            for n, (key, name, overrides, seconds) in enumerate(arms):
                if only and key not in only:
                    continue
                console.rule(f"seed {seed}: {name}")
                arm = in_fresh_process(run_seq_arm, key, [*overrides, f"output.name=seq{seed}-{n}"], str(out), seconds)
                arm["seed"] = seed
                runs.append(arm)
                save(runs)
                for role, values in arm["scores"].items():
                    if role != "teacher":
                        console.print(
                            f"{name} ({role}): held-out perplexity {values['perplexity']:,.2f}, agreement "
                            f"{100 * values['agreement']:.1f}%, teacher log-prob of its samples {values['plausibility']:.3f} "
                            f"(teacher's own {arm['scores']['teacher']['plausibility']:.3f}); wall {arm['run_seconds'] + seconds:.0f} s, "
                            f"peak {arm['peak_mib']:,.0f} MiB"
                        )
    return {"throughput": throughputs, "runs": runs, "table": _table(console, runs, blocks)}


def _table(console: Console, runs: list[dict], blocks: int) -> dict:
    names = {"token": {"scratch": "(b) lm loss only", "distilled": "(c) forward KL (live)"}}
    names |= {key: {"distilled": name} for key, (name, _, _) in SEQ_ARMS.items()}
    names["untrained"] = {"untrained": "(a) every 5th, untrained"}
    rows: dict[str, list[dict]] = {}
    for run in runs:
        for role, values in run["scores"].items():
            label = "teacher" if role == "teacher" else names[run["key"]][role]
            wall = run.get("run_seconds", 0) + run.get("generation_seconds", 0) if role != "teacher" else None
            rows.setdefault(label, []).append({**values, "wall": wall if run["key"] != "untrained" else None})
    table = Table(title=f"held-out BBC News blocks; {blocks} training rows; every-5th student; mean ± std over seeds")
    for column in ("arm", "perplexity", "agreement", "teacher log-prob / sampled token", "wall s (incl. generation)"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    summary = {}
    order = ["teacher", "(a) every 5th, untrained", "(b) lm loss only", "(c) forward KL (live)"]
    order += [name for name, _, _ in SEQ_ARMS.values()]
    for label in [name for name in order if name in rows]:
        values = rows[label]

        def stat(key, values=values):
            found = [v[key] for v in values if v.get(key) is not None]
            return mean_std(found) if found else None

        ppl, agree, plaus, wall = (stat(k) for k in ("perplexity", "agreement", "plausibility", "wall"))
        table.add_row(
            label, f"{ppl[0]:,.2f} ± {ppl[1]:,.2f}" if ppl else "—", f"{100 * agree[0]:.1f}%" if agree else "—",
            f"{plaus[0]:.3f} ± {plaus[1]:.3f}" if plaus else "—", f"{wall[0]:,.0f}" if wall else "—",
        )  # fmt: skip
        summary[label] = values
    console.print(table)
    return summary
