"""What every distillation loss term sees, and the registry that names terms in configs.

A term is a small ``nn.Module`` that turns student and teacher outputs into one scalar.
The training loop only sums weighted terms, so a new method is a new term, never a new loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.signals import TopKLogits, dense_logits


def logits_of(output: object) -> Tensor:
    """Logits from a plain tensor, :class:`ModelOutputs`, a Hugging Face ``ModelOutput`` or a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, ModelOutputs):
        raise TypeError("the model returned no logits (an embedding model): use terms that read its embedding")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in model output of type {type(output).__name__}")


@dataclass
class ModelOutputs:
    """What a model produced for one batch: logits ``[batch, classes]`` or
    ``[batch, seq, vocab]``, and any tapped intermediate features by module name. A cached
    teacher's logits are sparse (:class:`~distill.core.signals.TopKLogits`); terms that need dense
    ones call :func:`~distill.core.signals.dense_logits`."""

    logits: Tensor | TopKLogits | None = None  # None: a model with no head (an embedding model)
    features: dict[str, Tensor] = field(default_factory=dict)
    embedding: Tensor | None = None  # [batch, dim]: a sentence or image embedding
    hidden_states: tuple[Tensor, ...] | None = None  # per layer, [batch, seq, hidden]
    attentions: tuple[Tensor, ...] | None = None  # per layer, [batch, heads, seq, seq]


OUTPUT_KINDS = ("embedding", "hidden_states", "attentions")


def outputs_of(output: object) -> ModelOutputs:
    """A model's output as :class:`ModelOutputs`: itself if the model returns one, else its logits
    plus any ``hidden_states`` / ``attentions`` a Hugging Face ``ModelOutput`` carries."""
    if isinstance(output, ModelOutputs):
        return output
    extra = {kind: getattr(output, kind, None) for kind in ("hidden_states", "attentions")}
    return ModelOutputs(logits=logits_of(output), **{k: v for k, v in extra.items() if v is not None})


@runtime_checkable
class OutputsOnRequest(Protocol):
    """A model that computes intermediate outputs (hidden states, attentions, an embedding) only
    when asked: the Distiller asks for those its terms read, so nothing else is computed."""

    def request_outputs(self, kinds: set[str]) -> None: ...


@runtime_checkable
class TeacherSignals(Protocol):
    """A teacher that is not run but looked up: outputs precomputed for every sample of the
    training split (``distill cache``'s store, or logits computed once for tuning), addressed by
    the samples' positions in it. The Distiller accepts one in place of a teacher model."""

    def lookup(self, index: Tensor, *, device: torch.device | str | None = None) -> ModelOutputs:
        """The teacher's outputs for training samples ``index``, on ``device``."""
        ...

    def check_features(self, names: list[str]) -> None:
        """Raise a DistillError unless the named teacher features are held."""
        ...


class TeacherLogits:
    """A teacher's logits (and, for embedding students, its embeddings) on the training split,
    computed once and looked up by sample index (:class:`TeacherSignals`): the remembered teacher
    of a run and the teacher of tuning trials, which then never run it again. Only for objectives
    that read nothing else (no features, hidden states or attention maps)."""

    def __init__(self, logits: Tensor | None, embedding: Tensor | None = None) -> None:
        self.logits, self.embedding = logits, embedding

    def lookup(self, index: Tensor, *, device: torch.device | str | None = None) -> ModelOutputs:
        def rows(values: Tensor | None) -> Tensor | None:
            if values is None:
                return None
            picked = values[index.to(values.device)]
            return picked if device is None else picked.to(device)

        return ModelOutputs(logits=rows(self.logits), embedding=rows(self.embedding))

    def check_features(self, names: list[str]) -> None:
        raise DistillError(f"the teacher's logits were computed once; they hold no features ({names[0]})")


@dataclass
class Batch:
    """One batch of training data.

    ``labels`` use -1 for samples (or token positions) without a label, so the same batch
    can mix labeled and unlabeled data. ``mask`` marks the positions that count
    (``[batch, seq]``, True = counts); None means all of them. ``mix`` is set when images were
    mixed (mixup, cutmix): each sample's partner's label and its own share of the pixels, for
    the hard-label target (see :mod:`distill.tasks.augment`).
    """

    inputs: Any
    labels: Tensor | None = None
    mask: Tensor | None = None
    mix: tuple[Tensor, Tensor] | None = None  # (partner labels, own share), both [batch]


