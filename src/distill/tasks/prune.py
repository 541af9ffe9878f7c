"""Prune, then distill (Minitron, Muralidharan et al. 2024): a student cut from the teacher in
width as well as depth.

The teacher's layers, attention heads (whole key/value groups under grouped-query attention), MLP
neurons and hidden (embedding) channels are ranked by how much they do on a few hundred
calibration samples, the least important are removed, and the result is a standard architecture
(a smaller ``BertConfig`` or ``LlamaConfig``) whose kept tensors are the teacher's own, copied
exactly. The run then heals it by distillation like any other student.

Importance, as Minitron measures it from activations:
- layers: block influence, 1 − cosine(block input, block output) (ShortGPT);
- heads: the mean L2 norm of each head's attention output (the input of the output projection);
- MLP neurons: the mean absolute activation entering the down projection;
- hidden channels: the mean absolute output of every layer norm, summed over the norms.

``method: random`` and ``method: first`` keep random or leading units instead: the baselines
that show what the ranking is worth.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.tasks.hf_layers import block_influence, cut_layers, decoder_layers

_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


class PruneSpec(BaseModel):
    """How much of the teacher a pruned student keeps: fractions per axis, or a parameter budget."""

    model_config = ConfigDict(extra="forbid")

    layers: float = Field(1.0, gt=0, le=1, description="fraction of the teacher's layers to keep")
    heads: float = Field(
        1.0, gt=0, le=1, description="fraction of attention heads to keep (key/value groups under GQA)"
    )
    mlp: float = Field(1.0, gt=0, le=1, description="fraction of MLP neurons (intermediate size) to keep")
    hidden: float = Field(1.0, gt=0, le=1, description="fraction of hidden (embedding) channels to keep")
    params: int | None = Field(
        None,
        gt=0,
        description="a parameter budget (e.g. 60M): the MLP and hidden widths shrink together until the "
        "student has at most this many parameters",
    )
    method: Literal["importance", "random", "first"] = Field(
        "importance", description="importance: rank units on calibration data; random / first: baselines"
    )
    seed: int = Field(0, description="the draw of method: random")

    @field_validator("params", mode="before")
    @classmethod
    def _parse_count(cls, value: Any) -> Any:
        """``60M``, ``1.5B``, ``500k`` or a plain number."""
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", value.replace("_", ""))
            if match is None:
                raise ValueError(f"{value!r} is not a parameter count (write e.g. 60M, 1.5B or 500000)")
            number, suffix = match.groups()
            return round(float(number) * _SUFFIXES.get(suffix.lower(), 1))
        return value

    @model_validator(mode="after")
    def _budget_or_widths(self) -> PruneSpec:
        if self.params is not None and (self.mlp != 1.0 or self.hidden != 1.0):
            raise ValueError("params sets the mlp and hidden widths itself; give params or mlp/hidden, not both")
        return self


# ---------------------------------------------------------------------------------------------
# Architectures: which dimension of which tensor is a head, a neuron or a hidden channel


@dataclass(frozen=True)
class Family:
    """Where a transformer family keeps its prunable units. Names are relative to one layer;
    each maps to the axis of every dimension (``q``: head dims of the queries, ``kv``: of the keys
    and values, ``mlp``: neurons, ``hidden``: channels, None: kept whole)."""

    name: str
    head_output: str  # the linear layer whose input is the concatenated head outputs
    mlp_output: str  # the linear layer whose input is the MLP neurons
    layer_axes: dict[str, tuple[str | None, ...]]
    grouped: bool  # grouped-query attention: heads are pruned by whole key/value groups


def _linear(name: str, out: str | None, into: str | None) -> dict[str, tuple[str | None, ...]]:
    return {f"{name}.weight": (out, into), f"{name}.bias": (out,)}


BERT = Family(
    "bert",
    head_output="attention.output.dense",
    mlp_output="output.dense",
    layer_axes={
        **_linear("attention.self.query", "q", "hidden"),
        **_linear("attention.self.key", "q", "hidden"),
        **_linear("attention.self.value", "q", "hidden"),
        **_linear("attention.output.dense", "hidden", "q"),
        "attention.output.LayerNorm.weight": ("hidden",),
        "attention.output.LayerNorm.bias": ("hidden",),
        **_linear("intermediate.dense", "mlp", "hidden"),
        **_linear("output.dense", "hidden", "mlp"),
        "output.LayerNorm.weight": ("hidden",),
        "output.LayerNorm.bias": ("hidden",),
    },
    grouped=False,
)

LLAMA = Family(
    "llama",
    head_output="self_attn.o_proj",
    mlp_output="mlp.down_proj",
    layer_axes={
        **_linear("self_attn.q_proj", "q", "hidden"),
        **_linear("self_attn.k_proj", "kv", "hidden"),
        **_linear("self_attn.v_proj", "kv", "hidden"),
        **_linear("self_attn.o_proj", "hidden", "q"),
        **_linear("mlp.gate_proj", "mlp", "hidden"),
        **_linear("mlp.up_proj", "mlp", "hidden"),
        **_linear("mlp.down_proj", "hidden", "mlp"),
        "input_layernorm.weight": ("hidden",),
        "post_attention_layernorm.weight": ("hidden",),
    },
    grouped=True,
)


def family_of(model: nn.Module, field: str) -> Family:
    """The family of a Hugging Face model, from its config's ``model_type`` and its layers' names."""
    _, _, layers = decoder_layers(model)
    names = {name for name, _ in layers[0].named_parameters()}
    for family in (BERT, LLAMA):
        if {f"{family.head_output}.weight", f"{family.mlp_output}.weight"} <= names:
            unknown = sorted(names - set(family.layer_axes))
            if unknown:
                raise DistillError(f"{field}.prune: cannot prune the width of {unknown[0]} ({family.name}-like layers)")
            return family
    raise DistillError(
        f"{field}.prune: width pruning knows BERT-like encoders and Llama-like decoders "
        f"(Llama, Mistral, Qwen2, SmolLM), not {model.config.model_type}; cut layers with layers/every/first instead"
    )


@dataclass
class Shape:
    """The prunable sizes of a configuration."""

    layers: int
    hidden: int
    heads: int  # attention heads
    groups: int  # key/value heads (= heads without grouped-query attention)
    head_dim: int
    mlp: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        groups = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, heads, groups, head_dim, config.intermediate_size)


# ---------------------------------------------------------------------------------------------
# Importance


@dataclass
class Importance:
    """How much every unit of the teacher does on the calibration data (higher: keep)."""

    layers: list[float]
    hidden: list[float]
    heads: list[list[float]]  # per layer, per head
    mlp: list[list[float]]  # per layer, per neuron
    method: str = "importance"

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "mlp": self.mlp,
        }


@torch.no_grad()
def measure_importance(model: nn.Module, inputs: dict[str, Tensor], batch_size: int = 16) -> Importance:
    """Activation-based importance of ``model``'s (an ``HFModel``) units on ``inputs``, averaged
    over real (unpadded) tokens."""
    family = family_of(model.model, "student")
    shape = Shape.of(model.config)
    _, _, layers = decoder_layers(model.model)
    mask_now: list[Tensor] = []
    heads = [torch.zeros(shape.heads, dtype=torch.float64) for _ in layers]
    mlp = [torch.zeros(shape.mlp, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(shape.hidden, dtype=torch.float64)

    def real(x: Tensor) -> Tensor:  # [tokens, ...] of the real tokens
        mask = mask_now[0][:, : x.shape[1]]
        return x[mask].double()

    def on_heads(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = real(args[0])
            heads[i].add_(x.view(len(x), shape.heads, shape.head_dim).norm(dim=-1).sum(0))

        return hook

    def on_mlp(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            mlp[i].add_(real(args[0]).abs().sum(0))

        return hook

    def on_norm(module: nn.Module, args: tuple, out: Tensor) -> None:
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() == 3 and out.shape[-1] == shape.hidden:
            hidden.add_(real(out).abs().sum(0))

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(family.head_output).register_forward_pre_hook(on_heads(i)))
        handles.append(layer.get_submodule(family.mlp_output).register_forward_pre_hook(on_mlp(i)))
    for module in model.model.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            handles.append(module.register_forward_hook(on_norm))
    mode = model.training
    model.eval()
    tokens = 0.0
    try:
        n = len(inputs["input_ids"])
        for start in range(0, n, batch_size):
            batch = {key: value[start : start + batch_size] for key, value in inputs.items()}
            mask = batch.get("attention_mask")
            mask_now[:] = [torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()]
            model(**batch)
            tokens += float(mask_now[0].sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(mode)
    influence = block_influence(model, inputs, batch_size)
    return Importance(
        layers=influence,
        hidden=(hidden / tokens).tolist(),
        heads=[(h / tokens).tolist() for h in heads],
        mlp=[(m / tokens).tolist() for m in mlp],
    )


_last_measured: list[tuple[tuple, Importance]] = []


def _remembered_importance(model: nn.Module, inputs: dict[str, Tensor]) -> Importance:
    """:func:`measure_importance`, measured once per teacher and calibration set: a run builds its
    student several times (checks, the scratch baseline, the distilled student)."""
    weights = tuple(float(p.detach().double().sum()) for p in list(model.parameters())[:4])  # id()s get reused
    key = (id(model), weights, tuple((k, tuple(v.shape), hash(v.numpy().tobytes())) for k, v in sorted(inputs.items())))
    if not _last_measured or _last_measured[0][0] != key:
        _last_measured[:] = [(key, measure_importance(model, inputs))]
    return _last_measured[0][1]


def baseline_importance(shape: Shape, method: str, seed: int) -> Importance:
    """Scores that make ``random`` keep a seeded random choice and ``first`` keep leading units."""
    generator = torch.Generator().manual_seed(seed)

    def scores(n: int) -> list[float]:
        if method == "random":
            return torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        return [float(n - i) for i in range(n)]  # first: leading units score highest

    return Importance(
        layers=scores(shape.layers),
        hidden=scores(shape.hidden),
        heads=[scores(shape.heads) for _ in range(shape.layers)],
        mlp=[scores(shape.mlp) for _ in range(shape.layers)],
        method=method,
    )


def top(scores: list[float] | Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in increasing index order (ties: the lower index)."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return sorted(order[:k])


# ---------------------------------------------------------------------------------------------
# Targets


def _count(total: int, fraction: float) -> int:
    return max(1, min(total, round(total * fraction)))


def target_shape(shape: Shape, spec: PruneSpec, family: Family, field: str) -> Shape:
    """The pruned sizes a spec's fractions ask for (before any parameter budget)."""
    units = shape.groups if family.grouped else shape.heads
    kept_units = _count(units, spec.heads)
    per_unit = shape.heads // units
    heads = kept_units * per_unit
    hidden = _count(shape.hidden, spec.hidden)
    if family.name == "bert":  # BertConfig derives the head size from hidden_size / heads: they move together
        if spec.heads != 1.0 and spec.hidden != 1.0 and hidden != heads * shape.head_dim:
            raise DistillError(
                f"{field}.prune: in a BERT-like model the hidden size is heads × head size ({shape.head_dim}); "
                "give heads or hidden, not both"
            )
        if spec.hidden != 1.0:
            heads = max(1, round(hidden / shape.head_dim))
            kept_units = heads
        hidden = heads * shape.head_dim
    return Shape(
        layers=_count(shape.layers, spec.layers),
        hidden=hidden,
        heads=heads,
        groups=kept_units if family.grouped else heads,
        head_dim=shape.head_dim,
        mlp=_count(shape.mlp, spec.mlp),
    )


