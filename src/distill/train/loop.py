"""The training loop: one loop for teacher, scratch student and distilled student.

It only sums what the Distiller returns, so new loss terms never change it. Each epoch ends
with a validation pass (the best epoch is chosen on validation, never on test) and an
atomic checkpoint from which ``resume=True`` continues exactly: model, optimiser, schedule,
RNG state and data order (each epoch's shuffle is seeded by the run seed and the epoch).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from distill.core.data import DataBundle, iterate_batches
from distill.core.distiller import Distiller, DistillOutput
from distill.core.errors import DistillError
from distill.core.evaluate import accuracy, predict
from distill.core.inputs import take, to_device
from distill.core.io import load_checkpoint, save_checkpoint
from distill.core.losses import Batch
from distill.core.losses.response import hard_label_ce
from distill.core.memory import available_memory
from distill.train.distributed import Parallel
from distill.train.spec import TrainSpec

if TYPE_CHECKING:
    from distill.tasks import Task


class Augment(Protocol):
    """Changes training batches before the step (see :class:`distill.tasks.augment.ImageAugment`)."""

    def __call__(self, x: Any, index: torch.Tensor, epoch: int, source: Any) -> tuple[Any, Any]:
        """(batch inputs, their indices in the training split, epoch, the split's inputs) -> (inputs,
        mix); mix has ``partner`` (indices) and ``share`` tensors, or is None."""

    def view_rows(self, index: torch.Tensor, epoch: int, samples: int) -> torch.Tensor:
        """The rows of a teacher cache of views that hold these images' views in this epoch."""


@dataclass
class EpochLog:
    epoch: int
    loss: float
    terms: dict[str, float]
    train_acc: float
    val_acc: float
    val_loss: float
    lr: float
    seconds: float
    val_metrics: dict[str, float] = field(default_factory=dict)  # the task's scores on validation
    val_score: float = float("nan")  # the primary one among them (accuracy for images)


@dataclass
class TrainResult:
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = -1.0  # NaN without a validation split (the last epoch is kept)
    warnings: list[str] = field(default_factory=list)  # e.g. a model that learns nothing
    best_val_score: float | None = None  # the task's primary metric at the best epoch

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.history)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainResult:
        best = saved["best_val_acc"]
        return cls(
            [EpochLog(**{k: _nan(v) for k, v in e.items()}) for e in saved["history"]],
            saved["best_epoch"],
            _nan(best),
            list(saved.get("warnings", [])),
            saved.get("best_val_score"),
        )

    def to_dict(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_val_acc": self.best_val_acc,
            "seconds": self.seconds,
            "history": [asdict(e) for e in self.history],
            "warnings": self.warnings,
            "best_val_score": self.best_val_score,
        }


def _nan(value):
    """JSON stores NaN as null; read it back as NaN."""
    return float("nan") if value is None else value


def chance_level(labels: torch.Tensor) -> float:
    """The accuracy of always predicting the most frequent class (labels -1 skipped)."""
    labels = labels[labels >= 0]
    return float(torch.bincount(labels).max()) / len(labels) if len(labels) else float("nan")


