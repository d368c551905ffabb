"""The fast 2x2 average pool is the stock ``F.avg_pool2d(x, 2, 2)``: values, gradients, double
backward, vmap and torch.compile; and which inputs take the fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condense.models import _pool, create_model
from condense.models._pool import AvgPool2x2, _AvgPool2x2, avg_pool2x2


@pytest.fixture
def always_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small test tensors take the fast path too (normally they go to the stock kernel)."""
    monkeypatch.setattr(_pool, "_MIN_NUMEL", 0)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _is_fast(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "AvgPool2x2" in y.grad_fn.name()


@pytest.mark.usefixtures("always_fast")
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 10, 12), (1, 2, 4, 6), (2, 3, 9, 11), (2, 2, 7, 7)])
def test_values_gradients_and_double_backward_match_stock(shape: tuple[int, ...]) -> None:
    x = _x(*shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = avg_pool2x2(x), F.avg_pool2d(x_ref, 2, 2)
    assert _is_fast(y) == (shape[-1] % 2 == 0 and shape[-2] % 2 == 0)  # odd maps: the stock kernel
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    up = _x(*y.shape, seed=1).requires_grad_()
    up_ref = up.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad((y * up).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((y_ref * up_ref).sum(), x_ref, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    # second order: through the input gradient back into the upstream gradient
    w = _x(*shape, seed=2)
    (gg,) = torch.autograd.grad((g * w).sum(), up)
    (gg_ref,) = torch.autograd.grad((g_ref * w).sum(), up_ref)
    torch.testing.assert_close(gg, gg_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck() -> None:
    x = _x(2, 3, 4, 6).requires_grad_()
    assert torch.autograd.gradcheck(_AvgPool2x2.apply, (x,))
    assert torch.autograd.gradgradcheck(_AvgPool2x2.apply, (x,))


def test_dispatch_at_real_sizes() -> None:
    """A ConvNet-3 map at batch 256 takes the fast path; small, odd, channels-last, int do not."""
    assert _is_fast(avg_pool2x2(torch.zeros(256, 128, 28, 28, requires_grad=True)))
    assert _is_fast(avg_pool2x2(torch.zeros(10, 128, 14, 14, requires_grad=True)))
    assert not _is_fast(avg_pool2x2(torch.zeros(10, 128, 4, 4, requires_grad=True)))
    assert not _is_fast(avg_pool2x2(torch.zeros(256, 128, 7, 7, requires_grad=True)))
    cl = torch.zeros(256, 128, 28, 28).to(memory_format=torch.channels_last).requires_grad_()
    assert not _is_fast(avg_pool2x2(cl))


@pytest.mark.usefixtures("always_fast")
def test_vmap_and_functional_grad_match_stock() -> None:
    x = _x(4, 2, 3, 8, 8)
    torch.testing.assert_close(torch.func.vmap(avg_pool2x2)(x), F.avg_pool2d(x.flatten(0, 1), 2).view(4, 2, 3, 4, 4))

    def f(t: torch.Tensor) -> torch.Tensor:
        return avg_pool2x2(t).square().sum()

    def f_ref(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 2).square().sum()

    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(x), torch.func.vmap(torch.func.grad(f_ref))(x))


@pytest.mark.usefixtures("always_fast")
def test_compiles() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = torch.compile(lambda t: avg_pool2x2(t).relu().sum(), backend="aot_eager")(x)
    (g,) = torch.autograd.grad(y, x)
    x_ref = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.avg_pool2d(x_ref, 2).relu().sum(), x_ref)
    torch.testing.assert_close(g, g_ref)


def test_module_is_an_avgpool2d_and_used_by_the_zoo() -> None:
    pool = AvgPool2x2()
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    net = create_model("convnet", channels=1, num_classes=10, im_size=28, generator=torch.Generator().manual_seed(0))
    assert sum(isinstance(m, AvgPool2x2) for m in net.modules()) == 3
    ap = create_model("resnet18_ap", channels=3, num_classes=10, im_size=32, generator=torch.Generator().manual_seed(0))
    assert any(isinstance(m, AvgPool2x2) for m in ap.modules())


@pytest.mark.usefixtures("always_fast")
def test_channels_last_upstream_gradient() -> None:
    """A contiguous input whose upstream gradient arrives channels-last (a channels-last layer
    after the pool) gets the stock gradient."""
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = _pool.avg_pool2x2(x)
    assert _is_fast(y)
    (got,) = torch.autograd.grad(y, x, g)
    (ref,) = torch.autograd.grad(F.avg_pool2d(x, 2, 2), x, g)
    torch.testing.assert_close(got, ref)
