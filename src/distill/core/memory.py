"""Memory budgets: every size is checked before anything is allocated.

A model or batch that cannot fit must fail with one line naming the setting, not take the
machine down: where the kernel over-commits, a 29 GB weight "allocates" and its initialisation
then fills the RAM. Models are therefore sized on PyTorch's ``meta`` device (shapes, no
storage) for their parameters; once a model exists (its weights fit), the activations of one
real sample give the per-sample cost of every batch. The estimates are deliberately simple upper-ish bounds, not a profiler: they exist to refuse the
absurd in well under a second, not to predict the peak to the megabyte.

The budget is the memory available now (``/proc/meminfo``'s MemAvailable, the cgroup's limit
and this process's ``RLIMIT_AS`` / ``RLIMIT_DATA``, whichever is smallest), or what the user sets
with ``--max-memory 8GB`` or ``max_memory: 8GB`` in a config.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from distill.core.errors import DistillError
from distill.core.inputs import Inputs, batch_len, call_model

HOW_TO_SET = "set another budget with --max-memory (e.g. --max-memory 8GB) or max_memory: in the config"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's limit minus its usage (v2, then v1); None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            limit = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max", or v1's "no limit" sentinel
            return None
        try:
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(int(limit) - usage, 0)
    return None


def _rlimit_available() -> int | None:
    """What this process may still map under its address-space and data-segment limits."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    left = []
    for limit, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft == resource.RLIM_INFINITY:
            continue
        match = re.search(rf"^{field}:\s+(\d+)\s*kB", status, re.MULTILINE)
        used = int(match.group(1)) * 1024 if match else 0
        left.append(max(soft - used, 0))
    return min(left) if left else None


def available_memory() -> int | None:
    """Bytes this process can still allocate, by the tightest limit known; None if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_available(), _rlimit_available()) if v is not None]
    if not known:
        try:
            known = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(known)


@dataclass(frozen=True)
class Budget:
    bytes: int | None  # None: unknown, nothing is refused
    source: str  # "--max-memory / max_memory" or "the memory available now"

    @classmethod
    def resolve(cls, max_memory: int | None = None) -> Budget:
        if max_memory is not None:
            return cls(int(max_memory), "set by max_memory")
        return cls(available_memory(), "the memory available now")

    def check(self, needed: float, field: str, what: str) -> None:
        """Refuse ``needed`` bytes beyond the budget, in one line naming ``field``."""
        if self.bytes is None or needed <= self.bytes:
            return
        raise DistillError(
            f"{field}: {what} needs about {format_bytes(needed)}, more than the memory budget of "
            f"{format_bytes(self.bytes)} ({self.source}); make it smaller, or {HOW_TO_SET}"
        )


@dataclass(frozen=True)
class ModelSize:
    """A model's size: parameters from the meta device; activations, once the model exists, from
    a forward pass of one real sample (:meth:`with_activations`)."""

    params: int
    weight_bytes: int
    largest_param: str  # name of the biggest parameter tensor, to say which setting makes it big
    activation_bytes: int = 0  # outputs of every leaf module for one sample (kept for the backward pass)
    peak_activation_bytes: int = 0  # the largest single output for one sample (inference)

    def training_bytes(self, batch: int, input_bytes: int, optimizer_states: int) -> int:
        """Weights, gradients and optimiser state, plus the batch's activations and their gradients."""
        return self.weight_bytes * (2 + optimizer_states) + batch * (input_bytes + 2 * self.activation_bytes)

    def inference_bytes(self, batch: int, input_bytes: int) -> int:
        """Weights plus the batch's input and its two largest live outputs."""
        return self.weight_bytes + batch * (input_bytes + 2 * self.peak_activation_bytes)

    def with_activations(self, model: nn.Module, example: torch.Tensor) -> ModelSize:
        """This size plus the activations of ``model`` per sample of ``example`` (a small real
        batch: the model is built, its weights fit; a forward pass on the meta device would cost a
        second of imports)."""
        outputs: list[int] = []

        def record(_module, _inputs, output) -> None:
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor):
                    outputs.append(tensor.numel() * tensor.element_size())

        leaves = [m for m in model.modules() if not any(True for _ in m.children())]
        hooks = [m.register_forward_hook(record) for m in leaves]
        was_training = model.training
        try:
            model.eval()
            with torch.inference_mode():
                call_model(model, example)
        except Exception:  # noqa: BLE001 - the model's own checks report a failing forward pass
            outputs = []
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        n = max(batch_len(example), 1)
        return replace(self, activation_bytes=sum(outputs) // n, peak_activation_bytes=max(outputs, default=0) // n)


def measure(build: Callable[[], nn.Module]) -> ModelSize | None:
    """Size the model ``build()`` returns without allocating it (built on the meta device); None
    when it cannot be built there (e.g. a factory that loads weights): it is then not sized."""
    try:
        with torch.device("meta"):
            model = build()
    except DistillError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports the user's error
        return None
    if not isinstance(model, nn.Module):
        return None
    named = list(model.named_parameters())
    params = sum(p.numel() for _, p in named)
    weight_bytes = sum(p.numel() * p.element_size() for _, p in named) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    largest = max(named, key=lambda item: item[1].numel())[0] if named else ""
    return ModelSize(params, weight_bytes, largest)


def input_bytes(example: Inputs) -> int:
    """Bytes of one sample of ``example`` (a batch: a tensor, or a mapping of token ids, masks, ...),
    in the inputs' own dtypes."""
    tensors = example.values() if isinstance(example, Mapping) else (example,)
    total = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return -(-total // max(batch_len(example), 1))
