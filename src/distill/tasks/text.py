"""Text classification with Hugging Face encoders: the second task.

Teachers and students are local Hugging Face models (:mod:`distill.tasks.hf`): a model directory,
a student cut from the teacher's layers, or a fresh smaller configuration; data are tokenised
texts (:mod:`distill.tasks.text_data`). Scores: accuracy (primary) and macro-F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.evaluate import accuracy
from distill.core.inputs import Inputs, take
from distill.tasks.base import Task, register_task
from distill.tasks.hf import (
    FromTeacherSpec,
    HFConfigSpec,
    HFModel,
    HFSpec,
    OnnxReady,
    cut_student,
    fresh_student,
    load_classifier,
    random_init,
    save_pretrained,
)
from distill.tasks.text_data import TextDataSpec, has_tokenizer, load_text_data, load_tokenizer


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """The unweighted mean of per-class F1 over classes that occur in ``labels`` or the predictions."""
    keep = labels >= 0
    predicted, labels = logits.argmax(-1)[keep], labels[keep]
    scores = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def check_same_tokenizer(student_dir: Path, teacher: HFModel, field: str, chat: bool = False) -> None:
    """A student with its own directory must read the same token ids as the teacher: the data are
    tokenised once. Refused in one line saying what differs (vocabulary size, tokens, specials,
    and with ``chat`` the chat template). Language models (``chat``) may pad ``vocab_size``
    differently: their logits are cut to the tokenizer's size, so only the tokenizers must agree."""
    s_vocab, t_vocab = _vocab_size(student_dir), teacher.config.vocab_size
    if s_vocab != t_vocab and not chat:
        raise DistillError(
            f"{field}.path: its vocabulary has {s_vocab} rows, the teacher's {t_vocab}; teacher and student must "
            f"share a tokenizer (a padded vocab_size counts too)"
        )
    teacher_dir = getattr(teacher.config, "_name_or_path", "")
    if not teacher_dir or not Path(teacher_dir).is_dir() or not has_tokenizer(student_dir):
        return
    ours, theirs = load_tokenizer(student_dir, f"{field}.path"), load_tokenizer(Path(teacher_dir), "teacher.path")
    if ours.get_vocab() != theirs.get_vocab():
        differ = sorted(set(ours.get_vocab().items()) ^ set(theirs.get_vocab().items()))[0][0]
        raise DistillError(
            f"{field}.path: its tokenizer differs from the teacher's (e.g. token {differ!r}); use the same tokenizer"
        )
    if ours.all_special_tokens != theirs.all_special_tokens:
        raise DistillError(
            f"{field}.path: its special tokens {ours.all_special_tokens} differ from the teacher's {theirs.all_special_tokens}"
        )
    if chat and getattr(ours, "chat_template", None) != getattr(theirs, "chat_template", None):
        raise DistillError(f"{field}.path: its chat template differs from the teacher's; use the teacher's tokenizer")


def _vocab_size(directory: Path) -> int | None:
    import json

    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None


def export_beside(model: nn.Module, path: Path, data: DataBundle | None) -> None:
    """``<name>-hf/`` beside the weights at ``path``: ``save_pretrained`` with the data's tokenizer."""
    if isinstance(model, HFModel):
        tokenizer = data.info.get("tokenizer") if data is not None else None
        save_pretrained(model, path.with_name(f"{path.stem}-hf"), Path(tokenizer) if tokenizer else None)


@register_task("text_classification")
class TextClassification(Task):
    """Texts from folders, CSV, JSONL or BBC News; Hugging Face encoders; accuracy and macro-F1."""

    primary_metric = "accuracy"
    higher_is_better = True

    def load_data(self, spec: Any) -> DataBundle:
        if not isinstance(spec, TextDataSpec):
            raise DistillError(f"data.source: task {self.name} reads text (text_folder, csv, jsonl, hf_disk, bbc_news)")
        if spec.source == "text_file" or spec.format != "text" or spec.block_length is not None:
            field = "source" if spec.source == "text_file" else "format" if spec.format != "text" else "block_length"
            raise DistillError(f"data.{field}: is for language models (task: causal_lm), not task {self.name}")
        return load_text_data(spec)

    def load_model(self, spec: HFSpec, data: DataBundle, field: str) -> HFModel:
        """A model directory as this task's model: a classifier with the data's classes."""
        return load_classifier(spec, data.num_classes, field)

    def build_model(self, spec: Any, data: DataBundle, field: str, teacher: nn.Module | None = None) -> nn.Module:
        if isinstance(spec, HFSpec):
            model = self.load_model(spec, data, field)
            if isinstance(teacher, HFModel):
                check_same_tokenizer(spec.path, teacher, field)
            return model
        if isinstance(spec, FromTeacherSpec):
            calibration = take(data.train.x, slice(0, spec.calibration)) if spec.needs_calibration else None
            return cut_student(spec, teacher, field, calibration)
        if isinstance(spec, HFConfigSpec):
            return fresh_student(spec, teacher, data.num_classes, field)
        raise DistillError(
            f"{field}.arch: task {self.name} builds Hugging Face models (arch hf, from_teacher or hf_config), "
            f"not {getattr(spec, 'arch', type(spec).__name__)}"
        )

    def random_init(self, model: nn.Module, field: str) -> nn.Module:
        if not isinstance(model, HFModel):
            return super().random_init(model, field)
        return random_init(model)

    def eval_order(self, x: Inputs) -> Tensor | None:
        """Longest texts first: batches of similar lengths, cut to their longest text, waste little
        compute on padding (and the biggest batch comes first, so memory peaks at once)."""
        if isinstance(x, dict) and "attention_mask" in x:
            return torch.argsort(x["attention_mask"].sum(1), descending=True, stable=True)
        return None

    def onnx_module(self, model: nn.Module) -> nn.Module | None:
        return OnnxReady(model) if isinstance(model, HFModel) else None

    def embedding_parameters(self, model: nn.Module) -> int:
        if not isinstance(model, HFModel):
            return 0
        tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        return sum(p.numel() for table in tables for p in table.parameters())

    def latency_inputs(self, data: DataBundle, batch_size: int) -> Inputs:
        """``batch_size`` real test texts, each repeated to the split's padded length and counted in
        full, so every model is timed at the same stated sequence length."""
        ids = data.test.x["input_ids"]
        rows = ids[torch.arange(batch_size) % len(ids)]
        return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}

    def metrics(self, logits: Tensor, split: Split, reference: Tensor | None = None) -> dict[str, float]:
        return {"accuracy": accuracy(logits, split.y), "macro_f1": macro_f1(logits, split.y, logits.shape[-1])}

    def export(self, model: nn.Module, path: Path, data: DataBundle | None = None) -> None:
        """The weights, and beside them ``<name>-hf/``: a ``save_pretrained`` directory with the
        tokenizer, which ``transformers`` alone loads (``AutoModelForSequenceClassification``)."""
        super().export(model, path, data)
        export_beside(model, path, data)
