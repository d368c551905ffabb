"""Shared fixtures: a tiny fabricated dataset; no test touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CONDENSE_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from condense.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="real Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")


def make_tiny_data(num_classes: int = 4, per_class: int = 24, test_per_class: int = 10,
                   channels: int = 1, size: int = 28, seed: int = 0):
    """Separable fake data: class c has a bright blob at a class-specific place."""
    from condense.types import DatasetSpec, RealData

    g = torch.Generator().manual_seed(seed)

    def split(n_per: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(num_classes).repeat_interleave(n_per)
        x = torch.randn(len(y), channels, size, size, generator=g) * 0.5
        for c in range(num_classes):
            r = (c * 5) % (size - 6)
            x[y == c, :, r:r + 6, r:r + 6] += 2.0
        return x, y

    xtr, ytr = split(per_class)
    xte, yte = split(test_per_class)
    spec = DatasetSpec(name="tiny", channels=channels, im_size=(size, size), num_classes=num_classes,
                       class_names=tuple(f"c{i}" for i in range(num_classes)),
                       mean=(0.5,) * channels, std=(0.25,) * channels)
    return RealData(spec, xtr, ytr, xte, yte)


@pytest.fixture
def tiny_data():
    return make_tiny_data()


def make_ctx(data, ipc: int = 2, seed: int = 0, width: int = 8, depth: int = 2, augment: bool = True,
             cache_dir=None):
    from condense.augment import DSA
    from condense.data import ClassIndex
    from condense.synth.base import SynthContext

    g = torch.Generator().manual_seed(seed)
    return SynthContext(data=data, index=ClassIndex(data.train_labels, data.spec.num_classes), ipc=ipc,
                        seed=seed, device=torch.device("cpu"), generator=g, model_name="convnet",
                        model_kwargs={"width": width, "depth": depth},
                        augment=DSA() if augment else None, cache_dir=cache_dir)


@pytest.fixture
def tiny_ctx(tiny_data, tmp_path):
    return make_ctx(tiny_data, cache_dir=tmp_path / "cache")
