"""FYI flip augmentation (Son et al. 2024): append the horizontal mirror of each image.

Wherever a synthetic batch enters a matching loss or an inner training step, FYI replaces it
with ``[x ; hflip(x)]`` (labels duplicated). The real batch is not flipped.
"""

from __future__ import annotations

import torch
from torch import Tensor


def flip_cat(x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Concatenate a batch with its horizontal mirror.

    Args:
        x: ``(N, C, H, W)``.
        labels: ``(N,)`` hard or ``(N, K)`` soft labels, or ``None``.

    Returns:
        ``([x ; flip(x)]`` of shape ``(2N, C, H, W)``, ``[labels ; labels]`` or ``None``).
        Differentiable w.r.t. ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"flip_cat expects (N, C, H, W), got shape {tuple(x.shape)}")
    if labels is not None and labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows but x has {x.shape[0]}")
    out = torch.cat([x, x.flip(-1)], dim=0)
    return out, None if labels is None else torch.cat([labels, labels], dim=0)


def flip_cat_grouped(x: Tensor) -> Tensor:
    """Per-group :func:`flip_cat`: group ``k`` becomes ``[x_k ; flip(x_k)]``.

    Args:
        x: ``(K, B, C, H, W)``.

    Returns:
        ``(K, 2B, C, H, W)``; rows ``B..2B-1`` of each group mirror rows ``0..B-1``.
    """
    if x.dim() != 5:
        raise ValueError(f"flip_cat_grouped expects (K, B, C, H, W), got shape {tuple(x.shape)}")
    return torch.cat([x, x.flip(-1)], dim=1)
