"""On-policy distillation: the student's own continuations, scored by the live teacher (tiny Llama)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from tiny_lm import llama_dir, prompt_file  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from distill.tasks.hf import HFSpec, load_causal_lm
    from distill.tasks.lm_data import load_lm_data
    from distill.tasks.text_data import TextDataSpec

    root = tmp_path_factory.mktemp("onpolicy")
    model_dir = llama_dir(root / "llama", seed=7)
    prompts = prompt_file(root / "p.jsonl", count=20)
    data = load_lm_data(TextDataSpec(source="jsonl", path=prompts, tokenizer=model_dir, format="prompt_response"))
    student = load_causal_lm(HFSpec(path=model_dir), "student", vocab=data.num_classes)
    return root, model_dir, prompts, data, student


def test_a_rewritten_batch_keeps_each_prompt_and_counts_only_the_students_continuation(setup):
    from distill.core.inputs import take
    from distill.core.losses.base import Batch
    from distill.tasks.lm_on_policy import OnPolicySpec, on_policy_batch, prompt_lengths

    _, _, _, data, student = setup
    rows = slice(0, 4)
    batch = Batch(take(data.train.x, rows), data.train.y[rows], data.train.mask[rows])
    lengths = prompt_lengths(batch)
    first = [int(m.nonzero()[0]) for m in batch.mask]
    assert lengths == [f + 1 for f in first]  # the prompt ends where the first counted label is predicted
    student.train()
    spec = OnPolicySpec(fraction=1.0, max_new_tokens=5)
    torch.manual_seed(0)
    new = on_policy_batch(batch, student, spec)
    torch.manual_seed(0)
    again = on_policy_batch(batch, student, spec)
    assert student.training  # back in the mode it was in
    assert torch.equal(new.inputs["input_ids"], again.inputs["input_ids"]) and torch.equal(new.mask, again.mask)
    ids, attention = new.inputs["input_ids"], new.inputs["attention_mask"]
    for row, length in enumerate(lengths):
        assert torch.equal(ids[row, :length], batch.inputs["input_ids"][row, :length])  # the prompt, unchanged
        counted = new.mask[row].nonzero().flatten()
        n = int(attention[row].sum())
        assert int(counted[0]) == length - 1 and int(counted[-1]) == n - 1 and len(counted) <= 5  # the continuation
        assert torch.equal(new.labels[row, : n - 1], ids[row, 1:n])  # labels are the next tokens
        assert (new.labels[row, n:] == -1).all() and not new.mask[row, n:].any()
    # the continuation is what the student samples: greedy-like sampling gives the student's argmax
    cold = on_policy_batch(batch, student, OnPolicySpec(fraction=1.0, max_new_tokens=1, temperature=1e-4))
    with torch.no_grad():
        logits = student.model(
            input_ids=batch.inputs["input_ids"][:1, : lengths[0]],
            attention_mask=batch.inputs["attention_mask"][:1, : lengths[0]],
        ).logits
    assert int(cold.labels[0, lengths[0] - 1]) == int(logits[0, -1].argmax())


def config(root: Path, model_dir: Path, prompts: Path, **changes) -> Path:
    import yaml

    raw = {
        "task": "causal_lm",
        "data": {"source": "jsonl", "path": str(prompts), "format": "prompt_response"},
        "teacher": {"kind": "hf", "path": str(model_dir)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "distill": {"terms": [{"type": "jsd", "beta": 0.5}], "on_policy": {"fraction": 0.5, "max_new_tokens": 4}},
        "baseline": False,
        "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 0.01},
        "eval": {"latency_batch_sizes": [1], "latency_repeats": 1},
        "output": {"dir": str(root / "runs"), "name": "op"},
    } | changes
    path = root / "op.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_on_policy_run_trains_and_a_cached_teacher_or_plain_text_is_refused(setup, capsys, monkeypatch):
    from distill.cli import main
    from distill.tasks import lm

    root, model_dir, prompts, data, _ = setup
    calls = []
    real = lm.on_policy_batch
    monkeypatch.setattr(
        lm, "on_policy_batch", lambda batch, student, spec: calls.append(spec) or real(batch, student, spec)
    )
    assert main(["run", str(config(root, model_dir, prompts)), "--quiet"]) == 0
    steps = -(-len(data.train) // 4)
    assert 0 < len(calls) < steps and calls[0].max_new_tokens == 4  # about half the batches, this seed: not all
    metrics = json.loads((root / "runs" / "op" / "metrics.json").read_text())
    assert metrics["models"]["distilled"]["metrics"]["perplexity"] > 0
    capsys.readouterr()
    cached = config(root, model_dir, prompts, teacher={"kind": "cache", "path": str(root / "nowhere")})
    assert main(["run", str(cached), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "distill.on_policy: the teacher scores the student's own continuations" in err and err.count("\n") == 1
    text = config(root, model_dir, prompts, data={"source": "jsonl", "path": str(prompts), "format": "text"})
    assert main(["run", str(text), "--quiet", "--overwrite"]) == 2
    assert "needs prompts to continue" in capsys.readouterr().err


def test_a_padded_vocabulary_is_never_sampled(setup):
    from distill.core.inputs import take
    from distill.core.losses.base import Batch
    from distill.tasks.hf import HFSpec, load_causal_lm
    from distill.tasks.lm_on_policy import OnPolicySpec, on_policy_batch

    root, _, _, data, _ = setup
    padded = load_causal_lm(HFSpec(path=llama_dir(root / "padded", seed=8, vocab=96)), "s", vocab=data.num_classes)
    batch = Batch(take(data.train.x, slice(0, 8)), data.train.y[:8], data.train.mask[:8])
    torch.manual_seed(1)
    new = on_policy_batch(batch, padded, OnPolicySpec(fraction=1.0, max_new_tokens=12, temperature=20.0))
    assert int(new.labels[new.mask].max()) < data.num_classes < 96
