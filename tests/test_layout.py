"""Faster forward passes, the same numbers: channels-last layout (convolutional models switch to it
with the same outputs and gradients, models that need NCHW keep it, saved weights are in the
standard layout) and batch norms folded into a frozen model's convolutions."""

import torch
from safetensors.torch import load_file
from torch import nn

from distill import Distiller, SoftTargetKD
from distill.core.fold import folded_batch_norms
from distill.core.io import save_weights
from distill.core.layout import is_channels_last, use_channels_last


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


class ViewsItsFeatures(nn.Module):
    """A CNN written the old way: ``.view`` on a feature map, which needs contiguous NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        features = self.conv(x)
        return self.head(features.view(len(features), -1))


def test_a_cnn_goes_channels_last_with_the_same_outputs_and_gradients():
    x = torch.randn(4, 3, 6, 6)
    standard, fast = cnn(), cnn()
    assert use_channels_last(fast, x[:2]) and is_channels_last(fast) and not is_channels_last(standard)
    assert fast.training  # the probe leaves the mode as it was
    for model in (standard, fast):
        model(x).square().sum().backward()
    torch.testing.assert_close(fast(x), standard(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(standard.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
        assert b.requires_grad and not b.is_inference()


def test_models_that_need_nchw_or_have_no_convolutions_keep_their_layout():
    x = torch.randn(2, 3, 6, 6)
    views = ViewsItsFeatures()
    expected = views(x)
    assert not use_channels_last(views, x) and not is_channels_last(views)
    torch.testing.assert_close(views(x), expected, rtol=0, atol=0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    assert not use_channels_last(mlp, x)


def test_weights_are_saved_in_the_standard_layout_and_the_model_keeps_its_own(tmp_path):
    fast = cnn()
    use_channels_last(fast, torch.randn(2, 3, 6, 6))
    save_weights(fast, tmp_path / "w.safetensors")
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert is_channels_last(fast)
    for name, tensor in fast.state_dict().items():
        assert saved[name].is_contiguous()
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


class BranchesOnValues(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cnn()

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else -self.body(x)


def trained_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with running statistics far from the identity, as a trained teacher has."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
    return model


def test_a_frozen_cnn_folds_its_batch_norms_into_a_copy_with_the_same_logits():
    teacher, x = trained_statistics(cnn()), torch.randn(8, 3, 6, 6)
    use_channels_last(teacher, x[:2])
    teacher.train()
    folded = folded_batch_norms(teacher, x[:2])
    count = lambda m: sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())  # noqa: E731
    assert folded is not teacher and count(folded) == 0 and count(teacher) == 1
    assert teacher.training and not folded.training  # the user's model is left as it was
    assert is_channels_last(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), teacher.eval()(x), rtol=1e-5, atol=1e-5)


def test_models_without_batch_norms_or_that_cannot_be_traced_run_as_they_are():
    x = torch.randn(2, 3, 6, 6)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    assert folded_batch_norms(plain, x) is plain
    branches = trained_statistics(BranchesOnValues())
    assert folded_batch_norms(branches, x) is branches


def test_the_distiller_reads_the_teachers_logits_from_the_folded_copy():
    teacher, student, x = trained_statistics(cnn()), cnn(), torch.randn(16, 3, 6, 6)
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD(temperature=2.0)})
    keys = set(distiller.state_dict())
    assert distiller.remember_teacher(x, batch_size=4)
    with torch.no_grad():
        expected = teacher.eval()(x)
    torch.testing.assert_close(distiller._remembered.logits, expected, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in distiller._teacher_model(x).modules()) == 0
    assert set(distiller.state_dict()) == keys  # the copy is no part of the distiller's state
