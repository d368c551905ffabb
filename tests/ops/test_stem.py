"""The fused first ConvNet block (condense.ops.stem) against the stock layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condense.models import create_model
from condense.ops.mmd import group_means
from condense.ops.stem import (
    fusable_stem,
    fused_embed_means,
    resolve_fuse_stem,
    stem_apply,
    stem_prepare,
    stem_stencil,
)


def _net(channels: int, size: int, seed: int = 0, **kw) -> nn.Module:
    net = create_model("convnet", channels, 4, (size, size), generator=torch.Generator().manual_seed(seed), **kw)
    with torch.no_grad():  # non-trivial affine parameters and bias (a fresh norm is 1 / 0)
        g = torch.Generator().manual_seed(seed + 1)
        norm = net.features[0][1]
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.3)
        net.features[0][0].bias.copy_(torch.randn(net.features[0][0].bias.shape, generator=g))
    return net.double().requires_grad_(False)


@pytest.mark.parametrize(
    ("channels", "size", "kw"),
    [(1, 28, {}), (3, 32, {}), (3, 16, {"width": 8}), (1, 27, {"width": 8, "depth": 2}), (2, 9, {"width": 4, "depth": 1})],
)
def test_stem_equals_the_stock_first_block(channels: int, size: int, kw: dict) -> None:
    """Closed-form statistics + stencil = conv -> instance norm -> ReLU -> pool (float64), also
    for odd maps (the pool drops the last row/column) and the 28x28 padding of 3."""
    net = _net(channels, size, **kw)
    assert fusable_stem(net)
    x = torch.randn(5, channels, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0] = 0.0  # a constant image: variance 0, the norm's eps alone
    with torch.no_grad():
        ref = net.features[0](x)
        got = stem_apply(net, x, compiled=False)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_stem_parts_and_shapes() -> None:
    x = torch.randn(3, 2, 28, 28)
    w, g, b = torch.randn(6, 2, 3, 3), torch.ones(6), torch.zeros(6)
    patches, ws, t = stem_prepare(x, w, g, b, 3, 1e-5)
    assert patches.shape == (3, 16, 16, 2, 4, 4) and ws.shape == (3, 18, 6) and t.shape == (3, 6)
    assert stem_stencil(patches, ws, t).shape == (3, 6, 16, 16)


@pytest.mark.parametrize(
    "kw",
    [{"norm": "batchnorm"}, {"norm": "layernorm"}, {"norm": "groupnorm"}, {"norm": "none"},
     {"pooling": "maxpool"}, {"pooling": "none"}, {"activation": "sigmoid"}],
)
def test_other_first_blocks_are_not_fused(kw: dict) -> None:
    net = create_model("convnet", 1, 4, (28, 28), width=8, **kw)
    assert not fusable_stem(net)
    with torch.no_grad(), pytest.raises(ValueError, match="not fusable"):
        fused_embed_means(net, torch.zeros(4, 1, 28, 28), 2)
    assert not fusable_stem(create_model("mlp", 1, 4, (28, 28)))
    assert not fusable_stem(create_model("resnet18", 1, 4, (28, 28)))


def test_fused_embed_means_refuses_autograd() -> None:
    net = create_model("convnet", 1, 4, (28, 28), width=8)
    with pytest.raises(ValueError, match="no_grad"):
        fused_embed_means(net, torch.zeros(4, 1, 28, 28), 2)


@pytest.mark.slow
def test_compiled_fused_embed_means_equals_embed() -> None:
    """The compiled path (three compiled pieces) gives the stock embedding means."""
    net = create_model("convnet", 1, 4, (28, 28), generator=torch.Generator().manual_seed(0), width=16)
    net.requires_grad_(False)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = group_means(net.embed(x), 4)
        got = fused_embed_means(net, x, 4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fuse_stem_none_means_cpu_only() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_fuse_stem(None, cpu) and not resolve_fuse_stem(None, gpu)
    assert resolve_fuse_stem(True, gpu) and not resolve_fuse_stem(False, cpu)


@pytest.mark.parametrize(("channels", "size", "kw"), [(1, 28, {"width": 16}), (3, 16, {"width": 8}), (2, 9, {"width": 4, "depth": 1})])
def test_stem_backward_equals_autograd_through_the_stock_block(channels: int, size: int, kw: dict) -> None:
    """stem_apply's weight gradients (conv weight, bias = 0, norm scale and shift) are the
    stock block's (float64), for an arbitrary upstream gradient."""
    net = _net(channels, size, **kw).requires_grad_(True)
    conv, norm = net.features[0][0], net.features[0][1]
    params = [conv.weight, conv.bias, norm.weight, norm.bias]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, channels, size, size, generator=g, dtype=torch.float64)
    x[1] = 0.5
    ref_out = net.features[0](x)
    gy = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(ref_out, params, gy)
    out = stem_apply(net, x, compiled=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out, params, gy)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="input"):
        stem_apply(net, x.requires_grad_(True), compiled=False)


