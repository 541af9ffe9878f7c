"""The package's shape: layers that import only downwards, no import cycles, one teacher-signals protocol for every precomputed teacher."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import distill
from distill import Distiller, SoftTargetKD
from distill.core.errors import DistillError
from distill.core.losses import LossTerm
from distill.core.losses.base import ModelOutputs, TeacherSignals

PACKAGE = Path(distill.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, lazy ones (inside functions) included."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    graph[module] |= {candidate} if candidate in files else ({target} if target in files else set())
            elif isinstance(node, ast.Import):
                graph[module] |= {alias.name for alias in node.names if alias.name in files}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert (
        "distill.core.distiller" in graph and "distill.core.losses.base" in graph["distill.core.distiller"]
    )  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Each subpackage is a layer; a module may import its own layer and the layers below it, never
# one above or beside it. The top level (cli, hf, __init__, _version) may import anything.
LAYERS = {"core": 0, "tasks": 1, "report": 1, "cache": 2, "train": 2, "pipeline": 3, "workflows": 4}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None

    found = []
    for module, imports in sorted(graph.items()):
        own = layer(module)
        for target in sorted(imports):
            other = layer(target)
            if own is None or other is None or other == own:
                continue
            if LAYERS[other] >= LAYERS[own]:
                found.append(f"{module} -> {target}")
    return found


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    graph = import_graph()
    top_level = {"distill", "distill.cli", "distill.__main__", "distill._version", "distill.hf"}
    assert {m for m in graph if m.split(".")[1:2] and m.split(".")[1] not in LAYERS} - top_level == set()
    assert "distill.core.distiller" in graph and "distill.tasks.image" in graph
    assert layer_violations(graph) == []
    core_imports = {t for m, ts in graph.items() if m.startswith("distill.core") for t in ts}
    assert all(t.startswith("distill.core") for t in core_imports), "the core imports only the core"


def test_the_layer_check_finds_an_upward_import():
    graph = {"distill.core.a": {"distill.pipeline.b"}, "distill.tasks.c": {"distill.report.d"}}
    graph |= {"distill.pipeline.b": set(), "distill.report.d": set()}
    assert layer_violations(graph) == ["distill.core.a -> distill.pipeline.b", "distill.tasks.c -> distill.report.d"]


class Logits:
    """A minimal TeacherSignals: logits looked up by position."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def lookup(self, index, *, device=None):
        return ModelOutputs(logits=self.logits[index].to(device or "cpu"))

    def check_features(self, names):
        raise DistillError("no features")


def test_precomputed_teachers_share_one_protocol_and_train_like_the_live_one():
    from distill.cache import CachedTeacher
    from distill.workflows.tune import TeacherLogits

    for cls in (CachedTeacher, TeacherLogits):
        assert all(callable(getattr(cls, name, None)) for name in ("lookup", "check_features")), cls
    assert isinstance(TeacherLogits(torch.zeros(3, 2)), TeacherSignals)
    torch.manual_seed(0)
    teacher, x = nn.Linear(4, 3), torch.randn(6, 4)
    student = nn.Linear(4, 3)
    live = Distiller(student, teacher, {"kd": SoftTargetKD(2.0)})(x[2:5], index=torch.arange(2, 5))
    looked_up = Distiller(student, Logits(teacher(x).detach()), {"kd": SoftTargetKD(2.0)})(
        x[2:5], index=torch.arange(2, 5)
    )
    assert torch.equal(live.loss, looked_up.loss)
    with pytest.raises(TypeError, match="must be a torch.nn.Module or TeacherSignals"):
        Distiller(student, object(), {"kd": SoftTargetKD()})


def test_a_term_that_needs_a_live_teacher_refuses_signals():
    class OnPolicy(LossTerm):
        needs_live_teacher = True

        def forward(self, student, teacher, batch):
            return student.logits.sum() * 0

    Distiller(nn.Linear(4, 3), nn.Linear(4, 3), {"op": OnPolicy()})  # a model: fine
    with pytest.raises(DistillError, match="the op term needs a live teacher model"):
        Distiller(nn.Linear(4, 3), Logits(torch.zeros(6, 3)), {"op": OnPolicy()})


