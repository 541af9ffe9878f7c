"""Does the teacher know the students' views? Its test accuracy on plain and on augmented images.

Consistent teaching labels each augmented view with the teacher's output on it; a teacher that
never saw such views labels them worse than it labels the plain images. This scores the demo's
teacher (Fashion-MNIST, every label; trained and cached by distill on first use) on the test
split as it is, cropped, mirrored, and both (each image's view seeded by its index).

    python benchmarks/teacher_views.py                                   # the demo's teacher
    python benchmarks/teacher_views.py --set "teacher.augment={crop: 2, flip: true}" --set teacher.train.epochs=20
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

import torch
from rich.console import Console

from distill.core.evaluate import predict
from distill.core.io import default_cache_dir
from distill.pipeline.config import load_config
from distill.pipeline.experiment import obtain_teacher
from distill.tasks import get_task
from distill.tasks.augment import AugmentSpec, ImageAugment

VIEWS = {"plain": None, "crop 2": AugmentSpec(crop=2), "flip": AugmentSpec(flip=True),
         "crop 2 + flip": AugmentSpec(crop=2, flip=True)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    console = Console()
    with resources.as_file(resources.files("distill") / "configs" / "demo.yaml") as demo:
        config = load_config(demo, ["data.labeled=null", *args.overrides])
    data = get_task(config.task).load_data(config.data)
    teacher, path, _ = obtain_teacher(config, data, "cpu", console, default_cache_dir())
    x, y = data.test.x, data.test.y
    for name, spec in VIEWS.items():
        views = x if spec is None else ImageAugment(spec, seed=0)(x, torch.arange(len(x)), 0, x)[0]
        accuracy = (predict(teacher, views).argmax(-1) == y).float().mean().item()
        console.print(f"{name:14s} {100 * accuracy:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
