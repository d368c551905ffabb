"""Batched, differentiable image operations with explicit per-sample parameters.

Every function takes a batch ``x`` of shape ``(B, C, H, W)`` and parameter tensors whose
leading dimension is ``B`` (one entry per image), and returns a tensor shaped like ``x``.
None of them draws random numbers; :mod:`condense.augment.dsa` samples the parameters.
All are differentiable with respect to ``x`` and run on ``x``'s device and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def half_up(value: float) -> int:
    """``floor(value + 0.5)``: the rounding the reference DSA code uses for pixel counts."""
    return int(math.floor(value + 0.5))


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the images whose ``mask`` entry is true along the width axis.

    Args:
        x: ``(B, C, H, W)``.
        mask: ``(B,)`` bool.

    Returns:
        ``(B, C, H, W)``.
    """
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def brightness(x: Tensor, delta: Tensor) -> Tensor:
    """Add one constant per image: ``x + delta``.

    Args:
        x: ``(B, C, H, W)``.
        delta: ``(B,)``.
    """
    return x + delta.to(x.dtype).view(-1, 1, 1, 1)


def saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its mean over channels: ``(x - m_c) * f + m_c``.

    Args:
        x: ``(B, C, H, W)``; single-channel images are returned unchanged.
        factor: ``(B,)``.
    """
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor.to(x.dtype).view(-1, 1, 1, 1) + mean


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its mean over ``C, H, W``: ``(x - m) * f + m``.

    Args:
        x: ``(B, C, H, W)``.
        factor: ``(B,)``.
    """
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.to(x.dtype).view(-1, 1, 1, 1) + mean


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """Integer translation with zero fill: ``out[..., i, j] = x[..., i + dy, j + dx]``.

    Pixels read from outside the image are zero. Implemented as two gathers from a copy of
    ``x`` with a one-pixel zero border: every out-of-range index is clamped onto that border.

    Args:
        x: ``(B, C, H, W)``.
        shift: ``(B, 2)`` integer ``(dy, dx)`` per image.

    Returns:
        ``(B, C, H, W)``.
    """
    b, c, h, w = x.shape
    shift = shift.to(device=x.device, dtype=torch.long)
    padded = F.pad(x, (1, 1, 1, 1))
    rows = torch.arange(1, h + 1, device=x.device).unsqueeze(0) + shift[:, :1]
    cols = torch.arange(1, w + 1, device=x.device).unsqueeze(0) + shift[:, 1:]
    rows = rows.clamp(0, h + 1)
    cols = cols.clamp(0, w + 1)
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def cutout(x: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero an axis-aligned box per image, clipped at the image border.

    The box covers rows ``[cy - sh // 2, cy - sh // 2 + sh)`` and columns
    ``[cx - sw // 2, cx - sw // 2 + sw)``.

    Args:
        x: ``(B, C, H, W)``.
        centre: ``(B, 2)`` integer ``(cy, cx)`` per image.
        size: ``(sh, sw)`` box height and width in pixels.

    Returns:
        ``(B, C, H, W)``.
    """
    _, _, h, w = x.shape
    centre = centre.to(device=x.device, dtype=torch.long)
    top = (centre[:, 0] - size[0] // 2).unsqueeze(1)
    left = (centre[:, 1] - size[1] // 2).unsqueeze(1)
    rows = torch.arange(h, device=x.device).unsqueeze(0)
    cols = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (rows >= top) & (rows < top + size[0])
    in_cols = (cols >= left) & (cols < left + size[1])
    keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


def scale_theta(factors: Tensor) -> Tensor:
    """Affine matrices ``[[sx, 0, 0], [0, sy, 0]]``.

    Args:
        factors: ``(B, 2)`` ``(sx, sy)``; ``sx`` scales the width coordinate. Factors above 1
            shrink the content (the sampling grid reaches further out).

    Returns:
        ``(B, 2, 3)``.
    """
    zero = torch.zeros_like(factors[:, 0])
    row0 = torch.stack([factors[:, 0], zero, zero], dim=1)
    row1 = torch.stack([zero, factors[:, 1], zero], dim=1)
    return torch.stack([row0, row1], dim=1)


def rotate_theta(degrees: Tensor) -> Tensor:
    """Affine matrices ``[[cos a, -sin a, 0], [sin a, cos a, 0]]`` for angles in degrees.

    Args:
        degrees: ``(B,)``.

    Returns:
        ``(B, 2, 3)``.
    """
    rad = degrees * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    row0 = torch.stack([cos, -sin, zero], dim=1)
    row1 = torch.stack([sin, cos, zero], dim=1)
    return torch.stack([row0, row1], dim=1)


def affine(x: Tensor, theta: Tensor, align_corners: bool) -> Tensor:
    """Resample each image through its affine matrix (bilinear, zero padding).

    ``theta`` maps normalised output coordinates to input coordinates, as in
    :func:`torch.nn.functional.affine_grid`.

    Args:
        x: ``(B, C, H, W)``.
        theta: ``(B, 2, 3)``.
        align_corners: passed to ``affine_grid`` and ``grid_sample``.

    Returns:
        ``(B, C, H, W)``.
    """
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
    )