def pruned_config(config: Any, shape: Shape, family: Family) -> Any:
    pruned = copy.deepcopy(config)
    pruned.num_hidden_layers = shape.layers
    pruned.hidden_size = shape.hidden
    pruned.num_attention_heads = shape.heads
    pruned.intermediate_size = shape.mlp
    if family.name == "llama":
        pruned.num_key_value_heads = shape.groups
        pruned.head_dim = shape.head_dim  # kept: a smaller hidden size does not shrink the heads
    return pruned


def parameter_count(model: nn.Module, config: Any) -> int:
    """Parameters of ``model``'s class built from ``config`` (on the meta device: nothing allocated);
    tied tensors count once."""
    with torch.device("meta"):
        built = type(model)(config)
    return sum(p.numel() for p in built.parameters())


def fit_budget(model: nn.Module, spec: PruneSpec, family: Family, field: str) -> Shape:
    """The widest student within ``spec.params`` parameters: the MLP and hidden widths shrink by
    one common fraction (the heads follow the hidden size in BERT-like models), then the MLP takes
    what is left, so one more neuron per layer would exceed the budget."""
    assert spec.params is not None
    budget, full = spec.params, Shape.of(model.config)

    def shape_at(fraction: float) -> Shape:
        return target_shape(full, spec.model_copy(update={"mlp": fraction, "hidden": fraction}), family, field)

    def size(shape: Shape) -> int:
        return parameter_count(model, pruned_config(model.config, shape, family))

    teacher = size(full)
    if budget >= teacher:
        raise DistillError(f"{field}.prune.params: {budget:,} is not below the teacher's {teacher:,} parameters")
    if size(shape_at(1e-9)) > budget:
        raise DistillError(
            f"{field}.prune.params: {budget:,} is below the smallest student these layers and heads allow "
            f"({size(shape_at(1e-9)):,}); prune more layers or heads, or raise the budget"
        )
    low, high = 1e-9, 1.0  # size(shape_at(low)) <= budget < size(shape_at(high))
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if size(shape_at(middle)) <= budget else (low, middle)
    best = shape_at(low)
    wider = Shape(**{**vars(best), "mlp": best.mlp + 1})
    per_neuron = size(wider) - size(best)  # parameters are linear in the MLP width
    best.mlp = min(full.mlp, best.mlp + (budget - size(best)) // per_neuron)
    return best


# ---------------------------------------------------------------------------------------------
# The cut


def _rows(units: list[int], size: int) -> Tensor:
    """The tensor rows of the kept ``units`` of ``size`` rows each (heads of ``head_dim``)."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


@dataclass
class Plan:
    """What a pruned student keeps of the teacher: layer indices, and per kept layer its heads and
    neurons, and the hidden channels (shared by every layer: the residual stream)."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    groups: list[list[int]]
    mlp: list[list[int]]

    def summary(self, shape: Shape, method: str) -> dict[str, Any]:
        return {
            "method": method,
            "kept_layers": self.layers,
            "hidden_size": shape.hidden,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.groups,
            "intermediate_size": shape.mlp,
        }


def plan(importance: Importance, full: Shape, target: Shape, family: Family) -> Plan:
    keep_layers = top(importance.layers, target.layers)
    per_group = full.heads // full.groups
    heads, groups = [], []
    for i in keep_layers:
        scores = importance.heads[i]
        if family.grouped:  # a key/value group and its query heads stay whole
            group_scores = [sum(scores[g * per_group : (g + 1) * per_group]) for g in range(full.groups)]
            kept_groups = top(group_scores, target.groups)
            groups.append(kept_groups)
            heads.append([g * per_group + j for g in kept_groups for j in range(per_group)])
        else:
            kept = top(scores, target.heads)
            heads.append(kept)
            groups.append(kept)
    return Plan(
        layers=keep_layers,
        hidden=top(importance.hidden, target.hidden),
        heads=heads,
        groups=groups,
        mlp=[top(importance.mlp[i], target.mlp) for i in keep_layers],
    )


def _layer_of(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix) :].partition(".")
    return int(index), rest


