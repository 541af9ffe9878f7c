"""Typed experiment configs (pydantic), loaded from YAML with ``--set key=value`` overrides.

Every mistake is reported as one line naming the field, e.g.
``config.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.core.errors import DistillError
from distill.core.losses import TERMS
from distill.tasks.augment import AugmentSpec
from distill.tasks.hf import HFSpec
from distill.tasks.image_data import DataSpec
from distill.tasks.lm_on_policy import OnPolicySpec
from distill.tasks.models import ModelSpec
from distill.tasks.text_data import TextDataSpec
from distill.train.spec import TrainSpec


def registered(value: str, registry: dict, what: str) -> str:
    """``value`` if ``registry`` holds it; else a ValueError listing what does."""
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; available: {', '.join(sorted(registry))}")
    return value


class Strict(BaseModel):
    # infinities and NaN are never sensible settings: refused here, not after training has started
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainedTeacher(Strict):
    """A teacher trained by distill on the run's data, cached by a hash of config and data."""

    kind: Literal["train"] = "train"
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    augment: AugmentSpec | None = Field(
        None,
        description="train the teacher on augmented views (image data): for consistent teaching, a teacher that "
        "knows the views its students see (e.g. the same crop and flip as data.augment); null = plain images",
    )


class CheckpointTeacher(Strict):
    """A teacher loaded from safetensors weights; ``model`` describes its architecture."""

    kind: Literal["checkpoint"] = "checkpoint"
    model: ModelSpec
    path: Path


class CachedTeacherSpec(Strict):
    """Teacher signals precomputed by ``distill cache``: no teacher model is loaded."""

    kind: Literal["cache"] = "cache"
    path: Path
    verify: bool = Field(True, description="check every shard's sha256 when the cache is opened")


class HFTeacher(Strict):
    """A ready Hugging Face model directory (with its task head) as the teacher; nothing is trained."""

    kind: Literal["hf"] = "hf"
    path: Path
    trust_remote_code: bool = Field(False, description="run the directory's own model code (off unless you trust it)")

    @property
    def model(self) -> HFSpec:
        return HFSpec(path=self.path, trust_remote_code=self.trust_remote_code)


TeacherSpec = Annotated[TrainedTeacher | CheckpointTeacher | CachedTeacherSpec | HFTeacher, Field(discriminator="kind")]
AnyDataSpec = Annotated[DataSpec | TextDataSpec, Field(discriminator="source")]


class CacheSpec(Strict):
    """What ``distill cache`` stores: the teacher's top-k logits per sample (or token) in a
    compact dtype, plus the tail mass outside them, and optionally tapped teacher features."""

    path: Path | None = Field(None, description="cache directory; default: <output.dir>/<output.name>-teacher-cache")
    k: int = Field(10, gt=0, description="logits kept per row (capped at the number of classes)")
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float16", description="storage of the top-k values (int8: affine per-row scale)"
    )
    features: list[str] = Field(default_factory=list, description="teacher modules whose outputs are also stored")
    shard_rows: int = Field(1_000_000, gt=0, description="rows (samples or token positions) per shard")
    batch_size: int = Field(
        128,
        gt=0,
        description="teacher batch size while caching; 128 ran 1.8x faster per image than 512 on a 2-core CPU "
        "(benchmarks/cache.py --parts batch); on a GPU larger batches usually pay",
    )


