"""``distill export RUN --format hf|onnx``: a finished text run's student for the ecosystem.

``hf`` copies the run's ``student-hf/`` (a ``save_pretrained`` directory with the tokenizer, which
``transformers`` alone loads) to ``--out``; ``onnx`` writes ``model.onnx`` with dynamic batch and
sequence axes, checks it against PyTorch on sample texts, and times both on the CPU. A run with
``eval.onnx: true`` times its student under onnxruntime too, with the same inputs as PyTorch.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.io import atomic_dir, write_json
from distill.report.markdown import ONNX_TOLERANCE


def student_dir(run: Path) -> Path:
    directory = Path(run) / "student-hf"
    if not (Path(run) / "metrics.json").is_file():
        raise DistillError(f"{run} is not a finished distill run (no metrics.json)")
    if not (directory / "config.json").is_file():
        raise DistillError(f"{run} has no Hugging Face student (student-hf/): export works for text runs")
    return directory


def _load(run: Path, directory: Path):
    """The run's student as its task built it (a classifier, or an encoder for embedding runs),
    ready for ONNX, and its tokenizer."""
    import json

    from distill.tasks import get_task
    from distill.tasks.hf import HFClassifier, HFEncoder, _transformers

    transformers = _transformers()
    task = json.loads((Path(run) / "metrics.json").read_text()).get("task", "text_classification")
    if task == "text_embedding":
        model = HFEncoder(transformers.AutoModel.from_pretrained(directory, local_files_only=True))
    else:
        model = HFClassifier(
            transformers.AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return get_task(task).onnx_module(model.eval()), tokenizer


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


def require_onnxruntime(field: str) -> None:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise DistillError(f"{field} needs onnx and onnxruntime; run `pip install -e '.[text]'`")


def write_onnx(module: nn.Module, inputs: dict[str, Tensor], path: Path) -> None:
    """``module`` (keyword inputs to one tensor named ``module.output_name``) traced to ``path``,
    with dynamic batch and sequence axes."""
    output = getattr(module, "output_name", "output")
    # the tracer passes inputs by position: put them in the order of forward's parameters (a mapping
    # read back from safetensors is sorted by name, which once traced attention_mask as input_ids)
    order = [name for name in inspect.signature(module.forward).parameters if name in inputs]
    inputs = {name: inputs[name] for name in order}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on branches the parity checks cover
        torch.onnx.export(
            module.eval(),
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=[output],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in inputs} | {output: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like the module it was traced from (so
    :func:`distill.core.evaluate.measure_latencies` times it like any model)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many threads as PyTorch gets
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, **inputs: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def onnx_difference(module: nn.Module, runtime: OnnxRuntimeModel, batches: list[dict[str, Tensor]]) -> float:
    """The largest absolute difference between PyTorch and onnxruntime over ``batches``."""
    difference = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = module(**batch)
        difference = max(difference, float((runtime(**batch) - expected).abs().max()))
    return difference


def export_onnx(run: Path, out: Path) -> dict[str, Any]:
    """``out/model.onnx`` (+ tokenizer files), its largest difference from PyTorch on sample inputs,
    and the CPU latency of both (batch 1 and the sample batch)."""
    require_onnxruntime("--format onnx")
    source = student_dir(run)
    module, tokenizer = _load(run, source)
    inputs = sample_inputs(tokenizer)
    if out.exists():
        raise DistillError(f"--out: {out} already exists; choose another directory")
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        module.model.config.save_pretrained(tmp)
        write_onnx(module, inputs, tmp / "model.onnx")
        runtime = OnnxRuntimeModel(tmp / "model.onnx")
        # the traced shapes and two others: the batch and sequence axes must really be dynamic
        checks = [inputs, sample_inputs(tokenizer, n=2, step=7), sample_inputs(tokenizer, n=1, step=1)]
        difference = onnx_difference(module, runtime, checks)
        if difference > ONNX_TOLERANCE:
            raise DistillError(
                f"the ONNX model differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE}); not written"
            )
        one = {name: value[:1] for name, value in inputs.items()}
        n = len(inputs["input_ids"])
        with torch.no_grad():
            latency = {
                "pytorch_ms_batch_1": _median_ms(lambda: module(**one)),
                "onnxruntime_ms_batch_1": _median_ms(lambda: runtime(**one)),
                f"pytorch_ms_batch_{n}": _median_ms(lambda: module(**inputs)),
                f"onnxruntime_ms_batch_{n}": _median_ms(lambda: runtime(**inputs)),
            }
        facts = {"max_abs_difference": difference, "sequence_length": int(inputs["input_ids"].shape[1]), **latency}
        write_json(tmp / "export.json", facts)
    return facts


def onnx_timings(
    module: nn.Module,
    checks: list[dict[str, Tensor]],
    batches: dict[int, dict[str, Tensor]],
    measure,
    threads: int | None = None,
) -> dict[str, Any]:
    """``module`` exported to a temporary ONNX file: its largest difference from PyTorch on
    ``checks`` and its onnxruntime milliseconds per batch size (``measure(model, inputs)``, the
    run's own latency protocol)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        write_onnx(module, checks[0], path)
        runtime = OnnxRuntimeModel(path, threads)
        return {
            "max_abs_difference": onnx_difference(module, runtime, checks),
            "onnxruntime_ms": {str(b): measure(runtime, inputs) for b, inputs in batches.items()},
        }
