"""Distances between per-class gradients (gradient matching, DC/DSA), batched over classes.

Gradients come as ``{name: (K, *param_shape)}`` (see :func:`condense.ops.grads.per_class_grads`);
every metric returns one distance per class, ``(K,)``:

- ``ours`` (DC's layer-wise distance): each weight's gradient is viewed as ``(out, -1)`` (conv
  ``(out, in*kh*kw)``, linear ``(out, in)``, a 3-D layer-norm weight ``(C, H*W)``) and the
  distance is ``sum over rows of 1 - <a, b> / (|a| |b| + 1e-6)``; 1-D gradients (biases, norm
  scales) contribute 0.
- ``mse``: squared Euclidean distance of all gradients flattened and concatenated.
- ``cos``: ``1 - <a, b> / (|a| |b| + 1e-6)`` of all gradients flattened and concatenated.

The ``1e-6`` is added to the product of the two norms, as in the reference implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from condense.errors import ConfigError

METRICS = ("ours", "mse", "cos")
EPS = 1e-6


def _check(g_real: Mapping[str, Tensor], g_syn: Mapping[str, Tensor], metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown gradient distance {metric!r}; valid choices: {', '.join(METRICS)}")
    if list(g_real) != list(g_syn):
        raise ConfigError(
            f"real and synthetic gradients name different weights: {list(g_real)} vs {list(g_syn)}"
        )
    if not g_real:
        raise ConfigError("no gradients to compare (empty dicts)")
    for name, a in g_real.items():
        if a.shape != g_syn[name].shape:
            raise ConfigError(
                f"gradient shapes differ for {name!r}: real {tuple(a.shape)} vs syn "
                f"{tuple(g_syn[name].shape)}"
            )


def _rowwise_cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``(K, *s)`` pair -> ``(K,)``: sum over rows of ``(out, -1)`` of ``1 - cosine``."""
    if a.dim() <= 2:  # a 1-D weight (bias, norm scale): ignored by ``ours``
        return a.new_zeros(a.shape[0])
    a = a.reshape(a.shape[0], a.shape[1], -1)
    b = b.reshape(b.shape[0], b.shape[1], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)
    return (1.0 - cos).sum(-1)


def gradient_distance(g_real: Mapping[str, Tensor], g_syn: Mapping[str, Tensor], metric: str) -> Tensor:
    """Per-class distance between real and synthetic gradients.

    Args:
        g_real: ``{name: (K, *shape)}`` real-batch gradients.
        g_syn: the same names and shapes, synthetic-batch gradients (may carry a graph).
        metric: ``ours`` | ``mse`` | ``cos``.

    Returns:
        ``(K,)`` distances (float32 or the gradients' dtype if float64).

    Raises:
        ConfigError: unknown metric (lists the choices), mismatched names or shapes.
    """
    _check(g_real, g_syn, metric)
    pairs = [(g_real[n], g_syn[n]) for n in g_real]
    if metric == "ours":
        return torch.stack([_rowwise_cosine_distance(a, b) for a, b in pairs]).sum(0)
    a = torch.cat([a.flatten(1) for a, _ in pairs], dim=1)  # (K, P)
    b = torch.cat([b.flatten(1) for _, b in pairs], dim=1)
    if metric == "mse":
        return (b - a).pow(2).sum(1)
    return 1.0 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)
