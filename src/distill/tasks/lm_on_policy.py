"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the answers it is taught on.

For a fraction of training batches, each row's prompt (its tokens before the first position that
counts) is continued by the *current* student, sampled; the row becomes prompt + the student's
own continuation, and only the continuation counts. The live teacher then scores those tokens
through the usual token-level terms (reverse KL and JSD are the usual choices). The student
learns where it actually goes wrong, not only on the teacher's or the data's text.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from distill.core.losses.base import Batch


class OnPolicySpec(BaseModel):
    """``distill.on_policy``: how often and how the student writes its own continuations."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    fraction: float = Field(0.5, gt=0, le=1, description="share of training batches rewritten (GKD's λ)")
    max_new_tokens: int = Field(64, gt=0, description="the longest continuation the student writes")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the student")
    top_p: float = Field(1.0, gt=0, le=1)


def prompt_lengths(batch: Batch) -> list[int]:
    """Each row's prompt: its input tokens up to the first position whose label counts (that
    position's next token is the first answer token); a row with nothing counted keeps all its
    real tokens."""
    attention = batch.inputs["attention_mask"]
    counted = batch.mask.bool() if batch.mask is not None else torch.ones_like(attention, dtype=torch.bool)
    if batch.labels is not None:
        counted = counted & (batch.labels >= 0)
    out = []
    for row in range(len(attention)):
        first = counted[row].nonzero()
        out.append(int(first[0]) + 1 if len(first) else int(attention[row].sum()))
    return out


@torch.no_grad()
def on_policy_batch(batch: Batch, student: nn.Module, spec: OnPolicySpec) -> Batch:
    """``batch`` with every row's answer replaced by a continuation the student samples now.

    Rows become prompt + continuation (ending at the first end-of-sequence token, which is kept),
    right-padded; ``labels`` are the next tokens, ``mask`` the continuation's positions. The
    student goes back to the mode it was in."""
    model = getattr(student, "model", student)  # a distill HF wrapper or a transformers model
    ids, attention = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    lengths = prompt_lengths(batch)
    width, rows = max(lengths), len(lengths)
    pad = int(model.generation_config.pad_token_id or 0)
    eos = model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    prompts = torch.full((rows, width), pad, dtype=ids.dtype, device=ids.device)
    prompt_mask = torch.zeros_like(prompts)
    for row, length in enumerate(lengths):  # left-padded, as generation wants
        prompts[row, width - length :] = ids[row, :length]
        prompt_mask[row, width - length :] = attention[row, :length]
    extra = {}
    vocab, rows_in_head = getattr(student, "vocab", None), model.config.vocab_size
    if vocab is not None and vocab < rows_in_head:  # a padded vocabulary: never sample a row no token owns
        extra["suppress_tokens"] = list(range(vocab, rows_in_head))
    device = next(model.parameters()).device  # batches are still on the CPU here; the student may not be
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompts.to(device), attention_mask=prompt_mask.to(device), do_sample=True,
            temperature=spec.temperature, top_p=spec.top_p, top_k=None, max_new_tokens=spec.max_new_tokens,
            pad_token_id=pad, **extra,
        ).cpu()  # fmt: skip
    finally:
        model.train(was_training)
    written = []
    for row, length in enumerate(lengths):
        new = out[row, width:].tolist()
        end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
        written.append(ids[row, :length].tolist() + new[:end])
    return _as_batch(written, lengths, pad, ids)


def _as_batch(rows: list[list[int]], prompts: list[int], pad: int, like: Tensor) -> Batch:
    """Rows of token ids as inputs (all but the last token), next-token labels and the mask of the
    positions whose next token was written by the student."""
    width = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), width), pad, dtype=like.dtype, device=like.device)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -1)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=like.device)
    for row, (tokens, prompt) in enumerate(zip(rows, prompts, strict=True)):
        n = len(tokens) - 1
        ids[row, :n] = torch.tensor(tokens[:-1])
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor(tokens[1:])
        mask[row, prompt - 1 : n] = True  # position t predicts token t + 1: the student's own from the prompt's end
    return Batch({"input_ids": ids, "attention_mask": attention}, labels, mask)
