"""Sparse top-k teacher signals: round trips, compact dtypes, and the KD loss on them."""

import math

import pytest
import torch

from distill.core.losses import soft_target_kl
from distill.core.signals import QuantizedValues, TopKLogits


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return 3 * torch.randn(6, 50)


def test_top_k_round_trip_and_exact_tail_mass(logits):
    sparse = TopKLogits.from_dense(logits, 5)
    probabilities = logits.softmax(-1)
    top = probabilities.topk(5, dim=-1)
    assert torch.equal(sparse.indices, logits.topk(5, dim=-1).indices)
    torch.testing.assert_close(sparse.values, logits.gather(-1, sparse.indices))
    torch.testing.assert_close(sparse.tail.exp(), 1 - top.values.sum(-1), atol=1e-6, rtol=1e-5)
    buckets = sparse.bucket_log_probs(1.0).exp()
    torch.testing.assert_close(buckets[:, :5], top.values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(buckets.sum(-1), torch.ones(6))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_sparse_kd_equals_dense_kd_when_k_covers_every_class(logits, temperature):
    torch.manual_seed(1)
    student = torch.randn(6, 50, requires_grad=True)
    dense = soft_target_kl(student, logits, temperature)
    sparse = soft_target_kl(student, TopKLogits.from_dense(logits, 50), temperature)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    (dense_grad,) = torch.autograd.grad(dense, student)
    (sparse_grad,) = torch.autograd.grad(
        soft_target_kl(student, TopKLogits.from_dense(logits, 50), temperature), student
    )
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-6, rtol=1e-4)


def test_sparse_kd_never_exceeds_dense_kd_at_t1_and_approaches_it_with_k(logits):
    # merging classes into one bucket can only lose divergence (data-processing inequality)
    student = torch.randn(6, 50)
    dense = soft_target_kl(student, logits, 1.0).item()
    values = [soft_target_kl(student, TopKLogits.from_dense(logits, k), 1.0).item() for k in (1, 5, 20, 49, 50)]
    assert all(v <= dense + 1e-5 for v in values)
    assert all(a <= b + 1e-5 for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(dense, rel=1e-5)


def _bucket_kl_by_autograd(student, teacher: TopKLogits, temperature, mask=None):
    """The sparse KL written out with autograd through the bucketing: the reference for the
    closed-form gradient."""
    log_q = (student / temperature).log_softmax(-1)
    log_q_head = log_q.gather(-1, teacher.indices)
    log_q_tail = log_q.scatter(-1, teacher.indices, float("-inf")).logsumexp(-1)
    log_q_buckets = torch.cat([log_q_head, log_q_tail.unsqueeze(-1)], -1)
    log_p = teacher.bucket_log_probs(temperature).to(student.dtype)
    per_row = (log_p.exp() * (log_p - log_q_buckets)).sum(-1)
    if mask is not None:
        return (per_row * mask).sum() / mask.sum() * temperature**2
    return per_row.mean() * temperature**2


@pytest.mark.parametrize("k", [1, 3, 29])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sparse_kd_closed_form_gradient_equals_autograd_through_the_buckets(k, temperature):
    torch.manual_seed(3)
    top = TopKLogits.from_dense(4 * torch.randn(2, 5, 30, dtype=torch.float64), k)  # float32 values
    teacher = TopKLogits(top.values.double(), top.indices, top.logsumexp.double(), top.tail.double(), 30)
    student = (3 * torch.randn(2, 5, 30, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.float64)
    fused = soft_target_kl(student, teacher, temperature, mask)
    reference = _bucket_kl_by_autograd(student, teacher, temperature, mask)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-10)
    (g_fused,) = torch.autograd.grad(fused, student)
    (g_reference,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(g_fused, g_reference, atol=1e-12, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda s: soft_target_kl(s, teacher, temperature, mask), (student,))
    assert g_fused[0, 3:].abs().max() == 0  # masked rows get no gradient


def test_sparse_kd_gradient_is_finite_when_the_students_tail_underflows():
    teacher = TopKLogits.from_dense(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2)
    # the student's tail probability, about e^-390, is 0 in float32 but finite in log space
    student = torch.tensor([[200.0, 190.0, -200.0, -200.0]], requires_grad=True)
    loss = soft_target_kl(student, teacher, 1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)  # softmax gradients sum to 0


def test_sparse_kd_on_sequences_with_a_mask():
    torch.manual_seed(2)
    teacher, student = torch.randn(2, 4, 30), torch.randn(2, 4, 30)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    sparse = soft_target_kl(student, TopKLogits.from_dense(teacher, 30), 2.0, mask)
    assert sparse.item() == pytest.approx(soft_target_kl(student, teacher, 2.0, mask).item(), rel=1e-5)
    with pytest.raises(ValueError, match="do not match the teacher's top-k"):
        soft_target_kl(torch.randn(2, 4, 31), TopKLogits.from_dense(teacher, 5))


@pytest.mark.parametrize(
    ("dtype", "bound", "bytes_per_value"), [("float32", 0.0, 4), ("float16", 1e-3, 2), ("bfloat16", 8e-3, 2)]
)
def test_float_dtypes_reconstruct_within_their_precision(logits, dtype, bound, bytes_per_value):
    values = TopKLogits.from_dense(logits, 8).values
    encoded = QuantizedValues.encode(values, dtype)
    error = (encoded.decode() - values).abs() / values.abs().clamp_min(1e-3)
    assert float(error.max()) <= bound
    assert encoded.bytes_per_row() == 8 * bytes_per_value


def test_int8_reconstructs_within_half_a_step_of_its_row_scale(logits):
    values = TopKLogits.from_dense(logits, 16).values
    encoded = QuantizedValues.encode(values, "int8")
    step = (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)) / 255
    assert bool(((encoded.decode() - values).abs() <= step / 2 + 1e-5).all())
    assert encoded.data.dtype == torch.int8 and encoded.bytes_per_row() == 16 + 8
    # the loss barely moves when the teacher's values go through int8
    student = torch.randn(6, 50)
    exact = TopKLogits.from_dense(logits, 16)
    rough = TopKLogits(encoded.decode(), exact.indices, exact.logsumexp, exact.tail, 50)
    assert soft_target_kl(student, rough, 2.0).item() == pytest.approx(
        soft_target_kl(student, exact, 2.0).item(), rel=1e-2
    )
    assert math.isfinite(soft_target_kl(student, rough, 2.0).item())