class TermSpec(BaseModel):
    """One weighted loss term: ``{type: kd, weight: 0.9, temperature: 4}``; extra keys are
    the term's own parameters, checked against its declared ``Params``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    type: str
    weight: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0, description="grow the weight linearly from 0 over these epochs")
    name: str | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        return registered(value, TERMS, "loss term")

    @model_validator(mode="after")
    def _params(self) -> TermSpec:
        TERMS[self.type].Params(**self.params)  # raises ValidationError naming the parameter
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def key(self) -> str:
        return self.name or self.type


class DistillSpec(Strict):
    """The distillation objective. By default Hinton's ``alpha * kd + (1 - alpha) * ce``;
    ``terms`` lists weighted terms explicitly instead (alpha and temperature then unused)."""

    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target term")
    temperature: float = Field(4.0, gt=0)
    terms: list[TermSpec] | None = None
    on_policy: OnPolicySpec | None = Field(
        None,
        description="causal_lm: rewrite that fraction of batches with the student's own sampled continuations, "
        "scored by the live teacher (GKD); prompt/response or chat data",
    )
    remember_teacher: bool = Field(
        True,
        description="run a live teacher once over the training data and reuse its logits every epoch (the inputs "
        "are the same every epoch and the teacher is frozen, so its outputs are too); off: run it every step",
    )

    @model_validator(mode="after")
    def _exclusive(self) -> DistillSpec:
        if self.terms is not None:
            if not self.terms:
                raise ValueError("terms: list at least one loss term")
            keys = [t.key for t in self.terms]
            if len(set(keys)) != len(keys):
                raise ValueError(f"terms: names must be unique, got {keys}; give repeated types a 'name'")
            if "alpha" in self.model_fields_set or "temperature" in self.model_fields_set:
                raise ValueError("set either alpha/temperature or an explicit terms list, not both")
            if not any(t.weight > 0 for t in self.terms):
                raise ValueError("terms: every weight is 0; give at least one term a positive weight")
        return self

    def resolved_terms(self) -> list[TermSpec]:
        """The weighted terms to train with; zero-weight terms are dropped (alpha=1 needs no labels)."""
        terms = self.terms or [
            TermSpec(type="kd", weight=self.alpha, temperature=self.temperature),
            TermSpec(type="ce", weight=1 - self.alpha),
        ]
        return [t for t in terms if t.weight > 0]


class EvalSpec(Strict):
    latency_batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 256], min_length=1)
    latency_repeats: int = Field(30, gt=0, description="timed samples per model and batch size (median reported)")
    latency_seconds: float | None = Field(
        0.5,
        gt=0,
        description="time budget per batch size: fewer samples (at least 7) when latency_repeats would take longer; "
        "null = always latency_repeats",
    )
    latency_threads: int | None = Field(None, gt=0, description="CPU threads for latency; default: torch's")
    onnx: bool = Field(
        False,
        description="also export the distilled student to ONNX (in a temporary file), check it against PyTorch and "
        "time it under onnxruntime with the same inputs (text tasks; needs the text extra)",
    )


class OutputSpec(Strict):
    dir: Path = Path("runs")
    tracker: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="also log to TensorBoard or MLflow (through Accelerate) in <run>/tracking"
    )
    name: str | None = Field(None, pattern=r"^[\w.-]+$", description="run directory name; default: config file stem")

    @field_validator("name")
    @classmethod
    def _not_a_parent(cls, value: str | None) -> str | None:
        if value in (".", ".."):
            raise ValueError("must name a directory inside output.dir, not '.' or '..'")
        return value


def _cached_teacher_model(path: Path) -> HFSpec | None:
    """The Hugging Face model a teacher cache was made with, as its manifest records it (else None)."""
    from distill.cache.format import read_json

    recorded = ((read_json(Path(path) / "manifest.json") or {}).get("teacher") or {}).get("model")
    return HFSpec.model_validate(recorded) if isinstance(recorded, dict) and recorded.get("arch") == "hf" else None


class ExperimentConfig(Strict):
    """A whole experiment: teacher, scratch student and distilled student on one dataset."""

    task: str = Field("image_classification", description="what the models do; see distill.tasks")
    seed: int = Field(0, ge=0, lt=2**31)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data: AnyDataSpec
    teacher: TeacherSpec
    student: ModelSpec
    distill: DistillSpec = Field(default_factory=DistillSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    baseline: bool = Field(True, description="also train the student from scratch for comparison")
    random_baseline: bool = Field(
        False,
        description="also train the student's architecture from random weights on labels alone: for a student "
        "initialised from the teacher (cut from its layers), what the teacher's weights are worth",
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec, description="settings of `distill cache`")
    max_memory: ByteSize | None = Field(
        None,
        gt=0,
        description="memory budget, e.g. 8GB or 6GiB (also --max-memory); models and batches that would not fit are "
        "refused before anything is built. Default: the memory available when the run starts",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from distill.tasks import TASKS

        return registered(value, TASKS, "task")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, raw: Any) -> Any:
        """``student: {from_teacher: {layers: [0, 2]}}`` is ``student: {arch: from_teacher, layers: [0, 2]}``."""
        if isinstance(raw, dict) and isinstance(raw.get("student"), dict) and set(raw["student"]) == {"from_teacher"}:
            rule = raw["student"]["from_teacher"]
            raw = {**raw, "student": {"arch": "from_teacher", **(rule if isinstance(rule, dict) else {})}}
        return raw

    @model_validator(mode="after")
    def _on_policy_has_prompts_and_a_live_teacher(self) -> ExperimentConfig:
        if self.distill.on_policy is None:
            return self
        if self.task != "causal_lm":
            raise ValueError("distill.on_policy: the student writes continuations: task causal_lm only")
        if isinstance(self.teacher, CachedTeacherSpec):
            raise ValueError(
                "distill.on_policy: the teacher scores the student's own continuations, which no cache holds; "
                "use a live teacher (kind hf or train)"
            )
        if isinstance(self.data, TextDataSpec) and self.data.format == "text" and self.data.source != "generated":
            raise ValueError(
                "distill.on_policy: needs prompts to continue: data.format prompt_response or chat (or source generated)"
            )
        return self

    @model_validator(mode="after")
    def _language_models_distil_by_forward_kl(self) -> ExperimentConfig:
        """A causal LM with no objective given distils by forward KL at T = 1 alone (Minitron's and
        most LLM recipes' choice), not the classifiers' 0.9·kd at T = 4 + 0.1·ce."""
        if self.task == "causal_lm" and not self.distill.model_fields_set & {"alpha", "temperature", "terms"}:
            self.distill.terms = [TermSpec(type="forward_kl", weight=1.0, temperature=1.0)]
        return self

    @model_validator(mode="after")
    def _a_cache_of_views_has_a_count(self) -> ExperimentConfig:
        augment = self.augmentation
        if augment is not None and isinstance(self.teacher, CachedTeacherSpec) and augment.epochs is None:
            raise ValueError(
                "data.augment: a teacher cache holds a fixed number of views of each image; set data.augment.epochs "
                "to the number it was made with (or use a live teacher: a new view every epoch)"
            )
        return self

    @model_validator(mode="after")
    def _a_teacher_augments_images(self) -> ExperimentConfig:
        augment = getattr(self.teacher, "augment", None)
        if augment is not None and not isinstance(self.data, DataSpec):
            raise ValueError("teacher.augment: augmentation is for image data; drop it for text")
        if augment is not None and not augment.active:  # nothing to do: the same teacher (and cache key) as none
            self.teacher.augment = None
        return self

    @model_validator(mode="after")
    def _a_random_baseline_has_labels(self) -> ExperimentConfig:
        if self.random_baseline and self.task == "text_embedding":
            raise ValueError("random_baseline: an embedding student has no labels to train on alone; drop it")
        return self

    @model_validator(mode="after")
    def _an_embedding_teacher_is_ready(self) -> ExperimentConfig:
        if self.task == "text_embedding" and not isinstance(self.teacher, HFTeacher):
            raise ValueError(
                "teacher.kind: a text_embedding teacher is a ready encoder: {kind: hf, path: DIR} "
                "(e.g. builtin:all-MiniLM-L6-v2); it is never trained or cached here"
            )
        return self

    @model_validator(mode="after")
    def _text_needs_a_tokenizer(self) -> ExperimentConfig:
        """Text data is tokenised with the teacher's tokenizer unless ``data.tokenizer`` names one."""
        if isinstance(self.data, TextDataSpec) and self.data.tokenizer is None:
            model = getattr(self.teacher, "model", None)
            if isinstance(self.teacher, CachedTeacherSpec):  # the cache records the teacher it was made with
                model = _cached_teacher_model(self.teacher.path)
            if isinstance(model, HFSpec):
                self.data.tokenizer = model.path
            else:
                raise ValueError(
                    "data.tokenizer: set it, or use a Hugging Face teacher (kind hf) whose tokenizer is used"
                )
        return self

    @property
    def augmentation(self) -> AugmentSpec | None:
        """The students' augmentation when there is one (image data with data.augment set)."""
        augment = getattr(self.data, "augment", None)
        return augment if augment is not None and augment.active else None

    def cache_path(self) -> Path:
        return self.cache.path or self.output.dir / f"{self.output.name or 'run'}-teacher-cache"


# ---------------------------------------------------------------------------- loading


def _field_path(loc: tuple, raw: Any) -> str:
    """The user's dotted field path for a pydantic error location.

    Pydantic inserts the tag of a tagged union (``student.mlp.hidden``); the user wrote
    ``student.hidden``, so tags that are not keys of the input are skipped.
    """
    node, parts, fresh = raw, [], True
    for part in loc:
        # a union's tag comes right after the field that holds the union
        if fresh and isinstance(node, dict) and part in (node.get("arch"), node.get("kind"), node.get("source")):
            fresh = False
            continue
        fresh = True
        if str(part).startswith(("function-", "tagged-union")):
            continue
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts)


