"""Feature, attention, relation and decoupled-logit terms against independent references."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import Distiller, DistillError
from distill.core.adapters import ConvAdapter, FlatAdapter, make_adapter
from distill.core.distiller import LinearWarmup
from distill.core.losses import (
    AttentionTransfer,
    FitNetsHint,
    ModelOutputs,
    RKDDistance,
    SoftTargetKD,
    attention_map,
    decoupled_kd,
    probabilistic_transfer,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
    soft_target_kl,
)


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def cnn(channels):
    layers, c_in = [], 1
    for c in channels:
        layers.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)))
        c_in = c
    return nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.LazyLinear(10))


def built(model):
    model(torch.randn(2, 1, 8, 8))  # materialise lazy layers
    return model


# ---------------------------------------------------------------------------- attention transfer


def test_attention_map_matches_a_loop_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    for b in range(2):
        q = np.zeros((4, 5))
        for i, j in itertools.product(range(4), range(5)):
            q[i, j] = np.mean([float(x[b, c, i, j]) ** 2 for c in range(3)])
        q = q.flatten() / np.linalg.norm(q)
        np.testing.assert_allclose(attention_map(x)[b].numpy(), q, rtol=1e-5)


def test_attention_transfer_invariances_and_zero():
    torch.manual_seed(0)
    teacher = torch.randn(4, 6, 5, 5)
    term = AttentionTransfer("s", "t")

    def loss(student):
        return term(ModelOutputs(student[:, :1], {"s": student}), ModelOutputs(teacher[:, :1], {"t": teacher}), None)

    assert loss(teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(torch.cat([teacher, teacher, teacher], dim=1)).item() == pytest.approx(0.0, abs=1e-7)  # 18 channels
    assert loss(3.0 * teacher).item() == pytest.approx(0.0, abs=1e-7)  # feature scale
    other = torch.randn(4, 6, 5, 5)
    expected = (attention_map(other) - attention_map(teacher)).pow(2).mean()
    assert loss(other).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(torch.randn(4, 2, 10, 10)).item() > 0  # other size: resized to the teacher's map


# ---------------------------------------------------------------------------- relations


def test_rkd_distance_against_loops_and_scale_invariance():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)

    def normalised(e):
        d = [[float(torch.dist(e[i], e[j])) for j in range(5)] for i in range(5)]
        mean = np.mean([d[i][j] for i in range(5) for j in range(5) if i != j])
        return [[v / mean for v in row] for row in d]

    ds, dt = normalised(s), normalised(t)
    expected = np.mean([huber(ds[i][j], dt[i][j]) for i in range(5) for j in range(5)])
    assert rkd_distance(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert rkd_distance(10 * s, 0.1 * t).item() == pytest.approx(expected, rel=1e-4)
    assert rkd_distance(t, 5 * t).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_angle_against_loops():
    torch.manual_seed(1)
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)

    def cosines(e):
        out = {}
        for i, j, k in itertools.product(range(4), repeat=3):
            a, b = e[j] - e[i], e[k] - e[i]
            na, nb = float(a.norm()), float(b.norm())
            out[i, j, k] = float(a @ b) / (max(na, 1e-12) * max(nb, 1e-12))
        return out

    cs, ct = cosines(s), cosines(t)
    expected = np.mean([huber(cs[key], ct[key]) for key in cs])
    assert rkd_angle(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert rkd_angle(2 * t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preserving_against_numpy():
    torch.manual_seed(2)
    s, t = torch.randn(6, 2, 3, 3), torch.randn(6, 9)
    qs, qt = s.reshape(6, -1).double().numpy(), t.double().numpy()
    gs, gt = qs @ qs.T, qt @ qt.T
    gs /= np.linalg.norm(gs, axis=1, keepdims=True)
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    expected = ((gs - gt) ** 2).sum() / 36
    assert similarity_preserving(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert similarity_preserving(t, 4 * t).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_against_numpy():
    torch.manual_seed(3)
    s, t = torch.randn(5, 4), torch.randn(5, 8)

    def conditional(e):
        e = e.double().numpy()
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = (e @ e.T + 1) / 2
        return sim / sim.sum(axis=1, keepdims=True)

    ps, pt = conditional(s), conditional(t)
    expected = np.mean(pt * np.log((pt + 1e-7) / (ps + 1e-7)))
    assert probabilistic_transfer(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert probabilistic_transfer(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_terms_tap_logits_by_default():
    torch.manual_seed(4)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    value = RKDDistance()(ModelOutputs(s), ModelOutputs(t), None)
    assert value.item() == pytest.approx(rkd_distance(s, t).item())


# ---------------------------------------------------------------------------- decoupled KD


def test_dkd_against_hand_computed_parts_and_the_kd_decomposition():
    torch.manual_seed(5)
    s, t = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    target, temperature = torch.tensor([2]), 2.0
    ps = F.softmax(s / temperature, -1)[0].tolist()
    pt = F.softmax(t / temperature, -1)[0].tolist()
    bs, bt = [ps[2], 1 - ps[2]], [pt[2], 1 - pt[2]]
    tckd = sum(b * math.log(b / a) for a, b in zip(bs, bt, strict=True)) * temperature**2
    qs = [p / (1 - ps[2]) for i, p in enumerate(ps) if i != 2]
    qt = [p / (1 - pt[2]) for i, p in enumerate(pt) if i != 2]
    nckd = sum(b * math.log(b / a) for a, b in zip(qs, qt, strict=True)) * temperature**2
    assert decoupled_kd(s, t, target, 1.0, 0.0, temperature).item() == pytest.approx(tckd, rel=1e-6)
    assert decoupled_kd(s, t, target, 0.0, 1.0, temperature).item() == pytest.approx(nckd, rel=1e-6)
    assert decoupled_kd(s, t, target, 0.5, 3.0, temperature).item() == pytest.approx(0.5 * tckd + 3 * nckd, rel=1e-6)
    # Zhao et al.'s identity: KD = TCKD + (1 - p_t(target)) * NCKD
    kd = soft_target_kl(s, t, temperature).item()
    assert kd == pytest.approx(tckd + (1 - pt[2]) * nckd, rel=1e-6)


def test_dkd_uses_the_teachers_class_for_unlabeled_samples():
    from distill.core.losses import Batch, DecoupledKD

    torch.manual_seed(6)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    term = DecoupledKD()
    unlabeled = term(ModelOutputs(s), ModelOutputs(t), Batch(None, torch.full((4,), -1)))
    assert unlabeled.item() == pytest.approx(decoupled_kd(s, t, t.argmax(-1)).item())
    assert term(ModelOutputs(t), ModelOutputs(t), Batch(None, torch.tensor([0, 1, 2, 3]))).item() == pytest.approx(
        0, abs=1e-6
    )


# ---------------------------------------------------------------------------- adapters and taps


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((8, 14, 14), (16, 7, 7), ConvAdapter),
        ((8, 3, 3), (16, 7, 7), ConvAdapter),
        ((64,), (128,), FlatAdapter),
        ((64,), (16, 3, 3), FlatAdapter),
        ((10, 32), (10, 64), nn.Linear),
        ((5, 5), (5, 5), nn.Identity),
    ],
)
def test_adapters_map_student_shapes_to_teacher_shapes(student, teacher, kind):
    adapter = make_adapter(student, teacher, "here")
    assert isinstance(adapter, kind)
    assert adapter(torch.randn(3, *student)).shape == (3, *teacher)


@pytest.mark.parametrize(("student", "teacher"), [((10, 32), (12, 64)), ((64,), (10, 32)), ((4, 4, 4), (3, 5))])
def test_irreconcilable_shapes_are_a_one_line_error(student, teacher):
    with pytest.raises(DistillError, match=r"here: no adapter maps the student's shape"):
        make_adapter(student, teacher, "here")


def test_bad_taps_are_reported_before_training():
    student, teacher = built(cnn([4])), built(cnn([8, 16]))
    with pytest.raises(DistillError, match=r"student has no module named '0.9'.*did you mean"):
        Distiller(student, teacher, {"hint": FitNetsHint("0.9", "0.1")})
    with pytest.raises(DistillError, match=r"teacher has no module named 'nope'"):
        Distiller(student, teacher, {"hint": FitNetsHint("0.0", "nope")})
    sequence_student = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 30), nn.Unflatten(1, (5, 6)), nn.Flatten(), nn.Linear(30, 10)
    )
    with pytest.raises(
        DistillError, match=r"hint \(student 2 / teacher 0.0\): .*\[5, 6\] to the teacher's \[8, 4, 4\]"
    ) as info:
        Distiller(sequence_student, teacher, {"hint": FitNetsHint("2", "0.0")}, example_inputs=torch.randn(2, 1, 8, 8))
    assert "\n" not in str(info.value)
    with pytest.raises(DistillError, match=r"at \(student 2 / teacher 0\): attention transfer needs feature maps"):
        Distiller(student, teacher, {"at": AttentionTransfer("2", "0")}, example_inputs=torch.randn(2, 1, 8, 8))


def test_hint_gradients_reach_student_and_adapter_but_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = built(cnn([4])), built(cnn([8, 16]))
    x = torch.randn(4, 1, 8, 8)
    distiller = Distiller(
        student, teacher, {"hint": FitNetsHint("0.0", "0.0"), "kd": SoftTargetKD(2.0)}, example_inputs=x
    )
    adapter = distiller.terms["hint"].adapter
    assert isinstance(adapter, ConvAdapter) and adapter.conv.weight.shape == (8, 4, 1, 1)
    out = distiller(x)
    # reference: the same MSE computed from separately captured features
    with torch.no_grad():
        s_feat, t_feat = student[0][0](x), teacher[0][0](x)
        assert out.terms["hint"].item() == pytest.approx(F.mse_loss(adapter(s_feat), t_feat).item(), rel=1e-5)
    out.loss.backward()
    assert adapter.conv.weight.grad is not None and adapter.conv.weight.grad.abs().sum() > 0
    assert student[0][0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not out.teacher.features["0.0"].requires_grad
    assert {id(p) for p in distiller.trainable_parameters()} >= {id(adapter.conv.weight)}


def test_hint_is_zero_when_the_student_reproduces_the_teacher():
    torch.manual_seed(0)
    teacher = built(cnn([8]))
    student = built(cnn([8]))
    student.load_state_dict(teacher.state_dict())
    distiller = Distiller(student, teacher, {"hint": FitNetsHint("0.0", "0.0")}, example_inputs=torch.randn(2, 1, 8, 8))
    assert isinstance(distiller.terms["hint"].adapter, nn.Identity)
    student.eval()
    assert distiller(torch.randn(4, 1, 8, 8)).loss.item() == pytest.approx(0.0, abs=1e-8)


def test_adapter_terms_must_be_prepared_before_use():
    student, teacher = built(cnn([4])), built(cnn([8]))
    distiller = Distiller(student, teacher, {"hint": FitNetsHint("0.0", "0.0")})
    with pytest.raises(RuntimeError, match="call distiller.prepare"):
        distiller(torch.randn(2, 1, 8, 8))
    distiller.prepare(torch.randn(2, 1, 8, 8))
    assert torch.isfinite(distiller(torch.randn(2, 1, 8, 8)).loss)


def test_linear_warmup_weights_follow_progress():
    student, teacher = built(cnn([4])), built(cnn([8]))
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD()}, {"kd": LinearWarmup(2.0, 4)})
    for progress, expected in ((0, 0.0), (1, 0.5), (2, 1.0), (4, 2.0), (9, 2.0)):
        distiller.progress = progress
        assert distiller.weight("kd") == pytest.approx(expected)
    distiller.progress = 1
    x = torch.randn(4, 1, 8, 8)
    out = distiller(x)
    assert out.loss.item() == pytest.approx(0.5 * out.terms["kd"].item(), rel=1e-6)


# ---------------------------------------------------------------------------- in a whole run


def test_a_run_combines_methods_with_adapters_and_a_hint_stage(tmp_path):
    from safetensors.torch import load_file

    from distill.pipeline.config import parse_config
    from distill.pipeline.experiment import run_experiment

    from conftest import tiny_config

    terms = [
        {"type": "kd", "weight": 0.5, "temperature": 2.0},
        {"type": "ce", "weight": 0.5},
        {"type": "hint", "weight": 0.2, "student": "features.0", "teacher": "features.1", "stage_epochs": 1},
        {"type": "at", "weight": 10.0, "student": "features.0", "teacher": "features.0", "warmup_epochs": 1},
        {"type": "rkd_distance", "name": "rkd_pool", "weight": 1.0, "student": "pool", "teacher": "pool"},
    ]
    raw = tiny_config(
        tmp_path, **{"student": {"arch": "cnn", "channels": [8], "hidden": 16}, "distill": {"terms": terms}}
    )
    result = run_experiment(parse_config(raw), cache_dir=tmp_path / "cache")
    run = result.run_dir
    adapters = load_file(run / "adapters.safetensors")
    assert set(adapters) == {"hint.adapter.conv.weight"} and adapters["hint.adapter.conv.weight"].shape == (32, 8, 1, 1)
    student_keys = set(load_file(run / "student.safetensors"))
    assert student_keys and not any("adapter" in key for key in student_keys)
    training = result.metrics["training"]
    assert len(training["stage-hint"]["history"]) == 1 and set(training["stage-hint"]["history"][0]["terms"]) == {
        "hint"
    }
    assert set(training["distilled"]["history"][0]["terms"]) == {"kd", "ce", "hint", "at", "rkd_pool"}
    assert all(math.isfinite(e["loss"]) for e in training["distilled"]["history"])
    assert not any(p.is_dir() for p in run.iterdir())  # phase checkpoints are cleaned up


def test_a_bad_tap_in_a_config_stops_the_run_before_it_starts(tmp_path, capsys):
    import yaml

    from distill.cli import main

    from conftest import tiny_config

    terms = [{"type": "kd"}, {"type": "at", "student": "features.7", "teacher": "features.0"}]
    raw = tiny_config(tmp_path, **{"student": {"arch": "cnn", "channels": [8]}, "distill": {"terms": terms}})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err
    assert "student has no module named 'features.7'; did you mean features.0" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_methods_lists_every_term_with_its_parameters(capsys):
    from distill.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("kd", "ce", "hint", "at", "rkd_distance", "rkd_angle", "sp", "pkt", "dkd"):
        assert f"\n{name} " in "\n" + out or out.startswith(name), name
    assert "stage_epochs" in out and "beta" in out
    assert "student (required: student module to tap, e.g. features.1)" in out and "Undefined" not in out


def test_the_hint_stage_trains_only_the_layers_below_the_tap():
    from distill.pipeline.config import TrainSpec
    from distill.pipeline.experiment import run_hint_stage
    from distill.tasks.image_data import DataSpec, load_data
    from distill.tasks.models import CNNSpec, SmallCNN
    from distill.train.loop import train

    data = load_data(DataSpec(source="digits"))
    torch.manual_seed(0)
    student, teacher = SmallCNN((1, 8, 8), 10, CNNSpec(channels=[4, 8])), SmallCNN((1, 8, 8), 10, CNNSpec(channels=[8]))
    term = FitNetsHint("features.0", "features.0", stage_epochs=1)
    distiller = Distiller(student, teacher, {"hint": term, "kd": SoftTargetKD()}, example_inputs=data.train.x[:2])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = run_hint_stage(
        "hint",
        term,
        distiller,
        data,
        lambda stage, epochs: train(stage, data, TrainSpec(epochs=epochs), select_best=False),
    )
    after = student.state_dict()
    assert len(result.history) == 1 and set(result.history[0].terms) == {"hint"}
    assert not torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
    for key in ("features.1.0.weight", "head.1.weight", "head.3.weight"):
        assert torch.equal(before[key], after[key]), key
    assert all(p.requires_grad for p in student.parameters())  # unfrozen again afterwards


def test_taps_record_only_inside_the_distiller_and_catch_in_place_changes():
    from distill.tasks.models import CNNSpec, SmallCNN

    torch.manual_seed(0)
    student, teacher = SmallCNN((1, 8, 8), 10, CNNSpec(channels=[4])), SmallCNN((1, 8, 8), 10, CNNSpec(channels=[8]))
    x = torch.randn(4, 1, 8, 8)
    distiller = Distiller(student, teacher, {"hint": FitNetsHint("features.0", "features.0")}, example_inputs=x)
    student(x)  # an evaluation pass elsewhere records nothing
    assert distiller._student_taps._features == {}
    # features.0.1 is a BatchNorm whose output the next ReLU(inplace=True) overwrites
    with pytest.raises(DistillError, match=r"'features.0.1': its output was changed in place"):
        Distiller(student, teacher, {"hint": FitNetsHint("features.0.1", "features.0")}, example_inputs=x)


def test_a_tap_on_a_module_that_never_runs_is_caught_before_training():
    from distill.core.losses import SimilarityPreserving

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = nn.Linear(64, 10), nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x.flatten(1))

    teacher = built(cnn([8]))
    with pytest.raises(DistillError, match="student module 'spare' did not run in the forward pass"):
        Distiller(
            WithSpare(), teacher, {"sp": SimilarityPreserving("spare", None)}, example_inputs=torch.randn(2, 1, 8, 8)
        )


def test_the_hint_stage_leaves_the_users_frozen_layers_frozen():
    from distill.pipeline.experiment import run_hint_stage
    from distill.tasks.image_data import DataSpec, load_data
    from distill.tasks.models import CNNSpec, SmallCNN
    from distill.train.loop import TrainSpec, train

    data = load_data(DataSpec(source="digits", limit_train=128))
    student, teacher = SmallCNN((1, 8, 8), 10, CNNSpec(channels=[4, 8])), SmallCNN((1, 8, 8), 10, CNNSpec(channels=[8]))
    student.features[0][0].weight.requires_grad_(False)  # the user froze the first convolution
    term = FitNetsHint("features.1", "features.0", stage_epochs=1)
    distiller = Distiller(student, teacher, {"hint": term}, example_inputs=data.train.x[:2])
    adapter = term.adapter
    run_hint_stage(
        "hint", term, distiller, data, lambda s, epochs: train(s, data, TrainSpec(epochs=epochs), select_best=False)
    )
    assert not student.features[0][0].weight.requires_grad
    assert student.head[1].weight.requires_grad and term.adapter is adapter  # the same adapter trains on
