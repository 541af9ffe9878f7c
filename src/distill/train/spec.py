"""How a model is optimised: the training settings that every phase (teacher, scratch, distilled) uses."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSpec(BaseModel):
    """How a model is optimised. The same settings train the scratch and distilled students."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    grad_clip: float | None = Field(None, gt=0)
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimiser step (effective batch × this)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast the forward passes (bf16 on CPUs and recent GPUs; fp16 on CUDA, with loss scaling)"
    )