class TinyLM(nn.Module):
    """A language model as Hugging Face calls one: keyword inputs, logits [batch, seq, vocab]."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1))


def token_split(n: int, seq: int = 6, vocab: int = 11, seed: int = 0):
    from distill.core.data import Split

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (n,), generator=g)
    attention = (torch.arange(seq) < lengths[:, None]).long()
    labels = torch.roll(ids, -1, dims=1).masked_fill(attention == 0, -1)
    return Split({"input_ids": ids, "attention_mask": attention}, labels, attention.bool())


def test_token_models_take_keyword_inputs_and_padding_gets_no_gradient():
    from distill import HardLabelCE
    from distill.core.evaluate import predict
    from distill.core.losses import Batch

    torch.manual_seed(0)
    split = token_split(4)
    distiller = Distiller(TinyLM(), TinyLM(), {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()}, {"kd": 0.5, "ce": 0.5})
    out = distiller(split.x, labels=split.y, mask=split.mask)
    grad = torch.autograd.grad(out.loss, out.student.logits)[0]
    assert grad.shape == (4, 6, 11)
    assert grad[~split.mask].abs().max() == 0 and grad[split.mask].abs().sum(-1).min() > 0
    batch = Batch(split.x, split.y, split.mask)
    tokens = int(split.mask.sum())
    assert distiller.terms["kd"].rows(batch) == tokens and distiller.terms["ce"].rows(batch) == tokens
    assert predict(distiller.student, split.x, batch_size=3).shape == (4, 6, 11)


def test_the_trainer_trains_a_token_model_on_keyword_inputs_with_a_mask():
    from distill import HardLabelCE
    from distill.core.data import DataBundle
    from distill.pipeline.config import TrainSpec
    from distill.train.loop import train

    torch.manual_seed(0)
    data = DataBundle(
        "tokens", token_split(64), token_split(16, seed=1), token_split(16, seed=2), 11, list("abcdefghijk")
    )
    weights = {}
    for remember in (False, True):
        torch.manual_seed(1)
        teacher, student = TinyLM(width=16), TinyLM()
        distiller = Distiller(student, teacher, {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()}, {"kd": 0.5, "ce": 0.5})
        result = train(distiller, data, TrainSpec(epochs=3, batch_size=16, lr=0.5), remember_teacher=remember)
        assert result.history[-1].loss < result.history[0].loss
        weights[remember] = student.state_dict()
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])  # [N, S, V] remembered too


def test_a_tap_can_pick_an_element_of_a_tuple_output():
    """Hugging Face attention modules return (context, probabilities): ``name[1]`` taps the second."""
    from distill.core.taps import FeatureTaps

    class Attention(nn.Module):
        def forward(self, x):
            probabilities = torch.softmax(x @ x.transpose(-1, -2), -1)
            return probabilities @ x, probabilities

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

        def forward(self, x):
            return self.attention(x)[0].sum(-1)

    model, x = Model(), torch.randn(2, 3, 4)
    taps = FeatureTaps(model, ["attention[1]", "attention"], "student")
    with taps.recording() as features:
        model(x)
    assert features["attention[1]"].shape == (2, 3, 3) and torch.allclose(
        features["attention[1]"].sum(-1), torch.ones(2, 3)
    )
    assert features["attention"].shape == (2, 3, 4)  # element 0 by default
    bad = FeatureTaps(model, ["attention[5]"], "student")
    with pytest.raises(DistillError, match="cannot tap element 5 of a module output of type tuple \\(2 elements\\)"):
        with bad.recording():
            model(x)
    with pytest.raises(DistillError, match="student has no module named 'atention'; did you mean attention"):
        FeatureTaps(model, ["atention[1]"], "student")


def test_the_cache_stores_and_serves_a_token_model(tmp_path):
    """The cache writer runs a keyword-input model over [N, S] token splits; looked up by index, its
    signals give the live teacher's masked loss (k = vocabulary: exact)."""
    from distill.cache import CachedTeacher, write_cache
    from distill.core.data import DataBundle
    from distill.core.inputs import take

    torch.manual_seed(0)
    data = DataBundle(
        "tokens", token_split(20), token_split(8, seed=1), token_split(8, seed=2), 11, list("abcdefghijk")
    )
    teacher, student = TinyLM(width=16), TinyLM()
    path = write_cache(teacher, data, tmp_path / "cache", identity={"data": data.fingerprint}, k=11, dtype="float32")
    cache = CachedTeacher(path)
    index = torch.tensor([3, 1, 7])
    x, mask = take(data.train.x, index), data.train.mask[index]
    assert cache.lookup(index).logits.values.shape == (3, 6, 11)
    live = Distiller(student, teacher, {"kd": SoftTargetKD(2.0)})(x, mask=mask, index=index)
    cached = Distiller(student, cache, {"kd": SoftTargetKD(2.0)})(x, mask=mask, index=index)
    assert torch.allclose(live.loss, cached.loss, atol=1e-6) and live.loss > 0


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_cache_stores_only_the_positions_that_count(tmp_path, dtype):
    """Padding is never stored: a packed shard holds mask.sum() rows; lookups across shards put
    every stored position back where it was and fill padding with a finite uniform row."""
    import numpy as np

    from distill.cache import CachedTeacher, write_cache
    from distill.core.data import DataBundle
    from distill.core.signals import TopKLogits

    torch.manual_seed(0)
    data = DataBundle(
        "tokens", token_split(20), token_split(8, seed=1), token_split(8, seed=2), 11, list("abcdefghijk")
    )
    teacher = TinyLM(width=16)
    path = write_cache(
        teacher, data, tmp_path / "cache", identity={"data": data.fingerprint}, k=4, dtype=dtype, shard_rows=6 * 7
    )  # 7 samples per shard: lookups cross shard boundaries
    cache = CachedTeacher(path)
    assert cache.packed and cache.manifest["splits"]["train"]["rows"] == int(data.train.mask.sum())
    stored = sum(
        np.load(path / "shards" / r["name"] / "values.npy").shape[0]
        for r in cache.manifest["splits"]["train"]["shards"]
    )
    assert stored == int(data.train.mask.sum()) < data.train.mask.numel()
    index = torch.tensor([19, 0, 8, 6, 13])
    got = cache.lookup(index).logits
    with torch.no_grad():
        dense = TopKLogits.from_dense(teacher(**{k: v[index] for k, v in data.train.x.items()}), 4)
    mask = data.train.mask[index]
    tolerance = 1e-5 if dtype == "float32" else 0.05
    assert torch.allclose(got.values[mask], dense.values[mask], atol=tolerance)
    assert torch.equal(got.indices[mask], dense.indices[mask])
    assert torch.allclose(got.logsumexp[mask], dense.logsumexp[mask], atol=1e-5)
    padding = got.bucket_log_probs()[~mask]
    assert torch.isfinite(padding).all() and torch.allclose(padding[:, :4].exp(), torch.full((len(padding), 4), 1 / 11))
    assert cache.bytes_per_row() > 0


