"""The Distiller: a student, a frozen teacher and weighted loss terms, usable in any loop.

    distiller = Distiller(student, teacher,
                          terms={"kd": SoftTargetKD(temperature=4.0), "ce": HardLabelCE()},
                          weights={"kd": 0.9, "ce": 0.1})
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.05)
    for x, y in loader:
        out = distiller(x, labels=y)      # out.loss, out.terms["kd"], out.terms["ce"]
        optimizer.zero_grad(); out.loss.backward(); optimizer.step()

The teacher is frozen (no gradients) and stays in eval mode across ``train()`` calls, so
batch-norm statistics and dropout of the teacher never drift. The teacher may also be
:class:`~distill.core.losses.base.TeacherSignals`, e.g. a :class:`~distill.cache.CachedTeacher` (signals
precomputed by ``distill cache``): then
``forward`` needs ``index=`` (the samples' positions in the cached split) and no teacher runs. With no teacher (or only
terms that need none) the same wrapper trains a student from scratch, which is how the
baseline gets exactly the same loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.fold import folded_batch_norms
from distill.core.inputs import Inputs, batch_len, call_model, take, to_device
from distill.core.losses import Batch, LossTerm, ModelOutputs
from distill.core.losses.base import OutputsOnRequest, TeacherLogits, TeacherSignals, outputs_of
from distill.core.signals import TopKLogits
from distill.core.taps import FeatureTaps


@dataclass
class DistillOutput:
    """The weighted total ``loss`` to back-propagate, each term's unweighted value
    (detached, for logging; ``values`` keeps their gradients), the outputs of both models, and the
    batch as the terms saw it (labels and mask cut to the student's positions: :func:`fit_positions`)."""

    loss: Tensor
    terms: dict[str, Tensor]
    student: ModelOutputs
    teacher: ModelOutputs | None
    values: dict[str, Tensor] = field(default_factory=dict)
    batch: Batch | None = None


@dataclass(frozen=True)
class LinearWarmup:
    """A term weight that grows linearly from 0 to ``weight`` over the first ``epochs`` epochs."""

    weight: float
    epochs: float

    def __call__(self, progress: float) -> float:
        return self.weight * min(1.0, progress / self.epochs) if self.epochs > 0 else self.weight

    def __str__(self) -> str:
        return f"{self.weight:g} (warm-up {self.epochs:g} ep)"


Weight = float | LinearWarmup


def fit_positions(
    student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch
) -> tuple[Batch, ModelOutputs | None]:
    """Labels, mask and the teacher's logits cut to the student's number of positions.

    A model may skip the columns that are padding in every row of a batch (a Hugging Face model
    runs only as long as the batch's longest sequence), so its per-position logits ``[batch, seq',
    vocab]`` can be shorter than the labels ``[batch, seq]``; the columns cut are padding, with no
    label and masked out, so nothing that counts is lost. A cached teacher's rows are cut alike."""
    logits, labels = student.logits, batch.labels
    if logits is None or logits.dim() < 3:
        return batch, teacher
    width = logits.shape[1]
    if labels is not None and labels.dim() == 2 and labels.shape[1] > width:
        if bool((labels[:, width:] >= 0).any()) or (batch.mask is not None and bool(batch.mask[:, width:].any())):
            raise ValueError(f"the student returned {width} positions but positions after them count")
        batch = Batch(batch.inputs, labels[:, :width], None if batch.mask is None else batch.mask[:, :width])
    if teacher is not None and teacher.logits is not None:
        signals = teacher.logits
        if isinstance(signals, TopKLogits) and signals.values.dim() == 3 and signals.values.shape[1] > width:
            cut = TopKLogits(
                signals.values[:, :width], signals.indices[:, :width], signals.logsumexp[:, :width],
                signals.tail[:, :width], signals.vocab_size,
            )  # fmt: skip
            teacher = replace(teacher, logits=cut)
        elif isinstance(signals, Tensor) and signals.dim() == 3 and signals.shape[1] > width:
            teacher = replace(teacher, logits=signals[:, :width])
    if teacher is not None and labels is not None and labels.dim() == 2 and labels.shape[1] > width:
        wide = labels.shape[1]  # cached per-position features are as wide as the labels were
        features = {k: v[:, :width] if v.dim() >= 3 and v.shape[1] == wide else v for k, v in teacher.features.items()}
        teacher = replace(teacher, features=features)
    return batch, teacher


def _same_width(parts: list[list[Tensor | None]]) -> list[list[Tensor | None]]:
    """Per-position outputs of several batches padded to the widest (a model that skips padding
    columns returns each batch only as long as its longest row; the padding is never counted)."""
    widths = {p[0].shape[1] for p in parts if p[0] is not None and p[0].dim() >= 3}
    if len(widths) <= 1:
        return parts
    width = max(widths)
    pad = torch.nn.functional.pad
    return [[pad(p[0], (0, 0, 0, width - p[0].shape[1])), *p[1:]] for p in parts]


@contextmanager
def _recording(taps: FeatureTaps | None) -> Iterator[dict[str, Tensor]]:
    if taps is None:
        yield {}
    else:
        with taps.recording() as features:
            yield features


@contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for a probe pass, each module's own mode restored afterwards (also
    on errors): a probe must not move batch-norm statistics, nor switch a user-frozen part to train."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