def copy_pruned(source: nn.Module, target: nn.Module, the_plan: Plan, full: Shape, family: Family) -> None:
    """Fill ``target`` (the pruned architecture) with the kept slices of ``source``'s tensors."""
    owner, attr, _ = decoder_layers(source)
    prefix = next(name for name, module in source.named_modules() if module is owner)
    prefix = f"{prefix}.{attr}." if prefix else f"{attr}."
    hidden = torch.tensor(the_plan.hidden)
    sources = source.state_dict()
    state = {}
    for name, tensor in target.state_dict().items():
        layer = _layer_of(name, prefix)
        if layer is not None:
            j, rest = layer
            i = the_plan.layers[j]
            original = sources[f"{prefix}{i}.{rest}"]
            axes = family.layer_axes.get(rest, (None,) * original.dim())
            index = {
                "hidden": hidden,
                "q": _rows(the_plan.heads[j], full.head_dim),
                "kv": _rows(the_plan.groups[j], full.head_dim),
                "mlp": torch.tensor(the_plan.mlp[j]),
            }
        else:
            original = sources[name]
            axes = tuple("hidden" if size == full.hidden else None for size in original.shape)
            index = {"hidden": hidden}
        value = original
        for dim, axis in enumerate(axes):
            if axis is not None and value.shape[dim] != tensor.shape[dim]:
                value = value.index_select(dim, index[axis])
        if value.shape != tensor.shape:
            raise DistillError(
                f"student.prune: cannot map the teacher's {name} {tuple(original.shape)} to {tuple(tensor.shape)}"
            )
        state[name] = value.clone()
    target.load_state_dict(state)


