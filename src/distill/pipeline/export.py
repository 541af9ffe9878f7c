"""``distill export RUN --format hf|onnx``: a finished text run's student for the ecosystem.

``hf`` copies the run's ``student-hf/`` (a ``save_pretrained`` directory with the tokenizer, which
``transformers`` alone loads) to ``--out``; ``onnx`` writes ``model.onnx`` with dynamic batch and
sequence axes, checks it against PyTorch on the run's own test texts, and times both on the CPU.
"""

from __future__ import annotations

import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from distill.core.errors import DistillError
from distill.core.io import atomic_dir, write_json

ONNX_TOLERANCE = 1e-4


def student_dir(run: Path) -> Path:
    directory = Path(run) / "student-hf"
    if not (Path(run) / "metrics.json").is_file():
        raise DistillError(f"{run} is not a finished distill run (no metrics.json)")
    if not (directory / "config.json").is_file():
        raise DistillError(f"{run} has no Hugging Face student (student-hf/): export works for text runs")
    return directory


def _load(directory: Path):
    from distill.tasks.hf import _transformers

    transformers = _transformers()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


SENTENCE = "a small student keeps most of what the large teacher knows at a fraction of its cost and latency"


def sample_inputs(tokenizer, n: int = 4, length: int = 48, step: int = 3) -> dict[str, torch.Tensor]:
    """Token ids of ``n`` sentences of different lengths, padded: exercises the attention mask."""
    words = SENTENCE.split()
    texts = [" ".join(words[: 2 + i * step]) for i in range(n)]
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def export_hf(run: Path, out: Path) -> Path:
    source = student_dir(run)
    if out.exists():
        raise DistillError(f"--out: {out} already exists; choose another directory")
    with atomic_dir(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return out


def _median_ms(call, repeats: int = 20) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def export_onnx(run: Path, out: Path) -> dict[str, Any]:
    """``out/model.onnx`` (+ tokenizer files), its largest difference from PyTorch on sample inputs,
    and the CPU latency of both (batch 1 and the sample batch)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise DistillError("--format onnx needs onnx and onnxruntime; run `pip install -e '.[text]'`")
    import onnxruntime

    source = student_dir(run)
    model, tokenizer = _load(source)
    inputs = sample_inputs(tokenizer)
    if out.exists():
        raise DistillError(f"--out: {out} already exists; choose another directory")
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on branches the checks below cover
            torch.onnx.export(
                model,
                (inputs["input_ids"], inputs["attention_mask"]),
                str(tmp / "model.onnx"),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask")}
                | {"logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        session = onnxruntime.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {name: value.numpy() for name, value in inputs.items()}
        difference = 0.0
        # the traced shapes and two others: the batch and sequence axes must really be dynamic
        for check in (inputs, sample_inputs(tokenizer, n=2, step=7), sample_inputs(tokenizer, n=1, step=1)):
            with torch.no_grad():
                expected = model(**check).logits
            got = torch.from_numpy(session.run(["logits"], {k: v.numpy() for k, v in check.items()})[0])
            difference = max(difference, float((got - expected).abs().max()))
        if difference > ONNX_TOLERANCE:
            raise DistillError(
                f"the ONNX model differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE}); not written"
            )
        one = {name: value[:1] for name, value in inputs.items()}
        with torch.no_grad():
            latency = {
                "pytorch_ms_batch_1": _median_ms(lambda: model(**one)),
                "onnxruntime_ms_batch_1": _median_ms(
                    lambda: session.run(["logits"], {k: v.numpy() for k, v in one.items()})
                ),
                f"pytorch_ms_batch_{len(feeds['input_ids'])}": _median_ms(lambda: model(**inputs)),
                f"onnxruntime_ms_batch_{len(feeds['input_ids'])}": _median_ms(lambda: session.run(["logits"], feeds)),
            }
        facts = {"max_abs_difference": difference, "sequence_length": int(inputs["input_ids"].shape[1]), **latency}
        write_json(tmp / "export.json", facts)
    return facts
