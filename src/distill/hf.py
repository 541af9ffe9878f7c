"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a :class:`~distill.Distiller`'s.

For users with a Trainer script: swap the class, pass the teacher and (optionally) terms.

    from distill.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train,
                                  terms={"kd": SoftTargetKD(2.0), "ce": HardLabelCE()},
                                  weights={"kd": 0.5, "ce": 0.5})
    trainer.train()

Everything else (batching, schedules, logging, checkpoints, evaluation) is the Trainer's own.
Terms that read hidden states or attention maps get them: the Trainer's batches are called with
``output_hidden_states`` / ``output_attentions`` (and eager attention) only when a term needs them.
Terms with learnable parts (projections) are trained too: their parameters join the optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distill.core.distiller import Distiller
from distill.core.losses import HardLabelCE, LossTerm, SoftTargetKD

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - the text extra is missing
    raise ImportError("distill.hf needs transformers: pip install -e '.[text]'") from err


class DistillationTrainer(Trainer):
    """A Trainer that trains ``model`` (the student) to imitate ``teacher`` with distill's terms."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        terms: Mapping[str, LossTerm] | None = None,
        weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if terms is None:  # Hinton's recipe: half soft targets at T = 2, half labels
            terms, weights = {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()}, weights or {"kd": 0.5, "ce": 0.5}
        self.distiller = Distiller(self.model, teacher, terms, weights)
        self.kinds = {kind for term in terms.values() for kind in term.needs_outputs}
        for model in (self.model, teacher):
            if "attentions" in self.kinds and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")  # attention maps need the eager implementation
        teacher.to(self.args.device)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimiser, with the terms' learnable parts (projections) added to it."""
        optimizer = super().create_optimizer(*args, **kwargs)
        extra = [p for p in self.distiller.terms.parameters() if p.requires_grad]
        if extra:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def _model_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        batch = {key: value for key, value in inputs.items() if key != "labels"}
        if self.kinds & {"hidden_states", "embedding"}:
            batch["output_hidden_states"] = True
        if "attentions" in self.kinds:
            batch["output_attentions"] = True
        return batch

    def prepare_terms(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Build shape-dependent parts of the terms from one batch (before the optimiser exists);
        the Distiller's ``prepare`` does nothing once they are built."""
        self.distiller.prepare(self._model_inputs(inputs))

    def train(self, *args: Any, **kwargs: Any):
        self.prepare_terms(self._prepare_inputs(next(iter(self.get_train_dataloader()))))
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Any = None):
        labels = inputs.get("labels")
        self.prepare_terms(inputs)
        out = self.distiller(self._model_inputs(inputs), labels=labels)
        return (out.loss, {"logits": out.student.logits}) if return_outputs else out.loss