def prune_model(
    model: nn.Module, spec: PruneSpec, field: str, calibration: dict[str, Tensor] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned student of ``model`` (an ``HFModel``) and a record of what was kept and why
    (the importance scores; the choice is also written to the student's ``config.json`` as
    ``distill_pruning``)."""
    family = family_of(model.model, field)
    full = Shape.of(model.config)
    if spec.method == "importance":
        if calibration is None:
            raise DistillError(f"{field}.prune: method importance needs training data to measure the teacher on")
        importance = _remembered_importance(model, calibration)
    else:
        importance = baseline_importance(full, spec.method, spec.seed)
    target = target_shape(full, spec, family, field)
    if spec.params is not None:
        target = fit_budget(model.model, spec, family, field)
    the_plan = plan(importance, full, target, family)
    depth_cut = cut_layers(model.model, the_plan.layers)  # a copy with the kept layers, indices renumbered
    config = pruned_config(depth_cut.config, target, family)
    config.distill_pruning = the_plan.summary(target, spec.method)
    dtype = next(model.model.parameters()).dtype
    pruned = type(model.model)(config).to(dtype)
    depth_plan = Plan(list(range(target.layers)), the_plan.hidden, the_plan.heads, the_plan.groups, the_plan.mlp)
    copy_pruned(depth_cut, pruned, depth_plan, Shape.of(depth_cut.config), family)
    pruned.eval()
    record = {
        **config.distill_pruning,
        "teacher": {
            "layers": full.layers,
            "hidden_size": full.hidden,
            "num_attention_heads": full.heads,
            "num_key_value_heads": full.groups,
            "intermediate_size": full.mlp,
        },
        "parameters": {"teacher": _params(model.model), "student": _params(pruned)},
        "kept": {"hidden": the_plan.hidden, "heads": the_plan.heads, "mlp": the_plan.mlp},
        "importance": importance.as_dict(),
    }
    return model.rewrap(pruned).requires_grad_(True), record


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(record: dict[str, Any]) -> str:
    """One line: what the pruned student kept."""
    t = record["teacher"]
    return (
        f"pruned ({record['method']}): layers {len(record['kept_layers'])}/{t['layers']}, "
        f"hidden {record['hidden_size']}/{t['hidden_size']}, heads {record['num_attention_heads']}/"
        f"{t['num_attention_heads']} (key/value {record['num_key_value_heads']}/{t['num_key_value_heads']}), "
        f"MLP {record['intermediate_size']}/{t['intermediate_size']}; "
        f"{record['parameters']['student']:,} of {record['parameters']['teacher']:,} parameters"
    )
