"""Numerical building blocks shared by the methods.

- :mod:`condense.ops.grads` per-class gradients (``torch.func`` or a loop), BatchNorm freezing.
- :mod:`condense.ops.per_sample` per-sample gradients and norms (func / hooks / ghost backends).
- :mod:`condense.ops.kernels` the fused per-sample conv gradient norm (Triton, ``torch.library``).
- :mod:`condense.ops.distances` distances between per-class gradients (DC/DSA).
- :mod:`condense.ops.features` forward-hook feature capture, attention maps (DataDAM).
- :mod:`condense.ops.mmd` class-wise mean-embedding distances (DM).
- :mod:`condense.ops.stem` the fused first ConvNet block (detected from the layers).

Ops sit below :mod:`condense.models` (models may import ops, never the reverse;
``tests/test_layering.py`` checks it): structural queries such as :func:`has_batchnorm` live here.
"""

from condense.ops._nn import has_batchnorm
from condense.ops.distances import METRICS, gradient_distance
from condense.ops.grads import (
    IMPLS,
    freeze_bn_stats,
    matching_params,
    per_class_grads,
    resolve_impl,
)
from condense.ops.per_sample import BACKENDS, per_sample_grad_norms, per_sample_grads

__all__ = [
    "BACKENDS",
    "IMPLS",
    "METRICS",
    "freeze_bn_stats",
    "gradient_distance",
    "has_batchnorm",
    "matching_params",
    "per_class_grads",
    "per_sample_grad_norms",
    "per_sample_grads",
    "resolve_impl",
]
