"""Channels-last layout: convolutional models switch to it with the same outputs and gradients,
models that need NCHW keep it, and saved weights are in the standard layout."""

import torch
from safetensors.torch import load_file
from torch import nn

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
