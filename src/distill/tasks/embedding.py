"""Sentence embeddings: a smaller encoder that places texts where the teacher places them.

The teacher is a ready encoder (``teacher: {kind: hf, path}``, e.g. ``builtin:all-MiniLM-L6-v2``);
models return the mean of their last hidden states over real tokens (sentence-transformers' mean
pooling). There are no labels to train on alone, so runs have no scratch baseline; students are
scored against the teacher on held-out texts:

- ``spearman`` (primary): Spearman correlation between the student's and the teacher's cosine
  similarities over every pair of texts;
- ``recall_at_10``: how many of each text's 10 nearest neighbours under the teacher the student
  finds too;
- ``linear_probe``: 5-fold cross-validated accuracy of a logistic regression on the frozen
  embeddings of the split's labeled texts (what the embedding is worth to a downstream classifier).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.evaluate import predict
from distill.core.inputs import Inputs, call_model
from distill.core.losses.base import outputs_of
from distill.tasks.base import register_task
from distill.tasks.hf import HFModel, HFSpec, load_encoder
from distill.tasks.text import TextClassification

MAX_PAIRS_SAMPLES = 2000  # the pairwise scores use at most this many texts (4M pairs)


def pair_cosines(embeddings: Tensor) -> Tensor:
    """Cosine similarity of every pair ``i < j``, flattened."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(len(unit), len(unit), offset=1)
    return sims[i, j]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties broken by position, which continuous scores never need)."""
    if len(a) < 2:
        return float("nan")
    ranks = [
        torch.empty_like(x, dtype=torch.float64).scatter_(0, x.argsort(), torch.arange(len(x), dtype=torch.float64))
        for x in (a, b)
    ]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def recall_at_k(student: Tensor, teacher: Tensor, k: int = 10) -> float:
    """Mean share of each row's ``k`` nearest neighbours (cosine, itself excluded) under the
    teacher that are among its ``k`` nearest under the student."""
    n = len(student)
    k = min(k, n - 1)
    if k < 1:
        return float("nan")

    def neighbours(e: Tensor) -> Tensor:
        unit = torch.nn.functional.normalize(e.float(), dim=-1)
        sims = unit @ unit.T
        sims.fill_diagonal_(-float("inf"))
        return sims.topk(k, dim=-1).indices

    ours, theirs = neighbours(student), neighbours(teacher)
    hits = (ours.unsqueeze(-1) == theirs.unsqueeze(-2)).any(-1).sum(-1)
    return float(hits.float().mean() / k)


def linear_probe(embeddings: Tensor, labels: Tensor, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic regression on frozen embeddings (labeled rows only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    keep = labels >= 0
    x, y = embeddings[keep].float().numpy(), labels[keep].numpy()
    if len(np.unique(y)) < 2:
        return float("nan")
    folds = min(folds, int(np.bincount(y).min()))
    if folds < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes on tiny splits
        scores = cross_val_score(
            LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)
        )
    return float(scores.mean())


@register_task("text_embedding")
class TextEmbedding(TextClassification):
    """Sentence-embedding students of a Hugging Face encoder, scored against the teacher. The data,
    students (cut, fresh or another directory), latency inputs and export are text classification's;
    the models are encoders and the scores are measured against the teacher's embeddings."""

    primary_metric = "spearman"
    higher_is_better = True
    primary_percent = False
    has_logits = False
    trains_on_labels = False
    cacheable = False

    def load_model(self, spec: HFSpec, data: DataBundle, field: str) -> HFModel:
        """A model directory as a sentence encoder (its base model; any head is left out)."""
        return load_encoder(spec, field)

    def check_outputs(self, model: nn.Module, data: DataBundle, field: str) -> None:
        model.eval()
        with torch.inference_mode():
            outputs = outputs_of(call_model(model, self.example_inputs(data)))
        if outputs.embedding is None:
            raise DistillError(f"{field}: the model returns no embedding; task text_embedding needs an encoder")

    def predict(
        self, model: nn.Module, x: Inputs, device: torch.device | str = "cpu", labels=None, reference=None
    ) -> Tensor:
        return predict(
            model.to(device), x, 64, device, self.eval_order(x), output=lambda out: outputs_of(out).embedding
        )

    def metrics(self, logits: Tensor, split: Split, reference: Tensor | None = None) -> dict[str, float]:
        scores = {"linear_probe": linear_probe(logits, split.y)}
        if reference is not None:
            student, teacher = logits[:MAX_PAIRS_SAMPLES], reference[:MAX_PAIRS_SAMPLES]
            scores["spearman"] = spearman(pair_cosines(student), pair_cosines(teacher))
            scores["recall_at_10"] = recall_at_k(student, teacher)
        return scores
