"""Sparse top-k teacher signals: round trips, compact dtypes, and the KD loss on them."""

import math

import pytest
import torch

from distill.losses import soft_target_kl
from distill.signals import QuantizedValues, TopKLogits


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
