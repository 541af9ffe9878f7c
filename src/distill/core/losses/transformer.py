"""Intermediate-layer distillation for transformers: TinyBERT, DistilBERT and MiniLM.

These terms read ``ModelOutputs.hidden_states`` (the embedding output, then one ``[batch, seq,
hidden]`` per layer) and ``attentions`` (one ``[batch, heads, seq, seq]`` per layer), which the
Distiller asks the models for. Padding never counts: the positions come from the batch's
``attention_mask`` (a mapping input), cut to the sequence length the models actually ran.

Layer maps pair student layer ``j`` (1-based, as in the papers) with teacher layer ``map[j-1]``;
by default uniformly (TinyBERT's ``g(m) = m · N / M``), so the last student layer learns from the
last teacher layer.

- ``tinybert_embedding``: MSE between embedding outputs, through a learned projection when widths
  differ (Jiao et al. 2020, eq. 9).
- ``tinybert_hidden``: MSE between mapped layers' hidden states, through one learned projection
  shared by all layers (eq. 8).
- ``tinybert_attention``: the attention distributions of mapped layers, KL (default, as MiniLM)
  or MSE (TinyBERT, eq. 7), per head and query position.
- ``distilbert_cosine``: 1 − cosine between the last hidden states (Sanh et al. 2019).
- ``minilm_attention``: KL between the last layers' attention distributions (Wang et al. 2020).
- ``minilm_relation``: the self-relation of a tapped projection (values for MiniLM's value
  relation; queries, keys or values for MiniLMv2), split into ``relation_heads`` heads that need
  not match either model's, KL per head and query (Wang et al. 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.losses.base import (
    Batch,
    LossTerm,
    ModelOutputs,
    TappedPairParams,
    TappedPairTerm,
    TermParams,
    masked_mean,
    register_term,
)


def token_mask(batch: Batch, length: int) -> Tensor | None:
    """Which positions count, ``[batch, length]``: the inputs' ``attention_mask`` cut to the
    length the models ran (they may drop the columns no sequence of the batch needs)."""
    inputs = batch.inputs
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        return inputs["attention_mask"][:, :length].bool()
    return batch.mask[:, :length].bool() if batch.mask is not None and batch.mask.dim() == 2 else None


def token_rows(batch: Batch) -> int | None:
    """How many positions a token-averaged term averages over (for distributed share weighting)."""
    inputs = batch.inputs
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(batch.mask.sum()) if batch.mask is not None else None


class TokenTerm(LossTerm):
    """A term whose value is a mean over the batch's counted token positions."""

    def rows(self, batch: Batch) -> int | None:
        return token_rows(batch)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer: ``j · N / M`` rounded down, the last to the last."""
    return [max(1, (j * teacher_layers) // student_layers) for j in range(1, student_layers + 1)]


def resolve_layer_map(layer_map: list[int] | None, student_layers: int, teacher_layers: int, term: str) -> list[int]:
    chosen = layer_map if layer_map is not None else uniform_layer_map(student_layers, teacher_layers)
    if len(chosen) != student_layers:
        raise DistillError(
            f"distill.terms: {term}.layer_map has {len(chosen)} entries but the student has {student_layers} layers; "
            f"give one teacher layer per student layer"
        )
    bad = [t for t in chosen if not 1 <= t <= teacher_layers]
    if bad:
        raise DistillError(
            f"distill.terms: {term}.layer_map names teacher layer {bad[0]}; the teacher has layers 1..{teacher_layers}"
        )
    return list(chosen)


def _layers(outputs: ModelOutputs, kind: str, term: str, role: str) -> tuple[Tensor, ...]:
    value = getattr(outputs, kind)
    if value is None:
        raise DistillError(f"the {term} term needs the {role}'s {kind.replace('_', ' ')}")
    return value


class LayerMapParams(TermParams):
    layer_map: list[int] | None = Field(
        None, description="teacher layer (1-based) for each student layer; default uniform, last to last"
    )


class _Projected(TokenTerm):
    """A term that compares student and teacher hidden states through one learned projection
    (built in ``setup`` when the widths differ; the identity otherwise)."""

    needs_outputs: ClassVar[frozenset[str]] = frozenset({"hidden_states"})

    def __init__(self) -> None:
        super().__init__()
        self.projection: nn.Module = nn.Identity()

    def setup(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        if teacher is None:
            return
        s_width = _layers(student, "hidden_states", self.name, "student")[0].shape[-1]
        t_width = _layers(teacher, "hidden_states", self.name, "teacher")[0].shape[-1]
        if s_width != t_width:
            self.projection = nn.Linear(s_width, t_width)

    def mse(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:
        """The mean squared difference per position (TinyBERT's ``MSE``), averaged over counted positions."""
        per_position = (self.projection(student) - teacher.detach()).pow(2).mean(-1)
        return masked_mean(per_position, token_mask(batch, per_position.shape[1]))


@register_term("tinybert_embedding")
class TinyBERTEmbedding(_Projected):
    """MSE between the student's and the teacher's embedding-layer outputs (learned projection)."""

    summary = "TinyBERT embedding-layer MSE (learned projection)"

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s = _layers(student, "hidden_states", self.name, "student")[0]
        t = _layers(teacher, "hidden_states", self.name, "teacher")[0]
        return self.mse(s, t, batch)


@register_term("tinybert_hidden")
class TinyBERTHidden(_Projected):
    """MSE between mapped layers' hidden states, averaged over the student's layers."""

    summary = "TinyBERT hidden-state MSE over mapped layers (learned projection)"
    Params: ClassVar[type[TermParams]] = LayerMapParams

    def __init__(self, layer_map: list[int] | None = None) -> None:
        super().__init__()
        self.layer_map = layer_map

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s = _layers(student, "hidden_states", self.name, "student")
        t = _layers(teacher, "hidden_states", self.name, "teacher")
        pairs = resolve_layer_map(self.layer_map, len(s) - 1, len(t) - 1, self.name)
        return torch.stack([self.mse(s[j], t[i], batch) for j, i in enumerate(pairs, start=1)]).mean()


class AttentionParams(LayerMapParams):
    loss: Literal["kl", "mse"] = Field("kl", description="kl: KL(teacher ‖ student) per query; mse: TinyBERT's")


def attention_loss(student: Tensor, teacher: Tensor, mask: Tensor | None, loss: str = "kl") -> Tensor:
    """Distance between attention distributions ``[batch, heads, seq, seq]``, averaged over heads
    and counted query positions. KL sums over keys; padded keys carry no probability anyway."""
    if student.shape != teacher.shape:
        raise DistillError(
            f"attention maps differ in shape: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            f"attention transfer needs the same number of heads"
        )
    teacher = teacher.detach().float()
    student = student.float()
    if loss == "kl":
        per_query = (teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(-1)
    else:
        per_query = (student - teacher).pow(2).mean(-1)
    per_query = per_query.mean(1)  # over heads: [batch, seq]
    return masked_mean(per_query, mask)


@register_term("tinybert_attention")
class TinyBERTAttention(TokenTerm):
    """The attention distributions of mapped layers (same head count), KL or MSE."""

    summary = "TinyBERT attention transfer over mapped layers (KL or MSE)"
    Params: ClassVar[type[TermParams]] = AttentionParams
    needs_outputs: ClassVar[frozenset[str]] = frozenset({"attentions"})

    def __init__(self, layer_map: list[int] | None = None, loss: str = "kl") -> None:
        super().__init__()
        self.layer_map, self.loss = layer_map, loss

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s = _layers(student, "attentions", self.name, "student")
        t = _layers(teacher, "attentions", self.name, "teacher")
        pairs = resolve_layer_map(self.layer_map, len(s), len(t), self.name)
        mask = token_mask(batch, s[0].shape[-1])
        return torch.stack([attention_loss(s[j - 1], t[i - 1], mask, self.loss) for j, i in enumerate(pairs, 1)]).mean()


@register_term("minilm_attention")
class MiniLMAttention(TokenTerm):
    """KL between the last layers' self-attention distributions (MiniLM's first half)."""

    summary = "MiniLM last-layer attention KL"
    needs_outputs: ClassVar[frozenset[str]] = frozenset({"attentions"})

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s = _layers(student, "attentions", self.name, "student")[-1]
        t = _layers(teacher, "attentions", self.name, "teacher")[-1]
        return attention_loss(s, t, token_mask(batch, s.shape[-1]))


@register_term("distilbert_cosine")
class DistilBERTCosine(_Projected):
    """1 − cosine between the student's and the teacher's last hidden states, per counted token."""

    summary = "DistilBERT cosine loss between last hidden states"

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s = self.projection(_layers(student, "hidden_states", self.name, "student")[-1])
        t = _layers(teacher, "hidden_states", self.name, "teacher")[-1].detach()
        per_token = 1 - F.cosine_similarity(s.float(), t.float(), dim=-1)
        return masked_mean(per_token, token_mask(batch, per_token.shape[1]))


class RelationParams(TappedPairParams):
    student: str = Field(description="student module whose output is related to itself, e.g. the last layer's value")
    teacher: str = Field(description="teacher module, e.g. encoder.layer.5.attention.self.value")
    relation_heads: int = Field(12, gt=0, description="heads the projections are split into (MiniLMv2: any number)")


def self_relation(x: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """``softmax(A Aᵀ / √d)`` per relation head, ``[batch, heads, seq, seq]``, padded keys excluded."""
    batch, seq, width = x.shape
    if width % heads:
        raise DistillError(f"a width of {width} cannot be split into {heads} relation heads; choose a divisor")
    a = x.float().view(batch, seq, heads, width // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :seq], float("-inf"))
    return scores.softmax(-1)


@register_term("minilm_relation")
class MiniLMRelation(TappedPairTerm, TokenTerm):
    """KL between the teacher's and the student's self-relations of a tapped projection."""

    summary = "MiniLM(v2) self-relation KL of tapped queries, keys or values"
    Params: ClassVar[type[TermParams]] = RelationParams

    def __init__(self, student: str, teacher: str, relation_heads: int = 12) -> None:
        super().__init__(student, teacher)
        self.relation_heads = relation_heads

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> Tensor:
        s, t = self.pair(student, teacher)
        mask = token_mask(batch, s.shape[1])
        return attention_loss(
            self_relation(s, self.relation_heads, mask), self_relation(t, self.relation_heads, mask), mask
        )
