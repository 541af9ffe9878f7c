"""The seam between the modality-free core and a modality: what a task must say."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.evaluate import predict
from distill.core.inputs import Inputs, call_model, take
from distill.core.io import save_weights
from distill.core.losses import Batch
from distill.core.losses.base import logits_of
from distill.core.signals import TopKLogits

TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: make a task available as ``task: name`` in configs."""

    def decorate(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


def get_task(name: str = "image_classification") -> Task:
    if name not in TASKS:
        raise DistillError(f"task: unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


class Task(ABC):
    """Reads and splits the data, builds models, gives example inputs, scores predictions.

    Everything else (the Distiller, loss terms, the training loop, the teacher cache, run
    directories) is shared by every task. ``primary_metric`` (with ``higher_is_better``) is the
    one that picks the best epoch and that reports lead with.
    """

    name: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    primary_percent: ClassVar[bool] = True  # a fraction in [0, 1], reported as a percentage
    # models end in class (or vocabulary) logits; False: an embedding model, scored against the
    # teacher's outputs (no labels-only baseline, no accuracy, agreement or calibration)
    has_logits: ClassVar[bool] = True
    # the student can train on the data's labels alone (the scratch baseline); False: embeddings
    trains_on_labels: ClassVar[bool] = True
    # `distill cache` can store the teacher's top-k logits (False: embeddings, which have none)
    cacheable: ClassVar[bool] = True

    @abstractmethod
    def load_data(self, spec: Any) -> DataBundle:
        """The task's data, split into train / validation / test, with a content fingerprint."""

    @abstractmethod
    def build_model(self, spec: Any, data: DataBundle, field: str, teacher: nn.Module | None = None) -> nn.Module:
        """A model from its config spec, for this data (sized before it is allocated). ``teacher``
        is the teacher model, for students derived from it (cut from its layers)."""

    def example_inputs(self, data: DataBundle, n: int = 2) -> Inputs:
        """A few real training inputs: for probes (adapters, taps, activation sizes)."""
        return take(data.train.x, slice(0, n))

    @abstractmethod
    def latency_inputs(self, data: DataBundle, batch_size: int) -> Inputs:
        """Inputs of ``batch_size`` samples to time models on."""

    def check_outputs(self, model: nn.Module, data: DataBundle, field: str) -> None:
        """Run a tiny batch through ``model``; its last dimension must be the number of classes."""
        model.eval()
        try:
            with torch.inference_mode():
                logits = logits_of(call_model(model, self.example_inputs(data)))
        except Exception as err:  # noqa: BLE001 - any failure here is a model/data mismatch
            raise DistillError(
                f"{field}: forward pass on inputs of shape {list(data.input_shape)} failed: {str(err).splitlines()[0]}"
            ) from None
        if logits.shape[-1] != data.num_classes:
            raise DistillError(
                f"{field}: the model outputs {logits.shape[-1]} classes but the data has {data.num_classes}; "
                f"teacher, student and data must share the class set"
            )

    def predict(
        self,
        model: nn.Module,
        x: Inputs,
        device: torch.device | str = "cpu",
        labels: Tensor | None = None,
        reference: Any = None,
    ) -> Any:
        """What the task scores: the model's logits (an embedding task: its embeddings; a language
        model: per-token scores). ``labels`` are the split's labels and ``reference`` the
        teacher's predictions on the same inputs, for tasks that need them while predicting."""
        return predict(model, x, device=device, order=self.eval_order(x))

    def extra_evaluation(
        self, models: dict[str, nn.Module], data: DataBundle, teacher_has_weights: bool = True
    ) -> dict[str, Any]:
        """Task-specific facts for ``metrics.json`` beyond scores and latency (a language model:
        generation speed and sample generations); JSON-safe; none by default. Without
        ``teacher_has_weights`` (a cached teacher) ``models["teacher"]`` is only its architecture."""
        return {}

    def predict_cached(self, signals: TopKLogits, labels: Tensor, label_logprobs: Tensor | None = None) -> Any:
        """The teacher's predictions when only its cached top-k signals exist (what :meth:`predict`
        gives for a live teacher): the reconstructed logits by default. ``label_logprobs``: the
        teacher's log-probability of each label, where the cache stores it."""
        return signals.to_dense()

    def eval_order(self, x: Inputs) -> Tensor | None:
        """The order to batch samples in for evaluation (None: as they are); the results come back
        in the original order either way."""
        return None

    @abstractmethod
    def metrics(self, logits: Any, split: Split, reference: Any = None) -> dict[str, float]:
        """Scores of predictions ``logits`` on ``split``; holds :attr:`primary_metric`. ``reference``
        is the teacher's predictions on the same split, for tasks scored against the teacher."""

    def embedding_parameters(self, model: nn.Module) -> int:
        """Parameters in lookup tables (token and position embeddings): they cost memory, not time,
        so reports show them apart. 0 for models without any."""
        return 0

    def random_init(self, model: nn.Module, field: str) -> nn.Module:
        """The same architecture as ``model`` with fresh random weights: the second baseline of a
        student initialised from the teacher (what the teacher's weights are worth). Tasks whose
        students already start from random weights refuse it."""
        raise DistillError(
            f"{field}: task {self.name}'s students start from random weights already; the scratch baseline is that"
        )

    def onnx_module(self, model: nn.Module) -> nn.Module | None:
        """A traceable module that maps the task's inputs (as keyword arguments) to one output
        tensor, named by its ``output_name``, for ONNX export; None: the task has no ONNX export."""
        return None

    def rewrite_batch(self, batch: Batch, student: nn.Module) -> Batch:
        """A hook to change a training batch before the step (sequence-level and on-policy
        distillation will replace inputs with generated ones); the identity by default."""
        return batch

    def export(self, model: nn.Module, path: Path, data: DataBundle | None = None) -> None:
        """Write a trained student's weights to ``path`` (safetensors); a task may write more beside
        it (a text task: a ``save_pretrained`` directory with the tokenizer)."""
        save_weights(model, path)
