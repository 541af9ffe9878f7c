"""The same KD job three ways: `distill run`, a bare PyTorch loop, and torchdistill (when installed).

Why: distill adds a CLI, config checking, validation, reports and latency timing around the
training loop; this measures what that costs against a hand-written loop and a peer library, on
the same teacher file, student, data and loss, so the project's bars can be checked:

    distill training / torchdistill training            <= 0.5
    distill per-image training / bare per-image          <= 1.0   (distill keeps 10% for validation)
    distill whole command / bare whole command           <= 1.1
    distill collapses (test accuracy < 0.2)              <= the bare loop's
    distill whole command - its training                 <= 5 s

The job: a CNN teacher (~137k parameters, trained here once with a plain loop, seed 0, and saved
as safetensors), a CNN student (~9k parameters), both from a user-style models.py written into
the work folder; Fashion-MNIST; SGD lr 0.05 momentum 0.9 (Nesterov, weight decay 5e-4: distill's
defaults, used by every tool), cosine schedule per step, T = 4, loss 0.9 kd + 0.1 ce, batch 128.
Every tool runs as its own subprocess, so imports count in the whole-command time, and the runs
interleave by seed (seed 0: distill, bare, torchdistill; seed 1: ...) so drift hits all alike.
distill's cache folder starts empty in the work folder: its first run scores the teacher on the
test split, later ones find those predictions remembered, as a user's repeated runs do; the
outside-training lines say which. Before each seed, torch alone (the interpreter, `import torch`, one
optimizer) is timed as its own process: the floor under every tool's time outside training.

    python benchmarks/peers.py                                          # seeds 0 1 2, 2 epochs
    python benchmarks/peers.py --seeds 0 --epochs 1 --limit-train 3000  # a smoke run (~1-2 min)

Prints a table and writes JSON (default: benchmarks/results/peers.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE, ALPHA, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 4.0, 0.9, 128, 0.05, 0.9, 5e-4
COLLAPSE_BELOW = 0.2  # a 10-class student at chance ends near 0.1
OUTSIDE_TRAINING_BAR = 5.0  # seconds of the distill command outside its training epochs
TOOLS = ("distill", "bare", "torchdistill")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

MODELS_PY = '''\
"""Teacher and student of the peers benchmark: plain PyTorch, as a user would write them."""

from torch import nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Teacher(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 32), nn.MaxPool2d(2), *_block(32, 64), nn.MaxPool2d(2), *_block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(128, 320), nn.ReLU(inplace=True), nn.Linear(320, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def teacher(num_classes: int = 10) -> nn.Module:
    return Teacher(num_classes)


def student(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        *_block(1, 8), nn.MaxPool2d(2), *_block(8, 16), nn.MaxPool2d(2), *_block(16, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
    )
'''

DISTILL_YAML = """\
seed: {seed}
data: {{source: fashion_mnist, limit_train: {limit}}}
teacher: {{kind: checkpoint, path: teacher.safetensors, model: {{arch: factory, factory: "models:teacher"}}}}
student: {{arch: factory, factory: "models:student"}}
baseline: false
distill: {{alpha: {alpha}, temperature: {temperature}}}
train: {{epochs: {epochs}, batch_size: {batch}, lr: {lr}, schedule: cosine}}
output: {{dir: runs, name: distill-seed{seed}}}
"""


# ---------------------------------------------------------------------------- shared pieces


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as uint8 ``[N, H, W]`` or ``[N]``."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(limit_train: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test tensors, normalised with the (sliced) training images' mean and std, as distill does."""
    folder = Path(os.environ.get("DISTILL_FASHION_MNIST", FASHION_MNIST_DIR))

    def part(stem: str) -> np.ndarray:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return read_idx(folder / name)
        raise SystemExit(f"Fashion-MNIST file {stem}[.gz] not found in {folder}; set DISTILL_FASHION_MNIST")

    train_x = torch.tensor(part("train-images-idx3-ubyte")[:limit_train], dtype=torch.float32)[:, None] / 255
    train_y = torch.tensor(part("train-labels-idx1-ubyte")[:limit_train], dtype=torch.long)
    test_x = torch.tensor(part("t10k-images-idx3-ubyte"), dtype=torch.float32)[:, None] / 255
    test_y = torch.tensor(part("t10k-labels-idx1-ubyte"), dtype=torch.long)
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def import_models(work: Path):
    """The user's models.py from the work folder."""
    sys.path.insert(0, str(work))
    import models

    return models


