"""Model sizes: width multipliers, parameter counts, and assistants sized between teacher and student.

A teacher-assistant chain (Mirzadeh et al., 2020) needs models whose sizes lie between the
teacher's and the student's. :func:`assistant_specs` chooses them automatically: parameter
counts geometrically spaced strictly between the two, depth interpolated between theirs, the
rest of the architecture taken from the model nearest in depth (a 2-block assistant between a
3-block teacher and a 2-block student pools like the student), and widths scaled (one
multiplier per assistant, found by bisection) to hit each target count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from distill.core.errors import DistillError
from distill.tasks.models import CNNSpec, FactorySpec, MLPSpec, build_model, count_parameters

BuiltIn = CNNSpec | MLPSpec
Spec = CNNSpec | MLPSpec | FactorySpec


def scale_width(spec: Spec, multiplier: float, field: str = "student") -> BuiltIn:
    """``spec`` with every channel count and hidden width multiplied by ``multiplier`` (at least 1)."""
    if multiplier <= 0:
        raise DistillError(f"{field}: width multiplier must be positive, got {multiplier}")
    widen = lambda width: max(1, round(width * multiplier))  # noqa: E731
    if isinstance(spec, CNNSpec):
        return spec.model_copy(
            update={"channels": [widen(c) for c in spec.channels], "hidden": widen(spec.hidden) if spec.hidden else 0}
        )
    if isinstance(spec, MLPSpec):
        return spec.model_copy(update={"hidden": [widen(h) for h in spec.hidden]})
    raise DistillError(
        f"{field}: widths can only be scaled for the built-in cnn and mlp models, not a factory; list the models explicitly"
    )


def param_count(spec: Spec, in_shape: Sequence[int], num_classes: int, field: str = "model") -> int:
    return count_parameters(build_model(spec, in_shape, num_classes, field))


def describe(spec: Spec) -> str:
    """A short human label: ``cnn[8,16] h32 pool3``, ``mlp[256,128]``, ``factory pkg.mod:fn``."""
    if isinstance(spec, CNNSpec):
        pool = f" pool{spec.pool}" if spec.pool != 1 else ""
        return f"cnn[{','.join(map(str, spec.channels))}] h{spec.hidden}{pool}"
    if isinstance(spec, MLPSpec):
        return f"mlp[{','.join(map(str, spec.hidden))}]"
    return f"factory {spec.factory}"


def slug(spec: Spec) -> str:
    """``describe`` as a directory name: ``cnn-8-16-h32-pool3``."""
    text = describe(spec).replace("[", "-").replace("]", "").replace(",", "-").replace(" ", "-")
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")


def _depth(spec: BuiltIn) -> int:
    return len(spec.channels) if isinstance(spec, CNNSpec) else len(spec.hidden)


def _template(teacher: BuiltIn, student: BuiltIn, depth: int) -> BuiltIn:
    """An architecture with ``depth`` layers to be scaled in width: the model nearest in depth
    (ties: the teacher) gives everything but the depth (a CNN's pooling, batch-norm, dropout,
    hidden width) and its layer widths if it has enough layers; else the deeper model's."""
    near = teacher if abs(_depth(teacher) - depth) <= abs(_depth(student) - depth) else student
    deeper = teacher if _depth(teacher) >= _depth(student) else student
    source = near if _depth(near) >= depth else deeper
    if isinstance(near, CNNSpec):
        return near.model_copy(update={"channels": list(source.channels[:depth])})
    return near.model_copy(update={"hidden": list(source.hidden[:depth])})


def _fit_width(template: BuiltIn, target: float, in_shape: Sequence[int], num_classes: int) -> BuiltIn:
    """Scale ``template``'s widths so that its parameter count is as close to ``target`` as the
    integer widths allow (closest in ratio). The count never decreases with the multiplier."""

    def count(m: float) -> int:
        return param_count(scale_width(template, m), in_shape, num_classes)

    low, high = 1.0, 1.0
    for _ in range(40):  # bracket the target; doubling stops as soon as it is passed
        if count(high) >= target:
            break
        high *= 2
    for _ in range(40):
        if count(low) < target:
            break
        low /= 2
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if count(middle) < target else (low, middle)
    best = min((low, high), key=lambda m: abs(math.log(count(m) / target)))
    return scale_width(template, best)


def assistant_specs(
    teacher: Spec,
    student: Spec,
    count: int,
    in_shape: Sequence[int],
    num_classes: int,
    field: str = "chain.assistants",
) -> list[BuiltIn]:
    """``count`` assistant models between ``teacher`` and ``student``, in chain order (largest
    first). Their parameter counts are geometrically spaced: assistant i of k (counted from the
    student) aims at ``P_s · (P_t / P_s) ** (i / (k + 1))``; all lie strictly between ``P_s`` and
    ``P_t`` and strictly decrease along the chain, or this raises a DistillError."""
    if isinstance(teacher, FactorySpec) or isinstance(student, FactorySpec) or type(teacher) is not type(student):
        raise DistillError(
            f"{field}: automatic assistant sizes need a teacher and a student of the same built-in arch "
            f"(cnn or mlp), got {teacher.arch} and {student.arch}; list the assistants in chain.assistant_models"
        )
    p_student = param_count(student, in_shape, num_classes, "student")
    p_teacher = param_count(teacher, in_shape, num_classes, "teacher.model")
    if p_teacher <= p_student:
        raise DistillError(
            f"{field}: the teacher ({p_teacher:,} parameters) is not larger than the student ({p_student:,}); "
            f"a chain bridges the gap from a larger teacher to a smaller student"
        )
    specs = []
    for i in range(1, count + 1):
        fraction = i / (count + 1)
        target = p_student * (p_teacher / p_student) ** fraction
        depth = math.floor(_depth(student) + fraction * (_depth(teacher) - _depth(student)) + 0.5)
        specs.append(_fit_width(_template(teacher, student, depth), target, in_shape, num_classes))
    counts = [p_student] + [param_count(s, in_shape, num_classes) for s in specs] + [p_teacher]
    if any(a >= b for a, b in zip(counts, counts[1:], strict=False)):
        raise DistillError(
            f"{field}: cannot fit {count} assistant(s) of distinct sizes strictly between the student "
            f"({p_student:,} parameters) and the teacher ({p_teacher:,}); ask for fewer or list them in chain.assistant_models"
        )
    return specs[::-1]
