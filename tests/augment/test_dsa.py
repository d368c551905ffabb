"""DSA: siamese property, gradients, per-op references, determinism, ranges, errors, groups."""

from __future__ import annotations

import math

import pytest
import torch

from condense.augment import DSA, VALID_OPS, DSAParams, default_strategy
from condense.errors import ConfigError

OPS = list(VALID_OPS)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(seed))


def crop_u(shift: tuple[int, int], smax: tuple[int, int]) -> torch.Tensor:
    """Uniform draws that DSA turns into exactly ``shift`` pixels, shape ``(1, 2)``."""
    return torch.tensor([[(t + s + 0.5) / (2 * s + 1) for t, s in zip(shift, smax, strict=True)]])


def cutout_u(centre: tuple[int, int], counts: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([[(c + 0.5) / m for c, m in zip(centre, counts, strict=True)]])


def bilinear_reference(img: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Slow per-pixel affine resampling (bilinear, zero padding) of one ``(C, H, W)`` image."""
    c, h, w = img.shape
    out = torch.zeros_like(img)

    def norm(i: int, size: int) -> float:
        return (2 * i / (size - 1) - 1) if align_corners else ((2 * i + 1) / size - 1)

    def unnorm(v: float, size: int) -> float:
        return ((v + 1) / 2 * (size - 1)) if align_corners else (((v + 1) * size - 1) / 2)

    def pix(r: int, q: int) -> torch.Tensor:
        if 0 <= r < h and 0 <= q < w:
            return img[:, r, q]
        return torch.zeros(c, dtype=img.dtype)

    for i in range(h):
        for j in range(w):
            xn, yn = norm(j, w), norm(i, h)
            xs = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
            ys = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
            px, py = unnorm(float(xs), w), unnorm(float(ys), h)
            x0, y0 = math.floor(px), math.floor(py)
            ax, ay = px - x0, py - y0
            out[:, i, j] = (
                pix(y0, x0) * (1 - ax) * (1 - ay)
                + pix(y0, x0 + 1) * ax * (1 - ay)
                + pix(y0 + 1, x0) * (1 - ax) * ay
                + pix(y0 + 1, x0 + 1) * ax * ay
            )
    return out


# ----------------------------------------------------------------------------- (a) siamese


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flip_first", [False, True])
def test_same_params_same_transform_across_batch_sizes(op: str, flip_first: bool) -> None:
    dsa = DSA(strategy=op, flip_first=flip_first)
    n = 4
    params = dsa.sample(n, gen(3))
    assert params.op == ("none" if flip_first and op == "flip" else op)
    assert (params.first_flip is not None) == flip_first
    big = images(10, seed=1)
    small = images(3, seed=2)
    small[1] = big[1]
    small[2] = big[6]  # 6 % 4 == 2: same transform slot as small[2]
    out_big = dsa.apply(big, params)
    out_small = dsa.apply(small, params)
    torch.testing.assert_close(out_small[1], out_big[1])
    torch.testing.assert_close(out_small[2], out_big[6])
    # an image placed at slots i and i + n of one batch is transformed identically
    big[5] = big[1]
    torch.testing.assert_close(dsa.apply(big, params)[5], dsa.apply(big, params)[1])


@pytest.mark.parametrize("op", OPS)
def test_n1_shares_one_transform(op: str) -> None:
    dsa = DSA(strategy=op)
    x = images(1).expand(5, -1, -1, -1).contiguous()
    out = dsa.apply(x, dsa.sample(1, gen(4)))
    for i in range(1, 5):
        torch.testing.assert_close(out[i], out[0])


def test_params_n_larger_than_batch() -> None:
    dsa = DSA()
    g = gen(0)
    for _ in range(10):
        params = dsa.sample(7, g)
        x = images(7)
        torch.testing.assert_close(dsa.apply(x[:2], params), dsa.apply(x, params)[:2])


# ----------------------------------------------------------------------------- (b) gradients


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flip_first", [False, True])
def test_gradients_reach_images(op: str, flip_first: bool) -> None:
    dsa = DSA(strategy=op, flip_first=flip_first)
    x = images(4).requires_grad_(True)
    weights = torch.randn(4, 3, 8, 8, generator=gen(9))
    (dsa.apply(x, dsa.sample(4, gen(5))) * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_dtype_and_shape_preserved(op: str) -> None:
    dsa = DSA(strategy=op)
    x = images(3).double()
    out = dsa.apply(x, dsa.sample(3, gen(2)))
    assert out.dtype == torch.float64 and out.shape == x.shape


# ----------------------------------------------------------------------------- (c) references


def test_flip_matches_torch_flip() -> None:
    x = images(2)
    out = DSA().apply(x, DSAParams(op="flip", n=2, flip=torch.tensor([True, False])))
    torch.testing.assert_close(out[0], torch.flip(x[0], dims=(-1,)))
    torch.testing.assert_close(out[1], x[1])


@pytest.mark.parametrize("shift", [(2, -1), (-2, 2), (0, 0), (1, 0)])
def test_crop_is_zero_filled_translation(shift: tuple[int, int]) -> None:
    dsa = DSA()
    h, w = 16, 12
    smax = dsa.crop_max_shift(h, w)
    assert smax == (2, 2)  # round(0.125 * 16) = 2, round(0.125 * 12) = round(1.5) = 2
    x = images(1, h=h, w=w)
    out = dsa.apply(x, DSAParams(op="crop", n=1, crop=crop_u(shift, smax)))
    dy, dx = shift
    expected = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                expected[..., i, j] = x[..., i + dy, j + dx]
    torch.testing.assert_close(out, expected)


def test_crop_shift_by_hand_slicing() -> None:
    dsa = DSA()
    x = images(1, h=16, w=16)
    out = dsa.apply(x, DSAParams(op="crop", n=1, crop=crop_u((2, -1), (2, 2))))
    expected = torch.zeros_like(x)
    expected[..., :14, 1:] = x[..., 2:, :15]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("h", "centre", "rows", "cols"),
    [
        (8, (1, 6), (0, 3), (4, 8)),  # size 4: rows [-1, 3) clipped, cols [4, 8)
        (8, (8, 0), (6, 8), (0, 2)),  # even size: centre may sit on the far border
        (10, (4, 9), (2, 7), (7, 10)),  # odd size 5: rows [2, 7), cols [7, 12) clipped
    ],
)
def test_cutout_zeroes_expected_box(
    h: int, centre: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    dsa = DSA()
    sh, sw = dsa.cutout_size(h, h)
    counts = (h + 1 - sh % 2, h + 1 - sw % 2)
    x = images(1, h=h, w=h) + 10.0  # no zeros by chance
    out = dsa.apply(x, DSAParams(op="cutout", n=1, cutout=cutout_u(centre, counts)))
    expected = x.clone()
    expected[..., rows[0] : rows[1], cols[0] : cols[1]] = 0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("align_corners", [False, True])
def test_rotate_90_matches_rot90(align_corners: bool) -> None:
    x = images(2, h=7, w=7)
    dsa = DSA(align_corners=align_corners)
    out = dsa.apply(x, DSAParams(op="rotate", n=1, rotate=torch.tensor([90.0])))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_scale_one_and_rotate_zero_are_identity(align_corners: bool) -> None:
    x = images(2, h=6, w=9)
    dsa = DSA(align_corners=align_corners)
    ident_s = DSAParams(op="scale", n=1, scale=torch.tensor([[1.0, 1.0]]))
    ident_r = DSAParams(op="rotate", n=1, rotate=torch.tensor([0.0]))
    torch.testing.assert_close(dsa.apply(x, ident_s), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dsa.apply(x, ident_r), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_scale_and_rotate_match_slow_bilinear_reference(align_corners: bool) -> None:
    dsa = DSA(align_corners=align_corners)
    x = images(2, c=2, h=5, w=6).double()
    scale = torch.tensor([[1.15, 0.85], [0.9, 1.1]], dtype=torch.float64)
    angle = torch.tensor([12.0, -7.0], dtype=torch.float64)
    out_s = dsa.apply(x, DSAParams(op="scale", n=2, scale=scale))
    out_r = dsa.apply(x, DSAParams(op="rotate", n=2, rotate=angle))
    for i in range(2):
        sx, sy = scale[i].tolist()
        theta_s = torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]], dtype=torch.float64)
        a = math.radians(float(angle[i]))
        theta_r = torch.tensor(
            [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
            dtype=torch.float64,
        )
        torch.testing.assert_close(out_s[i], bilinear_reference(x[i], theta_s, align_corners))
        torch.testing.assert_close(out_r[i], bilinear_reference(x[i], theta_r, align_corners))


def _color(b: float, s: float, c: float) -> DSAParams:
    return DSAParams(
        op="color",
        n=1,
        brightness=torch.tensor([b]),
        saturation=torch.tensor([s]),
        contrast=torch.tensor([c]),
    )


def test_color_formulas() -> None:
    dsa = DSA()
    x = images(2)
    torch.testing.assert_close(dsa.apply(x, _color(0.3, 1.0, 1.0)), x + 0.3)
    m_c = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(dsa.apply(x, _color(0.0, 1.7, 1.0)), (x - m_c) * 1.7 + m_c)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(dsa.apply(x, _color(0.0, 1.0, 0.6)), (x - m) * 0.6 + m)
    # full sequence: brightness, then saturation, then contrast
    y = x - 0.2
    y = (y - y.mean(dim=1, keepdim=True)) * 0.4 + y.mean(dim=1, keepdim=True)
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * 1.3 + y.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(dsa.apply(x, _color(-0.2, 0.4, 1.3)), y)


def test_saturation_is_identity_on_grayscale() -> None:
    x = images(2, c=1)
    torch.testing.assert_close(DSA().apply(x, _color(0.0, 0.0, 1.0)), x)


def test_flip_first_flips_then_applies_op() -> None:
    dsa = DSA(strategy="crop_flip", flip_first=True)
    x = images(2, h=16, w=16)
    crop = torch.cat([crop_u((1, 2), (2, 2)), crop_u((-2, 0), (2, 2))])
    p = DSAParams(op="crop", n=2, first_flip=torch.tensor([True, False]), crop=crop)
    plain = DSAParams(op="crop", n=2, crop=crop)
    expected = DSA().apply(torch.stack([x[0].flip(-1), x[1]]), plain)
    torch.testing.assert_close(dsa.apply(x, p), expected)


# ----------------------------------------------------------------------------- (d) determinism


def _assert_params_equal(a: DSAParams, b: DSAParams) -> None:
    assert (a.op, a.n, a.num_groups) == (b.op, b.n, b.num_groups)
    ta, tb = dict(a.tensors()), dict(b.tensors())
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k])


@pytest.mark.parametrize("flip_first", [False, True])
def test_same_seed_same_params(flip_first: bool) -> None:
    dsa = DSA(flip_first=flip_first)
    g1, g2 = gen(11), gen(11)
    for _ in range(20):
        _assert_params_equal(dsa.sample(5, g1), dsa.sample(5, g2))
        _assert_params_equal(dsa.sample_per_group(3, 4, g1), dsa.sample_per_group(3, 4, g2))
    x = images(4)
    torch.testing.assert_close(dsa(x, gen(7)), dsa(x, gen(7)))
    # and the generator is what decides: another seed gives another batch (an implementation that
    # ignored the generator, or returned its input, would pass the line above)
    assert not torch.equal(dsa(x, gen(7)), dsa(x, gen(8)))
    assert not torch.equal(dsa(x, gen(7)), x)


@pytest.mark.parametrize("op", OPS)
def test_draw_count_fixed_per_op(op: str) -> None:
    """Sampling consumes one op draw plus a fixed number of uniforms per op."""
    per_sample = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}[op]
    for seed in range(3):
        g, ref = gen(seed), gen(seed)
        DSA(strategy=op).sample(6, g)
        torch.randint(1, (1,), generator=ref)
        torch.rand(6 * per_sample, generator=ref)
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


def test_different_seeds_differ() -> None:
    dsa = DSA(strategy="rotate")
    a, b = dsa.sample(8, gen(1)), dsa.sample(8, gen(2))
    assert a.rotate is not None and b.rotate is not None
    assert not torch.equal(a.rotate, b.rotate)


# ----------------------------------------------------------------------------- (e) ranges


def test_parameter_ranges() -> None:
    dsa = DSA()
    n, h = 4000, 28
    g = gen(123)
    p = {op: DSA(strategy=op).sample(n, g) for op in OPS}
    shifts = dsa.crop_shift(p["crop"].crop, h, h)
    assert dsa.crop_max_shift(h, h) == (4, 4)  # round(3.5) = 4
    assert shifts.min() == -4 and shifts.max() == 4
    assert len(torch.unique(shifts)) == 9
    centres = dsa.cutout_centre(p["cutout"].cutout, h, h)
    assert dsa.cutout_size(h, h) == (14, 14)
    assert centres.min() == 0 and centres.max() == h  # even side: centre in [0, H]
    assert p["rotate"].rotate.abs().max() <= 15.0
    assert p["rotate"].rotate.abs().max() > 14.0
    s = p["scale"].scale
    assert s.min() >= 1 / 1.2 - 1e-6 and s.max() <= 1.2 + 1e-6
    assert p["color"].brightness.abs().max() <= 0.5
    assert 0.0 <= p["color"].saturation.min() and p["color"].saturation.max() <= 2.0
    assert 0.5 <= p["color"].contrast.min() and p["color"].contrast.max() <= 1.5
    frac = p["flip"].flip.float().mean().item()
    assert 0.45 < frac < 0.55


def test_cutout_centre_range_odd_side() -> None:
    dsa = DSA()
    u = DSA(strategy="cutout").sample(3000, gen(5)).cutout
    centres = dsa.cutout_centre(u, 10, 10)  # side 5 (odd): centre in [0, H - 1]
    assert centres.min() == 0 and centres.max() == 9


def test_op_choice_covers_strategy() -> None:
    g = gen(0)
    dsa = DSA()
    seen = {dsa.sample(1, g).op for _ in range(200)}
    assert seen == set(OPS)
    fyi = DSA(flip_first=True)
    samples = [fyi.sample(2, g) for _ in range(200)]
    assert {s.op for s in samples} == set(OPS) - {"flip"}
    assert all(s.first_flip is not None for s in samples)


def test_default_strategy() -> None:
    assert "flip" not in default_strategy("mnist").split("_")
    assert "flip" not in default_strategy("SVHN").split("_")
    assert default_strategy("fashion_mnist") == "color_crop_cutout_flip_scale_rotate"
    assert default_strategy("cifar10") == "color_crop_cutout_flip_scale_rotate"


# ----------------------------------------------------------------------------- (f) errors


def test_unknown_op_lists_valid_ops() -> None:
    with pytest.raises(ConfigError) as err:
        DSA(strategy="color_blur")
    msg = str(err.value)
    assert "'blur'" in msg
    for op in VALID_OPS:
        assert op in msg


def test_out_of_range_ratio() -> None:
    with pytest.raises(ConfigError, match="ratio_scale"):
        DSA(ratio_scale=0.5)
    with pytest.raises(ConfigError, match="prob_flip"):
        DSA(prob_flip=1.5)


def test_none_strategy_is_identity() -> None:
    dsa = DSA(strategy="none")
    x = images(3)
    p = dsa.sample(3, gen(0))
    assert p.op == "none"
    torch.testing.assert_close(dsa.apply(x, p), x)


def test_shape_errors() -> None:
    dsa = DSA()
    with pytest.raises(ValueError):
        dsa.apply(images(2), dsa.sample_per_group(2, 2, gen(0)))
    with pytest.raises(ValueError):
        x = images(2).unsqueeze(0).expand(3, -1, -1, -1, -1)
        dsa.apply_grouped(x, dsa.sample_per_group(2, 2, gen(0)))


# ----------------------------------------------------------------------------- (g) groups


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flip_first", [False, True])
def test_grouped_equals_per_group(op: str, flip_first: bool) -> None:
    dsa = DSA(strategy=op, flip_first=flip_first)
    k, b, n = 3, 5, 2
    x = torch.randn(k, b, 3, 8, 8, generator=gen(8))
    params = dsa.sample_per_group(k, n, gen(6))
    assert params.num_groups == k
    out = dsa.apply_grouped(x, params)
    assert out.shape == x.shape
    for i in range(k):
        torch.testing.assert_close(out[i], dsa.apply(x[i], params.group(i)))
    shared = dsa.sample(n, gen(6))
    out_shared = dsa.apply_grouped(x, shared)
    for i in range(k):
        torch.testing.assert_close(out_shared[i], dsa.apply(x[i], shared))


def test_grouped_siamese_across_batch_sizes() -> None:
    dsa = DSA(strategy="rotate")
    params = dsa.sample_per_group(2, 3, gen(1))
    real = torch.randn(2, 7, 1, 8, 8, generator=gen(2))
    syn = real[:, :2].clone()
    expected = dsa.apply_grouped(real, params)[:, :2]
    torch.testing.assert_close(dsa.apply_grouped(syn, params), expected)


def test_grouped_gradients() -> None:
    dsa = DSA(strategy="crop")
    x = torch.randn(2, 3, 1, 8, 8, generator=gen(2)).requires_grad_(True)
    dsa.apply_grouped(x, dsa.sample_per_group(2, 3, gen(3))).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu(op: str) -> None:
    dsa = DSA(strategy=op)
    params = dsa.sample(4, gen(0))
    x = images(6)
    out = dsa.apply(x.cuda(), params)  # params moved to x's device
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), dsa.apply(x, params), atol=1e-5, rtol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    p_cuda = dsa.sample(4, g)
    assert p_cuda.device is None or p_cuda.device.type == "cuda"
    assert dsa.apply(x.cuda(), p_cuda).device.type == "cuda"
