"""FYI flip: [x ; hflip(x)] with duplicated labels, and the grouped variant."""

from __future__ import annotations

import pytest
import torch

from condense.augment import flip_cat, flip_cat_grouped


def test_flip_cat_images_and_hard_labels() -> None:
    x = torch.randn(3, 2, 4, 5)
    y = torch.tensor([0, 1, 2])
    out, labels = flip_cat(x, y)
    assert out.shape == (6, 2, 4, 5)
    torch.testing.assert_close(out[:3], x)
    torch.testing.assert_close(out[3:], torch.flip(x, dims=(-1,)))
    assert labels is not None and labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_flip_cat_soft_labels_and_none() -> None:
    x = torch.randn(2, 1, 3, 3)
    soft = torch.softmax(torch.randn(2, 4), dim=1)
    _, labels = flip_cat(x, soft)
    assert labels is not None
    torch.testing.assert_close(labels, torch.cat([soft, soft]))
    assert flip_cat(x)[1] is None


def test_flip_cat_gradient() -> None:
    x = torch.randn(2, 1, 3, 4, requires_grad=True)
    w = torch.randn(4, 1, 3, 4)
    (flip_cat(x)[0] * w).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, w[:2] + torch.flip(w[2:], dims=(-1,)))


def test_flip_cat_grouped_matches_per_group() -> None:
    x = torch.randn(3, 2, 1, 4, 4, requires_grad=True)
    out = flip_cat_grouped(x)
    assert out.shape == (3, 4, 1, 4, 4)
    for k in range(3):
        torch.testing.assert_close(out[k], flip_cat(x[k])[0])
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_flip_cat_shape_errors() -> None:
    with pytest.raises(ValueError):
        flip_cat(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        flip_cat(torch.randn(2, 1, 3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        flip_cat_grouped(torch.randn(2, 1, 3, 3))
