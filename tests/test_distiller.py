"""The Distiller wrapper: alpha limits, a frozen teacher in eval mode, no teacher gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import Distiller, HardLabelCE, SoftTargetKD, soft_target_kl


def teacher_with_bn_and_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def hinton(student, teacher, alpha, temperature=2.0):
    return Distiller(
        student, teacher, {"kd": SoftTargetKD(temperature), "ce": HardLabelCE()}, {"kd": alpha, "ce": 1 - alpha}
    )


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 5), torch.randint(0, 3, (8,))


def test_loss_is_alpha_blend_of_kd_and_ce(batch):
    x, y = batch
    torch.manual_seed(1)
    student, teacher = nn.Linear(5, 3), teacher_with_bn_and_dropout()
    out = hinton(student, teacher, alpha=0.3)(x, labels=y)
    s_logits, t_logits = student(x), teacher.eval()(x)
    kd = soft_target_kl(s_logits, t_logits, 2.0)
    ce = F.cross_entropy(s_logits, y)
    assert out.loss.item() == pytest.approx((0.3 * kd + 0.7 * ce).item(), rel=1e-6)
    assert out.terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert out.terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_with_identical_gradients(batch):
    x, y = batch
    torch.manual_seed(1)
    student, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(student.state_dict())
    hinton(student, teacher_with_bn_and_dropout(), alpha=0.0)(x, labels=y).loss.backward()
    F.cross_entropy(reference(x), y).backward()
    torch.testing.assert_close(student.weight.grad, reference.weight.grad)


def test_alpha_one_needs_no_labels(batch):
    x, _ = batch
    torch.manual_seed(1)
    student, teacher = nn.Linear(5, 3), teacher_with_bn_and_dropout()
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD(2.0)})
    out = distiller(x)  # no labels at all
    assert out.loss.item() == pytest.approx(soft_target_kl(student(x), teacher.eval()(x), 2.0).item(), rel=1e-6)
    # unlabeled markers (-1) everywhere also work when ce has weight 0
    out = hinton(student, teacher, alpha=1.0)(x, labels=torch.full((8,), -1))
    assert torch.isfinite(out.loss)


def test_no_gradient_reaches_the_teacher(batch):
    x, y = batch
    teacher = teacher_with_bn_and_dropout()
    distiller = hinton(nn.Linear(5, 3), teacher, alpha=0.9)
    distiller(x, labels=y).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher.parameters()}


def test_teacher_stays_in_eval_mode_and_keeps_its_statistics(batch):
    x, y = batch
    teacher = teacher_with_bn_and_dropout()
    teacher.train()
    distiller = hinton(nn.Linear(5, 3), teacher, alpha=0.9)
    running_mean = teacher[1].running_mean.clone()
    for mode in (True, False, True):
        distiller.train(mode)
        assert not teacher.training and all(not m.training for m in teacher.modules())
        assert distiller.student.training == mode
    first = distiller(x, labels=y).teacher.logits
    second = distiller(x, labels=y).teacher.logits
    torch.testing.assert_close(first, second)  # dropout off: the teacher is deterministic
    torch.testing.assert_close(teacher[1].running_mean, running_mean)  # batch-norm statistics untouched


def test_teacher_is_not_run_when_no_term_needs_it(batch):
    x, y = batch

    class Exploding(nn.Module):
        def forward(self, inputs):
            raise AssertionError("the teacher must not run")

    out = Distiller(nn.Linear(5, 3), Exploding(), {"ce": HardLabelCE()})(x, labels=y)
    assert out.teacher is None


def test_configuration_mistakes_are_caught():
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(nn.Linear(5, 3), None, {"kd": SoftTargetKD()})
    with pytest.raises(ValueError, match="unknown terms"):
        Distiller(nn.Linear(5, 3), None, {"ce": HardLabelCE()}, {"kd": 1.0})


def test_hugging_face_style_outputs_are_understood(batch):
    x, y = batch

    class WithLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, inputs):
            return type("Output", (), {"logits": self.linear(inputs)})()

    out = hinton(WithLogits(), WithLogits(), alpha=0.5)(x, labels=y)
    assert out.student.logits.shape == (8, 3)


def test_a_remembered_teacher_runs_once_and_trains_bit_for_bit_like_a_live_one():
    """distill.remember_teacher: the teacher's logits are computed once over the training split
    and looked up by sample index; training ends with the same weights, with far fewer passes."""
    from distill.pipeline.config import TrainSpec
    from distill.tasks.image_data import DataSpec, load_data
    from distill.train.loop import train

    data = load_data(DataSpec(source="digits"))
    spec = TrainSpec(epochs=3, batch_size=64, lr=0.05)
    students, calls = {}, {}
    for remember in (False, True):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
        torch.manual_seed(1)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        calls[remember] = 0

        def count(*_, remember=remember):
            calls[remember] += 1

        teacher.register_forward_hook(count)
        distiller = hinton(student, teacher, alpha=0.9)
        train(distiller, data, spec, remember_teacher=remember)
        assert distiller._remembered is None  # forgotten after training
        students[remember] = student.state_dict()
    steps = -(-len(data.train) // 64)
    assert calls[False] == 3 * steps and calls[True] == 1 + steps  # a probe, then one pass over the data
    assert all(torch.equal(students[False][k], students[True][k]) for k in students[False])


def test_a_teacher_is_not_remembered_when_terms_read_its_features():
    from distill import FitNetsHint

    student, teacher = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)), nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    distiller = Distiller(
        student, teacher, {"kd": SoftTargetKD(), "hint": FitNetsHint(student="0", teacher="0")},
        example_inputs=torch.randn(2, 5),
    )  # fmt: skip
    assert not distiller.remember_teacher(torch.randn(10, 5), 4)
    plain = hinton(nn.Linear(5, 3), teacher, alpha=1.0)
    assert not plain.remember_teacher(torch.randn(10, 5), 4, max_bytes=10 * 3 * 4 - 1)  # would not fit
    assert plain.remember_teacher(torch.randn(10, 5), 4, max_bytes=10 * 3 * 4)
