"""A transformer's stack of layers: finding it in any Hugging Face model, cutting it to chosen
layers, and measuring how much each layer changes its input (the depth half of cutting a
student from its teacher; :mod:`distill.tasks.prune` adds width)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from distill.core.errors import DistillError


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The module list holding a transformer's layers (``bert.encoder.layer``, ``model.layers``, ...):
    the first ``nn.ModuleList`` whose length is ``config.num_hidden_layers``."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == count:
                return module, attr, child
    raise DistillError(f"cannot find the {count} layers of {type(model).__name__} to cut a student from")


def cut_layers(model: nn.Module, keep: list[int], influence: list[float] | None = None) -> nn.Module:
    """A copy of ``model`` (a Hugging Face ``PreTrainedModel``) with only the layers ``keep``, in
    order; every other tensor (embeddings, final norm, pooler, head) copied exactly. The kept
    layers are recorded in the config (``distill_kept_layers``), so ``config.json`` says them."""
    cut = copy.deepcopy(model)
    owner, attr, layers = decoder_layers(cut)
    setattr(owner, attr, nn.ModuleList([layers[i] for i in keep]))
    config = cut.config
    config.num_hidden_layers = len(keep)
    config.distill_kept_layers = list(keep)
    if influence is not None:
        config.distill_layer_influence = [round(v, 6) for v in influence]
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    for j, layer in enumerate(getattr(owner, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # key/value caches index layers by position
                module.layer_idx = j
    return cut


@torch.no_grad()
def block_influence(model: nn.Module, inputs: dict[str, Tensor], batch_size: int = 32) -> list[float]:
    """Each layer's block influence on ``inputs`` (ShortGPT, Men et al. 2024): 1 − the mean cosine
    similarity between the hidden states entering and leaving it, over real (unpadded) tokens.
    A layer that barely changes its input (low influence) is the cheapest to drop."""
    kinds, mode = model.kinds, model.training
    model.request_outputs(kinds | {"hidden_states"})
    model.eval()
    total, tokens = None, 0.0
    try:
        n = len(inputs["input_ids"])
        for start in range(0, n, batch_size):
            batch = {key: value[start : start + batch_size] for key, value in inputs.items()}
            hidden = model(**batch).hidden_states
            mask = batch["attention_mask"][:, : hidden[0].shape[1]].bool()
            cos = torch.stack(
                [torch.cosine_similarity(a, b, dim=-1)[mask] for a, b in zip(hidden[:-1], hidden[1:], strict=True)]
            )
            total = cos.sum(1) if total is None else total + cos.sum(1)
            tokens += float(mask.sum())
    finally:
        model.request_outputs(kinds)
        model.train(mode)
    return [float(1 - value / tokens) for value in total]
