"""The loss terms against hand-computed values, finite differences and their limits."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.core.losses import build_term, hard_label_ce, soft_target_kl


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax(logits, temperature=1.0):
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def test_kd_matches_hand_computed_value_at_t1():
    # teacher uniform over 2 classes, student (3/4, 1/4): KL = 0.5 ln(4/3)
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    assert soft_target_kl(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_kd_applies_t_squared_and_softened_distributions():
    student, teacher, temperature = [2.0, 0.5, -1.0], [0.0, 1.5, 0.3], 3.0
    expected = kl(softmax(teacher, temperature), softmax(student, temperature)) * temperature**2
    value = soft_target_kl(torch.tensor([student]), torch.tensor([teacher]), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_a_batch_mean_not_an_elementwise_mean():
    # two rows over 5 classes: one with KL k, one identical (KL 0) -> batch mean k/2, not k/10
    row_s, row_t = [1.0, 0.0, 0.0, 2.0, -1.0], [0.0, 1.0, 0.5, 0.0, 0.0]
    k = kl(softmax(row_t), softmax(row_s))
    student = torch.tensor([row_s, row_t])
    teacher = torch.tensor([row_t, row_t])
    assert soft_target_kl(student, teacher, 1.0).item() == pytest.approx(k / 2, rel=1e-5)


def test_kd_gradient_matches_finite_differences_and_closed_form():
    torch.manual_seed(0)
    student = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, dtype=torch.float64)
    temperature = 2.5
    assert torch.autograd.gradcheck(lambda s: soft_target_kl(s, teacher, temperature), (student,))
    soft_target_kl(student, teacher, temperature).backward()
    # d/ds [T^2 KL(p_t || p_s)] / batch = T (p_s - p_t) / batch
    closed = temperature * (F.softmax(student / temperature, -1) - F.softmax(teacher / temperature, -1)) / 4
    torch.testing.assert_close(student.grad, closed.detach())


def test_kd_is_zero_when_student_reproduces_teacher_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert soft_target_kl(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(logits, torch.randn(8, 10), 4.0).item() > 0


def test_kd_on_sequences_averages_over_unmasked_positions():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rows = [
        soft_target_kl(student[b, s][None], teacher[b, s][None], 2.0) for b in range(2) for s in range(5) if mask[b, s]
    ]
    assert soft_target_kl(student, teacher, 2.0, mask).item() == pytest.approx(
        torch.stack(rows).mean().item(), rel=1e-5
    )
    # masked positions have no influence at all
    changed = student.clone()
    changed[~mask] = 100.0
    assert soft_target_kl(changed, teacher, 2.0, mask).item() == pytest.approx(
        soft_target_kl(student, teacher, 2.0, mask).item()
    )


def test_kd_rejects_mismatched_class_sets():
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_kl(torch.randn(2, 10), torch.randn(2, 12))


def test_kd_handles_half_precision_logits_in_float32():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    half = soft_target_kl(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(
        soft_target_kl(student.bfloat16().float(), teacher.bfloat16().float(), 2.0).item()
    )


def test_ce_skips_unlabeled_samples_and_is_zero_without_labels():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, -1, 2, -1])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert hard_label_ce(logits, labels).item() == pytest.approx(expected.item())
    none = hard_label_ce(logits, torch.full((4,), -1))
    none.backward()
    assert none.item() == 0.0 and torch.all(logits.grad == 0)


def test_terms_are_built_from_config_parameters():
    term = build_term("kd", {"temperature": 3.0})
    assert term.temperature == 3.0
    with pytest.raises(Exception, match="temperature"):
        build_term("kd", {"temperature": -1})
    with pytest.raises(Exception, match="Extra inputs"):
        build_term("kd", {"temprature": 2})
