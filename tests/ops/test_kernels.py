"""Per-sample Conv2d gradient norms (condense.ops.kernels) against explicit per-sample gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from condense.errors import ConfigError
from condense.ops import kernels as K

OP = torch.ops.condense.per_sample_conv_sqnorm.default

# (N, T, D, P): 2 T^2 > P D materialises G, 2 T^2 <= P D takes the Gram ("ghost") route
MATERIALIZE = [(3, 20, 18, 7), (1, 33, 45, 19)]
GHOST = [(3, 5, 18, 7), (1, 6, 45, 19)]


def _ab(n: int, t: int, d: int, p: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=dtype), torch.randn(n, t, p, generator=g, dtype=dtype)


def _brute(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The obvious reference: each G_n = B_n^T A_n written out, then its squared Frobenius norm."""
    return torch.stack([(b[i].double().T @ a[i].double()).pow(2).sum() for i in range(a.shape[0])])


def test_branch_shapes_are_what_the_names_say() -> None:
    assert not any(K.use_ghost(t, p, d) for _, t, d, p in MATERIALIZE)
    assert all(K.use_ghost(t, p, d) for _, t, d, p in GHOST)


@pytest.mark.parametrize("chunk_elems", [K._CHUNK_ELEMS, 1])
@pytest.mark.parametrize("shape", MATERIALIZE + GHOST)
def test_torch_impl_equals_brute_force(shape: tuple[int, int, int, int], chunk_elems: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both branches, in one chunk and in one-sample chunks, to 1e-10 relative in float64."""
    monkeypatch.setattr(K, "_CHUNK_ELEMS", chunk_elems)
    a, b = _ab(*shape)
    out = K.per_sample_conv_sqnorm(a, b, impl="torch")
    assert out.shape == (shape[0],) and out.dtype == torch.float64
    torch.testing.assert_close(out, _brute(a, b), rtol=1e-10, atol=0)
    torch.testing.assert_close(K.per_sample_conv_sqnorm(a, b), out, rtol=1e-10, atol=0)  # the op on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(dtype: torch.dtype) -> None:
    a, b = _ab(3, 20, 18, 7, dtype=dtype)
    out = K.per_sample_conv_sqnorm(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _brute(a, b), rtol=1e-5, atol=0)


def test_non_contiguous_inputs() -> None:
    a, b = _ab(3, 20, 18, 7)
    at, bt = a.transpose(0, 1).contiguous().transpose(0, 1), b.mT.contiguous().mT
    assert not at.is_contiguous() and not bt.is_contiguous()
    torch.testing.assert_close(K.per_sample_conv_sqnorm(at, bt), _brute(a, b), rtol=1e-10, atol=0)


def test_empty_batch_and_empty_positions() -> None:
    a, b = _ab(0, 4, 5, 6)
    assert K.per_sample_conv_sqnorm(a, b).shape == (0,)
    a, b = _ab(2, 0, 5, 6)
    assert K.per_sample_conv_sqnorm(a, b).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [MATERIALIZE[0], GHOST[0]])
def test_opcheck(shape: tuple[int, int, int, int], dtype: torch.dtype, requires_grad: bool) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch (which decomposes a triton_op
    into its body: that body must route CPU tensors to the torch implementation)."""
    a, b = _ab(*shape, dtype=dtype)
    torch.library.opcheck(OP, (a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)))


@pytest.mark.parametrize("shape", [MATERIALIZE[0], GHOST[0]])
def test_gradcheck(shape: tuple[int, int, int, int]) -> None:
    a, b = _ab(*shape)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(OP, (a, b))
    assert torch.autograd.gradgradcheck(OP, (a, b))


def test_autograd_one_input_and_half_dtype() -> None:
    a, b = _ab(3, 20, 18, 7, dtype=torch.float16)
    a.requires_grad_()
    w = torch.tensor([1.0, -2.0, 0.5])
    (K.per_sample_conv_sqnorm(a, b) * w).sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float16 and b.grad is None
    ad, bd = a.detach().double().requires_grad_(), b.double()
    (_brute(ad, bd) * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, rtol=2e-3, atol=2e-3)


