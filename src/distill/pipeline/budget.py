"""What each phase of a run needs in memory, checked against the budget before it is allocated.

Every setting that drives a large allocation is checked, with the field to blame: the models
(weights, gradients, optimiser state) before they are built, then the training, evaluation,
latency and cache batches times the input size, and cache shards, before any batch exists. See
:mod:`distill.core.memory` for how models are sized.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from distill.core.inputs import Inputs
from distill.core.memory import Budget, ModelSize, input_bytes
from distill.pipeline.config import CachedTeacherSpec, ExperimentConfig, TrainedTeacher, TrainSpec
from distill.tasks.models import size_field, size_model

PREDICT_BATCH = 1024  # evaluate.predict's largest batch (on an accelerator; 128 on a CPU)


def _optimizer_states(spec: TrainSpec) -> int:
    """Tensors per parameter that the optimiser keeps: AdamW two moments, SGD a momentum buffer."""
    if spec.optimizer == "adamw":
        return 2
    return 1 if spec.momentum > 0 else 0


class RunMemory:
    """The memory of one run (or, with ``caching``, of ``distill cache``), checked in two steps:
    :meth:`check_models` before the models are built, :meth:`check_batches` once they exist (the
    activations of one real sample give the per-sample cost of every batch)."""

    def __init__(
        self, config: ExperimentConfig, in_shape: Sequence[int], num_classes: int, rows: int, caching: bool = False
    ) -> None:
        self.config, self.in_shape, self.rows, self.caching = config, tuple(in_shape), rows, caching
        self.budget = Budget.resolve(config.max_memory)
        specs = {} if isinstance(config.teacher, CachedTeacherSpec) else {"teacher.model": config.teacher.model}
        if not caching:
            specs["student"] = config.student
        self.specs = specs
        self.sizes: dict[str, ModelSize | None] = {
            field: size_model(spec, in_shape, num_classes, field) for field, spec in specs.items()
        }

    def _model_field(self, field: str) -> str:
        size = self.sizes[field]
        return size_field(self.specs[field], field, size.largest_param if size else "")

    def _trained(self) -> dict[str, tuple[TrainSpec, str]]:
        """The models this command trains, with their settings and batch-size field."""
        trained = {}
        if isinstance(self.config.teacher, TrainedTeacher):
            trained["teacher.model"] = (self.config.teacher.train, "teacher.train.batch_size")
        if not self.caching:
            trained["student"] = (self.config.train, "train.batch_size")
        return trained

    def check_models(self) -> None:
        """Weights, plus gradients and optimiser state for a model that is trained."""
        if self.budget.bytes is None:
            return
        trained = self._trained()
        for field, size in self.sizes.items():
            if size is None:
                continue
            copies = 2 + _optimizer_states(trained[field][0]) if field in trained else 1
            what = f"{'training' if field in trained else 'loading'} {size.params:,} parameters"
            self.budget.check(size.weight_bytes * copies, self._model_field(field), what)

    def check_batches(self, models: dict[str, nn.Module], example: Inputs) -> None:
        """Every batch the command will run, from the activations of ``models`` on ``example``."""
        if self.budget.bytes is None:
            return
        sizes = {
            field: size.with_activations(models[field], example)
            for field, size in self.sizes.items()
            if size is not None and field in models
        }
        sample = input_bytes(example)
        check = self.budget.check
        for field, (train, batch_field) in self._trained().items():
            if field not in sizes:
                continue
            batch = min(train.batch_size, self.rows)  # a batch never holds more than the data
            needed = sizes[field].training_bytes(batch, sample, _optimizer_states(train))
            if field == "student" and "teacher.model" in sizes:  # a live teacher runs beside it
                needed += sizes["teacher.model"].inference_bytes(batch, sample)
            check(needed, batch_field, f"a training step at batch {batch}")
        if self.caching:
            cache = self.config.cache
            if "teacher.model" in sizes:
                batch = min(cache.batch_size, self.rows)
                needed = sizes["teacher.model"].inference_bytes(batch, sample)
                check(needed, "cache.batch_size", f"a forward pass at batch {batch}")
            rows = min(cache.shard_rows, self.rows)  # values and indices (4 bytes at most each), lse and tail
            check(rows * (cache.k * 8 + 8), "cache.shard_rows", f"a cache shard of {rows:,} rows")
            return
        for field, size in sizes.items():  # validation and test predictions, then latency batches
            batch = min(PREDICT_BATCH, self.rows)
            check(size.inference_bytes(batch, sample), self._model_field(field), f"a forward pass at batch {batch}")
            for batch in self.config.eval.latency_batch_sizes:
                check(
                    size.inference_bytes(batch, sample), "eval.latency_batch_sizes", f"a forward pass at batch {batch}"
                )
