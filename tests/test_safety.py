"""Loading only what cannot execute code, and stopping on non-finite losses."""

import os
import pickle

import pytest
import torch

from distill import Distiller, DistillError, HardLabelCE
from distill.core.io import load_checkpoint, load_weights
from distill.pipeline.config import TrainSpec
from distill.tasks.image_data import DataSpec, load_data
from distill.tasks.models import MLP, MLPSpec
from distill.train.loop import train


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the crafted file's protocol
def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint.pt"
    with open(checkpoint, "wb") as handle:
        pickle.dump({"epoch": 1, "student": Payload(str(marker))}, handle)
    with pytest.raises(DistillError, match="cannot load checkpoint"):
        load_checkpoint(checkpoint)
    data = load_data(DataSpec(source="digits"))
    distiller = Distiller(MLP((1, 8, 8), 10, MLPSpec()), None, {"ce": HardLabelCE()})
    with pytest.raises(DistillError, match="cannot load checkpoint"):
        train(distiller, data, TrainSpec(epochs=1), checkpoint=checkpoint, resume=True)
    assert not marker.exists()


def test_weights_load_only_from_safetensors(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "teacher.safetensors"
    fake.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(DistillError, match="expected a .safetensors file"):
        load_weights(MLP((1, 8, 8), 10, MLPSpec()), fake, "teacher.path")
    assert not marker.exists()


def test_a_non_finite_loss_stops_the_run_naming_term_and_step():
    data = load_data(DataSpec(source="digits"))
    data.train.x[5] = float("inf")  # one poisoned sample, first batch of an unshuffled order
    distiller = Distiller(MLP((1, 8, 8), 10, MLPSpec()), None, {"ce": HardLabelCE()})
    with pytest.raises(DistillError, match=r"loss term 'ce' became non-finite at epoch 1, step \d+"):
        train(distiller, data, TrainSpec(epochs=1, batch_size=len(data.train)))
    assert torch.isfinite(next(distiller.student.parameters())).all()  # no step was taken with it
