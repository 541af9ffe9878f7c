"""Multi-process runs on Hugging Face Accelerate: one process per GPU (or CPU slot), DDP.

A run becomes distributed when it is launched by ``accelerate launch -m distill run CONFIG``,
``torchrun -m distill run CONFIG`` or ``distill run CONFIG --processes N`` (which starts
``torch.distributed.run`` for you). Each process then takes its share of every global batch
(``train.batch_size`` is the global batch, so 1 and N processes see the same batches), the
student's gradients are averaged by DDP, and process 0 alone writes checkpoints, caches and
reports. The teacher is never wrapped or synchronised: it is frozen and only runs forward.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.errors import DistillError


def launched_distributed() -> bool:
    """True in a process started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Parallel:
    """The process group of a distributed run, set up through :class:`accelerate.Accelerator`."""

    def __init__(self, cpu: bool) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.accelerator = Accelerator(
            cpu=cpu,
            kwargs_handlers=[
                # a long timeout: process 0 may train the teacher while the others wait
                InitProcessGroupKwargs(timeout=timedelta(hours=6)),
                DistributedDataParallelKwargs(broadcast_buffers=True),
            ],
        )
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, distiller: nn.Module) -> nn.Module:
        """DDP around the student and the terms' learnable parts; the teacher is left out
        (frozen, never synchronised), so only what trains is reduced."""
        teacher = getattr(distiller, "teacher", None)
        if isinstance(teacher, nn.Module):
            ignored = [f"teacher.{name}" for name, _ in teacher.named_parameters()]
            ignored += [f"teacher.{name}" for name, _ in teacher.named_buffers()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
        return self.accelerator.prepare_model(distiller)

    def shard(self, *tensors: Tensor | Mapping[str, Tensor] | None) -> tuple:
        """This process's contiguous share of one global batch (tensors, mappings of tensors, or None)."""

        def share(t):
            if t is None:
                return None
            if isinstance(t, Mapping):
                return {key: share(value) for key, value in t.items()}
            return torch.tensor_split(t, self.world)[self.rank]

        return tuple(share(t) for t in tensors)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        with self._peers():
            total = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.device), "sum")
        return total.cpu().tolist()

    def gather_object(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order (a collective: every process calls it)."""
        gathered: list[Any] = [None] * self.world
        with self._peers():
            torch.distributed.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        with self._peers():
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _peers(self) -> Iterator[None]:
        """A collective that fails because another process died (it printed its own error)
        ends this one with a line saying so, not with the backend's traceback."""
        try:
            yield
        except RuntimeError as err:  # gloo / NCCL: connection closed, process group aborted
            raise DistillError(
                f"process {self.rank} of {self.world} stopped: another process failed (its error is above)"
            ) from err

    def finish(self) -> None:
        """Wait for every process, then leave the process group cleanly."""
        self.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parallel_from_environment(device: torch.device) -> Parallel | None:
    """A :class:`Parallel` when this process was launched as one of several, else None."""
    if not launched_distributed():
        return None
    return Parallel(cpu=device.type == "cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, argv: list[str]) -> int:
    """``distill ... --processes N``: rerun this command in N local processes via torchrun.

    torchrun's agent runs in this process, so that a failed worker ends the command with the
    worker's own one-line error (each process prints it) and its exit code, not torchrun's
    traceback and report."""
    if processes < 1:
        raise DistillError("--processes must be at least 1")
    if launched_distributed():
        raise DistillError("--processes: already running under a distributed launcher; drop --processes")
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise DistillError(f"--processes {processes}: only {torch.cuda.device_count()} GPU(s) are visible")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the workers inherit it
    options = get_args_parser().parse_args(
        [f"--nproc-per-node={processes}", f"--master-port={_free_port()}", "-m", "distill", *argv]
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own failure report
    try:
        torchrun(options)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if 2 not in codes:  # 2: a worker printed its error (the others were stopped); else none did
            print(
                f"distill: error: a process of {processes} failed (exit codes {codes}; negative: killed by that "
                "signal, e.g. -9 when out of memory)",
                file=sys.stderr,
            )
        return 2 if 2 in codes else 1
    return 0
