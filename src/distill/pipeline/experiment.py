"""One experiment end to end: teacher, scratch student, distilled student, evaluation, report.

The run is built in ``<dir>/<name>.partial`` and renamed to ``<dir>/<name>`` only when
everything is written, so a failed or interrupted run never looks complete; ``resume=True``
continues a ``.partial`` run from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from distill._version import __version__
from distill.cache import CachedTeacher, write_cache
from distill.cache.generated import GeneratedSignals, generated_signals
from distill.cache.writer import Views
from distill.core.data import DataBundle, Split
from distill.core.distiller import Distiller, LinearWarmup, probing
from distill.core.errors import DistillError
from distill.core.evaluate import (
    accuracy,
    agreement,
    calibration,
    measure_latencies,
    per_class_accuracy,
    per_class_agreement,
)
from distill.core.fold import folded_batch_norms
from distill.core.inputs import batch_len, take
from distill.core.io import (
    default_cache_dir,
    directory_digest,
    file_sha256,
    hash_json,
    hash_tensors,
    json_safe,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    write_json,
)
from distill.core.losses import HardLabelCE, LossTerm, build_term
from distill.pipeline.budget import RunMemory
from distill.pipeline.config import (
    CachedTeacherSpec,
    CheckpointTeacher,
    ExperimentConfig,
    HFTeacher,
    TrainedTeacher,
    TrainSpec,
    config_to_dict,
)
from distill.pipeline.export import onnx_timings, require_onnxruntime
from distill.pipeline.predictions import remembered_predictions
from distill.pipeline.rundir import finish_dir, prepare_dir, run_dir_paths
from distill.report.html import write_html_report
from distill.report.markdown import ROLES, print_summary, write_markdown, write_plots
from distill.report.plots import pruning_figure, save_png
from distill.tasks import Task, get_task
from distill.tasks.augment import ImageAugment
from distill.tasks.hf import FromTeacherSpec, HFSpec, resolve_model_dir
from distill.tasks.lm_generate import manifest_path_for, read_manifest
from distill.tasks.models import count_parameters
from distill.tasks.prune import describe as describe_pruning
from distill.train.distributed import parallel_from_environment
from distill.train.loop import EpochLog, TrainResult, pick_device, rng_states, set_rng_states, train
from distill.train.tracking import RunTracker, check_tracker


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


def seeded_model(
    spec, data: DataBundle, seed: int, field: str, task: Task | None = None, teacher: nn.Module | None = None
) -> nn.Module:
    """Build a model whose initial weights depend only on ``seed`` (scratch and distilled
    students therefore start from the same weights), and check it fits the data. ``teacher``
    is the teacher model, for students derived from it (cut from its layers)."""
    task = task or get_task()
    torch.manual_seed(seed)
    model = task.build_model(spec, data, field, teacher=teacher if isinstance(teacher, nn.Module) else None)
    task.check_outputs(model, data, field)
    return model


def random_student(config: ExperimentConfig, data: DataBundle, teacher: nn.Module | None) -> nn.Module:
    """The student's architecture with random weights (seeded apart from the student's own init)."""
    task = get_task(config.task)
    student = seeded_model(config.student, data, config.seed, "student", task, teacher)
    torch.manual_seed(config.seed + 1)
    return task.random_init(student, "random_baseline")


def _train_phase(
    phase_dir: Path,
    distiller: Distiller,
    data: DataBundle,
    spec: TrainSpec,
    *,
    resume: bool,
    label: str,
    console: Console,
    **train_options: Any,
) -> TrainResult:
    """Train one model inside ``phase_dir``; a finished phase is loaded, not retrained.
    ``train_options`` go to :func:`distill.train.loop.train` (seed, device, ...).

    The student's weights and the terms' learnable parts (adapters) are kept separately, so
    the exported student never carries distillation machinery.
    """
    weights, adapters, history_file, rng_file = (
        phase_dir / n for n in ("model.safetensors", "adapters.safetensors", "history.json", "rng.pt")
    )
    if resume and weights.exists() and history_file.exists():
        distiller.prepare(take(data.train.x, slice(0, 2)))
        load_weights(distiller.student, weights)
        if adapters.exists():
            load_weights(distiller.terms, adapters)
        if rng_file.exists():  # the next phase draws the random numbers it would have drawn
            set_rng_states(load_checkpoint(rng_file), train_options.get("parallel"))
        console.print(f"[dim]{label}: already trained, reusing {weights}[/]")
        return TrainResult.from_dict(json.loads(history_file.read_text()))
    phase_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = phase_dir / "checkpoint.pt"
    result = train(
        distiller, data, spec, checkpoint=checkpoint, resume=resume, label=label, console=console, **train_options
    )
    distiller.to("cpu")
    parallel = train_options.get("parallel")
    rng = rng_states(parallel)
    if parallel is not None and not parallel.is_main:
        return result  # process 0 writes the files
    save_weights(distiller.student, weights)
    if any(True for _ in distiller.terms.state_dict()):
        save_weights(distiller.terms, adapters)
    save_checkpoint(rng, rng_file)  # before history.json marks the phase done
    write_json(history_file, result.to_dict())
    (phase_dir / "checkpoint.pt").unlink(missing_ok=True)
    return result


def hf_weights_file(directory: Path) -> Path:
    """The weights file of a Hugging Face model directory (its size and digest go into metrics)."""
    directory = resolve_model_dir(directory, "teacher.path")
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise DistillError(f"teacher.path: {directory} holds no .safetensors weights")
    return files[0]


def _views_settings(config: ExperimentConfig) -> dict[str, Any] | None:
    """What identifies a cache of augmented views: the augmentation, its seed, views per image."""
    augment = config.augmentation
    if augment is None:
        return None
    return {
        "augment": augment.model_dump(mode="json", exclude={"seed", "epochs"}),
        "seed": augment.seed if augment.seed is not None else config.seed,
        "count": augment.epochs,
    }


def _cached_views(config: ExperimentConfig) -> Views | None:
    """The augmented views `distill cache` stores beside the images, for a config with data.augment."""
    settings = _views_settings(config)
    if settings is None:
        return None
    if settings["count"] is None:
        raise DistillError(
            "data.augment.epochs: set how many views of each image to cache (epoch e then shows view e mod epochs)"
        )
    return Views(ImageAugment(config.data.augment, config.seed), settings)


def open_cached_teacher(config: ExperimentConfig, data: DataBundle, verify: bool = True) -> CachedTeacher:
    """The teacher signals of a ``teacher: {kind: cache}`` config, checked against the data (and,
    with data.augment, its views against the augmentation)."""
    assert isinstance(config.teacher, CachedTeacherSpec)
    cache = CachedTeacher(config.teacher.path, verify=verify and config.teacher.verify)
    cache.check_data(data)
    wanted = _views_settings(config)
    if wanted is not None:
        made = cache.views
        if made is None:
            raise DistillError(
                f"data.augment: cache {cache.path} holds the teacher on the plain images only; cache the views with "
                f"`distill cache` and this data.augment"
            )
        differs = next((key for key in ("augment", "seed", "count") if made.get(key) != wanted[key]), None)
        if differs is not None:
            field = {"augment": "data.augment", "seed": "data.augment.seed", "count": "data.augment.epochs"}[differs]
            raise DistillError(
                f"{field}: cache {cache.path} holds views made with {made.get(differs)}, this run asks for "
                f"{wanted[differs]}; use the cache's settings or cache these views"
            )
        cache.use_views()
    return cache


def obtain_teacher(
    config: ExperimentConfig, data: DataBundle, device, console: Console, cache_dir: Path
) -> tuple[nn.Module | CachedTeacher, Path, TrainResult | None]:
    """The teacher model (or its cached signals), the path of its weights (or cache), and its
    training history if distill trained it.

    A teacher trained by distill trains on the labeled training samples only (all of them: it
    stands for a model trained elsewhere; the students' label budget does not apply to it)."""
    spec = config.teacher
    if isinstance(spec, CachedTeacherSpec):
        console.print(f"teacher: signals from the cache {spec.path} (no teacher model is loaded)")
        return open_cached_teacher(config, data, verify=False), spec.path, None  # verified by _check_inputs
    data = data.labeled_only()
    field = "teacher" if isinstance(spec, HFTeacher) else "teacher.model"
    model = seeded_model(spec.model, data, config.seed, field, get_task(config.task))
    if isinstance(spec, CheckpointTeacher):
        load_weights(model, spec.path, "teacher.path")
        get_task(config.task).check_outputs(model, data, "teacher.path")
        return model, spec.path, None
    if isinstance(spec, HFTeacher):
        console.print(f"teacher: {spec.path} ({count_parameters(model):,} parameters)")
        return model, hf_weights_file(spec.path), None
    assert isinstance(spec, TrainedTeacher)
    if isinstance(spec.model, HFSpec):  # a pretrained directory: its files' digests, memoised by size and time
        initial = directory_digest(resolve_model_dir(spec.model.path, "teacher.model.path"), cache_dir / "digests.json")
    else:
        initial = hash_tensors(*model.state_dict().values())  # a changed factory gives a new key
    described = spec.model_dump(mode="json", exclude={"augment"} if spec.augment is None else None)  # keys as before
    key = hash_json({
        "teacher": described, "seed": config.seed, "data": data.fingerprint,
        "initial_weights": initial, "distill": __version__,
    })  # fmt: skip
    final = cache_dir / "teachers" / key[:20]
    if (final / "model.safetensors").exists():
        console.print(f"teacher: reusing cached teacher {final}")
        load_weights(model, final / "model.safetensors", f"cached teacher {final} (delete it to retrain)")
        saved = json.loads((final / "history.json").read_text())
        return model, final / "model.safetensors", TrainResult.from_dict(saved)
    console.print(f"teacher: training {count_parameters(model):,} parameters (cached for later runs)")
    work = final.with_name(final.name + ".partial")
    distiller = Distiller(model, None, {"ce": HardLabelCE()})
    result = _train_phase(
        work,
        distiller,
        data,
        spec.train,
        seed=config.seed,
        device=device,
        resume=True,
        label="teacher",
        console=console,
        on_epoch_end=None,
        task=get_task(config.task),
        augment=ImageAugment(spec.augment, config.seed) if spec.augment is not None else None,
    )
    write_json(
        work / "meta.json",
        {
            "key": key,
            "teacher": described,
            "data": data.summary(),
            "seed": config.seed,
            "distill_version": __version__,
        },
    )
    if final.exists():  # a concurrent run finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.replace(work, final)
    return model.to("cpu"), final / "model.safetensors", result


def _cached_teacher_architecture(cache: CachedTeacher, data: DataBundle, config: ExperimentConfig) -> nn.Module:
    """The cached teacher's architecture with fresh weights, to time it (the weights do not
    change latency); a cache of a teacher distill cannot rebuild gets the same error as a bad spec."""
    spec = cache.model_spec()
    if spec is None:
        raise DistillError(f"teacher.path: the cache {cache.path} does not record the teacher's architecture")
    return seeded_model(spec, data, config.seed, "teacher (cached) model", get_task(config.task))


def teacher_for_students(teacher: nn.Module | CachedTeacher, config: ExperimentConfig, data: DataBundle):
    """What the students are built from: the teacher model; for a cached teacher, its own weights
    when the student is cut from it (loaded from the Hugging Face directory the cache records and
    checked against the digest recorded then; it never runs, except for ``layers: auto``'s
    influence pass), else None."""
    if not isinstance(teacher, CachedTeacher):
        return teacher
    if not isinstance(config.student, FromTeacherSpec):
        return None
    spec = teacher.model_spec()
    if not isinstance(spec, HFSpec):
        raise DistillError(
            f"student: a student cut from the teacher needs the teacher's weights, and the cache {teacher.path} "
            "records no Hugging Face teacher directory; cut it from a teacher of kind hf, or train a fresh student"
        )
    weights = hf_weights_file(spec.path)
    if file_sha256(weights) != teacher.teacher.get("weights_sha256"):
        raise DistillError(
            f"student: the teacher's weights {weights} changed since the cache {teacher.path} was made; "
            "rebuild the cache (distill cache --overwrite) or cut the student from the teacher it was made with"
        )
    return seeded_model(spec, data, config.seed, "teacher (cached) weights", get_task(config.task))


def cache_teacher(
    config: ExperimentConfig,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> Path:
    """``distill cache``: obtain the configured teacher (training it if needed) and store its
    top-k signals on every split at ``config.cache_path()``. Resumable; see :mod:`distill.cache`."""
    console = console or Console()
    cache_dir = cache_dir or default_cache_dir()
    if isinstance(config.teacher, CachedTeacherSpec):
        raise DistillError(
            "teacher.kind: 'cache' reads a cache; to make one, give the teacher as kind train or checkpoint"
        )
    if not get_task(config.task).cacheable:
        raise DistillError(f"task: {config.task} has no logits to cache; its students learn from the live teacher")
    views = _cached_views(config)
    device = pick_device(config.device)
    data = get_task(config.task).load_data(config.data)
    console.print(
        f"data: {data.name}, {len(data.train)} train ({data.train.labeled} labeled) / {len(data.val)} val / "
        f"{len(data.test)} test, {data.num_classes} classes"
    )
    memory = RunMemory(config, data.input_shape, data.num_classes, len(data.train), caching=True)
    memory.check_models()  # before the teacher is built
    probe = seeded_model(config.teacher.model, data, config.seed, "teacher.model", get_task(config.task))
    memory.check_batches({"teacher.model": probe}, take(data.train.x, slice(0, 1)))  # before it trains or runs a batch
    teacher, weights, _ = obtain_teacher(config, data, device, console, cache_dir)
    spec = config.cache
    path = config.cache_path()
    identity = {
        "teacher": {"weights_sha256": file_sha256(weights), "model": config.teacher.model.model_dump(mode="json")},
        "data": data.fingerprint,
    }
    stored = _stored_signals(config, data, cache_dir, console)
    console.print(
        f"cache: top-{spec.k} logits as {spec.dtype} -> {path}"
        + (" (from the logits `distill generate` stored: the teacher does not run)" if stored else "")
        + (f", and on {views.count} augmented views of each training image" if views is not None else "")
    )
    write_cache(
        stored or teacher, data, path, identity=identity, k=spec.k, dtype=spec.dtype, features=spec.features,
        shard_rows=spec.shard_rows, batch_size=spec.batch_size, device=device, overwrite=overwrite,
        console=console, on_shard=on_shard, views=views,
        info={"teacher_facts": {"params": count_parameters(teacher), "weights_bytes": Path(weights).stat().st_size,
                                "source": str(weights)}, "data_summary": data.summary(), "data_info": data.info,
              "signals_from": "distill generate" if stored else "teacher"},
    )  # fmt: skip
    return path


def _stored_signals(
    config: ExperimentConfig, data: DataBundle, cache_dir: Path, console: Console
) -> GeneratedSignals | None:
    """The teacher's top-k logits stored with generated data, when they are this teacher's (the
    Hugging Face directory that generated it, by digest), on the teacher's own tokens, for every
    split, and enough for the cache asked for; else None (the teacher runs)."""
    generated = data.info.get("generated_by")
    spec = config.teacher
    if not generated or not generated.get("signals") or not isinstance(spec, HFTeacher):
        return None
    digest = directory_digest(resolve_model_dir(spec.path, "teacher.path"), cache_dir / "digests.json")
    if digest != (generated.get("teacher") or {}).get("sha256") or config.data.test_path is not None:
        return None  # another teacher, or test rows that were not generated
    if config.cache.k > generated["signals"] or config.cache.features:
        console.print(
            f"cache: {config.data.path} stores the teacher's top-{generated['signals']} logits and no features; "
            f"cache.k {config.cache.k}{' and cache.features' if config.cache.features else ''} need the teacher "
            "to run"
        )
        return None
    manifest = read_manifest(manifest_path_for(config.data.path))
    return generated_signals(config.data.path, manifest or {}, data.num_classes, data.info["max_length"])


def scratch_setup(student_data: DataBundle, config: ExperimentConfig) -> tuple[DataBundle, int]:
    """The scratch baseline trains on the labeled samples only, for as many optimisation steps
    as the distilled student takes: a fair baseline. With a label budget one of its epochs is
    several passes over the labeled samples; returns the data and the passes per epoch."""
    labeled = student_data.labeled_only()
    if len(labeled.train) == len(student_data.train):
        return student_data, 1
    batch = config.train.batch_size
    return labeled, max(1, round(math.ceil(len(student_data.train) / batch) / math.ceil(len(labeled.train) / batch)))


def build_distiller(config: ExperimentConfig, student: nn.Module, teacher: nn.Module, data: DataBundle) -> Distiller:
    """The configured objective around ``student``; taps and adapter shapes are checked here."""
    terms, weights = {}, {}
    for spec in config.distill.resolved_terms():
        terms[spec.key] = build_term(spec.type, spec.params)
        weights[spec.key] = LinearWarmup(spec.weight, spec.warmup_epochs) if spec.warmup_epochs else spec.weight
    samples = max([2] + [term.calibration_samples for term in terms.values()])  # a PCA's calibration set
    return Distiller(
        student, teacher, terms, weights, example_inputs=get_task(config.task).example_inputs(data, samples)
    )


def hint_stages(distiller: Distiller) -> list[tuple[str, LossTerm]]:
    """Terms that ask for a stage of their own before full training (FitNets' first stage)."""
    return [(name, term) for name, term in distiller.terms.items() if getattr(term, "stage_epochs", 0) > 0]


def run_hint_stage(name: str, term: LossTerm, distiller: Distiller, data: DataBundle, train_phase) -> TrainResult:
    """Train only the student parameters that feed term ``name`` (and its adapter) on that term
    alone, as FitNets' first stage; the rest of the student is frozen meanwhile."""
    stage = Distiller(distiller.student, distiller.teacher, {name: term})
    frozen: list[torch.nn.Parameter] = []
    try:
        stage.prepare(take(data.train.x, slice(0, 2)))
        trainable = [p for p in distiller.student.parameters() if p.requires_grad]
        with probing(distiller.student):  # the probe must not move batch-norm statistics
            probe = stage(
                take(data.train.x, slice(0, 8)), labels=data.train.y[:8], index=torch.arange(min(8, len(data.train)))
            )
            gradients = torch.autograd.grad(probe.loss, trainable, allow_unused=True)
        frozen = [p for p, g in zip(trainable, gradients, strict=True) if g is None]  # not below the tap
        for parameter in frozen:
            parameter.requires_grad_(False)
        return train_phase(stage, epochs=term.stage_epochs)
    finally:
        for parameter in frozen:  # only what this stage froze: the user's frozen layers stay frozen
            parameter.requires_grad_(True)
        stage.remove_taps()


def _prepare_run_dir(config: ExperimentConfig, resume: bool, overwrite: bool, console: Console) -> tuple[Path, Path]:
    return prepare_dir(config.output, config_to_dict(config), "metrics.json", resume, overwrite, console)


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    cache_dir: Path | None = None,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> RunResult:
    """Train teacher (or load it), scratch and distilled students; evaluate; write the run directory.

    ``on_epoch_end(role, epoch)`` is called after each student epoch (``role`` is "scratch" or
    "distilled"); raising there interrupts the run as a crash would.
    """
    console = console or Console()
    cache_dir = cache_dir or default_cache_dir()  # trained teachers, their test predictions
    started = time.perf_counter()
    device = pick_device(config.device)
    parallel = parallel_from_environment(device)
    if parallel is not None:
        device = parallel.device
        if not parallel.is_main:
            console = Console(quiet=True)  # one process speaks
    data = get_task(config.task).load_data(config.data)
    _check_inputs(config, data, console)  # everything that can be wrong is found before the run directory exists
    final, partial = run_dir_paths(config.output)
    main_process = parallel is None or parallel.is_main
    if main_process:
        _prepare_run_dir(config, resume, overwrite, console)
        teacher, teacher_weights, teacher_result = obtain_teacher(config, data, device, console, cache_dir)
    if parallel is not None:
        parallel.barrier()  # process 0 has made the run directory and trained (or loaded) the teacher
        if not main_process:  # a cache hit now
            teacher, teacher_weights, teacher_result = obtain_teacher(config, data, device, console, cache_dir)
        console.print(f"distributed: {parallel.world} processes ({parallel.accelerator.distributed_type.value})")
    tracker = RunTracker(
        config.output.tracker if main_process else "none", partial / "tracking", final.name, config_to_dict(config)
    )
    try:
        session = _StudentTraining(config, data, partial, device, resume, console, tracker, on_epoch_end, parallel)
        objective = session.run(teacher)
        if not main_process:
            tracker.finish()
            parallel.finish()  # process 0 evaluates and writes the run
            return RunResult(final, {})
        console.print("evaluating on the test split and timing CPU latency ...")
        weights_paths: dict[str, Path | None] = {"teacher": Path(teacher_weights)}
        for role, model in session.students.items():
            weights_paths[role] = partial / ("student.safetensors" if role == "distilled" else f"{role}.safetensors")
            get_task(config.task).export(model, weights_paths[role], data)
        if isinstance(teacher, CachedTeacher):
            models = {"teacher": _cached_teacher_architecture(teacher, data, config), **session.students}
            weights_paths["teacher"] = None
            cached = {
                "test_signals": teacher.split_logits("test"),
                "test_label_logprobs": teacher.split_label_logprobs("test"),
                "size_bytes": teacher.teacher.get("weights_bytes"),
                "weights_sha256": teacher.teacher.get("weights_sha256"),
            }
            metrics = evaluate_models(models, weights_paths, session.student_data, config, cached_teacher=cached)
            metrics["teacher_cache"] = {"path": str(teacher.path), "k": teacher.k, "dtype": teacher.dtype}
        else:
            models = {"teacher": teacher.to("cpu"), **session.students}
            metrics = evaluate_models(models, weights_paths, session.student_data, config, cache_dir=cache_dir)
        results = {"teacher": teacher_result, **session.results}
        metrics.update(
            name=final.name,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            distill_version=__version__,
            device=str(device),
            seconds=time.perf_counter() - started,
            objective=objective,
            training={role: (r.to_dict() if r else None) for role, r in results.items()},
        )
        metrics = json_safe(metrics)  # what is returned is exactly what metrics.json holds
        tracker.log(
            {
                f"test/{role}/{k}": m[k]
                for role, m in metrics["models"].items()
                for k in ("score", "agreement")
                if k in m
            }
        )
        tracker.finish()  # before the run directory moves into place
        _write_run(partial, final, config, metrics)
        if parallel is not None:
            parallel.finish()
    finally:
        tracker.finish()  # flush what was logged, also when the run fails
    print_summary(console, metrics, final)
    return RunResult(final, metrics)


class _StudentTraining:
    """The scratch baseline, any hint stages and the distilled student of one run, each a
    resumable phase in its own directory under the run's ``.partial`` directory."""

    def __init__(self, config, data, partial, device, resume, console, tracker, on_epoch_end, parallel=None) -> None:
        self.config, self.data, self.partial, self.device, self.parallel = config, data, partial, device, parallel
        self.resume, self.console, self.tracker, self.on_epoch_end = resume, console, tracker, on_epoch_end
        self.student_data = data.with_label_budget(config.data.labeled, config.data.split_seed)
        augment = config.augmentation
        self.augment = ImageAugment(augment, config.seed) if augment is not None else None
        self.students: dict[str, nn.Module] = {}
        self.results: dict[str, TrainResult] = {}

    def _phase(self, name: str, distiller: Distiller, data: DataBundle, spec: TrainSpec, **options: Any) -> TrainResult:
        options.setdefault("task", get_task(self.config.task))
        options.setdefault("augment", self.augment)
        return _train_phase(
            self.partial / name, distiller, data, spec, resume=self.resume, console=self.console,
            seed=self.config.seed, device=self.device, parallel=self.parallel, **options,
        )  # fmt: skip

    def _train_student(
        self, role: str, distiller: Distiller, data: DataBundle, passes_per_epoch: int = 1, on_policy: bool = False
    ) -> None:
        def hook(log: EpochLog) -> None:
            values = {"loss": log.loss, "train_acc": log.train_acc, "val_acc": log.val_acc, **log.terms}
            self.tracker.log({f"{role}/{key}": value for key, value in values.items()}, step=log.epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(role, log.epoch)

        task = get_task(self.config.task)
        if on_policy:  # the distilled student alone writes its own continuations; the baselines never do
            task.on_policy = self.config.distill.on_policy
        self.results[role] = self._phase(
            role, distiller, data, self.config.train, label=role, on_epoch_end=hook, passes_per_epoch=passes_per_epoch,
            remember_teacher=self.config.distill.remember_teacher and not on_policy, task=task,
        )  # fmt: skip
        self.students[role] = distiller.student.to("cpu")

    def run(self, teacher: nn.Module) -> str:
        """Train both students; return the distillation objective as text."""
        config, data = self.config, self.data
        if config.distill.on_policy is not None and self.parallel is not None:
            raise DistillError("distill.on_policy: runs in one process for now; drop --processes")
        source = teacher_for_students(teacher, config, data)  # a cached teacher's weights, to cut students from
        if self.augment is not None:
            self.console.print(
                f"augmentation: {config.data.augment.describe()}; each training image's view depends on (seed, "
                "image, epoch), and teacher and student see the same one (the scratch baseline too)"
            )
        if config.baseline and not get_task(config.task).trains_on_labels:
            self.console.print("no scratch baseline: an embedding student has no labels to train on alone")
        if config.baseline and get_task(config.task).trains_on_labels:
            scratch_data, passes = scratch_setup(self.student_data, config)
            scratch = seeded_model(config.student, data, config.seed, "student", get_task(config.task), source)
            more = (
                f", {passes} passes over them per epoch (as many steps as the distilled student)" if passes > 1 else ""
            )
            self.console.print(
                f"scratch student: {count_parameters(scratch):,} parameters, {len(scratch_data.train)} labeled samples{more}"
            )
            self._train_student("scratch", Distiller(scratch, None, {"ce": HardLabelCE()}), scratch_data, passes)
        if config.random_baseline:
            scratch_data, passes = scratch_setup(self.student_data, config)
            fresh = random_student(config, data, source)
            self.console.print("random-init student: the same architecture from random weights, on labels alone")
            self._train_student("random", Distiller(fresh, None, {"ce": HardLabelCE()}), scratch_data, passes)

        student = seeded_model(config.student, data, config.seed, "student", get_task(config.task), source)
        del source
        pruning = getattr(student, "pruning", None)
        if pruning is not None:  # a student pruned in width: what it kept, and the importance behind it
            self.console.print(describe_pruning(pruning))
            if self.parallel is None or self.parallel.is_main:
                write_json(self.partial / "pruning.json", pruning)
        distiller = build_distiller(config, student, teacher, data)
        objective = " + ".join(
            f"{w:g}·{k}" if isinstance(w, float) else f"{w}·{k}" for k, w in distiller.weights.items()
        )
        self.console.print(f"distilled student: {count_parameters(distiller.student):,} parameters, loss = {objective}")
        for name, term in hint_stages(distiller):
            self.console.print(
                f"{name} stage: {term.stage_epochs} epoch(s) on the {name} term alone, lower layers only"
            )

            def stage_phase(stage: Distiller, epochs: int, name: str = name) -> TrainResult:
                spec = config.train.model_copy(update={"epochs": epochs})
                return self._phase(
                    f"stage-{name}", stage, self.student_data, spec, label=f"{name} stage", select_best=False
                )

            self.results[f"stage-{name}"] = run_hint_stage(name, term, distiller, self.student_data, stage_phase)
        self._train_student("distilled", distiller, self.student_data, on_policy=config.distill.on_policy is not None)
        distiller.remove_taps()  # the exported student and the teacher are timed without hooks
        if any(True for _ in distiller.terms.state_dict()) and (self.parallel is None or self.parallel.is_main):
            save_weights(distiller.terms, self.partial / "adapters.safetensors")
        return objective


def _check_inputs(config: ExperimentConfig, data: DataBundle, console: Console) -> None:
    """Models build, weights fit and class counts agree; notes on unusual objectives."""
    console.print(
        f"data: {data.name}, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
        f"{data.num_classes} classes, input {list(data.input_shape)}"
    )
    memory = RunMemory(config, data.input_shape, data.num_classes, len(data.train))
    memory.check_models()  # before any model is built
    task = get_task(config.task)
    if isinstance(config.teacher, CachedTeacherSpec):
        teacher = open_cached_teacher(config, data)
        source = teacher_for_students(teacher, config, data)
        student = seeded_model(config.student, data, config.seed, "student", task, source)
        del source
        memory.check_batches({"student": student}, take(data.train.x, slice(0, 1)))
    else:
        field = "teacher" if isinstance(config.teacher, HFTeacher) else "teacher.model"
        teacher = seeded_model(config.teacher.model, data, config.seed, field, task)
        if isinstance(config.teacher, CheckpointTeacher):
            load_weights(teacher, config.teacher.path, "teacher.path")
        student = seeded_model(config.student, data, config.seed, "student", task, teacher)
        memory.check_batches(
            {"student": student, "teacher.model": teacher}, take(data.train.x, slice(0, 1))
        )  # before any batch
    build_distiller(config, student, teacher, data).remove_taps()  # the taps exist and adapters fit
    if config.eval.onnx:
        require_onnxruntime("eval.onnx")
        if task.onnx_module(student) is None:
            raise DistillError(f"eval.onnx: task {task.name} has no ONNX export; drop eval.onnx")
    if config.random_baseline:
        task.random_init(student, "random_baseline")  # the task can re-initialise its students
    check_tracker(config.output.tracker)
    if len(data.val) == 0:
        console.print("no validation split (data.val_fraction: 0): every model keeps the weights of its last epoch")
    terms = config.distill.resolved_terms()
    if all(term.type == "ce" for term in terms):
        console.print(
            "[yellow]note: the objective has no teacher term (alpha=0): the distilled student trains like the scratch one[/]"
        )
    if config.data.labeled is not None and config.data.labeled < len(data.train):
        console.print(
            f"label budget: the students see labels on {config.data.labeled} of {len(data.train)} training samples"
            + ("; the ce term skips the rest" if any(t.type == "ce" for t in terms) else "")
        )


def _write_run(partial: Path, final: Path, config: ExperimentConfig, metrics: dict[str, Any]) -> None:
    """Write metrics, plots and report into the partial directory, then move it into place."""
    pruning = partial / "pruning.json"
    if pruning.is_file():  # a student pruned from the teacher: what it kept, in the metrics and a figure
        record = json.loads(pruning.read_text())
        metrics["pruning"] = {
            "summary": describe_pruning(record),
            **{key: value for key, value in record.items() if key not in ("importance", "kept")},
        }
        save_png(pruning_figure(record), partial / "pruning.png")
    write_json(partial / "metrics.json", metrics)
    histories = {role: (r["history"] if r else []) for role, r in metrics["training"].items() if role in ROLES}
    write_plots(partial, metrics, histories)
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    write_markdown(partial / "report.md", metrics, config_yaml)
    drawn = [name for name in ("curves", "tradeoff", "pruning") if (partial / f"{name}.png").is_file()]
    pngs = {name: (partial / f"{name}.png").read_bytes() for name in drawn}  # drawn once
    write_html_report(partial / "report.html", metrics, histories, config_yaml, pngs)
    for phase in partial.iterdir():  # phase checkpoints are no longer needed; tracker logs and exports stay
        if phase.is_dir() and (phase.name in ROLES or phase.name.startswith("stage-")):
            shutil.rmtree(phase)
    for leftover in partial.rglob(".*.tmp"):  # a temporary file a crash left behind never ships
        leftover.unlink()
    finish_dir(partial, final)


def retention(student: float, teacher: float, higher_is_better: bool = True) -> float:
    """How much of the teacher's quality the student kept: student / teacher (teacher / student when
    lower is better, e.g. perplexity); NaN when the ratio means nothing (a score of zero or below)."""
    if higher_is_better:
        return student / teacher if teacher > 0 else float("nan")
    return teacher / student if student > 0 and teacher > 0 else float("nan")


def _augment_summary(config: ExperimentConfig) -> dict[str, str]:
    augment = config.augmentation
    return {"augment": augment.describe()} if augment is not None else {}


def evaluate_models(
    models: dict[str, nn.Module],
    weights: dict[str, Path | None],
    data: DataBundle,
    config: ExperimentConfig,
    cached_teacher: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The task's test metrics (``score``: its primary metric), agreement, retention, gap closed, size
    and latency for each model.

    With ``cached_teacher`` (``test_signals``, ``size_bytes``, ``weights_sha256`` from a cache),
    the teacher's predictions come from the cache and ``models["teacher"]`` is only its
    architecture, used to time it and count its parameters (latency does not need its weights).
    Otherwise a teacher's test predictions are remembered under ``cache_dir`` for the next run with
    the same weights and test split (:mod:`distill.pipeline.predictions`).
    """
    spec, task = config.eval, get_task(config.task)
    shas = {role: file_sha256(path) if path else cached_teacher["weights_sha256"] for role, path in weights.items()}
    test = data.test
    example = task.example_inputs(data)

    def predict(model: nn.Module, split: Split, reference: Any = None) -> Any:
        """Predictions, not latency, may come from batch norms folded in (a model without any runs as it is)."""
        return task.predict(folded_batch_norms(model, example), split.x, labels=split.y, reference=reference)

    remembered = False
    if cached_teacher is not None:  # a cached teacher's model is only its architecture
        teacher_predictions = task.predict_cached(
            cached_teacher["test_signals"], test.y, cached_teacher.get("test_label_logprobs")
        )
    else:
        teacher_predictions, remembered = remembered_predictions(
            models["teacher"], shas["teacher"], test, predict, cache_dir or default_cache_dir(), task.name
        )
    reference = None if task.has_logits else teacher_predictions  # embeddings, token scores: against the teacher's
    predictions = {"teacher": teacher_predictions} | {
        role: predict(model, test, reference) for role, model in models.items() if role != "teacher"
    }
    latencies = {
        b: measure_latencies(
            models,
            data.input_shape,
            b,
            spec.latency_repeats,
            threads=spec.latency_threads,
            max_seconds=spec.latency_seconds,
            inputs=get_task(config.task).latency_inputs(data, b),
        )
        for b in spec.latency_batch_sizes
    }
    out: dict[str, Any] = {}
    embedding = {role: task.embedding_parameters(model) for role, model in models.items()}  # memory, not time
    for role, model in models.items():
        common = {
            "params": count_parameters(model),
            **({"embedding_params": embedding[role]} if embedding[role] else {}),
            "size_bytes": weights[role].stat().st_size if weights[role] else cached_teacher["size_bytes"],
            "weights_sha256": shas[role],
            "latency_ms": {str(b): latencies[b][role] for b in spec.latency_batch_sizes},
        }
        if not task.has_logits:
            scores = task.metrics(predictions[role], test, predictions["teacher"])
            agrees = {"agreement": scores["agreement"]} if "agreement" in scores else {}  # top-1 tokens, for LMs
            out[role] = {"metrics": scores, **agrees, **common}
            continue
        logits = predictions[role]
        out[role] = {
            "test_acc": accuracy(logits, test.y),
            "metrics": task.metrics(logits, test),  # the task's scores, its primary metric among them
            "agreement": agreement(logits, predictions["teacher"]),
            **common,
            "per_class_acc": per_class_accuracy(logits, test.y, data.num_classes),
            "per_class_agreement": per_class_agreement(logits, predictions["teacher"], test.y, data.num_classes),
            "calibration": calibration(logits, test.y),
        }
    for m in out.values():
        m["score"] = m["metrics"][task.primary_metric]
    teacher = out["teacher"]
    for m in out.values():
        m["retention"] = retention(m["score"], teacher["score"], task.higher_is_better)
        m["speedup"] = {b: teacher["latency_ms"][b] / m["latency_ms"][b] for b in m["latency_ms"]}
        m["compression"] = teacher["params"] / m["params"]
    if spec.onnx:  # the distilled student under onnxruntime, timed like the PyTorch models
        out["distilled"]["onnx"] = onnx_timings(
            task.onnx_module(models["distilled"]),
            [take(data.test.x, slice(0, 4)), take(data.test.x, slice(4, 5))],
            {b: task.latency_inputs(data, b) for b in spec.latency_batch_sizes},
            lambda model, inputs: measure_latencies(
                {"onnx": model}, data.input_shape, batch_len(inputs), spec.latency_repeats,
                threads=spec.latency_threads, max_seconds=spec.latency_seconds, inputs=inputs,
            )["onnx"],
            threads=spec.latency_threads,
        )  # fmt: skip
    if "scratch" in out:
        gap = teacher["score"] - out["scratch"]["score"]
        ahead = gap > 0 if task.higher_is_better else gap < 0  # the teacher is better than the scratch student
        out["distilled"]["gap_closed"] = (
            (out["distilled"]["score"] - out["scratch"]["score"]) / gap if ahead else float("nan")
        )
    return {
        **task.extra_evaluation(models, data, teacher_has_weights=cached_teacher is None),
        "task": task.name,
        "primary_metric": {
            "name": task.primary_metric,
            "higher_is_better": task.higher_is_better,
            "percent": task.primary_percent,
        },
        "models": out,
        "teacher_predictions_remembered": remembered,  # its test predictions from an earlier run with these weights
        "data": {**data.summary(), **_augment_summary(config)},
        "class_names": data.class_names,
        "seed": config.seed,
        "latency_batch_sizes": spec.latency_batch_sizes,
        "latency_repeats": spec.latency_repeats,
        "latency_seconds": spec.latency_seconds,
        "latency_threads": spec.latency_threads or torch.get_num_threads(),
    }
