"""Causal language models: students whose next-token distributions match the teacher's.

Teachers and students are local Hugging Face causal LMs (``AutoModelForCausalLM``): a model
directory, a student cut from the teacher's layers (embeddings, final norm and tied head copied),
or a fresh smaller configuration with the same tokenizer. Data are packed text blocks,
prompt/response pairs or chats (:mod:`distill.tasks.lm_data`); the mask says which positions
count. Scores on held-out text, over the counted positions:

- ``perplexity`` (primary, lower is better): exp of the mean next-token cross-entropy;
- ``token_accuracy``: how often the top-1 next token is the right one;
- ``agreement``: how often the top-1 next token is the teacher's;
- ``kl``: KL(teacher ‖ student) per position, over the teacher's top-:data:`REFERENCE_K` tokens
  plus one bucket for the rest of the vocabulary (the bucketed KL is a lower bound of the full
  one and close to it when the teacher's mass sits in its top tokens).

Predictions are per-position scores, not logits: ``[tokens, vocabulary]`` for a held-out split
would not fit in memory, so each batch's logits are reduced as soon as they are computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.data import DataBundle, Split
from distill.core.errors import DistillError
from distill.core.inputs import Inputs, batch_len, call_model, take, to_device
from distill.core.losses.base import Batch, logits_of
from distill.core.signals import TopKLogits
from distill.tasks.base import register_task
from distill.tasks.hf import FromTeacherSpec, HFCausalLM, HFConfigSpec, HFModel, HFSpec, fresh_student, load_causal_lm
from distill.tasks.lm_data import load_lm_data
from distill.tasks.lm_on_policy import OnPolicySpec, on_policy_batch
from distill.tasks.text import TextClassification, check_same_tokenizer
from distill.tasks.text_data import TextDataSpec

REFERENCE_K = 64
"""Teacher tokens per position kept to score students' KL against."""


@dataclass
class TokenScores:
    """Per-position scores of a model on a split (``[n, seq]``, and ``[n, seq, k]`` for the
    teacher's top tokens): what language-model metrics need, without the vocabulary."""

    label_logprob: Tensor
    argmax: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    kl: Tensor | None = None


def bucketed_kl(teacher_ids: Tensor, teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(teacher ‖ student) per position over the teacher's top tokens and one tail bucket.

    ``teacher_ids`` / ``teacher_logprobs``: ``[..., k]``; ``student_logprobs``: ``[..., vocab]``.
    """
    p = teacher_logprobs.double().exp()
    q_log = student_logprobs.gather(-1, teacher_ids).double()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_log.exp().sum(-1)).clamp_min(1e-30)
    head = (p * (teacher_logprobs.double() - q_log)).sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(p_tail))
    return (head + tail).clamp_min(0).float()


@torch.inference_mode()
def score_tokens(
    model: nn.Module,
    x: Inputs,
    labels: Tensor,
    reference: TokenScores | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    k: int = REFERENCE_K,
) -> TokenScores:
    """Run ``model`` over ``x`` batch by batch and keep per-position scores: the log-probability
    of each label, the top-1 token, and either the model's own top-``k`` (no ``reference``: it is
    the teacher) or its bucketed KL from the ``reference``'s top-``k``."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"label_logprob": [], "argmax": [], "top_ids": [], "top_logprobs": [], "kl": []}
    n = batch_len(x)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        logits = logits_of(call_model(model, to_device(take(x, rows), device))).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        width = logprobs.shape[1]  # batches are cut to their longest sequence
        y = labels[rows, :width].to(logprobs.device)
        picked = logprobs.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(y < 0, 0.0)
        parts["label_logprob"].append(_pad(picked.cpu(), labels.shape[1]))
        parts["argmax"].append(_pad(logprobs.argmax(-1).cpu(), labels.shape[1]))
        if reference is None:
            top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            parts["top_ids"].append(_pad(top.indices.cpu(), labels.shape[1]))
            parts["top_logprobs"].append(_pad(top.values.cpu(), labels.shape[1]))
        else:
            ids = reference.top_ids[rows, :width].to(logprobs.device)
            values = reference.top_logprobs[rows, :width].to(logprobs.device)
            parts["kl"].append(_pad(bucketed_kl(ids, values, logprobs).cpu(), labels.shape[1]))
    model.train(was_training)
    joined = {key: torch.cat(value) if value else None for key, value in parts.items()}
    return TokenScores(**joined)


