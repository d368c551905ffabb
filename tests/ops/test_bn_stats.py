"""BatchNorm statistic matching through forward hooks (condense.ops.bn_stats)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condense.ops.bn_stats import BNStatLoss, batchnorm_layers


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 36, 5),
                        nn.BatchNorm1d(5))
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6) * 2 + 1)
    return net.eval()


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_loss_is_the_weighted_sum_of_plain_norms() -> None:
    net = _net()
    x = torch.randn(7, 1, 6, 6, dtype=torch.float32)
    # the truth, by hand: inputs of each BN layer, biased variance, 2-norms, first layer x 10
    a1 = net[0](x)
    a2 = net[3](net[2](net[1](a1)))
    a3 = net[6](net[5](net[4](a2)))
    want = 0.0
    for i, (a, bn) in enumerate(((a1, net[1]), (a2, net[4]), (a3, net[7]))):
        dims = [0, 2, 3] if a.dim() == 4 else [0]
        t = (a.mean(dims) - bn.running_mean).norm() + (a.var(dims, unbiased=False) - bn.running_var).norm()
        want = want + (10.0 if i == 0 else 1.0) * t
    with BNStatLoss(net) as bn:
        net(x)
        assert len(bn.terms()) == 3
        got = bn.loss()
        assert bn.terms() == []  # cleared for the next forward
    assert torch.allclose(got, want, rtol=1e-5)
    with BNStatLoss(net, first_weight=2.0) as bn:
        net(x)
        assert torch.allclose(bn.loss(), want - 8.0 * ((a1.mean([0, 2, 3]) - net[1].running_mean).norm()
                                                       + (a1.var([0, 2, 3], unbiased=False)
                                                          - net[1].running_var).norm()), rtol=1e-5)


def test_gradient_reaches_the_images() -> None:
    net = _net()
    x = torch.randn(4, 1, 6, 6, requires_grad=True)
    with BNStatLoss(net) as bn:
        net(x)
        bn.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hooks_removed_on_exit_and_on_exception() -> None:
    net = _net()
    before = _hooks(net)
    with BNStatLoss(net) as bn:
        assert _hooks(net) == before + 3 and bn.active
    assert _hooks(net) == before and not bn.active
    with pytest.raises(ZeroDivisionError):
        with BNStatLoss(net):
            assert _hooks(net) == before + 3
            _ = 1 / 0
    assert _hooks(net) == before
    net(torch.randn(2, 1, 6, 6))  # forwards after the block record nothing anywhere


def test_errors() -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatLoss(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2)))
    net = _net()
    with BNStatLoss(net) as bn, pytest.raises(RuntimeError, match="no BatchNorm layer ran"):
        bn.loss()
    assert len(batchnorm_layers(net)) == 3


def test_split_batches_give_the_whole_batch_loss_and_gradients() -> None:
    """Two halves with ``reduce`` adding the other half's sums = the whole batch (class-parallel)."""
    net = _net().double()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    with BNStatLoss(net) as bn:
        net(x)
        whole = bn.loss()
    whole.backward()
    recorded: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> None:  # "process" B: its sums, in call order
        recorded.append(t.clone())

    with BNStatLoss(net, reduce=record) as bn:
        net(x[4:].detach())
        bn.loss()
    other = iter(recorded)

    def add_other(t: torch.Tensor) -> None:  # "process" A: the all-reduce = A's + B's
        t.add_(next(other).to(t.dtype))

    a = x[:4].detach().clone().requires_grad_(True)
    with BNStatLoss(net, reduce=add_other) as bn:
        net(a)
        split = bn.loss()
    split.backward()
    assert torch.allclose(split, whole, rtol=1e-10)
    # E[x^2] - E[x]^2 loses digits to cancellation that the two-pass variance keeps (measured
    # here: 6e-9 against gradients of 0.15 in float64)
    assert torch.allclose(a.grad, x.grad[:4], rtol=0, atol=1e-6 * x.grad.abs().max().item())
