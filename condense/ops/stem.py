"""A fused, gradient-free first block for ConvNet forwards of big real batches (DM's real side).

A ConvNet's first block, ``Conv3x3(C_in -> C) -> instance norm -> ReLU -> 2x2 average pool``,
is cheap in arithmetic (``9 * C_in`` multiply-adds per output value) but the stock kernels
write and re-read its full-resolution ``(N, C, H, W)`` map several times (convolution output,
the norm's statistics, normalisation, activation, pooling): on a 2-core CPU that memory traffic
costs more than the big 128 -> 128 convolution after it. Here the map is never stored:

1. Statistics in closed form. Instance norm needs each image's per-channel mean and variance of
   the convolution output ``z_c = w_c . p + b_c`` over the positions ``p`` (the ``9 * C_in``
   input taps of a position). With ``m`` the mean tap vector and ``S`` the tap covariance of an
   image (one unfold and one batched matrix product), ``mean_c = w_c . m + b_c`` and
   ``var_c = w_c^T S w_c``. The bias cancels in ``z - mean``.
2. One stencil pass. Folding the norm into per-image weights ``s_nc * w_c`` and offsets
   ``t_nc``, each pooled output is ``1/4 sum_{2x2} relu(sum_taps x * s w + t)``, computed from
   the 4x4 input patch under it; ``torch.compile`` turns it into one vectorised loop over the
   channels (channels-last output, the layout the next convolution prefers).

The result is the stock block's function up to float rounding (the tests compare them). It is
used only without autograd (:func:`fused_embed_means`, DM's real forward with ``compile``);
gradients w.r.t. images or weights go through the stock layers. Measured on a 2-core Xeon:
the first block of a (2560, 1, 28, 28) batch in 0.08 s against 0.56 s for the compiled stock
block (``benchmarks/perf/distribution_matching.py`` times the whole DM iteration both ways).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condense.ops.mmd import group_means

__all__ = ["fusable_stem", "fused_embed_means", "stem_forward", "stem_prepare", "stem_stencil"]


def _stem_layers(model: nn.Module) -> tuple[nn.Conv2d, nn.GroupNorm] | None:
    """The first block's conv and instance norm when it has the fusable form, else ``None``."""
    from condense.models._pool import AvgPool2x2  # local: models import ops at module level

    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or len(features) < 1 or not hasattr(model, "embed"):
        return None
    block = features[0]
    if not isinstance(block, nn.Sequential) or len(block) != 4:
        return None
    conv, norm, act, pool = block
    pool_ok = isinstance(pool, AvgPool2x2) or (
        type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0)) and not pool.ceil_mode
    )
    conv_ok = (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
    )
    norm_ok = (
        type(norm) is nn.GroupNorm and norm.num_groups == norm.num_channels == conv.out_channels
        and norm.affine
    )
    if not (pool_ok and conv_ok and norm_ok and type(act) is nn.ReLU):
        return None
    return conv, norm


def fusable_stem(model: nn.Module) -> bool:
    """Whether ``model`` is a ConvNet whose first block is ``[Conv3x3 (stride 1, zero padding),
    GroupNorm(C, C) (instance norm, affine), ReLU, 2x2 / stride-2 average pool]`` and whose
    ``embed`` is ``flatten(features(x))``: what :func:`fused_embed_means` computes faster."""
    from condense.models.convnet import ConvNet

    return isinstance(model, ConvNet) and _stem_layers(model) is not None


