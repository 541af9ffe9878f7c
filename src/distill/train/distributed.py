"""Multi-process runs on Hugging Face Accelerate: one process per GPU (or CPU slot), DDP.

A run becomes distributed when it is launched by ``accelerate launch -m distill run CONFIG``,
``torchrun -m distill run CONFIG`` or ``distill run CONFIG --processes N`` (which starts
``torch.distributed.run`` for you). Each process then takes its share of every global batch
(``train.batch_size`` is the global batch, so 1 and N processes see the same batches), the
student's gradients are averaged by DDP, and process 0 alone writes checkpoints, caches and
reports. The teacher is never wrapped or synchronised: it is frozen and only runs forward.

With an Accelerate config whose ``distributed_type`` is ``FSDP`` (``accelerate launch
--config_file fsdp.yaml -m distill run CONFIG``), the student is sharded instead (FSDP version 1,
``use_orig_params``): its own FSDP unit, and one per transformer block, while the teacher stays
out of the wrapping, whole on every process and in eval mode. Validation runs the sharded
student; checkpoints gather the full weights and optimiser state; when training ends the student
is gathered and unwrapped, so evaluation, reports and export see a plain model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
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
        from accelerate.utils import DistributedType

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
        state = self.accelerator.state
        #: Accelerate's FSDP settings when its config asks for FSDP (GPUs only), else None
        self.fsdp = state.fsdp_plugin if state.distributed_type == DistributedType.FSDP else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, distiller: nn.Module) -> nn.Module:
        """DDP around the student and the terms' learnable parts; the teacher is left out
        (frozen, never synchronised), so only what trains is reduced. FSDP: see :meth:`_shard`."""
        teacher = getattr(distiller, "teacher", None)
        if self.fsdp is not None:
            return self._shard(distiller, teacher if isinstance(teacher, nn.Module) else None)
        if isinstance(teacher, nn.Module):
            ignored = [f"teacher.{name}" for name, _ in teacher.named_parameters()]
            ignored += [f"teacher.{name}" for name, _ in teacher.named_buffers()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
        return self.accelerator.prepare_model(distiller)

    def _shard(self, distiller: nn.Module, teacher: nn.Module | None) -> nn.Module:
        """FSDP (version 1) around the distiller with the teacher as an ignored module: the
        teacher is neither sharded nor gathered, stays in eval mode and costs no communication.
        The student is a unit of its own (so validation can call it directly) and so is each of its
        transformer blocks (Accelerate's ``fsdp_transformer_layer_cls_to_wrap``, by default the
        model's ``_no_split_modules``). ``use_orig_params`` is always on: the optimiser and the
        terms hold the student's own parameters."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        plugin = self.fsdp
        if getattr(plugin, "fsdp_version", 1) != 1:
            raise DistillError(
                "FSDP: distill shards students with FSDP version 1; set fsdp_version: 1 in the Accelerate config"
            )
        student = distiller.student
        inner = getattr(student, "model", student)  # the Hugging Face model inside distill's wrapper
        blocks: tuple[type, ...] = ()
        if plugin.transformer_cls_names_to_wrap or getattr(inner, "_no_split_modules", None):
            names = plugin.transformer_cls_names_to_wrap or list(inner._no_split_modules)
            blocks = tuple({type(m) for m in student.modules() if type(m).__name__ in names})

        def unit(module: nn.Module) -> bool:
            return module is student or isinstance(module, blocks)

        if teacher is not None:
            teacher.eval()
        return FSDP(
            distiller,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=unit),
            mixed_precision=plugin.mixed_precision_policy,
            backward_prefetch=plugin.backward_prefetch,
            forward_prefetch=plugin.forward_prefetch,
            limit_all_gathers=plugin.limit_all_gathers,
            use_orig_params=True,
            ignored_modules=[teacher] if teacher is not None else None,
            device_id=self.device
            if self.device.type != "cpu"
            else torch.device("cpu"),  # FSDP reads "cpu:0" as another device
        )

    def whole(self, model: nn.Module):
        """A context in which a sharded model's parameters are whole on every process (a
        collective: every process enters it); nothing to do without FSDP."""
        if self.fsdp is None:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(model, writeback=False)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """FSDP: the optimiser's full state for a checkpoint, gathered from every shard (a collective)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(model, optimizer)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """FSDP: restore :meth:`optimizer_state`'s result, each process taking its shard."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))

    def unwrap(self, model: nn.Module) -> None:
        """After training under FSDP: gather the full weights on every process and strip the FSDP
        units, so that the distiller (student and terms) is a plain module again. A collective;
        tied weights (an LM's embedding and head) stay tied."""
        if self.fsdp is None:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            full = {name: p.detach().clone() for name, p in _unsharded_parameters(model)}
        root = model.module

        def strip(module: nn.Module) -> None:
            for name, child in list(module.named_children()):
                if isinstance(child, FSDP):
                    child = child.module
                    setattr(module, name, child)
                strip(child)

        strip(root)
        replaced: dict[int, nn.Parameter] = {}
        for name, old in list(root.named_parameters(remove_duplicate=False)):
            if name not in full:  # the ignored teacher
                continue
            owner, _, attr = name.rpartition(".")
            if id(old) not in replaced:
                replaced[id(old)] = nn.Parameter(full[name], requires_grad=old.requires_grad)
            root.get_submodule(owner)._parameters[attr] = replaced[id(old)]

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
        """Wait for every process, then leave the process group cleanly.

        Accelerate keeps every prepared model, and a DDP wrapper's reducer holds the process
        group: left alive, the group would be torn down during interpreter exit, where gloo's
        threads can abort the process ("terminate called without an active exception"). So the
        wrappers are dropped and collected before the group is destroyed."""
        self.barrier()
        self.accelerator.free_memory()
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _unsharded_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, whole tensor) of every parameter FSDP manages, named as in the unwrapped module."""
    ignored = {id(p) for m in getattr(model, "_ignored_modules", ()) for p in m.parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in ignored:
            yield name.replace("_fsdp_wrapped_module.", ""), p


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
        [f"--nproc-per-node={processes}", f"--master-port={_free_port()}", "-m", "distill"]
    )
    options.training_script_args = argv  # not parsed by torchrun: `--signals` would pass for its `--signals-to-handle`
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
