"""Helpers shared by the perf benchmarks (run as ``python benchmarks/perf/<name>.py``)."""

from __future__ import annotations

import logging

import torch

from condense.errors import CondenseError
from condense.types import DatasetSpec, RealData


def load_data(name: str) -> tuple[RealData, str]:
    """The dataset if its files are here (never downloads), else random tensors of its shape."""
    try:
        from condense.data import build_dataset

        return build_dataset(name, allow_download=False), name
    except (CondenseError, OSError, ImportError) as err:
        logging.warning("%s not available (%s); using random 1x28x28 tensors", name, err)
    k, per_class = 10, 600
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k * per_class, 1, 28, 28, generator=g)
    y = torch.arange(k).repeat_interleave(per_class)
    spec = DatasetSpec("random", 1, (28, 28), k, tuple(map(str, range(k))), (0.0,), (1.0,))
    return RealData(spec, x, y, x[:10], y[:10]), "random"