def stem_prepare(
    x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, pad: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image folded weights and offsets, and the 4x4 input patches under each pooled output.

    Args:
        x: ``(N, C_in, H, W)`` images; ``H + 2*pad - 2`` and ``W + 2*pad - 2`` (the conv output)
            even.
        weight: ``(C, C_in, 3, 3)`` conv weight (its bias cancels in the norm).
        gamma, beta: ``(C,)`` instance-norm affine parameters.
        pad: the conv's zero padding.
        eps: the norm's epsilon.

    Returns:
        ``patches (N, P, Q, C_in, 4, 4)``, ``ws (N, 9*C_in, C)`` = ``s_nc * w_c`` with
        ``s = gamma / sqrt(var + eps)``, ``t (N, C)`` = ``beta - s * (w . m)``.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # never below float32
    xp = F.pad(x.to(dtype), (pad, pad, pad, pad))
    cols = F.unfold(xp, 3)  # (N, K, L): the K = 9*C_in taps at each of the L conv positions
    mean = cols.mean(2)
    centred = cols - mean[:, :, None]
    cov = torch.bmm(centred, centred.transpose(1, 2)) / cols.shape[2]  # (N, K, K)
    w = weight.reshape(weight.shape[0], -1).to(dtype).t()  # (K, C)
    var = ((cov @ w) * w).sum(1)  # (N, C): w_c^T S w_c
    s = gamma.to(dtype) / torch.sqrt(var + eps)
    t = beta.to(dtype) - s * (mean @ w)
    ws = (s[:, None, :] * w[None]).contiguous()
    patches = xp.unfold(2, 4, 2).unfold(3, 4, 2).permute(0, 2, 3, 1, 4, 5).contiguous()
    return patches, ws, t


def stem_stencil(patches: torch.Tensor, ws: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``1/4 sum_{a,b in 2x2} relu(sum_taps patch * ws + t)``: the pooled block output.

    Args:
        patches, ws, t: from :func:`stem_prepare`.

    Returns:
        ``(N, C, P, Q)`` in channels-last memory.
    """
    cin = patches.shape[3]
    offset = t[:, None, None, :]
    acc = None
    for a in range(2):
        for b in range(2):
            z = offset
            for ci in range(cin):
                for i in range(3):
                    for j in range(3):
                        tap = patches[:, :, :, ci, a + i, b + j, None]
                        z = z + tap * ws[:, None, None, ci * 9 + i * 3 + j, :]
            r = torch.relu(z)
            acc = r if acc is None else acc + r
    return (acc * 0.25).permute(0, 3, 1, 2)


def stem_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first block's output for ``x`` by :func:`stem_prepare` + :func:`stem_stencil` (eager;
    the reference for the compiled path). Raises ``ValueError`` for a non-fusable model."""
    layers = _stem_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: the first block is not fusable (see fusable_stem)")
    conv, norm = layers
    return stem_stencil(*stem_prepare(x, conv.weight, norm.weight, norm.bias, conv.padding[0], norm.eps))


def _rest_embed_means(model: nn.Module, h: torch.Tensor, groups: int) -> torch.Tensor:
    for block in list(model.features)[1:]:
        h = block(h)
    return group_means(torch.flatten(h, 1), groups)


_COMPILED: dict[str, Callable[..., object]] = {}


def _compiled(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    if name not in _COMPILED:
        # Compiled apart: compiled together, inductor inlines the patch gather into the stencil
        # and loses its vectorisation (measured 1.06 s against 0.07 s for the two parts).
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def fused_embed_means(model: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-class mean embeddings ``(G, D)`` of a class-major batch, without autograd.

    The first block goes through :func:`stem_prepare` and :func:`stem_stencil` (each compiled
    once per process), the other blocks through a compiled forward; the stem runs in float32
    even under autocast (its covariance needs the precision), the later blocks under whatever
    autocast is active. Same values as ``group_means(model.embed(x), groups)`` up to float
    rounding.

    Raises:
        ValueError: ``model`` is not :func:`fusable_stem`, or autograd is enabled.
    """
    if torch.is_grad_enabled():
        raise ValueError("fused_embed_means is gradient-free: call it under torch.no_grad()")
    if not fusable_stem(model):
        raise ValueError(f"{type(model).__name__}: the first block is not fusable (see fusable_stem)")
    conv, norm = _stem_layers(model)  # type: ignore[misc]
    with torch.autocast(device_type=x.device.type, enabled=False):
        prepared = _compiled("prepare", stem_prepare)(x, conv.weight, norm.weight, norm.bias, conv.padding[0], norm.eps)
        h = _compiled("stencil", stem_stencil)(*prepared)
    return _compiled("rest", _rest_embed_means)(model, h, groups)  # type: ignore[return-value]
