"""Train the tiny token model of test_architecture in this process (alone, or as one of the
processes a torchrun launch started) and write the student's weights: the distributed token tests.

``--fsdp`` shards the student with FSDP (Accelerate's default settings, on CPU through gloo);
``--resume`` stops after the first epoch and resumes from the checkpoint for the second."""

import faulthandler
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


class Stop(Exception):
    pass


def build() -> tuple[Distiller, TinyLM, TinyLM]:
    torch.manual_seed(1)
    teacher, student = TinyLM(width=16), TinyLM()
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()}, {"kd": 0.5, "ce": 0.5})
    return distiller, student, teacher


def main(out: str, fsdp: bool = False, resume: bool = False) -> None:
    torch.set_num_threads(1)
    parallel = parallel_from_environment(torch.device("cpu"))
    if fsdp and parallel is not None:  # Accelerate enables FSDP on GPUs only; its settings, on CPU (gloo)
        from accelerate.utils import FullyShardedDataParallelPlugin

        parallel.fsdp = FullyShardedDataParallelPlugin(fsdp_version=1)
    data = DataBundle(
        "tokens", token_split(61), token_split(16, seed=1), token_split(16, seed=2), 11, list("abcdefghijk")
    )
    # batch 13: shares of 7 and 6 sequences whose token counts differ, so weighting by sequences would be wrong
    spec = TrainSpec(epochs=2, batch_size=13, lr=0.5, weight_decay=0.0, grad_clip=5.0)
    checkpoint = Path(out).with_suffix(".ckpt")
    if resume:

        def stop(log) -> None:
            raise Stop

        try:
            train(build()[0], data, spec, parallel=parallel, checkpoint=checkpoint, on_epoch_end=stop)
        except Stop:
            pass
        if parallel is not None:  # process 0 has written the checkpoint (a new launch, in real use)
            parallel.barrier()
    distiller, student, teacher = build()
    teacher_size = sum(p.numel() for p in teacher.parameters())
    train(distiller, data, spec, parallel=parallel, checkpoint=checkpoint, resume=resume)
    # the teacher was never sharded, trained or put in training mode
    assert sum(p.numel() for p in teacher.parameters()) == teacher_size
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    if parallel is None or parallel.is_main:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)
    if parallel is not None:
        parallel.finish()


if __name__ == "__main__":
    faulthandler.enable()  # a crash in a rank prints every thread's stack into the test's failure output
    main(sys.argv[1], fsdp="--fsdp" in sys.argv[2:], resume="--resume" in sys.argv[2:])