def learning_warning(label: str, history: list[EpochLog], chance: float, measured_on: str) -> str | None:
    """One line when a model learns nothing: accuracy at chance after an epoch, or a loss that
    has not fallen after two. None when training looks healthy."""
    last = history[-1]
    acc = last.val_acc if measured_on == "validation" else last.train_acc
    causes = (
        "likely causes: a learning rate too high or too low, no warm-up, or a kd term whose T² scale dwarfs the rest"
    )
    if not math.isnan(acc) and not math.isnan(chance) and acc <= chance + 0.02:
        return (
            f"{label} is at chance level after epoch {last.epoch} ({measured_on} accuracy {100 * acc:.2f}%, "
            f"always guessing the commonest class gives {100 * chance:.2f}%); {causes}"
        )
    if len(history) >= 2 and not last.loss < 0.99 * history[0].loss:
        return (
            f"{label}'s loss has not fallen in {last.epoch} epochs ({history[0].loss:.4f} → {last.loss:.4f}); {causes}"
        )
    return None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DistillError("device: 'cuda' requested but no CUDA GPU is available; use device: auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DistillError("device: 'mps' requested but Apple's MPS is not available; use device: auto")
    return torch.device(name)


def make_optimizer(params, spec: TrainSpec) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.momentum > 0
        )
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int):
    if spec.schedule == "onecycle":
        # cycle_momentum=False: the optimiser keeps the configured momentum
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=spec.lr, total_steps=total_steps, cycle_momentum=False
        )
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class _NoScaler:
    """The GradScaler interface without scaling (fp32 and bf16 need none)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def _mixed_precision(spec: TrainSpec, device: torch.device):
    """An autocast context factory and a gradient scaler (a real one only for fp16, on CUDA)."""
    if spec.mixed_precision == "no":
        return contextlib.nullcontext, _NoScaler()
    if spec.mixed_precision == "fp16" and device.type != "cuda":
        raise DistillError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 (or no) on this device")
    dtype = torch.bfloat16 if spec.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if spec.mixed_precision == "fp16" else _NoScaler()
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _no_sync(model: torch.nn.Module, skip: bool):
    """DDP's no_sync() on accumulation micro-steps: gradients are reduced once per step."""
    return model.no_sync() if skip else contextlib.nullcontext()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffle of epoch ``epoch`` depends on nothing but the seed and the epoch."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _share_weighted_loss(
    out: DistillOutput, distiller: Distiller, world: int, share: Batch, whole: Batch
) -> tuple[torch.Tensor, dict[str, float]]:
    """This process's loss, weighted so that DDP's average of the processes' gradients is the
    gradient of one process on the whole global batch ``whole``, of which ``share`` is ours.

    Each term is a mean over some rows of the share (all of them, or e.g. the labeled ones for
    ``ce``: see :meth:`LossTerm.rows`); scaled by ``rows here × processes / rows in the global
    batch``, the average over processes is the mean over the global batch. Every process holds
    the global batch's labels, so no communication is needed. Returns the loss and each term's
    factor.
    """
    factors = {}
    for name, term in distiller.terms.items():
        here, total = term.rows(share), term.rows(whole)
        if here is None or total is None:
            here, total = len(share.labels), len(whole.labels)
        factors[name] = here * world / total if total else 0.0
    return distiller.weighted_sum(out.values, factors), factors