def scores_from_signals(
    signals: TopKLogits, labels: Tensor, k: int = REFERENCE_K, label_logprobs: Tensor | None = None
) -> TokenScores:
    """:class:`TokenScores` of a teacher known only by its top-k signals ``[n, seq, k]`` (and, where
    the cache stores them, its log-probabilities of the labels ``[n, seq]``)."""
    logprobs = signals.values.float() - signals.logsumexp.unsqueeze(-1).float()
    y = labels.clamp_min(0).unsqueeze(-1)
    hit = signals.indices == y
    rest = max(signals.vocab_size - signals.k, 1)
    tail_each = signals.tail.float() - math.log(rest)  # the tail's mass shared evenly by the unseen tokens
    if label_logprobs is not None:
        label = label_logprobs.float().masked_fill(labels < 0, 0.0)
    else:
        label = torch.where(hit.any(-1), (logprobs * hit).sum(-1), tail_each).masked_fill(labels < 0, 0.0)
    order = logprobs.argsort(-1, descending=True)[..., :k]  # stored top-k need not be sorted
    return TokenScores(
        label_logprob=label,
        argmax=signals.indices.gather(-1, order[..., :1]).squeeze(-1).long(),
        top_ids=signals.indices.gather(-1, order).long(),
        top_logprobs=logprobs.gather(-1, order),
    )


PROMPT_TOKENS, NEW_TOKENS, SAMPLES = 32, 32, 3
"""Generation checks: held-out openings of this many tokens, continued greedily by this many."""


@torch.inference_mode()
def generate(model: nn.Module, prompts: Tensor, tokenizer, new_tokens: int) -> Tensor:
    """Greedy continuations of ``prompts`` ``[batch, length]`` (no padding) by a Hugging Face LM."""
    inner = model.model if isinstance(model, HFModel) else model
    inner.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return inner.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=pad,
    )  # fmt: skip


def generation_speed(
    model: nn.Module, prompts: Tensor, tokenizer, batches: tuple[int, ...] = (1, 8)
) -> dict[str, float]:
    """New tokens per second of greedy generation at each batch size (after one warm-up call)."""
    out = {}
    for batch in batches:
        rows = prompts[torch.arange(batch) % len(prompts)]
        generate(model, rows[:, :4], tokenizer, 2)  # warm-up
        started = time.perf_counter()
        generate(model, rows, tokenizer, NEW_TOKENS)
        out[str(batch)] = batch * NEW_TOKENS / (time.perf_counter() - started)
    return out


def sample_prompt(split: Split, row: int) -> Tensor:
    """The opening a generation sample continues: for prompt/response and chat rows the prompt
    (every token before the first counted position's target, so the model answers it), for packed
    text the first :data:`PROMPT_TOKENS` tokens. ``[1, length]``."""
    ids = split.x["input_ids"][row]
    counted = split.mask[row].nonzero() if split.mask is not None else None
    if counted is not None and len(counted) and int(counted[0]) > 0:  # a row whose start is not scored
        return ids[: int(counted[0]) + 1].unsqueeze(0)
    return ids[:PROMPT_TOKENS].unsqueeze(0)


def _pad(values: Tensor, width: int) -> Tensor:
    """``values`` ``[b, s, ...]`` padded with zeros to ``[b, width, ...]``."""
    if values.shape[1] == width:
        return values
    shape = (values.shape[0], width - values.shape[1], *values.shape[2:])
    return torch.cat([values, values.new_zeros(shape)], dim=1)


def token_metrics(scores: TokenScores, split: Split, reference: TokenScores | None = None) -> dict[str, float]:
    mask = split.mask.bool() if split.mask is not None else split.y >= 0
    count = int(mask.sum())
    if count == 0:
        return {"perplexity": float("nan"), "token_accuracy": float("nan")}
    nll = -scores.label_logprob[mask].double().mean()
    out = {
        "perplexity": float(nll.exp()),
        "token_accuracy": float((scores.argmax[mask] == split.y[mask]).float().mean()),
    }
    if reference is not None:
        out["agreement"] = float((scores.argmax[mask] == reference.argmax[mask]).float().mean())
        out["kl"] = float(scores.kl[mask].mean()) if scores.kl is not None else 0.0  # the teacher against itself
    return out


