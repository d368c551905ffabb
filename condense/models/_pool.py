"""A faster exact 2x2 / stride-2 average pooling (the ConvNet and ResNet down-sampling layer).

PyTorch's CPU ``avg_pool2d`` kernel (and above all its backward) is slow on the big early maps
of a ConvNet: at (256, 128, 28, 28) one forward + backward costs about as much as three
instance norms. A 2x2 window with stride 2 on an even map is only a reshape: the forward adds
row pairs (contiguous), then column pairs of the half-size result, and scales by 1/4; the
backward scales the upstream gradient by 1/4 while widening each row, then repeats whole rows. Measured on a 2-core
Xeon (heap kept, fp32, fwd + bwd, batch 256, 128 channels): 2.6x faster at 28x28, 2.2x at
14x14, 2.9x at 32x32, 2.7x at 16x16 (``benchmarks/perf/pool.py``, record in
``benchmarks/results/perf/pool.json``).

The result is the same function as ``F.avg_pool2d(x, 2, 2)`` (summation order aside); inputs
the fast path does not cover go to the stock kernel: odd sizes (floor mode drops a row /
column; the crop would cost what it saves), non-contiguous or channels-last memory, small
tensors where the stock kernel's single call is faster, non-float dtypes. The backward is written in differentiable ops, so
double backward (gradient matching's ``create_graph``) works, and the function has a
generated vmap rule (``torch.func`` per-class gradients) and compiles with ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Below this many input elements the stock kernel is as fast or faster (per-op overhead: the
# fast path is 3-4 small ops). Measured: (10, 128, 4, 4) 0.25 vs 0.14 ms; (256, 128, 6, 6)
# 3.7 vs 5.5 ms.
_MIN_NUMEL = 1 << 16

class _AvgPool2x2(torch.autograd.Function):
    """Exact 2x2 stride-2 mean over an even (..., H, W) map."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        *lead, h, w = x.shape
        rows = x.reshape(*lead, h // 2, 2, w)
        pairs = (rows[..., 0, :] + rows[..., 1, :]).view(*lead, h // 2, w // 2, 2)  # contiguous rows
        return (pairs[..., 0] + pairs[..., 1]).mul_(0.25)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.hw = tuple(inputs[0].shape[-2:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, w = ctx.hw
        *lead, h2, w2 = grad.shape
        # widen each row first (a copy of half the output), then repeat whole rows (contiguous)
        # reshape, not view: an upstream gradient in channels-last memory (a channels-last conv
        # after the pool) makes the product channels-last too
        wide = torch.mul(grad.unsqueeze(-1).expand(*lead, h2, w2, 2), 0.25).reshape(*lead, h2, w)
        return wide.unsqueeze(-2).expand(*lead, h2, 2, w).reshape(*lead, h, w)


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, 2)`` for a (C, H, W) or (N, C, H, W) tensor, faster on big maps."""
    h, w = x.shape[-2:]
    if (
        x.dim() not in (3, 4)
        or h % 2
        or w % 2
        or x.numel() < _MIN_NUMEL
        or not x.is_floating_point()
        or not x.is_contiguous()
    ):
        return F.avg_pool2d(x, 2, 2)
    return _AvgPool2x2.apply(x)

class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` (same module type, attributes and state) on :func:`avg_pool2x2`."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return avg_pool2x2(input)
