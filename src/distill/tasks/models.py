"""Built-in image models (small CNNs and MLPs) and user factories named ``package.module:function``.

Module names are stable (``features.0``, ``features.1``, ``head``) so later feature taps can
name them in configs.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distill.core.errors import DistillError
from distill.core.memory import ModelSize, available_memory, format_bytes, measure
from distill.tasks.hf import HF_SPECS, FromTeacherSpec, HFConfigSpec, HFSpec


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CNNSpec(_Spec):
    """Conv blocks (3×3 conv, optional batch-norm, ReLU, 2×2 max-pool), then a pooled classifier."""

    arch: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32, 64], min_length=1)
    hidden: int = Field(128, ge=0, description="width of the hidden fully-connected layer; 0 = none")
    pool: int = Field(1, ge=1, description="spatial size after the final adaptive average pool")
    batch_norm: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)


class MLPSpec(_Spec):
    """Flatten, then fully-connected layers with ReLU."""

    arch: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [256])
    dropout: float = Field(0.0, ge=0, lt=1)


class FactorySpec(_Spec):
    """Any model: ``factory(in_shape=..., num_classes=..., **kwargs)`` from ``package.module:function``;
    ``in_shape`` and ``num_classes`` are passed only if the function's signature takes them."""

    arch: Literal["factory"] = "factory"
    factory: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    path: Path | None = Field(
        None,
        description="folder searched first for the factory's module (default: the config file's folder), "
        "then the working directory, then sys.path",
    )


ModelSpec = Annotated[
    CNNSpec | MLPSpec | FactorySpec | HFSpec | FromTeacherSpec | HFConfigSpec, Field(discriminator="arch")
]


class SmallCNN(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, spec: CNNSpec, field: str = "model") -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise DistillError(
                f"{field}: the cnn model needs image inputs [C, H, W], but the data has shape {list(in_shape)}"
            )
        blocks, in_ch, size = [], in_shape[0], min(in_shape[1:])
        for out_ch in spec.channels:
            layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not spec.batch_norm)]
            if spec.batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if size >= 4:  # pool while the feature map is still large enough
                layers.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(spec.pool)
        flat = in_ch * spec.pool * spec.pool
        head: list[nn.Module] = [nn.Flatten()]
        if spec.dropout:
            head.append(nn.Dropout(spec.dropout))
        if spec.hidden:
            head += [nn.Linear(flat, spec.hidden), nn.ReLU(inplace=True)]
            flat = spec.hidden
        head.append(nn.Linear(flat, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class MLP(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, spec: MLPSpec) -> None:
        super().__init__()
        width = 1
        for dim in in_shape:
            width *= dim
        layers: list[nn.Module] = [nn.Flatten()]
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def load_factory(path: str, field: str = "factory", folder: Path | None = None):
    """Import ``package.module:function``, looking in ``folder`` first, then the working directory,
    then ``sys.path``; a missing module or name is a DistillError."""
    module_name, _, attr = path.partition(":")
    searched = [str(p) for p in (folder, Path.cwd()) if p is not None]
    saved = list(sys.path)
    sys.path[:0] = [p for p in searched if p not in sys.path]
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        where = ", ".join(searched + ["sys.path"])
        raise DistillError(
            f"{field}: cannot import module {module_name!r} ({err}); looked in {where}; "
            f"put {module_name.split('.')[0]}.py beside the config or set the factory's path"
        ) from err
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise DistillError(f"{field}: importing {module_name!r} failed: {type(err).__name__}: {err}") from err
    finally:
        sys.path[:] = saved
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DistillError(f"{field}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DistillError(f"{field}: {path} is not callable")
    return obj


def _accepted(function, offered: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``offered`` that ``function``'s signature takes (all of them with ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: offer everything
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return offered
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in offered.items() if key in names}


def _construct(
    spec: CNNSpec | MLPSpec | FactorySpec, in_shape: Sequence[int], num_classes: int, field: str
) -> nn.Module:
    if isinstance(spec, CNNSpec):
        return SmallCNN(in_shape, num_classes, spec, field)
    if isinstance(spec, MLPSpec):
        return MLP(in_shape, num_classes, spec)
    factory = load_factory(spec.factory, f"{field}.factory", spec.path)
    offered = _accepted(factory, {"in_shape": tuple(in_shape), "num_classes": num_classes})
    try:
        model = factory(**offered, **spec.kwargs)
    except Exception as err:  # noqa: BLE001 - report the user's factory failure in one line
        raise DistillError(f"{field}.factory: calling {spec.factory} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise DistillError(f"{field}: {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def size_model(
    spec: CNNSpec | MLPSpec | FactorySpec, in_shape: Sequence[int], num_classes: int, field: str = "model"
) -> ModelSize | None:
    """The model's parameters and weight bytes, from a build on the meta device (nothing allocated);
    None for a factory that cannot build there, and for Hugging Face models (their files say it)."""
    if isinstance(spec, HF_SPECS):
        return None
    return measure(lambda: _construct(spec, in_shape, num_classes, field))


def size_field(spec: CNNSpec | MLPSpec | FactorySpec, field: str, largest_param: str = "") -> str:
    """The setting that makes a model big, for messages: ``student.hidden``, ``teacher.model.channels``."""
    if isinstance(spec, MLPSpec):
        return f"{field}.hidden"
    if isinstance(spec, CNNSpec):
        if largest_param.startswith("features"):
            return f"{field}.channels"
        return f"{field}.hidden" if spec.hidden else f"{field}.pool"
    return f"{field}.kwargs"


def build_model(
    spec: CNNSpec | MLPSpec | FactorySpec, in_shape: Sequence[int], num_classes: int, field: str = "model"
) -> nn.Module:
    """Build a model from its spec for inputs of ``in_shape`` and ``num_classes`` outputs.

    The model is sized on the meta device first: one whose weights alone exceed the memory this
    machine has available is refused before a byte is allocated."""
    size = size_model(spec, in_shape, num_classes, field)
    free = available_memory()
    if size is not None and free is not None and size.weight_bytes > free:
        raise DistillError(
            f"{size_field(spec, field, size.largest_param)}: the model has {size.params:,} parameters, "
            f"{format_bytes(size.weight_bytes)} of weights, more than the {format_bytes(free)} of memory available; "
            f"make it smaller"
        )
    return _construct(spec, in_shape, num_classes, field)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
