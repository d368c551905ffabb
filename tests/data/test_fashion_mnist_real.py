"""Integration: the real Fashion-MNIST from the Debian package (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from condense.data import build_dataset

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.integration
@pytest.mark.skipif(
    not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDENSE_DATA_ROOT", raising=False)
    data = build_dataset("fashion_mnist", SYSTEM_DIR, allow_download=False)
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    assert abs(float(data.train_images.mean())) < 0.01
    assert abs(float(data.train_images.std()) - 1.0) < 0.01
