"""The Distiller: a student, a frozen teacher and weighted loss terms, usable in any loop.

    distiller = Distiller(student, teacher,
                          terms={"kd": SoftTargetKD(temperature=4.0), "ce": HardLabelCE()},
                          weights={"kd": 0.9, "ce": 0.1})
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05)
    for x, y in loader:
        out = distiller(x, labels=y)      # out.loss, out.terms["kd"], out.terms["ce"]
        optimizer.zero_grad(); out.loss.backward(); optimizer.step()

The teacher is frozen (no gradients) and stays in eval mode across ``train()`` calls, so
batch-norm statistics and dropout of the teacher never drift. With no teacher (or only
terms that need none) the same wrapper trains a student from scratch, which is how the
baseline gets exactly the same loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import Batch, LossTerm, ModelOutputs


@dataclass
class DistillOutput:
    """The weighted total ``loss`` to back-propagate, each term's unweighted value
    (detached, for logging), and the outputs of both models."""

    loss: Tensor
    terms: dict[str, Tensor]
    student: ModelOutputs
    teacher: ModelOutputs | None


def logits_of(output: object) -> Tensor:
    """Logits from a plain tensor, a Hugging Face ``ModelOutput`` or a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in model output of type {type(output).__name__}")


class Distiller(nn.Module):
    """Wraps ``student`` and a frozen ``teacher`` and returns the weighted sum of ``terms``."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Mapping[str, LossTerm] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        terms = dict(terms or {})
        if not terms:
            raise ValueError("Distiller needs at least one loss term")
        weights = {name: 1.0 for name in terms} | dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"weights given for unknown terms: {sorted(unknown)}")
        needs_teacher = [name for name, term in terms.items() if term.needs_teacher]
        if needs_teacher and teacher is None:
            raise ValueError(f"terms {needs_teacher} need a teacher, but none was given")
        self.student = student
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(w) for name, w in weights.items()}
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and any(term.needs_teacher for term in self.terms.values())

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters plus any learnable parts of the terms (e.g. adapters)."""
        yield from self.student.parameters()
        yield from self.terms.parameters()

    def forward(self, inputs: object, labels: Tensor | None = None, mask: Tensor | None = None) -> DistillOutput:
        batch = Batch(inputs=inputs, labels=labels, mask=mask)
        student = ModelOutputs(logits=logits_of(self.student(inputs)))
        teacher = None
        if self.uses_teacher:
            with torch.no_grad():
                teacher = ModelOutputs(logits=logits_of(self.teacher(inputs)))
        values = {name: term(student, teacher, batch) for name, term in self.terms.items()}
        loss = sum(self.weights[name] * value for name, value in values.items())
        return DistillOutput(
            loss=loss,
            terms={name: value.detach() for name, value in values.items()},
            student=student,
            teacher=teacher,
        )
