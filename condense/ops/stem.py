"""A fused first ConvNet block for real images: DM's real forward, DC/DSA's real-side gradients.

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

3. A first-order backward for the weights only (:func:`stem_backward`): gradient matching's
   real side needs the conv and norm weight gradients but no gradient w.r.t. the real images;
   the instance-norm backward folds into per-image tap sums, so the map is never stored there
   either (:func:`stem_apply`, :func:`fused_module_loss`).

The results are the stock block's values and weight gradients up to float rounding (the tests
compare them in float64). Only real images go through it (DM's real forward, the real per-class
gradients of DC/DSA, both with ``compile``); the synthetic images, which need input gradients
and a double backward, take the stock layers. Measured on a 2-core Xeon: the first block of a
(2560, 1, 28, 28) batch in 0.08 s against 0.56 s for the compiled stock block; forward +
backward of 1024 images in micro-batches of 32 in 0.15 s against 0.9-1.2 s
(``benchmarks/perf/distribution_matching.py`` and ``gradient_matching.py`` time whole steps both
ways).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condense.ops.mmd import group_means

__all__ = [
    "fusable_stem",
    "fused_embed_means",
    "fused_module_loss",
    "resolve_fuse_stem",
    "stem_apply",
    "stem_backward",
    "stem_prepare",
    "stem_stencil",
]


def _is_avgpool2x2(pool: nn.Module) -> bool:
    """A 2x2 / stride-2 average pool without padding (``nn.AvgPool2d(2, 2)`` or a subclass such
    as the model zoo's faster ``AvgPool2x2``, identified by its attributes)."""
    return (
        isinstance(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0)) and not pool.ceil_mode and pool.divisor_override is None
    )


def _stem_layers(model: nn.Module) -> tuple[nn.Conv2d, nn.GroupNorm] | None:
    """The first block's conv and instance norm when ``model`` has the fusable structure, else ``None``.

    Duck-typed (ops sit below models and import none of them): ``model.features`` an
    ``nn.Sequential`` of blocks whose first block is an ``nn.Sequential`` ``[Conv2d 3x3 stride 1
    zero padding, GroupNorm(C, C) affine (instance norm), ReLU, 2x2 average pool]``,
    ``model.classifier`` an ``nn.Linear`` and ``model.embed`` present. The fused paths compute
    ``embed`` as ``flatten(features(x))`` and the logits as ``classifier(embed(x))``: a model
    with this structure must mean that (the zoo's ConvNet does; its other networks do not have
    the structure).
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or len(features) < 1:
        return None
    if not callable(getattr(model, "embed", None)) or not isinstance(getattr(model, "classifier", None), nn.Linear):
        return None
    block = features[0]
    if not isinstance(block, nn.Sequential) or len(block) != 4:
        return None
    conv, norm, act, pool = block
    conv_ok = (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
    )
    norm_ok = (
        conv_ok and type(norm) is nn.GroupNorm and norm.num_groups == norm.num_channels == conv.out_channels
        and norm.affine
    )
    if not (conv_ok and norm_ok and type(act) is nn.ReLU and _is_avgpool2x2(pool)):
        return None
    return conv, norm


def fusable_stem(model: nn.Module) -> bool:
    """Whether ``model``'s first block is ``[Conv3x3 (stride 1, zero padding), GroupNorm(C, C)
    (instance norm, affine), ReLU, 2x2 / stride-2 average pool]`` inside a ``features`` /
    ``classifier`` network whose ``embed`` is ``flatten(features(x))`` (the zoo's ConvNet with
    instance norm, ReLU and average pooling): what :func:`fused_embed_means` computes faster.
    Detected from the layers (see :func:`_stem_layers`), without importing the model zoo."""
    return _stem_layers(model) is not None


def _prepare(
    x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, pad: int, eps: float
) -> tuple[torch.Tensor, ...]:
    """:func:`stem_prepare`'s outputs plus what the backward needs: the mean tap vector ``m``
    ``(N, K)``, ``S w`` ``(N, K, C)``, ``sigma`` ``(N, C)`` and ``w . m`` ``(N, C)``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # never below float32
    xp = F.pad(x.to(dtype), (pad, pad, pad, pad))
    cols = F.unfold(xp, 3)  # (N, K, L): the K = 9*C_in taps at each of the L conv positions
    mean = cols.mean(2)
    centred = cols - mean[:, :, None]
    cov = torch.bmm(centred, centred.transpose(1, 2)) / cols.shape[2]  # (N, K, K)
    w = weight.reshape(weight.shape[0], -1).to(dtype).t()  # (K, C)
    sw = cov @ w  # (N, K, C)
    sigma = torch.sqrt((sw * w).sum(1) + eps)  # (N, C): sqrt(w_c^T S w_c + eps)
    s = gamma.to(dtype) / sigma
    wm = mean @ w
    t = beta.to(dtype) - s * wm
    ws = (s[:, None, :] * w[None]).contiguous()
    patches = xp.unfold(2, 4, 2).unfold(3, 4, 2).permute(0, 2, 3, 1, 4, 5).contiguous()
    return patches, ws, t, mean, sw, sigma, wm