def test_compiled_on_cpu() -> None:
    """torch.compile decomposes the triton_op into its body; on a CPU that must not launch Triton."""
    a, b = _ab(3, 20, 18, 7, dtype=torch.float32)
    f = torch.compile(lambda x, y: torch.ops.condense.per_sample_conv_sqnorm(x, y), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(a, b), K.per_sample_conv_sqnorm(a, b, impl="torch"))


# --------------------------------------------------------------------------- Triton (interpreter)

_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from condense.ops import kernels as K

    assert K._interpreted(), "TRITON_INTERPRET=1 did not take effect"
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.float64):
        for n, t, d, p in [(3, 20, 18, 7), (2, 37, 45, 19), (1, 33, 70, 19)]:
            a = torch.randn(n, t, d, generator=g).to(dtype)
            b = torch.randn(n, t, p, generator=g).to(dtype)
            key = f"{dtype}-{n}-{t}-{d}-{p}"
            out[key, "ref"] = K.per_sample_conv_sqnorm_torch(a, b)
            out[key, "triton"] = K.per_sample_conv_sqnorm(a, b, impl="triton")
            out[key, "small_tiles"] = K.per_sample_conv_sqnorm_triton(a, b, block_t=16, block_p=16, block_d=16)
            out[key, "wrapped"] = K._launch(a, b, block_t=None, block_p=None, block_d=None, wrap=True)
    a = torch.randn(20, 3, 18, generator=g).transpose(0, 1)  # strided views
    b = torch.randn(3, 7, 20, generator=g).mT
    out["strided", "ref"] = K.per_sample_conv_sqnorm_torch(a, b)
    out["strided", "triton"] = K.per_sample_conv_sqnorm_triton(a, b, block_p=16, block_d=16)
    torch.save(out, sys.argv[1])
    """
)


def test_triton_kernel_interpreted_equals_torch(tmp_path: Path) -> None:
    """The kernel under TRITON_INTERPRET=1 (read when triton is imported: a fresh interpreter)."""
    pytest.importorskip("triton", reason="triton is not installed: the kernel cannot be checked")
    dest = tmp_path / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(dest)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(dest)
    keys = {k for k, _ in out}
    assert len(keys) == 7
    for key in keys:
        ref = out[key, "ref"]
        for variant in ("triton", "small_tiles", "wrapped"):
            if (key, variant) in out:
                got = out[key, variant]
                assert got.dtype == ref.dtype, (key, variant)
                rtol = 1e-12 if ref.dtype == torch.float64 else 1e-5
                torch.testing.assert_close(got, ref, rtol=rtol, atol=0, msg=f"{key} {variant}")


def test_triton_on_cpu_without_interpreter_says_how() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    if K._interpreted():
        pytest.skip("this process runs triton interpreted")
    a, b = _ab(2, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        K.per_sample_conv_sqnorm(a, b, impl="triton")


# --------------------------------------------------------------------------- unfold_conv_input

CONVS = {
    "stride2_pad1_dil2": dict(kernel_size=3, stride=2, padding=1, dilation=2),
    "same_reflect": dict(kernel_size=3, padding="same", padding_mode="reflect"),
    "same_even_kernel_dilated": dict(kernel_size=(4, 2), padding="same", dilation=(1, 2)),
    "same_even_circular": dict(kernel_size=4, padding="same", padding_mode="circular"),
    "valid_rect": dict(kernel_size=(2, 3), stride=(1, 2), padding="valid"),
    "replicate_pad": dict(kernel_size=3, padding=(2, 1), padding_mode="replicate"),
}


def _conv(name: str, c_in: int = 2, c_out: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, **CONVS[name]).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return conv


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("name", list(CONVS))
def test_unfold_reproduces_the_convolution(name: str) -> None:
    conv = _conv(name)
    x = torch.randn(2, 2, 9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = conv(x)
    a = K.unfold_conv_input(x, conv)
    assert a.shape == (2, y.shape[2] * y.shape[3], 2 * conv.kernel_size[0] * conv.kernel_size[1])
    z = torch.einsum("ntd,pd->npt", a, conv.weight.flatten(1)) + conv.bias[:, None]
    torch.testing.assert_close(z.reshape(y.shape), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["stride2_pad1_dil2", "same_reflect", "same_even_circular"])
def test_per_sample_weight_grads_match_vmap(name: str) -> None:
    """B^T A from unfold_conv_input = per-sample conv weight gradients of torch.func, and the op
    gives their squared norms."""
    conv = _conv(name)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 9, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    head = nn.Linear(conv(x)[0].numel(), 4).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=torch.float64) * 0.3)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    want = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)["0.weight"]  # (N, C_out, C_in, kh, kw)

    out = conv(x)
    out.retain_grad()
    F.cross_entropy(net[1:](out), y, reduction="sum").backward()  # per-sample losses: B_n = d loss_n / d out_n
    a = K.unfold_conv_input(x, conv)
    b = out.grad.flatten(2).mT  # (N, T, P)
    got = torch.bmm(b.mT, a).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(K.per_sample_conv_sqnorm(a, b), want.flatten(1).pow(2).sum(1), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (torch.zeros(3, 4), torch.zeros(3, 4, 2), r"\(N, T, D\).*got a \(3, 4\)"),
        (torch.zeros(3, 4, 5), torch.zeros(3, 6, 2), r"same N and T.*b \(3, 6, 2\)"),
        (torch.zeros(3, 4, 5), torch.zeros(2, 4, 2), r"same N and T.*b \(2, 4, 2\)"),
        (torch.zeros(3, 4, 5), torch.zeros(3, 4, 2, dtype=torch.float64), r"one dtype.*torch.float64"),
        (torch.zeros(3, 4, 5, dtype=torch.int64), torch.zeros(3, 4, 2, dtype=torch.int64), r"torch.int64"),
        (torch.zeros(3, 4, 5), torch.zeros(3, 4, 2, device="meta"), r"one device.*meta"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
def test_bad_inputs_raise(a: torch.Tensor, b: torch.Tensor, match: str, impl: str) -> None:
    with pytest.raises(ConfigError, match=match):
        K.per_sample_conv_sqnorm(a, b, impl=impl)


def test_bad_impl_and_blocks_raise() -> None:
    a, b = _ab(2, 4, 5, 6)
    with pytest.raises(ConfigError, match=r"'cuda'.*auto, torch, triton"):
        K.per_sample_conv_sqnorm(a, b, impl="cuda")
    with pytest.raises(ConfigError, match=r"block_p must be a power of two >= 16.*got 24"):
        K._launch(a, b, block_t=None, block_p=24, block_d=None, wrap=False)
    with pytest.raises(ConfigError, match="same N and T"):
        OP(a, b[:, :3])


def test_unfold_grouped_conv_columns_per_group() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    a = K.unfold_conv_input(x, conv)  # (2, 25, 36): group g's columns are [18 g, 18 (g + 1))
    w = conv.weight.flatten(1)  # (6, 18)
    out = torch.cat([torch.einsum("ntd,pd->npt", a[..., 18 * g:18 * (g + 1)], w[3 * g:3 * (g + 1)]) for g in range(2)], 1)
    torch.testing.assert_close(out.reshape(2, 6, 5, 5) + conv.bias.reshape(1, 6, 1, 1), conv(x), rtol=1e-12, atol=1e-12)


def test_unfold_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match=r"x \(N, 2, H, W\).*got \(1, 3, 5, 5\)"):
        K.unfold_conv_input(torch.zeros(1, 3, 5, 5), nn.Conv2d(2, 4, 3))
    with pytest.raises(ConfigError, match="expects an nn.Conv2d; got Linear"):
        K.unfold_conv_input(torch.zeros(1, 3, 5, 5), nn.Linear(3, 3))
