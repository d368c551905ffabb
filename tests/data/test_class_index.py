"""ClassIndex: batched per-class sampling without replacement, deterministic per generator."""

from __future__ import annotations

import pytest
import torch

from condense.data import ClassIndex
from condense.errors import ConfigError


def make_labels() -> torch.Tensor:
    """Imbalanced, shuffled labels: class c has 5 + 3c rows (K=4, N=38)."""
    labels = torch.cat([torch.full((5 + 3 * c,), c) for c in range(4)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def test_counts_and_indices_of() -> None:
    labels = make_labels()
    index = ClassIndex(labels, 4)
    assert index.counts.tolist() == [5, 8, 11, 14] and index.counts.dtype == torch.long
    assert index.min_count == 5 and len(index) == 4
    for c in range(4):
        rows = index.indices_of(c)
        assert torch.equal(rows, torch.nonzero(labels == c).flatten())


def test_sample_shape_membership_no_replacement() -> None:
    labels = make_labels()
    index = ClassIndex(labels, 4)
    g = torch.Generator().manual_seed(1)
    idx = index.sample(5, g)
    assert idx.shape == (4, 5) and idx.dtype == torch.long
    for c in range(4):
        assert (labels[idx[c]] == c).all()
        assert idx[c].unique().numel() == 5
    full = index.sample(14, g, classes=[3])  # n == count: a permutation of the whole class
    assert sorted(full[0].tolist()) == index.indices_of(3).tolist()
    sub = index.sample(2, g, classes=torch.tensor([2, 0]))
    assert sub.shape == (2, 2) and (labels[sub[0]] == 2).all() and (labels[sub[1]] == 0).all()


def test_sample_is_deterministic_per_seed_and_covers_class() -> None:
    index = ClassIndex(make_labels(), 4)
    a = index.sample(4, torch.Generator().manual_seed(7))
    b = index.sample(4, torch.Generator().manual_seed(7))
    c = index.sample(4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)
    draws = torch.cat([index.sample(2, g, classes=[0])[0] for _ in range(1000)])
    freq = torch.bincount(draws, minlength=38)[index.indices_of(0)]
    assert freq.sum() == 2000 and freq.min() > 300 and freq.max() < 500  # ~400 each, uniform


def test_gather_matches_sample() -> None:
    labels = make_labels()
    images = torch.arange(38, dtype=torch.float32).view(38, 1, 1, 1).expand(38, 2, 3, 3).contiguous()
    index = ClassIndex(labels, 4)
    batch = index.gather(images, 3, torch.Generator().manual_seed(5), classes=[1, 3])
    idx = index.sample(3, torch.Generator().manual_seed(5), classes=[1, 3])
    assert batch.shape == (2, 3, 2, 3, 3)
    assert torch.equal(batch, images[idx.flatten()].view(2, 3, 2, 3, 3))


def test_errors_name_class_count_and_n() -> None:
    index = ClassIndex(make_labels(), 4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match=r"n=6 .*class 0.* only 5"):
        index.sample(6, g)
    with pytest.raises(ConfigError, match="class 4 out of range"):
        index.sample(1, g, classes=[4])
    with pytest.raises(ConfigError, match="labels span"):
        ClassIndex(torch.tensor([0, 1, 5]), 3)


def test_empty_class_allows_other_classes() -> None:
    index = ClassIndex(torch.tensor([0, 0, 2, 2, 2]), 3)
    assert index.counts.tolist() == [2, 0, 3] and index.min_count == 0
    assert index.sample(2, torch.Generator().manual_seed(0), classes=[0, 2]).shape == (2, 2)
    with pytest.raises(ConfigError, match="class 1"):
        index.sample(1, torch.Generator().manual_seed(0))
