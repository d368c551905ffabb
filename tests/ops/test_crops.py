"""Replayable crop augmentations (condense.ops.crops) against their definitions and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from condense.ops import crops


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_resized_crops_follow_the_sampling_rule() -> None:
    boxes = crops.sample_resized_crops(4000, 28, 20, scale=(0.3, 0.9), ratio=(0.5, 2.0), generator=_gen())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(boxes, boxes.round())  # integer pixel edges, as torchvision's crops
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 20).all() and (boxes[:, 3] <= 28).all()
    area = w * h / (28 * 20)
    # rounding w and h moves the area a little outside the drawn range; the bulk lies inside it
    assert area.min() > 0.3 - 0.08 and area.max() < 0.9 + 0.08
    # the same distribution as torchvision's sampler (draws that do not fit are redrawn, which
    # favours small areas and moderate ratios: compare with it, not with the uniform law)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(1, 28, 20)
    tv = torch.tensor([RandomResizedCrop.get_params(img, [0.3, 0.9], [0.5, 2.0]) for _ in range(4000)],
                      dtype=torch.float32)  # (i, j, h, w)
    tv_area = tv[:, 2] * tv[:, 3] / (28 * 20)
    assert abs(area.mean() - tv_area.mean()) < 0.01 and abs(area.std() - tv_area.std()) < 0.01
    assert abs((w / h).log().mean() - (tv[:, 3] / tv[:, 2]).log().mean()) < 0.03
    ratio = w / h
    assert ratio.min() > 0.5 * 0.8 and ratio.max() < 2.0 * 1.25
    # both edges are used: offsets cover the free range
    assert boxes[:, 0].min() == 0 and (boxes[:, 2] == 20).any()


def test_impossible_draws_fall_back_to_a_centre_crop() -> None:
    # an aspect ratio range no crop of a square image at this scale can meet -> centre crop
    boxes = crops.sample_resized_crops(8, 10, 10, scale=(1.0, 1.0), ratio=(3.0, 4.0), generator=_gen())
    assert torch.equal(boxes, torch.tensor([[0.0, 3.0, 10.0, 6.0]]).expand(8, 4))


def test_same_seed_same_draws_and_errors() -> None:
    a = crops.sample_resized_crops(16, 28, 28, generator=_gen(3))
    b = crops.sample_resized_crops(16, 28, 28, generator=_gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, crops.sample_resized_crops(16, 28, 28, generator=_gen(4)))
    with pytest.raises(ValueError, match="scale"):
        crops.sample_resized_crops(2, 28, 28, scale=(0.0, 1.0), generator=_gen())
    with pytest.raises(ValueError, match="boxes"):
        crops.resized_crop(torch.zeros(2, 1, 8, 8), torch.zeros(3, 4))


def test_resized_crop_identity_and_torchvision_interior() -> None:
    x = torch.randn(3, 2, 28, 28, generator=_gen())
    full = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).expand(3, 4)
    assert torch.allclose(crops.resized_crop(x, full), x, atol=1e-6)
    box = torch.tensor([[2.0, 3.0, 23.0, 19.0]])  # 21 wide, 16 high, upscaled to 28 x 28
    ours = crops.resized_crop(x[:1], box)
    ref = TF.resized_crop(x[:1], 3, 2, 16, 21, [28, 28], antialias=False)
    # the same bilinear resampling; at the border ours reads the pixels just outside the box
    # (a crop of the continuous image) where torchvision clamps to the cut-out tensor's edge
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


def test_resized_crop_is_differentiable() -> None:
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 11.0], [0.0, 0.0, 6.0, 6.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: crops.resized_crop(t, boxes, (7, 5)), (x,))


def test_flip_and_shift() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    flags = torch.tensor([True, False])
    y = crops.flip(x, flags)
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1])
    f = crops.sample_flips(10000, generator=_gen())
    assert 0.47 < f.float().mean() < 0.53
    g1, g2 = _gen(5), _gen(5)
    shifted = crops.random_shift(x, 2, generator=g1)
    d = torch.randint(-2, 3, (2,), generator=g2).tolist()
    assert torch.equal(shifted, torch.roll(x, (d[0], d[1]), (-2, -1)))
    assert torch.equal(crops.random_shift(x, 0, generator=g1), x)


def test_cutmix_box_and_lambda() -> None:
    x = torch.randn(6, 1, 20, 16, generator=_gen())
    for seed in range(20):
        cm = crops.sample_cutmix(6, 20, 16, alpha=1.0, generator=_gen(seed))
        x0, y0, x1, y1 = cm.box
        assert 0 <= x0 <= x1 <= 16 and 0 <= y0 <= y1 <= 20
        assert math.isclose(cm.lam, 1 - (x1 - x0) * (y1 - y0) / (20 * 16))
        y = crops.cutmix(x, cm)
        inside = torch.zeros(20, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(y[..., inside], x[cm.perm][..., inside])
        assert torch.equal(y[..., ~inside], x[..., ~inside])
        assert sorted(cm.perm.tolist()) == list(range(6))
    with pytest.raises(ValueError, match="alpha"):
        crops.sample_cutmix(2, 4, 4, alpha=0.0, generator=_gen())
