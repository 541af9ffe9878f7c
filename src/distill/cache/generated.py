"""A teacher cache from the logits ``distill generate --signals K`` stored while it generated.

Generation computes the teacher's full next-token distribution at every step it writes; keeping
its top-k there costs nothing extra, and this module turns those rows into an ordinary cache for
the run's own splits, so a student learns the teacher's answers token by token as well ("word-
level + sequence-level KD", Kim & Rush 2016) without the teacher running again. Each sample is
matched to the generated row it came from by its token ids, so the run may split, shuffle and
truncate the rows as it likes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.core.errors import DistillError
from distill.core.signals import TopKLogits
from distill.tasks.lm_generate import token_rows


class GeneratedSignals:
    """The stored top-k rows of a ``distill generate`` output, looked up by a sample's token ids.

    Stands in for the teacher model in :func:`distill.cache.writer.write_cache`."""

    def __init__(self, shards: list[dict[str, np.ndarray]], vocab_size: int, max_length: int) -> None:
        self.vocab_size = vocab_size
        self.k = int(shards[0]["values"].shape[-1])
        self._shards = shards
        self._rows: dict[tuple[int, ...], tuple[int, int, int]] = {}  # ids -> (shard, first step, steps)
        for number, arrays in enumerate(shards):
            starts = arrays["response_offsets"]
            for r, (prompt, response) in enumerate(token_rows([arrays])):
                key = tuple([*prompt, *response][: max_length + 1])  # as the data cut it
                self._rows.setdefault(key, (number, int(starts[r]), len(response)))

    def rows(self, x: dict[str, Tensor], labels: Tensor, k: int) -> tuple[TopKLogits, Tensor]:
        """Signals ``[n, seq, k]`` and the teacher's log-probability of each label ``[n, seq]`` for
        samples ``x``: the stored rows at their response positions, a uniform row elsewhere (those
        positions are masked out and never stored)."""
        n, seq = labels.shape
        k = min(k, self.k)
        values = torch.zeros(n, seq, k)
        indices = torch.arange(k).expand(n, seq, k).clone()
        logsumexp = torch.full((n, seq), float(np.log(self.vocab_size)))
        tail = torch.full((n, seq), float(np.log1p(-k / self.vocab_size)) if k < self.vocab_size else float("-inf"))
        label_logprob = torch.zeros(n, seq)
        for i in range(n):
            length = int(x["attention_mask"][i].sum())
            counted = (labels[i, :length] >= 0).nonzero().flatten()
            if len(counted) == 0:
                continue
            key = tuple(x["input_ids"][i, :length].tolist()) + (int(labels[i, length - 1]),)
            found = self._rows.get(key)
            start = int(counted[0])
            if found is None or len(counted) > found[2] or int(counted[-1]) - start + 1 != len(counted):
                raise DistillError(
                    "data.path: a row of the data is not one `distill generate` stored logits for (were the "
                    "files edited?); run the same `distill generate` command with --overwrite"
                )
            shard, first, _ = found
            arrays, steps = self._shards[shard], slice(first, first + len(counted))
            positions = slice(start, start + len(counted))
            values[i, positions] = _tensor(arrays["values"][steps, :k], np.float32)
            indices[i, positions] = _tensor(arrays["indices"][steps, :k], np.int64)
            logsumexp[i, positions] = _tensor(arrays["logsumexp"][steps])
            label_logprob[i, positions] = _tensor(arrays["label_logprob"][steps])
            if k == self.k:
                tail[i, positions] = _tensor(arrays["tail"][steps])
            else:  # fewer than stored: the dropped values join the tail
                stored = _tensor(arrays["values"][steps], np.float32)
                head = (stored[:, k:] - logsumexp[i, positions, None]).logsumexp(-1)
                tail[i, positions] = torch.logaddexp(_tensor(arrays["tail"][steps]), head)
        return TopKLogits(values, indices, logsumexp, tail, self.vocab_size), label_logprob


def _tensor(array: np.ndarray, dtype=None) -> Tensor:
    """A copy of (part of) a read-only memory map as a tensor."""
    return torch.from_numpy(np.array(array, dtype=dtype))


def generated_signals(path: Path, manifest: dict, vocab_size: int, max_length: int) -> GeneratedSignals | None:
    """The stored signals of a generated dataset, or None when it was written without ``--signals``."""
    from distill.tasks.lm_generate import read_token_shards

    if not manifest.get("settings", {}).get("signals"):
        return None
    shards = read_token_shards(path, manifest)
    return None if shards is None else GeneratedSignals(shards, vocab_size, max_length)
