"""Class-wise mean-embedding (linear-kernel MMD) distances, batched over classes by reshaping.

With a linear kernel the squared MMD between two samples is the squared distance of their means,
so distribution matching (DM) and DataDAM's embedding/attention terms reduce to
``sum_k || mean(real_k) - mean(syn_k) ||^2`` over classes ``k``: one reshape + mean, no loop.
"""

from __future__ import annotations

import torch

from condense.errors import ConfigError


def group_means(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group means of a class-major batch, by one reshape (no loop over groups).

    Args:
        x: ``(G*B, ...)`` class-major: group ``g`` owns rows ``g*B:(g+1)*B``.
        groups: ``G``.

    Returns:
        ``(G, D)`` with ``D = prod(...)``, float32 (float64 kept) even if ``x`` is bfloat16.
    """
    if groups < 1 or x.shape[0] % groups:
        raise ConfigError(
            f"a batch of {x.shape[0]} rows cannot be split into {groups} equal class groups"
        )
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.reshape(groups, x.shape[0] // groups, -1).mean(1)


def mean_sq_distance(real_means: torch.Tensor, syn_means: torch.Tensor) -> torch.Tensor:
    """``sum_k || real_means[k] - syn_means[k] ||^2`` (a 0-d tensor).

    Args:
        real_means: ``(G, D)``.
        syn_means: ``(G, D)``.
    """
    if real_means.shape != syn_means.shape:
        raise ConfigError(
            f"mean shapes differ: real {tuple(real_means.shape)} vs syn {tuple(syn_means.shape)}"
        )
    return (real_means - syn_means).pow(2).sum()


def class_mmd(real: torch.Tensor, syn: torch.Tensor, groups: int) -> torch.Tensor:
    """Linear-kernel MMD^2 summed over classes: ``sum_k || mean(real_k) - mean(syn_k) ||^2``.

    Args:
        real: ``(G*B, ...)`` class-major real features.
        syn: ``(G*S, ...)`` class-major synthetic features (``S`` may differ from ``B``).
        groups: number of classes ``G``.

    Returns:
        0-d tensor (float32 or float64).
    """
    return mean_sq_distance(group_means(real, groups), group_means(syn, groups))