def stem_prepare(
    x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, pad: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image folded weights and offsets, and the 4x4 input patches under each pooled output.

    Args:
        x: ``(N, C_in, H, W)`` images.
        weight: ``(C, C_in, 3, 3)`` conv weight (its bias cancels in the norm).
        gamma, beta: ``(C,)`` instance-norm affine parameters.
        pad: the conv's zero padding.
        eps: the norm's epsilon.

    Returns:
        ``patches (N, P, Q, C_in, 4, 4)``, ``ws (N, 9*C_in, C)`` = ``s_nc * w_c`` with
        ``s = gamma / sqrt(var + eps)``, ``t (N, C)`` = ``beta - s * (w . m)``; float32 at least.
    """
    return _prepare(x, weight, gamma, beta, pad, eps)[:3]  # type: ignore[return-value]


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


def stem_backward(
    patches: torch.Tensor,
    ws: torch.Tensor,
    t: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    sw: torch.Tensor,
    sigma: torch.Tensor,
    wm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight gradients of the fused block, summed over the batch (no input gradient).

    With ``u`` the normalised conv output, ``g_u = 1/4 grad * [u > 0]`` at the four positions
    under each pooled output, ``G_n = sum_pos p g_u^T`` (one batched product per pool offset)
    and ``Sg = sum_pos g_u``: ``dbeta = sum_n Sg``, ``dgamma = sum_n sum_pos g_u xhat`` with
    ``sum_pos g_u xhat = (w . G - (w . m) Sg) / sigma``, and the instance-norm backward folded
    into the tap sums, ``dW_c = sum_n gamma_c / sigma_nc (G - Sg m - (sum g_u xhat / sigma) S w_c)``
    (the conv bias gets exactly zero: the norm removes it).

    Args:
        patches, ws, t: from :func:`stem_prepare`; ``mean, sw, sigma, wm`` the rest of the
            forward's statistics (``m``, ``S w``, ``sigma``, ``w . m``).
        grad: ``(N, C, P, Q)`` upstream gradient of the block output.
        weight, gamma: the conv weight ``(C, C_in, 3, 3)`` and the norm's scale ``(C,)``.

    Returns:
        ``dweight (C, C_in, 3, 3)``, ``dgamma (C,)``, ``dbeta (C,)``.
    """
    n, p, q, cin = patches.shape[:4]
    k = 9 * cin
    gy = grad.to(ws.dtype).permute(0, 2, 3, 1).reshape(n, p * q, -1)
    g_sum = s_sum = None
    for a in range(2):
        for b in range(2):
            taps = patches[:, :, :, :, a : a + 3, b : b + 3].reshape(n, p * q, k)
            u = torch.baddbmm(t[:, None, :], taps, ws)  # (N, PQ, C)
            gu = torch.where(u > 0, gy, 0.0) * 0.25
            g = torch.bmm(taps.transpose(1, 2), gu)  # (N, K, C)
            sg = gu.sum(1)
            g_sum = g if g_sum is None else g_sum + g
            s_sum = sg if s_sum is None else s_sum + sg
    w = weight.reshape(weight.shape[0], -1).to(ws.dtype).t()  # (K, C)
    gx = ((g_sum * w[None]).sum(1) - wm * s_sum) / sigma  # (N, C): sum_pos g_u xhat
    coef = gamma.to(ws.dtype) / sigma
    dw = (coef[:, None, :] * (g_sum - s_sum[:, None, :] * mean[:, :, None] - (gx / sigma)[:, None, :] * sw)).sum(0)
    return dw.t().reshape(weight.shape).to(weight.dtype), gx.sum(0).to(gamma.dtype), s_sum.sum(0).to(gamma.dtype)


class _StemFn(torch.autograd.Function):
    """The fused block with :func:`stem_backward` as its (first-order) backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                gamma: torch.Tensor, beta: torch.Tensor, pad: int, eps: float, compiled: bool) -> torch.Tensor:
        prepare = _compiled("prepare", _prepare) if compiled else _prepare
        stencil = _compiled("stencil", stem_stencil) if compiled else stem_stencil
        saved = prepare(x, weight, gamma, beta, pad, eps)
        ctx.save_for_backward(*saved, weight, gamma)
        ctx.has_bias = bias is not None
        ctx.compiled = compiled
        return stencil(*saved[:3]).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        patches, ws, t, mean, sw, sigma, wm, weight, gamma = ctx.saved_tensors
        bwd = _compiled("backward", stem_backward) if ctx.compiled else stem_backward
        dw, dgamma, dbeta = bwd(patches, ws, t, grad, weight, gamma, mean, sw, sigma, wm)
        dbias = torch.zeros_like(gamma) if ctx.has_bias else None
        return None, dw, dbias, dgamma, dbeta, None, None, None


def stem_apply(model: nn.Module, x: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
    """The first block's output ``(N, C, P, Q)`` (channels-last), differentiable w.r.t. its conv
    and norm parameters (first order, :func:`stem_backward`) but not w.r.t. ``x``: for real
    images only. It runs in float32 at least, even under autocast (the covariance needs the
    precision). ``compiled=False``: eager, the reference the tests compare with the stock block.

    Raises:
        ValueError: a non-fusable model, or ``x`` requires grad.
    """
    if not fusable_stem(model):
        raise ValueError(f"{type(model).__name__}: the first block is not fusable (see fusable_stem)")
    if x.requires_grad:
        raise ValueError("stem_apply gives no gradient w.r.t. its input: pass images that do not require grad")
    conv, norm = _stem_layers(model)  # type: ignore[misc]
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _StemFn.apply(x, conv.weight, conv.bias, norm.weight, norm.bias, conv.padding[0], norm.eps, compiled)


def _after_stem(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The blocks after the first and the flatten: ``embed`` from the first block's output."""
    for block in list(model.features)[1:]:
        h = block(h)
    return torch.flatten(h, 1)


def _rest_loss(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from condense.ops.grads import _upcast  # local: grads imports this module lazily too

    return F.cross_entropy(_upcast(model.classifier(_after_stem(model, h))), y)


def fused_module_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean CE(model(x), y)`` with the first block through :func:`stem_apply` and the rest
    through a compiled forward (its backward compiled too): the real side of gradient matching,
    whose weight gradients are first-order and need no gradient w.r.t. the real images."""
    return _compiled("rest_loss", _rest_loss)(model, stem_apply(model, x), y)  # type: ignore[return-value]


def _rest_embed_means(model: nn.Module, h: torch.Tensor, groups: int) -> torch.Tensor:
    return group_means(_after_stem(model, h), groups)


_COMPILED: dict[str, Callable[..., object]] = {}


def _compiled(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    if name not in _COMPILED:
        # Compiled apart: compiled together, inductor inlines the patch gather into the stencil
        # and loses its vectorisation (measured 1.06 s against 0.07 s for the two parts).
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def fused_embed_means(model: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-class mean embeddings ``(G, D)`` of a class-major batch, without autograd.

    The first block through :func:`stem_apply`, the other blocks through a compiled forward
    under whatever autocast is active. Same values as ``group_means(model.embed(x), groups)``
    up to float rounding.

    Raises:
        ValueError: ``model`` is not :func:`fusable_stem`, or autograd is enabled.
    """
    if torch.is_grad_enabled():
        raise ValueError("fused_embed_means is gradient-free: call it under torch.no_grad()")
    return _compiled("rest", _rest_embed_means)(model, stem_apply(model, x), groups)  # type: ignore[return-value]


def resolve_fuse_stem(value: bool | None, device: torch.device) -> bool:
    """A method's ``fuse_stem`` setting: ``None`` = on a CPU only (where it was measured)."""
    return device.type == "cpu" if value is None else bool(value)
