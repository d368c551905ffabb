"""Small structural queries on ``nn.Module`` trees that ops and models share.

Here (below :mod:`condense.models`) so that ops never import models; :mod:`condense.models`
re-exports :func:`has_batchnorm` for its callers.
"""

from __future__ import annotations

from torch import nn

#: The BatchNorm layer types (train-mode statistics couple the images of a batch).
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` contains a BatchNorm layer (then per-sample / vmapped calls need care)."""
    return any(isinstance(m, BATCHNORMS) for m in model.modules())