def sgd_cosine(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """distill's optimiser and schedule for ``train: {lr: 0.05, schedule: cosine}``: Nesterov SGD, cosine per step."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=MOMENTUM > 0
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(-1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ALPHA * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - ALPHA) * CE, the loss distill optimises."""
    kd = F.kl_div(
        F.log_softmax(student_logits / TEMPERATURE, -1),
        F.log_softmax(teacher_logits / TEMPERATURE, -1),
        log_target=True,
        reduction="batchmean",
    )
    return ALPHA * kd * TEMPERATURE**2 + (1 - ALPHA) * F.cross_entropy(student_logits, labels)


def train_teacher(work: Path, epochs: int, limit_train: int | None) -> dict:
    """Train the teacher once (seed 0) with a plain loop and save it as safetensors for every tool."""
    from safetensors.torch import save_file

    models = import_models(work)
    train_x, train_y, test_x, test_y = load_fashion_mnist(limit_train)
    torch.manual_seed(0)
    teacher = models.teacher(num_classes=10)
    steps = epochs * -(-len(train_x) // BATCH)
    optimizer, scheduler = sgd_cosine(teacher, steps)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        teacher.train()
        for index in torch.randperm(len(train_x), generator=generator).split(BATCH):
            loss = F.cross_entropy(teacher(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(work / "teacher.safetensors"))
    return {
        "seed": 0,
        "epochs": epochs,
        "params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in models.student(num_classes=10).parameters()),
        "train_images": len(train_x),
        "seconds": seconds,
        "test_acc": accuracy(teacher, test_x, test_y),
    }


# ---------------------------------------------------------------------------- workers (own subprocesses)


def load_teacher(work: Path, models) -> nn.Module:
    from safetensors.torch import load_file

    teacher = models.teacher(num_classes=10)
    teacher.load_state_dict(load_file(str(work / "teacher.safetensors")))
    return teacher.eval().requires_grad_(False)


def bare_worker(work: Path, seed: int, epochs: int, limit_train: int | None) -> dict:
    """The job as a hand-written loop over in-memory tensors: the floor for distill's training cost."""
    models = import_models(work)
    train_x, train_y, test_x, test_y = load_fashion_mnist(limit_train)
    teacher = load_teacher(work, models)
    torch.manual_seed(seed)
    student = models.student(num_classes=10)
    optimizer, scheduler = sgd_cosine(student, epochs * -(-len(train_x) // BATCH))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        student.train()
        for index in torch.randperm(len(train_x), generator=generator).split(BATCH):
            x, y = train_x[index], train_y[index]
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = kd_loss(student(x), teacher_logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - started
    return {"train_seconds": seconds, "train_images": len(train_x), "test_acc": accuracy(student, test_x, test_y)}


def torchdistill_worker(work: Path, seed: int, epochs: int, limit_train: int | None) -> dict:
    """The job through torchdistill's Python API: its DistillationBox (1.1.x config keys) builds the data loader,
    forward processes, criterion, optimiser and scheduler, and its pre/post epoch/forward processes drive training."""
    from torch.utils.data import RandomSampler, TensorDataset
    from torchdistill.core.distillation import get_distillation_box

    models = import_models(work)
    train_x, train_y, test_x, test_y = load_fashion_mnist(limit_train)
    teacher = load_teacher(work, models)
    torch.manual_seed(seed)
    student = models.student(num_classes=10)
    steps = epochs * -(-len(train_x) // BATCH)
    # KDLoss returns alpha * CE + beta * T^2 * KL(batchmean): alpha weighs the cross-entropy, beta the scaled KL.
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": TEMPERATURE,
        "alpha": 1 - ALPHA,
        "beta": ALPHA,
        "reduction": "batchmean",
    }
    train_config = {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            # seeded like the bare loop: the first epoch visits the same randperm(n, Generator(seed)) batches
            "sampler": {"class_or_func": RandomSampler, "kwargs": {"generator": torch.Generator().manual_seed(seed)}},
            "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": False},
            "requires_supp": True,
        },
        # the teacher stays as load_teacher left it (eval mode, frozen) and runs under no_grad; the default
        # pre-epoch process puts only the student in train mode
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {
            "key": "SGD",
            "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "nesterov": MOMENTUM > 0},
        },
        # scheduling_step 1: the default post-forward process steps the scheduler after every optimiser step
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": steps}, "scheduling_step": 1},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}},
        },
    }
    box = get_distillation_box(
        teacher, student, {"train": TensorDataset(train_x, train_y)}, train_config, torch.device("cpu"), None, False, 1
    )
    _check_torchdistill_box(box, steps)
    started = time.perf_counter()
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            box.post_forward_process(loss=box.forward_process(sample_batch, targets, supp_dict))
        box.post_epoch_process()
    seconds = time.perf_counter() - started
    if box.lr_scheduler.last_epoch != steps:
        raise RuntimeError(f"torchdistill stepped its scheduler {box.lr_scheduler.last_epoch} times, not {steps}")
    return {"train_seconds": seconds, "train_images": len(train_x), "test_acc": accuracy(student, test_x, test_y)}


def _check_torchdistill_box(box, steps: int) -> None:
    """Fail unless torchdistill's box optimises the same loss, with the same optimiser and schedule, as bare_worker."""
    generator = torch.Generator().manual_seed(1234)  # random logits: leaves the global RNG (and so the run) alone
    student_logits, teacher_logits = torch.randn(2, BATCH, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    io_dict = {"student": {".": {"output": student_logits}}, "teacher": {".": {"output": teacher_logits}}}
    theirs, ours = float(box.criterion(io_dict, {}, labels)), float(kd_loss(student_logits, teacher_logits, labels))
    if abs(theirs - ours) > 1e-5 * max(1.0, abs(ours)):
        raise RuntimeError(f"torchdistill's criterion gives {theirs}, bare_worker's kd_loss {ours}: not the same job")
    group = box.optimizer.param_groups[0]
    expected = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "nesterov": MOMENTUM > 0}
    got = {key: group[key] for key in expected}
    trainable = sum(p.numel() for g in box.optimizer.param_groups for p in g["params"])
    if got != expected or trainable != sum(p.numel() for p in box.student_model.parameters()):
        raise RuntimeError(f"torchdistill's optimiser is {got} over {trainable} parameters, not the student's SGD")
    scheduler = box.lr_scheduler
    if type(scheduler).__name__ != "CosineAnnealingLR" or scheduler.T_max != steps or box.scheduling_step != 1:
        raise RuntimeError(
            f"torchdistill's scheduler is {scheduler} every {box.scheduling_step} steps, not per-step cosine"
        )
    if box.teacher_updatable or box.teacher_model.training:
        raise RuntimeError("torchdistill's teacher is not frozen in eval mode")


WORKERS = {"bare": bare_worker, "torchdistill": torchdistill_worker}

# what every tool pays before its first step: the interpreter, `import torch`, and the first optimiser (whose
# first call imports torch._dynamo, about 1.5 s here); timed as its own process beside the tools
TORCH_FLOOR = "import torch; torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)"


# ---------------------------------------------------------------------------- the benchmark


def timed(command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall-clock seconds and exit code of ``command``, its output kept in ``log``."""
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    return time.perf_counter() - started, code


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_distill(work: Path, seed: int, args: argparse.Namespace) -> dict:
    """`distill run` as a user runs it; training seconds and accuracy from the run's metrics.json."""
    config = work / f"distill-seed{seed}.yaml"
    config.write_text(
        DISTILL_YAML.format(
            seed=seed,
            limit="null" if args.limit_train is None else args.limit_train,
            alpha=ALPHA,
            temperature=TEMPERATURE,
            epochs=args.epochs,
            batch=BATCH,
            lr=LR,
        )
    )
    executable = Path(sys.executable).with_name("distill")
    command = [str(executable if executable.exists() else shutil.which("distill") or "distill")]
    log = work / f"distill-seed{seed}.log"
    # distill's cache starts empty in the work folder, as on a user's first run: seed 0 scores the teacher on the
    # test split, later seeds find its predictions remembered (as a user's second run with that teacher does)
    env = {**os.environ, "DISTILL_CACHE_DIR": str(work / "distill-cache")}
    whole, code = timed([*command, "run", config.name, "--overwrite"], work, log, env)
    if code != 0:
        return {"error": f"exit {code}: {last_line(log)}", "whole_seconds": whole}
    metrics = json.loads((work / "runs" / f"distill-seed{seed}" / "metrics.json").read_text())
    history = metrics["training"]["distilled"]["history"]
    return {
        "whole_seconds": whole,
        "run_seconds": metrics["seconds"],
        "train_seconds": sum(epoch["seconds"] for epoch in history),
        "epoch_seconds": [epoch["seconds"] for epoch in history],
        "train_images": metrics["data"]["train"],
        "test_acc": metrics["models"]["distilled"]["test_acc"],
        "teacher_test_acc": metrics["models"]["teacher"]["test_acc"],
        "teacher_predictions_remembered": metrics["teacher_predictions_remembered"],
    }


def run_worker(tool: str, work: Path, seed: int, args: argparse.Namespace) -> dict:
    """A bare or torchdistill run in its own Python process (this file, --worker)."""
    result = work / f"{tool}-seed{seed}.json"
    result.unlink(missing_ok=True)
    python = args.torchdistill_python if tool == "torchdistill" and args.torchdistill_python else sys.executable
    command = [str(python), str(Path(__file__).resolve()), "--worker", tool, "--work", str(work)]
    command += ["--seeds", str(seed), "--epochs", str(args.epochs), "--result", str(result)]
    if args.limit_train is not None:
        command += ["--limit-train", str(args.limit_train)]
    log = work / f"{tool}-seed{seed}.log"
    whole, code = timed(command, work, log)
    if code != 0 or not result.exists():
        return {"error": f"exit {code}: {last_line(log)}", "whole_seconds": whole}
    return {"whole_seconds": whole, **json.loads(result.read_text())}


def torchdistill_missing(python: Path | None = None) -> str | None:
    """Why torchdistill cannot run here (in ``python``, default this interpreter), or None when it can."""
    if python is not None:
        done = subprocess.run([str(python), "-c", "import torchdistill"], capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        return (
            None
            if done.returncode == 0
            else f"torchdistill unusable in {python}: {lines[-1] if lines else done.returncode}"
        )
    try:
        import torchdistill  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name == "torchdistill":
            return "torchdistill not installed: pip install torchdistill to compare"
        return f"torchdistill unusable: {err}"
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip, said in one line
        return f"torchdistill unusable: {type(err).__name__}: {err}"
    return None


def span(values: list[float], digits: int = 1) -> str:
    if not values:
        return "—"
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if len(values) == 1 else f"{low:.{digits}f}–{high:.{digits}f}"


def per_image_us(run: dict, epochs: int) -> float:
    return run["train_seconds"] / (run["train_images"] * epochs) * 1e6


def ratio_of_medians(top: list[float], bottom: list[float]) -> float | None:
    return statistics.median(top) / statistics.median(bottom) if top and bottom else None


def benchmark(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from _common import machine, write_results

    console = Console()
    load_at_start = os.getloadavg()  # this measures wall clock: a busy machine shows here
    skipped = torchdistill_missing(args.torchdistill_python)
    tools = [t for t in TOOLS if t != "torchdistill" or skipped is None]
    if skipped:
        console.print(f"[yellow]skipping torchdistill[/]: {skipped}")
    keep = args.work is not None
    work = (args.work or Path(tempfile.mkdtemp(prefix="distill-peers-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "models.py").write_text(MODELS_PY)
    try:
        console.print(
            f"work folder {work}; training the teacher ({args.teacher_epochs} epochs, plain loop, seed 0) ..."
        )
        teacher = train_teacher(work, args.teacher_epochs, args.limit_train)
        console.print(
            f"teacher: {teacher['params']:,} parameters, trained once (seed 0) on {teacher['train_images']:,} images "
            f"in {teacher['seconds']:.1f}s, test acc {100 * teacher['test_acc']:.2f}%; shared by every seed and tool. "
            f"Student: {teacher['student_params']:,} parameters."
        )
        runs: dict[str, dict[int, dict]] = {tool: {} for tool in tools}
        floor: dict[int, float] = {}
        for seed in args.seeds:
            floor[seed], _ = timed([sys.executable, "-c", TORCH_FLOOR], work, work / "floor.log")
            for tool in tools:
                run = run_distill(work, seed, args) if tool == "distill" else run_worker(tool, work, seed, args)
                runs[tool][seed] = run
                said = run.get("error") or f"train {run['train_seconds']:.1f}s, test acc {100 * run['test_acc']:.2f}%"
                console.print(f"seed {seed} {tool}: whole command {run['whole_seconds']:.1f}s, {said}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    ok = {tool: {s: r for s, r in by_seed.items() if "error" not in r} for tool, by_seed in runs.items()}
    collapses = {tool: sum(r["test_acc"] < COLLAPSE_BELOW for r in by_seed.values()) for tool, by_seed in ok.items()}
    table = Table(
        title=f"One KD job, {args.epochs} epoch(s), seeds {args.seeds}, {torch.get_num_threads()} CPU threads"
    )
    for column in ("tool", "train s", "whole s", "img/epoch", "µs/img", "test acc % by seed", "collapses"):
        table.add_column(column, justify="left" if column == "tool" else "right")
    for tool in tools:
        good = list(ok[tool].values())
        accs = " ".join(
            f"{100 * runs[tool][s]['test_acc']:.2f}" if "error" not in runs[tool][s] else "failed" for s in args.seeds
        )
        table.add_row(
            tool,
            span([r["train_seconds"] for r in good]),
            span([r["whole_seconds"] for r in good]),
            span([r["train_images"] for r in good], 0),
            span([per_image_us(r, args.epochs) for r in good], 0),
            accs,
            f"{collapses[tool]}/{len(good)}",
        )
    console.print(table)
    console.print(
        "[dim]train s: training loop only (distill: its epochs' seconds from metrics.json, per-epoch validation "
        "included); whole s: the whole subprocess; min–max over seeds; µs/img: training seconds per training image "
        f"seen; collapse: test accuracy < {COLLAPSE_BELOW}[/]"
    )
    for tool in tools:
        for seed, run in runs[tool].items():
            if "error" in run:
                console.print(f"[red]{tool} seed {seed} failed[/]: {run['error']}")
    if skipped:
        console.print(f"torchdistill: {skipped}")

    def values(tool: str, key) -> list[float]:
        return [key(r) for r in ok.get(tool, {}).values()]

    train = {tool: values(tool, lambda r: r["train_seconds"]) for tool in tools}
    whole = {tool: values(tool, lambda r: r["whole_seconds"]) for tool in tools}
    per_image = {tool: values(tool, lambda r: per_image_us(r, args.epochs)) for tool in tools}
    ratios = {
        "distill training / torchdistill training": (
            ratio_of_medians(train["distill"], train.get("torchdistill", [])),
            0.5,
        ),
        "distill / bare training per image": (ratio_of_medians(per_image["distill"], per_image["bare"]), 1.0),
        "distill / bare whole command": (ratio_of_medians(whole["distill"], whole["bare"]), 1.1),
    }
    bars = Table(title="Against the project's bars (medians over seeds)")
    for column in ("measure", "value", "bar", "met"):
        bars.add_column(column, justify="left" if column == "measure" else "right")
    for name, (value, bar) in ratios.items():
        met = "—" if value is None else ("yes" if value <= bar else "NO")
        bars.add_row(name, "n/a" if value is None else f"{value:.2f}", f"≤ {bar}", met)
    outside = {
        s: {
            "total": r["whole_seconds"] - r["train_seconds"],
            "startup": r["whole_seconds"] - r["run_seconds"],  # interpreter, imports, config; report files; exit
            "in_run": r["run_seconds"] - r["train_seconds"],  # data, teacher, test evaluation, latency
        }
        for s, r in ok["distill"].items()
    }
    collapse_met = collapses["distill"] <= collapses["bare"]
    bars.add_row(
        "collapses: distill vs bare",
        f"{collapses['distill']} vs {collapses['bare']}",
        "≤ bare",
        "yes" if collapse_met else "NO",
    )
    outside_median = statistics.median(o["total"] for o in outside.values()) if outside else None
    bars.add_row(
        "distill outside training (s, median)",
        "n/a" if outside_median is None else f"{outside_median:.1f}",
        f"≤ {OUTSIDE_TRAINING_BAR:g}",
        "—" if outside_median is None else ("yes" if outside_median <= OUTSIDE_TRAINING_BAR else "NO"),
    )
    console.print(bars)
    console.print("distill outside training (whole command − training):")
    for s, o in outside.items():
        memo = "remembered" if ok["distill"][s]["teacher_predictions_remembered"] else "computed"
        console.print(
            f"  seed {s}: {o['total']:.1f}s = {o['startup']:.1f}s outside run_experiment's clock (interpreter, imports, "
            f"config, report files, exit) + {o['in_run']:.1f}s on it (data, teacher load, test predictions, latency); "
            f"the teacher's test predictions {memo}"
        )
    for tool in tools:
        if tool != "distill" and ok[tool]:
            spans = span([r["whole_seconds"] - r["train_seconds"] for r in ok[tool].values()])
            console.print(f"{tool} outside training (whole command − training): {spans}s")
    console.print(
        f"torch alone (interpreter, import torch, the first optimizer; no data, no model): {span(list(floor.values()))}s"
        " — under every tool's outside-training time"
    )
    beyond_bare = [
        outside[s]["total"] - (ok["bare"][s]["whole_seconds"] - ok["bare"][s]["train_seconds"])
        for s in outside
        if s in ok["bare"]
    ]
    if beyond_bare:
        console.print(f"distill outside training minus the bare loop's, per seed: {span(beyond_bare)}s")
    load = os.getloadavg()
    console.print(
        f"[dim]load average (1, 5, 15 min) at start {' '.join(f'{v:.2f}' for v in load_at_start)}, "
        f"at end {' '.join(f'{v:.2f}' for v in load)} on {os.cpu_count()} CPUs[/]"
    )

    result = {
        "benchmark": "peers",
        "seeds": args.seeds,
        "epochs": args.epochs,
        "limit_train": args.limit_train,
        "machine": machine(),
        "load_average": {"start": load_at_start, "end": load},
        "teacher": teacher,
        "torchdistill_skipped": skipped,
        "runs": {tool: {str(s): r for s, r in by_seed.items()} for tool, by_seed in runs.items()},
        "collapses": collapses,
        "ratios": {name: {"value": value, "bar": bar} for name, (value, bar) in ratios.items()},
        "distill_outside_training_seconds": {str(s): v for s, v in outside.items()},
        "distill_outside_training_median": {"value": outside_median, "bar": OUTSIDE_TRAINING_BAR},
        "torch_floor_seconds": {str(s): v for s, v in floor.items()},
        "distill_outside_minus_bare_seconds": beyond_bare,
    }
    write_results(args.out, result, console)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=None, help="train on this many images (a smoke run)")
    parser.add_argument("--work", type=Path, default=None, help="work folder, kept (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    parser.add_argument(
        "--torchdistill-python",
        type=Path,
        default=None,
        help="a Python with torchdistill installed, if not this one (torchdistill needs torchvision, which needs "
        "its own torch build: e.g. a venv with torch==2.14.1 torchvision==0.29.1 torchdistill)",
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.worker:  # one tool's run, in its own process: only what that run needs is imported
        result = WORKERS[args.worker](args.work, args.seeds[0], args.epochs, args.limit_train)
        args.result.write_text(json.dumps(result))
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