@register_task("causal_lm")
class CausalLM(TextClassification):
    """Next-token prediction with Hugging Face causal LMs, scored by held-out perplexity."""

    primary_metric = "perplexity"
    higher_is_better = False
    primary_percent = False
    has_logits = False  # per-token scores, not class logits: nothing per class
    cacheable = True  # per-position top-k signals (packed: only the positions that count)
    on_policy: OnPolicySpec | None = None  # set for the distilled student's training (distill.on_policy)

    def load_data(self, spec: Any) -> DataBundle:
        if not isinstance(spec, TextDataSpec):
            raise DistillError(
                "data.source: task causal_lm reads text (text_file, text_folder, jsonl, hf_disk, bbc_news)"
            )
        if spec.unit != "text" or spec.labeled is not None or spec.unlabeled is not None:
            field = "unit" if spec.unit != "text" else "labeled" if spec.labeled is not None else "unlabeled"
            raise DistillError(f"data.{field}: is for text classification and embeddings, not task causal_lm")
        return load_lm_data(spec)

    def load_model(self, spec: HFSpec, data: DataBundle, field: str) -> HFCausalLM:
        return load_causal_lm(spec, field, vocab=data.num_classes)

    def build_model(self, spec: Any, data: DataBundle, field: str, teacher: nn.Module | None = None) -> nn.Module:
        if isinstance(spec, HFConfigSpec):
            return fresh_student(spec, teacher, None, field)
        if isinstance(spec, HFSpec):
            model = self.load_model(spec, data, field)
            if isinstance(teacher, HFModel):
                check_same_tokenizer(spec.path, teacher, field, chat=True)
            return model
        if isinstance(spec, FromTeacherSpec):
            return super().build_model(spec, data, field, teacher)
        raise DistillError(
            f"{field}.arch: task causal_lm builds Hugging Face models (arch hf, from_teacher or hf_config), "
            f"not {getattr(spec, 'arch', type(spec).__name__)}"
        )

    def eval_order(self, x: Inputs) -> Tensor | None:
        return None  # scores are gathered batch by batch in the split's order

    def rewrite_batch(self, batch: Batch, student: nn.Module) -> Batch:
        """With ``on_policy`` set, that fraction of batches carry the student's own continuations
        of their prompts (drawn from the global generator, so a resumed run draws alike)."""
        if self.on_policy is None or float(torch.rand(())) >= self.on_policy.fraction:
            return batch
        return on_policy_batch(batch, student, self.on_policy)

    def predict(
        self,
        model: nn.Module,
        x: Inputs,
        device: torch.device | str = "cpu",
        labels: Tensor | None = None,
        reference: Any = None,
    ) -> TokenScores:
        if labels is None:
            raise ValueError("causal_lm predictions need the split's labels (the next tokens)")
        return score_tokens(model.to(device), x, labels, reference, device=device)

    def extra_evaluation(
        self, models: dict[str, nn.Module], data: DataBundle, teacher_has_weights: bool = True
    ) -> dict[str, Any]:
        """Greedy generation speed (new tokens per second at batch 1 and 8) and a few continuations
        of held-out openings by every model, side by side in ``report.html``."""
        from distill.tasks.text_data import load_tokenizer

        test = data.test if len(data.test) else data.val
        if not len(test):
            return {}
        tokenizer = load_tokenizer(Path(data.info["tokenizer"]))
        prompts = test.x["input_ids"][:, :PROMPT_TOKENS]
        speed = {role: generation_speed(model, prompts, tokenizer) for role, model in models.items()}
        samples = []
        for row in range(min(SAMPLES, len(prompts))):
            prompt = sample_prompt(test, row)
            sample = {"prompt": tokenizer.decode(prompt[0])}
            for role, model in models.items():
                if role == "teacher" and not teacher_has_weights:
                    continue  # a cached teacher's architecture has random weights: its speed is real, its text not
                out = generate(model, prompt, tokenizer, NEW_TOKENS)
                sample[role] = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            samples.append(sample)
        return {"generation": {"new_tokens": NEW_TOKENS, "tokens_per_second": speed}, "samples": samples}

    def predict_cached(self, signals: TopKLogits, labels: Tensor, label_logprobs: Tensor | None = None) -> TokenScores:
        """The teacher's scores from its cache: perplexity exact from the stored label
        log-probabilities; without them (a cache from distill 0.x before they were stored) the next
        token's log-probability is estimated where it is outside the top k, as the tail bucket's
        mass shared evenly by the other tokens."""
        return scores_from_signals(signals, labels, label_logprobs=label_logprobs)

    def metrics(self, logits: Any, split: Split, reference: Any = None) -> dict[str, float]:
        return token_metrics(logits, split, reference)

    def onnx_module(self, model: nn.Module) -> nn.Module | None:
        return None