class TermParams(BaseModel):
    """Base of each term's config parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class LossTerm(nn.Module):
    """A named distillation loss: ``forward(student, teacher, batch) -> scalar``.

    A term that reads intermediate features names the modules in ``student_taps`` /
    ``teacher_taps``; the Distiller hooks them and fills ``ModelOutputs.features``. A term
    with learnable parts that depend on shapes (adapters) builds them in ``setup``, which the
    Distiller calls once with example outputs before the optimiser is created.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    # a term that must run the teacher on inputs no cache holds (e.g. on-policy: the student's own samples)
    needs_live_teacher: ClassVar[bool] = False
    Params: ClassVar[type[TermParams]] = TermParams
    # what the term reads from both models besides logits and taps: a subset of OUTPUT_KINDS
    needs_outputs: ClassVar[frozenset[str]] = frozenset()
    # how many training samples ``setup`` wants to see (e.g. a PCA); the Distiller's example batch
    # holds at least this many
    calibration_samples: int = 0

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        """Build shape-dependent parts from example outputs (default: nothing to build)."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        raise NotImplementedError

    def rows(self, batch: Batch) -> int | None:
        """How many rows (samples or token positions) of ``batch`` this term's value averages
        over. A distributed run weights each process's value by its share of the global batch's
        count, so that N processes follow the mean over the global batch, as one process would.
        Default: the rows ``batch.mask`` keeps; None (no mask) means every row."""
        return int(batch.mask.sum()) if batch.mask is not None else None


class TappedPairParams(TermParams):
    """Which outputs a feature or relation term compares: module names, or null for the logits."""

    student: str | None = None
    teacher: str | None = None


def _head(outputs: ModelOutputs) -> Tensor | None:
    """What an untapped pair term compares: the logits, or the embedding of a model without logits."""
    return outputs.logits if outputs.logits is not None else outputs.embedding


class TappedPairTerm(LossTerm):
    """Base of terms comparing one student output with one teacher output (features or logits)."""

    Params: ClassVar[type[TermParams]] = TappedPairParams

    def __init__(self, student: str | None = None, teacher: str | None = None) -> None:
        super().__init__()
        self.student_name, self.teacher_name = student, teacher

    def student_taps(self) -> list[str]:
        return [self.student_name] if self.student_name else []

    def teacher_taps(self) -> list[str]:
        return [self.teacher_name] if self.teacher_name else []

    def pair(self, student: ModelOutputs, teacher: ModelOutputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None:
            raise ValueError(f"the {self.name} term needs teacher outputs")
        s = student.features[self.student_name] if self.student_name else _head(student)
        if self.teacher_name:
            t = teacher.features[self.teacher_name]
        else:
            t = dense_logits(teacher.logits) if teacher.logits is not None else teacher.embedding
        if s is None or t is None:
            raise DistillError(f"the {self.name} term found neither logits nor an embedding to compare")
        return s, t.detach()

    def describe_pair(self) -> str:
        return f"student {self.student_name or 'logits'} / teacher {self.teacher_name or 'logits'}"

    def extra_repr(self) -> str:
        return self.describe_pair()


TERMS: dict[str, type[LossTerm]] = {}


def register_term(name: str):
    """Class decorator that makes a term available to configs under ``name``."""

    def decorate(cls: type[LossTerm]) -> type[LossTerm]:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is registered twice")
        cls.name = name
        TERMS[name] = cls
        return cls

    return decorate


def build_term(name: str, params: dict[str, Any] | None = None) -> LossTerm:
    """Build a registered term from config parameters (validated by the term's ``Params``)."""
    if name not in TERMS:
        raise KeyError(name)
    cls = TERMS[name]
    validated = cls.Params(**(params or {}))
    return cls(**validated.model_dump())


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-row values over the rows the mask keeps (all rows if mask is None).

    An empty selection gives 0 (with a gradient path), not NaN, so a batch without any
    counted position does not poison training.
    """
    if mask is not None:
        values = values[mask.bool()]
    if values.numel() == 0:
        return values.sum() * 0.0
    return values.mean()


def upcast(tensor: Tensor) -> Tensor:
    """Half-precision logits to float32 for a stable softmax; float32/64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def same_shape(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}; they must share the class set (or vocabulary)"
        )


__all__ = [
    "OUTPUT_KINDS",
    "Batch",
    "LossTerm",
    "ModelOutputs",
    "TERMS",
    "TappedPairParams",
    "TappedPairTerm",
    "TermParams",
    "build_term",
    "masked_mean",
    "outputs_of",
    "register_term",
]