def test_the_image_task_is_the_default_and_configs_name_tasks(tmp_path):
    from distill.pipeline.config import parse_config
    from distill.tasks import ImageClassification, get_task
    from distill.tasks.image_data import DataSpec
    from distill.tasks.models import MLPSpec

    from conftest import tiny_config

    task = get_task()
    assert isinstance(task, ImageClassification) and (task.primary_metric, task.higher_is_better) == ("accuracy", True)
    assert parse_config(tiny_config(tmp_path)).task == "image_classification"
    with pytest.raises(
        DistillError,
        match=r"^config: task: unknown task 'poetry'; available: causal_lm, image_classification, text_classification, text_embedding$",
    ):
        parse_config(tiny_config(tmp_path, task="poetry"))
    data = task.load_data(DataSpec(source="digits"))
    model = task.build_model(MLPSpec(hidden=[8]), data, "student")
    assert task.example_inputs(data).shape == (2, 1, 8, 8) and task.latency_inputs(data, 5).shape == (5, 1, 8, 8)
    logits = torch.zeros(len(data.test), 10)
    logits[:, 3] = 1
    assert task.metrics(logits, data.test) == {"accuracy": pytest.approx(float((data.test.y == 3).float().mean()))}
    task.check_outputs(model, data, "student")
    with pytest.raises(DistillError, match="student: the model outputs 3 classes but the data has 10"):
        task.check_outputs(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data, "student")


def test_the_task_primary_metric_and_its_direction_pick_the_best_epoch_and_batches_pass_its_rewrite():
    from distill import HardLabelCE
    from distill.pipeline.config import TrainSpec
    from distill.tasks import ImageClassification
    from distill.tasks.image_data import DataSpec
    from distill.train.loop import train

    class Unsure(ImageClassification):
        """Prefers the least confident epoch: a metric where lower is better."""

        primary_metric, higher_is_better, rewrites = "confidence", False, 0

        def metrics(self, logits, split):
            return {"confidence": float(logits.softmax(-1).max(-1).values.mean())}

        def rewrite_batch(self, batch, student):
            Unsure.rewrites += 1
            return batch

    task = Unsure()
    data = task.load_data(DataSpec(source="digits"))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    result = train(
        Distiller(student, None, {"ce": HardLabelCE()}), data, TrainSpec(epochs=4, batch_size=128), task=task
    )
    scores = [log.val_metrics["confidence"] for log in result.history]
    assert result.best_epoch == 1 + scores.index(min(scores)) and result.best_val_score == min(scores)
    assert scores[-1] > scores[0]  # training made it more confident: the lowest is not the last epoch
    assert Unsure.rewrites == 4 * -(-len(data.train) // 128)