def format_validation_error(err: ValidationError, source: str, raw: Any) -> str:
    parts = []
    for item in err.errors():
        loc = _field_path(item["loc"], raw)
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_invalid":  # an unknown source / arch / kind: name that field
            ctx = item["ctx"]
            loc = ".".join(part for part in (loc, ctx["discriminator"].strip("'")) if part)
            msg = f"Input should be one of {ctx['expected_tags']} (got {ctx['tag']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(parts) - 1} more)" if len(parts) > 1 else ""
    return f"{source}: {parts[0]}{more}"


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; ``value`` is parsed as YAML (numbers, lists...)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise DistillError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise DistillError(f"--set {assignment!r}: value is not valid YAML ({getattr(err, 'problem', err)})") from None
    except (RecursionError, ValueError):  # absurd nesting, integers of thousands of digits
        raise DistillError(f"--set {key.strip()}: the value is too deeply nested or too large to read") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DistillError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make relative input paths (data, teacher weights) absolute, relative to ``base``."""
    for section, key in (
        ("data", "path"),
        ("data", "test_path"),
        ("data", "unlabeled"),
        ("data", "tokenizer"),
        ("teacher", "path"),
        ("cache", "path"),
    ):
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and not node[key].startswith("builtin:"):
            path = Path(os.path.expanduser(node[key]))
            node[key] = str(path if path.is_absolute() else base / path)
    teacher = raw.get("teacher")
    for model in (raw.get("student"), teacher.get("model") if isinstance(teacher, dict) else None):
        # a factory's module is looked for beside the config first
        if (
            isinstance(model, dict)
            and model.get("arch") == "hf"
            and isinstance(model.get("path"), str)
            and not model["path"].startswith("builtin:")
        ):
            path = Path(os.path.expanduser(model["path"]))
            model["path"] = str(path if path.is_absolute() else base / path)
        if isinstance(model, dict) and model.get("arch") == "factory":
            path = model.get("path")
            if path is None:
                model["path"] = str(base)
            elif isinstance(path, str):
                path = Path(os.path.expanduser(path))
                model["path"] = str(path if path.is_absolute() else base / path)


def parse_config(
    raw: Any, source: str = "config", overrides: list[str] | None = None, base: Path | None = None
) -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DistillError(
            f"{source}: expected a mapping of sections (data, teacher, student, ...), got {type(raw).__name__}"
        )
    if base is not None:
        _resolve_paths(raw, base)  # paths in the file are relative to the file
    for assignment in overrides or []:
        apply_override(raw, assignment)
    if overrides:
        _resolve_paths(raw, Path.cwd())  # paths given with --set are relative to the working directory
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise DistillError(format_validation_error(err, source, raw)) from None


WORKFLOW_SECTIONS = ("chain", "sweep", "tune")
"""Top-level config sections read by ``distill chain``, ``sweep`` and ``tune``; other commands ignore them."""


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path``; a missing, unreadable or invalid file is a one-line DistillError."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DistillError(f"{path}: not a UTF-8 text file; a config is YAML text") from None
    except OSError as err:
        raise DistillError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DistillError(f"{path}: not valid YAML{where}; fix the syntax") from None
    except (RecursionError, ValueError):  # absurd nesting, integers of thousands of digits
        raise DistillError(f"{path}: the YAML is too deeply nested or holds numbers too large to read") from None
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; every problem is a one-line DistillError."""
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict):  # the sections of `distill chain / sweep / tune` are theirs to read
        raw = {key: value for key, value in raw.items() if key not in WORKFLOW_SECTIONS}
    config = parse_config(raw, str(path), overrides, base=path.parent)
    if config.output.name is None:
        config.output.name = path.stem
    return config


MACHINE_KEYS = ("output", "max_memory")
"""Config keys that say where and on what a run happens, not what it computes: a run may be resumed
(or a finished one reused) with other values."""


def run_identity(raw: dict) -> dict:
    """A config's plain data without :data:`MACHINE_KEYS`, to decide whether two runs are the same."""
    return {key: value for key, value in raw.items() if key not in MACHINE_KEYS}


def config_to_dict(config: ExperimentConfig) -> dict:
    """The config as plain data that parses back to the same config (with an explicit terms
    list, the unused alpha/temperature defaults are left out)."""
    raw = config.model_dump(mode="json")
    if config.distill.terms is not None:
        raw["distill"] = {"terms": raw["distill"]["terms"], "remember_teacher": raw["distill"]["remember_teacher"]}
    return raw
