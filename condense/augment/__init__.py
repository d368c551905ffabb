"""Augmentation: differentiable siamese augmentation (DSA) and FYI flip."""

from condense.augment.dsa import (
    DEFAULT_STRATEGY,
    DSA,
    VALID_OPS,
    DSAParams,
    default_strategy,
)
from condense.augment.flip import flip_cat, flip_cat_grouped

__all__ = [
    "DEFAULT_STRATEGY",
    "DSA",
    "DSAParams",
    "VALID_OPS",
    "default_strategy",
    "flip_cat",
    "flip_cat_grouped",
]