def rng_states(parallel: Parallel | None = None) -> dict[str, Any]:
    """This process's random-number state and, in a distributed run, every process's (a
    collective: every process calls it), for a checkpoint that resumes exactly."""
    own = {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if parallel is None:
        return own
    return {**own, "rng_per_process": parallel.gather_object(own)}


def set_rng_states(state: dict[str, Any], parallel: Parallel | None = None) -> None:
    """Restore what :func:`rng_states` saved: this process's own state when the checkpoint holds
    one per process for the same number of processes, else process 0's."""
    per_process = state.get("rng_per_process")
    if parallel is not None and per_process and len(per_process) == parallel.world:
        state = per_process[parallel.rank]
    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(
    distiller: Distiller,
    data: DataBundle,
    spec: TrainSpec,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpoint: Path | None = None,
    resume: bool = False,
    label: str = "model",
    console: Console | None = None,
    on_epoch_end: Callable[[EpochLog], None] | None = None,
    select_best: bool = True,
    passes_per_epoch: int = 1,
    parallel: Parallel | None = None,
    remember_teacher: bool = False,
    task: Task | None = None,
    augment: Augment | None = None,
) -> TrainResult:
    """Train ``distiller.student`` (and any learnable term parts); return per-epoch history.

    On return the student holds the weights of its best validation epoch (of its last epoch
    with ``select_best=False``, e.g. for a stage whose classifier is not trained yet, or without
    a validation split). A model that learns nothing (at chance after an epoch, or a loss that
    does not fall) gets one warning line, kept in ``TrainResult.warnings``; training goes on.
    ``passes_per_epoch`` > 1 makes one epoch several shuffled passes over a small training set
    (the scratch baseline on a label budget), so validation and checkpoints stay per epoch.

    With ``parallel`` (a distributed run) every process takes its share of each global batch of
    ``spec.batch_size`` samples, DDP averages the gradients, and only process 0 writes the
    checkpoint; the losses are scaled so that N processes follow the gradient of 1.
    ``spec.grad_accumulation`` micro-batches make one optimiser step; ``spec.mixed_precision``
    runs the forward passes under autocast. With ``remember_teacher`` (one process), a live
    teacher runs once over the training inputs at the start, counted in the first epoch's time,
    and its logits are reused every step (:meth:`Distiller.remember_teacher`).
    ``augment(x, index, epoch, train_inputs) -> (x, mix)`` changes each training batch before the
    step (e.g. :class:`~distill.tasks.augment.ImageAugment`): the student and a live teacher see
    the same augmented inputs, and a teacher is then never remembered.
    """
    console = console or Console(quiet=True)
    device = torch.device(device)
    distiller.to(device)
    distiller.prepare(
        to_device(take(data.train.x, slice(0, 2)), device), torch.arange(2)
    )  # adapters exist before the optimiser does
    state = load_checkpoint(checkpoint) if resume and checkpoint is not None and checkpoint.exists() else None
    if state is not None:  # before wrapping: FSDP shards what it wraps
        distiller.student.load_state_dict(state["student"])
        distiller.terms.load_state_dict(state["terms"])
    validating = len(data.val) > 0  # without a validation split the last epoch is kept
    best_state = copy.deepcopy(distiller.state_dict_to_keep()) if validating else {}
    model = parallel.wrap(distiller) if parallel is not None else distiller
    sharded = parallel is not None and parallel.fsdp is not None  # FSDP: parameters are split over processes

    def kept_state() -> dict[str, torch.Tensor]:  # a collective under FSDP: every process calls it
        with parallel.whole(model) if parallel is not None else contextlib.nullcontext():
            return {k: v.detach().cpu().clone() for k, v in distiller.state_dict_to_keep().items()}

    optimizer = make_optimizer(distiller.trainable_parameters(), spec)
    micro_steps = passes_per_epoch * math.ceil(len(data.train) / spec.batch_size)
    steps_per_epoch = math.ceil(micro_steps / spec.grad_accumulation)  # optimiser steps
    scheduler = make_scheduler(optimizer, spec, spec.epochs * steps_per_epoch)
    autocast, scaler = _mixed_precision(spec, device)
    is_main = parallel is None or parallel.is_main
    result = TrainResult()
    primary, higher_is_better = (task.primary_metric, task.higher_is_better) if task is not None else ("accuracy", True)
    measured_on = "validation" if validating else "training"
    chance = chance_level(data.val.y if validating else data.train.y)
    start_epoch = 0
    reference = None  # the teacher's validation predictions, for tasks scored against them

    if state is not None:
        if sharded:
            parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state, parallel)
        best_state = state["best_state"]
        result = TrainResult.from_dict(state)
        start_epoch = state["epoch"]
        console.print(f"[dim]{label}: resumed after epoch {start_epoch}/{spec.epochs}[/]")

    distiller.forget_teacher()  # nothing remembered from an earlier call (or one that failed)
    remembered = 0.0  # seconds of the teacher's one pass, counted in the first epoch's time
    remember_teacher = remember_teacher and augment is None  # every epoch shows the teacher new views
    if remember_teacher and parallel is None and distiller.can_remember_teacher() and start_epoch < spec.epochs:
        started = time.perf_counter()
        free = available_memory()
        with autocast():
            order = task.eval_order(data.train.x) if task is not None else None
            distiller.remember_teacher(data.train.x, spec.batch_size, free // 4 if free else None, order)
        remembered = time.perf_counter() - started
    for epoch in range(start_epoch, spec.epochs):
        started, remembered = time.perf_counter() - remembered, 0.0
        distiller.train()
        sums: dict[str, float] = {}
        seen = correct = labeled = 0
        with Progress(
            TextColumn(f"{label} {epoch + 1}/{spec.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console.quiet or not console.is_terminal,
        ) as progress:
            bar = progress.add_task("train", total=micro_steps, stats="")
            generator = epoch_generator(seed, epoch)
            batches = (
                b for _ in range(passes_per_epoch) for b in iterate_batches(data.train, spec.batch_size, generator)
            )
            for step, (x, y, index) in enumerate(batches):
                mask = None if data.train.mask is None else data.train.mask[index]
                if task is not None:  # e.g. generated continuations instead of the data's (the identity for images)
                    rewritten = task.rewrite_batch(Batch(x, y, mask), distiller.student)
                    x, y, mask = rewritten.inputs, rewritten.labels, rewritten.mask
                mix = None
                if augment is not None:  # each sample's view depends on (seed, sample, epoch) alone
                    x, mixed = augment(x, index, epoch, data.train.x)
                    mix = None if mixed is None else (data.train.y[mixed.partner], mixed.share)
                    if distiller.teacher_is_cached:  # a cache of views: the rows of this epoch's views
                        index = augment.view_rows(index, epoch, len(data.train))
                global_size, global_y, global_mask, global_mix = len(y), y, mask, mix
                if parallel is not None:
                    if global_size < parallel.world:  # a tail too small to give every process a sample
                        continue  # (every process decides alike: the batches are the same everywhere)
                    x, y, index, mask = parallel.shard(x, y, index, mask)
                    mix = None if mix is None else parallel.shard(*mix)
                x, y = to_device(x, device, non_blocking=True), y.to(device, non_blocking=True)
                mask = None if mask is None else mask.to(device, non_blocking=True)
                mix = None if mix is None else tuple(t.to(device, non_blocking=True) for t in mix)
                distiller.progress = epoch + step / micro_steps
                last_micro = (step + 1) % spec.grad_accumulation == 0 or step + 1 == micro_steps
                with _no_sync(model, parallel is not None and not last_micro), autocast():
                    out = model(x, labels=y, mask=mask, index=index, mix=mix)
                    if not torch.isfinite(out.loss):
                        bad = [n for n, v in out.terms.items() if not torch.isfinite(v)] or ["total"]
                        raise DistillError(
                            f"{label}: loss term {bad[0]!r} became non-finite at epoch {epoch + 1}, step {step + 1}; "
                            f"lower train.lr or set train.grad_clip"
                        )
                    loss, factors = out.loss, dict.fromkeys(out.terms, 1.0)
                    if parallel is not None:
                        local_mix = None if mix is None else tuple(t.cpu() for t in mix)
                        share = Batch(None, y.cpu(), None if mask is None else mask.cpu(), local_mix)
                        whole = Batch(None, global_y, global_mask, global_mix)
                        loss, factors = _share_weighted_loss(out, distiller, parallel.world, share, whole)
                    # this process's part of the global batch's mean loss, times the global batch size
                    world = parallel.world if parallel is not None else 1
                    batch_loss = float(loss.detach()) * global_size / world
                    if spec.grad_accumulation > 1:  # the mean over this step's micro-batches (fewer at the end)
                        loss = loss / min(
                            spec.grad_accumulation,
                            micro_steps - step // spec.grad_accumulation * spec.grad_accumulation,
                        )
                    scaler.scale(loss).backward()
                if last_micro:
                    if spec.grad_clip:
                        scaler.unscale_(optimizer)
                        if sharded:  # the norm over every process's shard
                            model.clip_grad_norm_(spec.grad_clip)
                        else:
                            torch.nn.utils.clip_grad_norm_(list(distiller.trainable_parameters()), spec.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()

                seen += len(y)
                sums["loss"] = sums.get("loss", 0.0) + batch_loss
                for name, value in out.terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * factors[name] * global_size / world
                if out.student.logits is not None:  # an embedding model has no classes to be right about
                    if out.batch is not None and out.batch.labels is not None:  # cut to the student's positions
                        y, mask = out.batch.labels, out.batch.mask
                    keep = y >= 0 if mask is None else (y >= 0) & mask.bool()
                    labeled += int(keep.sum())
                    correct += int((out.student.logits.argmax(-1)[keep] == y[keep]).sum())
                progress.update(
                    bar, advance=1, stats=f"loss {sums['loss'] / seen:.4f}  acc {correct / max(labeled, 1):.3f}"
                )

        if parallel is not None:  # epoch statistics over every process's share
            keys = sorted(sums)
            totals = parallel.sum([sums[key] for key in keys] + [seen, correct, labeled])
            sums = dict(zip(keys, totals[: len(keys)], strict=True))
            seen, correct, labeled = (int(v) for v in totals[len(keys) :])
        val_metrics: dict[str, float] = {}
        if validating and task is not None and not task.has_logits:  # scored against the teacher
            val = data.val
            if reference is None and isinstance(distiller.teacher, nn.Module):  # none for a student alone
                reference = task.predict(distiller.teacher, val.x, device=device, labels=val.y)
            scored = task.predict(distiller.student, val.x, device=device, labels=val.y, reference=reference)
            val_metrics = task.metrics(scored, val, reference)
            val_acc = val_loss = float("nan")
        elif validating:
            val_logits = (
                task.predict(distiller.student, data.val.x, device=device)
                if task is not None
                else predict(distiller.student, data.val.x, device=device)
            )
            val_acc = accuracy(val_logits, data.val.y)
            val_loss = float(hard_label_ce(val_logits, data.val.y, data.val.mask))
            val_metrics = task.metrics(val_logits, data.val) if task is not None else {"accuracy": val_acc}
        else:
            val_acc = val_loss = float("nan")
        score = val_metrics.get(primary, float("nan"))
        log = EpochLog(
            epoch=epoch + 1,
            loss=sums["loss"] / seen,
            terms={name: sums[name] / seen for name in out.terms},
            train_acc=correct / labeled if labeled else float("nan"),
            val_acc=val_acc,
            val_loss=val_loss,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            val_metrics=val_metrics,
            val_score=score,
        )
        result.history.append(log)
        if not validating:  # the last epoch is kept
            result.best_val_acc, result.best_epoch = float("nan"), epoch + 1
        elif result.best_val_score is None or (
            score > result.best_val_score if higher_is_better else score < result.best_val_score
        ):  # the task's primary metric picks the best epoch (accuracy, higher is better, for images)
            result.best_val_acc, result.best_val_score, result.best_epoch = val_acc, score, epoch + 1
            best_state = kept_state()
        terms = "  ".join(f"{k} {v:.4f}" for k, v in log.terms.items())
        shown = "acc" if primary == "accuracy" else primary.replace("_", " ")
        val_text = f"  val {shown} {score:.4f}" if validating else ""
        console.print(
            f"{label} epoch {epoch + 1}/{spec.epochs}  loss {log.loss:.4f} ({terms})"
            + ("" if math.isnan(log.train_acc) else f"  train acc {log.train_acc:.4f}")
            + f"{val_text}  {log.seconds:.1f}s"
        )
        if not result.warnings and (warning := learning_warning(label, result.history, chance, measured_on)):
            result.warnings.append(warning)
            console.print(f"[yellow]warning: {warning}[/]")
        rng = rng_states(parallel)  # every process's: dropout draws differ between shares
        if checkpoint is not None:  # gathered from every shard under FSDP (collectives)
            kept = kept_state() if sharded else distiller.state_dict_to_keep()
            optimizer_state = parallel.optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
        if checkpoint is not None and is_main:
            save_checkpoint(
                {
                    "epoch": epoch + 1,
                    "student": {k.removeprefix("student."): v for k, v in kept.items() if k.startswith("student.")},
                    "terms": {k.removeprefix("terms."): v for k, v in kept.items() if k.startswith("terms.")},
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    **rng,
                    "best_state": best_state,
                    "best_epoch": result.best_epoch,
                    "best_val_acc": result.best_val_acc,
                    "best_val_score": result.best_val_score,
                    "history": [asdict(e) for e in result.history],
                    "warnings": result.warnings,
                },
                checkpoint,
            )
        if on_epoch_end is not None:
            on_epoch_end(log)
    distiller.forget_teacher()
    if parallel is not None:
        parallel.unwrap(model)  # FSDP: the full student again, as a plain module
    if select_best and validating:
        distiller.load_state_dict(best_state, strict=False)  # student and adapters of the best epoch
    return result
