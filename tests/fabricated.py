"""Tiny datasets written on disk in their true formats, for tests that go through the loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray) -> None:
    """``arr`` (uint8) as a gzipped IDX file ``<path>.gz``, the format of (Fashion-)MNIST."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    with gzip.open(str(path) + ".gz", "wb") as fh:
        fh.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def fabricate_fashion_mnist(folder: Path, per_class: int = 40, test_per_class: int = 4) -> Path:
    """The four IDX files of Fashion-MNIST, tiny: noise plus a bright square at a class-specific place."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        y = np.repeat(np.arange(10), n).astype(np.uint8)
        x = rng.integers(0, 80, size=(len(y), 28, 28), dtype=np.uint8)
        for i, c in enumerate(y):
            r = 2 * int(c)
            x[i, r:r + 6, r:r + 6] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y)
    return folder
