"""Train the tiny token model of test_architecture in this process (alone, or as one of the
processes a torchrun launch started) and write the student's weights: the distributed token test."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from test_architecture import TinyLM, token_split  # noqa: E402

from distill import Distiller, HardLabelCE, SoftTargetKD  # noqa: E402
from distill.core.data import DataBundle  # noqa: E402
from distill.pipeline.config import TrainSpec  # noqa: E402
from distill.train.distributed import parallel_from_environment  # noqa: E402
from distill.train.loop import train  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    parallel = parallel_from_environment(torch.device("cpu"))
    data = DataBundle(
        "tokens", token_split(61), token_split(16, seed=1), token_split(16, seed=2), 11, list("abcdefghijk")
    )
    torch.manual_seed(1)
    teacher, student = TinyLM(width=16), TinyLM()
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()}, {"kd": 0.5, "ce": 0.5})
    # batch 13: shares of 7 and 6 sequences whose token counts differ, so weighting by sequences would be wrong
    train(distiller, data, TrainSpec(epochs=2, batch_size=13, lr=0.5, weight_decay=0.0), parallel=parallel)
    if parallel is None or parallel.is_main:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)
    if parallel is not None:
        parallel.finish()


if __name__ == "__main__":
    main(sys.argv[1])