#: The registry networks the fused stem is selected for: ConvNets with instance norm, ReLU and
#: average pooling (the structure it computes), and no other network.
FUSABLE = {"convnet", "convnet_w32", "convnet_w64", "convnet_w256", "convnet_d1", "convnet_d2", "convnet_d4"}


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_fused_stem_selected_exactly_for_instance_norm_convnets(channels: int, size: int) -> None:
    """ConvNet-3 with instance norm (and its width/depth variants) is fusable; BatchNorm /
    LayerNorm / max-pool ConvNets, AlexNet, VGG, ResNet, LeNet and the MLP are not."""
    from condense.models import MODELS, ConvNet

    selected = {n for n in MODELS.names() if fusable_stem(create_model(n, channels, 4, (size, size)))}
    assert selected == FUSABLE
    for name in ("convnet", "convnet_bn", "alexnet"):
        net = create_model(name, channels, 4, (size, size))
        assert isinstance(net, ConvNet) == name.startswith("convnet")
    net = create_model("convnet", channels, 4, (size, size), depth=3, norm="instancenorm")
    assert fusable_stem(net) and not fusable_stem(create_model("convnet_bn", channels, 4, (size, size)))
    assert not fusable_stem(create_model("alexnet", channels, 4, (size, size)))


class _Plain(nn.Module):
    """Not a zoo network: the duck-typed structure the fused stem needs, built from stock layers."""

    def __init__(self, pool: nn.Module, conv: nn.Conv2d | None = None, norm: nn.Module | None = None) -> None:
        super().__init__()
        conv = conv or nn.Conv2d(1, 6, 3, padding=1)
        self.features = nn.Sequential(nn.Sequential(conv, norm or nn.GroupNorm(6, 6), nn.ReLU(), pool))
        self.classifier = nn.Linear(6 * 4 * 4, 3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def test_fusable_stem_is_structural() -> None:
    """Detected from the layers and their attributes, not the class: a stock ``nn.AvgPool2d(2, 2)``
    network is fused (and equals its stock forward); other pools, convs and norms are not."""
    net = _Plain(nn.AvgPool2d(2, 2)).double().requires_grad_(False)
    assert fusable_stem(net)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stem_apply(net, x, compiled=False), net.features[0](x), rtol=1e-10, atol=1e-10)
    assert not fusable_stem(_Plain(nn.AvgPool2d(3, 2)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 1)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2, padding=1)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2, ceil_mode=True)))
    assert not fusable_stem(_Plain(nn.MaxPool2d(2, 2)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2), conv=nn.Conv2d(1, 6, 3, stride=2)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2), conv=nn.Conv2d(1, 6, 3, padding=1, padding_mode="reflect")))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2), norm=nn.GroupNorm(2, 6)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2), norm=nn.GroupNorm(6, 6, affine=False)))
    assert not fusable_stem(_Plain(nn.AvgPool2d(2, 2), norm=nn.BatchNorm2d(6)))
    headless = _Plain(nn.AvgPool2d(2, 2))
    headless.classifier = nn.Identity()  # type: ignore[assignment]
    assert not fusable_stem(headless)