REMEMBERED_OUTPUTS = frozenset({"embedding"})
"""Outputs besides logits that a remembered teacher keeps (small: one vector per sample)."""


def _has_setup(term: LossTerm) -> bool:
    return type(term).setup is not LossTerm.setup


class Distiller(nn.Module):
    """Wraps ``student`` and a frozen ``teacher`` (a model, or cached signals) and returns the weighted sum of ``terms``.

    Terms that read intermediate features get them through forward hooks on the modules they
    name. Terms with shape-dependent parts (adapters) are built by ``prepare(example_inputs)``,
    which must run before the optimiser is created (pass ``example_inputs`` here to do it now).
    ``progress`` (epochs done, fractional) drives weight schedules; the trainer sets it.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | TeacherSignals | None = None,
        terms: Mapping[str, LossTerm] | None = None,
        weights: Mapping[str, Weight] | None = None,
        example_inputs: object | None = None,
        example_index: Tensor | None = None,
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
        if teacher is not None and not isinstance(teacher, (nn.Module, TeacherSignals)):
            raise TypeError(f"the teacher must be a torch.nn.Module or TeacherSignals, not {type(teacher).__name__}")
        live_only = [name for name, term in terms.items() if term.needs_live_teacher]
        if live_only and teacher is not None and not isinstance(teacher, nn.Module):
            raise DistillError(
                f"the {live_only[0]} term needs a live teacher model (it scores inputs no cache holds); "
                f"give the teacher as a model (kind train or checkpoint), not a cache"
            )
        self.student = student
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: w if isinstance(w, LinearWarmup) else float(w) for name, w in weights.items()}
        self.teacher = teacher
        self.progress = 0.0
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False)
            teacher.eval()
        student_taps = [name for term in terms.values() for name in term.student_taps()]
        teacher_taps = [name for term in terms.values() for name in term.teacher_taps()] if self.uses_teacher else []
        self._student_taps = FeatureTaps(student, student_taps, "student") if student_taps else None
        if teacher_taps and self.teacher_is_cached:
            teacher.check_features(teacher_taps)  # a cache holds the tapped features it was made with
            teacher_taps = []
        self._teacher_taps = FeatureTaps(teacher, teacher_taps, "teacher") if teacher_taps else None
        # hidden states, attentions, embeddings: asked of the models that compute them on request
        self._needs_outputs = {kind: name for name, term in terms.items() for kind in term.needs_outputs}
        teacher_needs = (
            {k: n for k, n in self._needs_outputs.items() if terms[n].needs_teacher} if self.uses_teacher else {}
        )
        if teacher_needs and self.teacher_is_cached:
            kind, name = next(iter(teacher_needs.items()))
            raise DistillError(
                f"the {name} term needs the teacher's {kind.replace('_', ' ')}; a cache holds only logits and tapped "
                f"features: give the teacher as a model"
            )
        for model, kinds in ((student, self._needs_outputs), (teacher, teacher_needs)):
            if kinds and isinstance(model, OutputsOnRequest):
                model.request_outputs(set(kinds))
        self._prepared = not (
            student_taps or teacher_taps or self._needs_outputs or any(_has_setup(term) for term in terms.values())
        )
        self._remembered: TeacherLogits | None = None  # see remember_teacher
        # the teacher's outputs alone are read: they may come from a copy with batch norms folded in
        self._may_fold_teacher = isinstance(teacher, nn.Module) and self._teacher_taps is None and not teacher_needs
        self._teacher_forward: list[nn.Module] = []  # that copy, made on first use (a list: not a submodule)
        if example_inputs is not None:
            self.prepare(example_inputs, example_index)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and any(term.needs_teacher for term in self.terms.values())

    def weight(self, name: str) -> float:
        """The current weight of term ``name`` (after any schedule)."""
        weight = self.weights[name]
        return weight(self.progress) if isinstance(weight, LinearWarmup) else weight

    @property
    def teacher_is_cached(self) -> bool:
        return self.teacher is not None and not isinstance(self.teacher, nn.Module)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        return self

    def state_dict_to_keep(self) -> dict[str, Tensor]:
        """The student's and the terms' state (adapters), without the frozen teacher's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters plus any learnable parts of the terms (e.g. adapters)."""
        yield from self.student.parameters()
        yield from self.terms.parameters()

    def _apply(self, fn, recurse: bool = True):  # .to(device) and the like: the folded copy is made again
        self._teacher_forward.clear()
        return super()._apply(fn, recurse)

    def _teacher_model(self, inputs: Inputs) -> nn.Module:
        """What computes the live teacher's outputs: when only its outputs are read (no taps, no
        hidden states), a copy with its batch norms folded into its convolutions
        (:func:`distill.core.fold.folded_batch_norms`: the same outputs, sooner), else the teacher."""
        if not self._teacher_forward:
            fold = self._may_fold_teacher
            self._teacher_forward.append(
                folded_batch_norms(self.teacher, take(inputs, slice(0, 2))) if fold else self.teacher
            )
        return self._teacher_forward[0]

    def _outputs(self, inputs: object, index: Tensor | None) -> tuple[ModelOutputs, ModelOutputs | None]:
        with _recording(self._student_taps) as features:
            student = outputs_of(call_model(self.student, inputs))
        student.features = features
        teacher = None
        signals = self._remembered if index is not None and self._remembered is not None else None
        if self.uses_teacher and (signals is not None or self.teacher_is_cached):
            if index is None:
                raise ValueError("the teacher is a cache: pass index= (the samples' positions in the cached split)")
            device = next(self.student.parameters(), torch.empty(0)).device
            teacher = (signals or self.teacher).lookup(index, device=device)
        elif self.uses_teacher:
            with torch.no_grad(), _recording(self._teacher_taps) as features:
                teacher = outputs_of(call_model(self._teacher_model(inputs), inputs))
            teacher.features = features
        return student, teacher

    def prepare(self, example_inputs: object, example_index: Tensor | None = None) -> None:
        """Build the terms' shape-dependent parts (adapters) from one example batch; checks
        every tap and shape before training starts. Idempotent. With a cached teacher,
        ``example_index`` gives the example batch's positions (default: the first samples)."""
        if self._prepared:
            return
        if example_index is None and self.teacher_is_cached:
            example_index = torch.arange(batch_len(example_inputs))
        with probing(self.student), torch.no_grad():  # no batch-norm statistics are updated by the probe
            student, teacher = self._outputs(example_inputs, example_index)
        for role, taps, outputs in (("student", self._student_taps, student), ("teacher", self._teacher_taps, teacher)):
            missing = [name for name in (taps.names if taps else []) if outputs is None or name not in outputs.features]
            if missing:
                raise DistillError(
                    f"{role} module {missing[0]!r} did not run in the forward pass; tap a module that does"
                )
        for kind, name in self._needs_outputs.items():
            for role, outputs in (
                ("student", student),
                ("teacher", teacher if self.terms[name].needs_teacher else None),
            ):
                if outputs is not None and getattr(outputs, kind) is None:
                    raise DistillError(
                        f"the {name} term reads the {role}'s {kind.replace('_', ' ')}, which the {role} model does not "
                        f"return; use a Hugging Face model (task: text_classification) or return ModelOutputs({kind}=...)"
                    )
        for term in self.terms.values():
            term.setup(student, teacher)
        device = next(self.student.parameters(), torch.empty(0)).device
        self.terms.to(device)
        self._prepared = True

    def can_remember_teacher(self) -> bool:
        """A live teacher whose logits or embeddings are all the terms read (no feature taps,
        hidden states, attention maps)."""
        return (
            self.uses_teacher
            and not self.teacher_is_cached
            and self._teacher_taps is None
            and set(self._needs_outputs) <= REMEMBERED_OUTPUTS
        )

    def remember_teacher(
        self, inputs: Inputs, batch_size: int, max_bytes: int | None = None, order: Tensor | None = None
    ) -> bool:
        """Run the live teacher once over ``inputs`` (the training split, in order) and answer every
        later batch from memory by the samples' positions (``forward(..., index=)``).

        Why: the teacher is frozen and in eval mode, so while a sample's input is the same every
        epoch (no augmentation), so are its outputs; every epoch after the first then skips the
        teacher's forward pass, which is most of a distillation step. The outputs are those of the
        same forward passes (on this machine's CPU, bit for bit: a sample's logits do not depend on
        the batch it runs in). Not done with teacher feature taps (features are not kept), nor when
        the logits would take more than ``max_bytes``. ``order`` is the order to batch the samples
        in (texts sorted by length waste less on padding). Returns whether the teacher is remembered.
        """
        if not self.can_remember_teacher():
            return False
        device = next(self.student.parameters(), torch.empty(0)).device

        def kept(inputs: Inputs) -> list[Tensor | None]:
            inputs = to_device(inputs, device)
            out = outputs_of(call_model(self._teacher_model(inputs), inputs))
            return [out.logits, out.embedding if "embedding" in self._needs_outputs else None]

        with torch.no_grad():
            first = [t for t in kept(take(inputs, slice(0, 1))) if t is not None]
            per_sample = sum(t.numel() * t.element_size() for t in first)
            if first and first[0].dim() >= 3 and isinstance(inputs, Mapping):  # per position: as wide as the widest row
                width = max((v.shape[1] for v in inputs.values() if isinstance(v, Tensor) and v.dim() == 2), default=0)
                per_sample = per_sample * max(width, first[0].shape[1]) // first[0].shape[1]
            if max_bytes is not None and batch_len(inputs) * per_sample > max_bytes:
                return False
            n = batch_len(inputs)
            index = torch.arange(n) if order is None else order
            parts = [kept(take(inputs, index[i : i + batch_size])) for i in range(0, n, batch_size)]
            parts = _same_width(parts)
            restore = torch.argsort(index)
            logits, embedding = (
                torch.cat([p[j] for p in parts])[restore] if parts and parts[0][j] is not None else None
                for j in range(2)
            )
            self._remembered = TeacherLogits(logits, embedding)
        return True

    def forget_teacher(self) -> None:
        """Run the live teacher on every batch again (after :meth:`remember_teacher`)."""
        self._remembered = None

    def remove_taps(self) -> None:
        """Remove the forward hooks this Distiller put on student and teacher, and stop asking them
        for intermediate outputs (a model is timed and exported as it would run alone)."""
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        for model in (self.student, self.teacher):
            if self._needs_outputs and isinstance(model, OutputsOnRequest):
                model.request_outputs(set())

    def weighted_sum(self, values: Mapping[str, Tensor], factors: Mapping[str, float] | None = None) -> Tensor:
        """The loss: the terms' values times their weights (and times ``factors``, which a
        distributed run uses to weight each process's share; see :mod:`distill.train.loop`)."""
        return sum(  # type: ignore[return-value]
            self.weight(name) * value * (factors[name] if factors is not None else 1.0)
            for name, value in values.items()
        )

    def forward(
        self,
        inputs: object,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        index: Tensor | None = None,
        mix: tuple[Tensor, Tensor] | None = None,
    ) -> DistillOutput:
        """The weighted loss of one batch. ``index`` (positions of the samples in the training
        split) is needed only when the teacher is a cache; ``mix`` (partner labels, own share)
        only for mixed images (:class:`~distill.core.losses.base.Batch`)."""
        if not self._prepared:
            raise RuntimeError(
                "some terms build adapters from example shapes: call distiller.prepare(example_inputs) "
                "(or pass example_inputs=...) before creating the optimiser"
            )
        student, teacher = self._outputs(inputs, index)
        batch, teacher = fit_positions(student, teacher, Batch(inputs=inputs, labels=labels, mask=mask, mix=mix))
        values = {name: term(student, teacher, batch) for name, term in self.terms.items()}
        loss = self.weighted_sum(values)
        return DistillOutput(
            loss=loss,
            terms={name: value.detach() for name, value in values.items()},
            student=student,
            teacher=teacher,
            values=values,
            batch=batch,
        )
