"""Per-sample squared gradient norms of a Conv2d weight without the per-sample gradients.

For sample ``n`` let ``A_n`` (T, D) be the unfolded layer input (:func:`unfold_conv_input`;
``T`` output positions, ``D = C_in * kh * kw``) and ``B_n`` (T, P) the gradient w.r.t. the
layer output (``P = C_out``). The per-sample weight gradient is ``G_n = B_n^T A_n`` (P, D);
:func:`per_sample_conv_sqnorm` returns ``||G_n||_F^2`` for every ``n`` without writing any
``G_n`` to memory.

- CUDA: a Triton kernel, one program per (sample, P-tile, D-tile). Each program accumulates its
  tile of ``G_n`` over ``T`` with ``tl.dot`` in registers, squares and sums it, and stores one
  number into an ``(N, tiles)`` buffer that is summed afterwards (deterministic, no atomics).
- CPU (and any other device): plain torch, in chunks of samples, per call the cheaper of
  materialising ``G_n`` (``bmm``) or the "ghost" identity ``||B^T A||^2 = <A A^T, B B^T>``
  (``T x T`` Gram matrices; chosen when ``2 T^2 <= P D``, the fastDP rule).

Both sit behind one operator, ``torch.ops.condense.per_sample_conv_sqnorm``, made with
``torch.library.triton_op`` (torch 2.14 takes a ``register_kernel("cpu")`` override on it) with
a fake kernel and an autograd formula (``d/dA = 2 B G``, ``d/dB = 2 A G^T``, plain ``bmm``).
Under ``torch.compile`` a ``triton_op`` is decomposed into its body on every device, so the body
itself sends non-CUDA tensors to the torch implementation. Accumulation is float32 (float64 for
float64 inputs); float32 inputs use tf32 in ``tl.dot`` only when torch's float32 matmul
precision allows it. The tests run the kernel on a CPU with ``TRITON_INTERPRET=1`` (read when
``triton`` is imported, hence in a subprocess).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condense.errors import ConfigError

try:  # optional: CPU-only installs work without it (the op then uses torch everywhere)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = [
    "IMPLS",
    "per_sample_conv_sqnorm",
    "per_sample_conv_sqnorm_torch",
    "per_sample_conv_sqnorm_triton",
    "ghost_sqnorm",
    "unfold_conv_input",
    "use_ghost",
]

IMPLS = ("auto", "torch", "triton")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Elements of intermediates one chunk of the torch implementation may allocate (~32 MB float64).
_CHUNK_ELEMS = 1 << 22
_OP_NAME = "condense::per_sample_conv_sqnorm"


# --------------------------------------------------------------------------- checks


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(a: Tensor, b: Tensor) -> None:
    """Raise one :class:`ConfigError` naming the shapes / dtypes / devices unless ``a`` is
    (N, T, D) and ``b`` is (N, T, P) of one supported floating dtype on one device."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ConfigError(f"per_sample_conv_sqnorm expects two tensors; got {type(a).__name__}, {type(b).__name__}")
    problem = None
    if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
        problem = "a must be (N, T, D) and b (N, T, P) with the same N and T"
    elif a.dtype != b.dtype or a.dtype not in _DTYPES:
        problem = f"a and b must share one dtype of {', '.join(str(d) for d in _DTYPES)}"
    elif a.device != b.device:
        problem = "a and b must be on one device"
    if problem is not None:
        raise ConfigError(
            f"per_sample_conv_sqnorm: {problem}; got a {tuple(a.shape)} {a.dtype} on {a.device}, "
            f"b {tuple(b.shape)} {b.dtype} on {b.device}"
        )


def use_ghost(t: int, p: int, d: int) -> bool:
    """The fastDP rule: Gram matrices (2 T^2 numbers) when no larger than G (P D numbers)."""
    return 2 * t * t <= p * d


def ghost_sqnorm(a: Tensor, b: Tensor) -> Tensor:
    """``||B_n^T A_n||_F^2`` per sample from the Gram matrices ``<A A^T, B B^T>`` (any ``T``)."""
    if a.shape[1] == 1:  # a Linear on a flat input: the outer product's norm
        return a.square().sum((1, 2)) * b.square().sum((1, 2))
    return (torch.bmm(a, a.mT) * torch.bmm(b, b.mT)).sum(dim=(1, 2))


# --------------------------------------------------------------------------- torch implementation


def per_sample_conv_sqnorm_torch(a: Tensor, b: Tensor) -> Tensor:
    """``||B_n^T A_n||_F^2`` per sample with plain torch ops (any device), chunked over samples.

    Args:
        a: (N, T, D) unfolded layer inputs.
        b: (N, T, P) gradients w.r.t. the layer outputs, same dtype and device as ``a``.

    Returns:
        (N,) float32 (float64 for float64 inputs).
    """
    _check_inputs(a, b)
    n, t, d = a.shape
    p = b.shape[2]
    acc = _acc_dtype(a.dtype)
    ghost = use_ghost(t, p, d)
    per_sample = (3 * t * t if ghost else 2 * p * d) + t * (d + p)  # intermediates + upcast copies
    chunk = max(1, _CHUNK_ELEMS // max(per_sample, 1))
    parts = []
    for s in range(0, n, chunk):
        ac, bc = a[s:s + chunk].to(acc), b[s:s + chunk].to(acc)
        if ghost:
            parts.append(ghost_sqnorm(ac, bc))
        else:
            g = torch.bmm(bc.mT, ac)
            parts.append((g * g).sum(dim=(1, 2)))
    if not parts:
        return a.new_zeros((0,), dtype=acc)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- Triton kernel

_BLOCK_T, _BLOCK_MAX = 32, 64

if triton is not None:

    @triton.jit
    def _sqnorm_tiles_kernel(
        a_ptr, b_ptr, part_ptr,
        T, D, P,
        stride_an, stride_at, stride_ad,
        stride_bn, stride_bt, stride_bp,
        stride_part_n,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Program (n, i, j): ``sum(tile_ij(B_n^T A_n) ** 2)`` -> ``part[n, i * n_j + j]``."""
        n = tl.program_id(0)
        pid_p = tl.program_id(1)
        pid_d = tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_T)
        a_base = a_ptr + n.to(tl.int64) * stride_an
        b_base = b_ptr + n.to(tl.int64) * stride_bn
        mask_p = offs_p[:, None] < P
        mask_d = offs_d[None, :] < D
        acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=part_ptr.dtype.element_ty)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            t64 = t.to(tl.int64)
            # B^T tile (BLOCK_P, BLOCK_T) read straight through b's strides, A tile (BLOCK_T, BLOCK_D)
            bt = tl.load(b_base + offs_p[:, None] * stride_bp + t64[None, :] * stride_bt,
                         mask=mask_p & (t[None, :] < T), other=0.0)
            at = tl.load(a_base + t64[:, None] * stride_at + offs_d[None, :] * stride_ad,
                         mask=(t[:, None] < T) & mask_d, other=0.0)
            acc = tl.dot(bt, at, acc, input_precision=INPUT_PRECISION)
        tile = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        tl.store(part_ptr + n.to(tl.int64) * stride_part_n + pid_p * tl.num_programs(2) + pid_d, tile)

else:  # pragma: no cover
    _sqnorm_tiles_kernel = None


def _pow2_block(size: int) -> int:
    """The tile edge for a dimension: the next power of two, clamped to [16, 64]."""
    return min(_BLOCK_MAX, max(16, 1 << max(0, int(size) - 1).bit_length()))


def _check_block(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ConfigError(f"{name} must be a power of two >= 16 (tl.dot's minimum); got {value!r}")
    return value


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"  # the only setting that matters for float32; ignored for half types and float64


def _launch(a: Tensor, b: Tensor, *, block_t: int | None, block_p: int | None, block_d: int | None,
            wrap: bool) -> Tensor:
    """Run the kernel on ``a``'s device; ``wrap`` goes through ``torch.library.wrap_triton``
    (the ``triton_op`` body, traceable by ``torch.compile``)."""
    n, t, d = a.shape
    p = b.shape[2]
    acc = _acc_dtype(a.dtype)
    bt = _check_block("block_t", _BLOCK_T if block_t is None else block_t)
    bp = _check_block("block_p", _pow2_block(p) if block_p is None else block_p)
    bd = _check_block("block_d", _pow2_block(d) if block_d is None else block_d)
    if n == 0 or p == 0 or d == 0:
        return a.new_zeros((n,), dtype=acc)
    n_p, n_d = triton.cdiv(p, bp), triton.cdiv(d, bd)
    part = torch.empty((n, n_p * n_d), dtype=acc, device=a.device)
    kernel = torch.library.wrap_triton(_sqnorm_tiles_kernel) if wrap else _sqnorm_tiles_kernel
    kernel[(n, n_p, n_d)](
        a, b, part, t, d, p, *a.stride(), *b.stride(), part.stride(0),
        BLOCK_T=bt, BLOCK_P=bp, BLOCK_D=bd, INPUT_PRECISION=_input_precision(a.dtype),
    )
    return part.sum(dim=1)


def _interpreted() -> bool:
    """Whether ``triton`` was imported with ``TRITON_INTERPRET=1`` (kernels then run on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sqnorm_tiles_kernel, InterpretedFunction)


def per_sample_conv_sqnorm_triton(a: Tensor, b: Tensor, *, block_t: int | None = None,
                                  block_p: int | None = None, block_d: int | None = None) -> Tensor:
    """``||B_n^T A_n||_F^2`` per sample with the Triton kernel, on the tensors' device.

    On a CPU this needs ``TRITON_INTERPRET=1`` set before ``triton`` was first imported.

    Args:
        a: (N, T, D) unfolded layer inputs (any strides).
        b: (N, T, P) gradients w.r.t. the layer outputs, same dtype and device as ``a``.
        block_t, block_p, block_d: tile edges (powers of two >= 16); default 32 for ``T`` and the
            next power of two of ``P`` / ``D`` clamped to [16, 64].

    Returns:
        (N,) float32 (float64 for float64 inputs).
    """
    _check_inputs(a, b)
    if triton is None:
        raise ConfigError("impl='triton' needs the triton package (pip install triton); use impl='torch'")
    if a.device.type == "cpu" and not _interpreted():
        raise ConfigError(
            "the Triton kernel runs on a CPU only in interpreter mode: set TRITON_INTERPRET=1 before "
            "triton is imported, or use impl='torch'"
        )
    return _launch(a, b, block_t=block_t, block_p=block_p, block_d=block_d, wrap=False)


# --------------------------------------------------------------------------- the operator


@torch.library.triton_op(_OP_NAME, mutates_args=())
def _per_sample_conv_sqnorm_op(a: Tensor, b: Tensor) -> Tensor:
    # Eager CUDA calls and every device under torch.compile (which decomposes a triton_op into
    # this body) come here; eager CPU calls take the registered CPU kernel below.
    _check_inputs(a, b)
    if a.device.type != "cuda" or triton is None:
        return per_sample_conv_sqnorm_torch(a, b)
    return _launch(a, b, block_t=None, block_p=None, block_d=None, wrap=True)


_per_sample_conv_sqnorm_op.register_kernel("cpu")(per_sample_conv_sqnorm_torch)


@_per_sample_conv_sqnorm_op.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    _check_inputs(a, b)
    return a.new_empty((a.shape[0],), dtype=_acc_dtype(a.dtype))


def _setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``d out_n / d A_n = 2 B_n G_n``, ``d out_n / d B_n = 2 A_n G_n^T``, through the ``T x T``
    Gram matrices (``B G = (B B^T) A``) when the fastDP rule says they are the smaller."""
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad
    acc = _acc_dtype(a.dtype)
    ac, bc = a.to(acc), b.to(acc)
    w = 2 * grad_out.to(acc)[:, None, None]
    ga = gb = None
    if use_ghost(a.shape[1], b.shape[2], a.shape[2]):
        if need_a:
            ga = torch.bmm(torch.bmm(bc, bc.mT), ac) * w
        if need_b:
            gb = torch.bmm(torch.bmm(ac, ac.mT), bc) * w
    else:
        g = torch.bmm(bc.mT, ac)
        if need_a:
            ga = torch.bmm(bc, g) * w
        if need_b:
            gb = torch.bmm(ac, g.mT) * w
    return (None if ga is None else ga.to(a.dtype)), (None if gb is None else gb.to(b.dtype))


_per_sample_conv_sqnorm_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def per_sample_conv_sqnorm(a: Tensor, b: Tensor, impl: str = "auto") -> Tensor:
    """``||G_n||_F^2`` for ``G_n = B_n^T A_n``, per sample, without materialising ``G``.

    Args:
        a: (N, T, D) unfolded layer inputs (:func:`unfold_conv_input`).
        b: (N, T, P) gradients w.r.t. the layer outputs, reshaped ``(N, C_out, H*W) -> (N, T, P)``.
        impl: ``auto`` the registered operator (torch on CPU, Triton on CUDA; differentiable,
            ``torch.compile``-able); ``torch`` / ``triton`` one implementation directly
            (``triton`` records no autograd graph; on a CPU it needs ``TRITON_INTERPRET=1``).

    Returns:
        (N,) float32 (float64 for float64 inputs).
    """
    if impl not in IMPLS:
        raise ConfigError(f"unknown per-sample norm impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl == "torch":
        return per_sample_conv_sqnorm_torch(a, b)
    if impl == "triton":
        return per_sample_conv_sqnorm_triton(a, b)
    _check_inputs(a, b)
    return torch.ops.condense.per_sample_conv_sqnorm(a, b)


def _conv_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts ``(left, right, top, bottom)`` equivalent to the conv's ``padding``."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # the extra pixel of an odd total goes right / bottom, as in torch
        out: list[int] = []
        for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = dil * (k - 1)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def unfold_conv_input(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input patches a Conv2d multiplies with its weight, one row per output position.

    Padding (``'same'`` / ``'valid'`` / numbers, any ``padding_mode``) is applied first with
    ``F.pad``; stride and dilation go to ``F.unfold``. ``conv(x)`` equals
    ``einsum('ntd,pd->npt', A, conv.weight.flatten(1))`` (+ bias) reshaped to the output map.

    Args:
        x: (N, C_in, H, W) layer input.
        conv: the layer. With ``groups > 1``, group ``g`` multiplies columns
            ``[g * C_in / groups * kh * kw, (g + 1) * C_in / groups * kh * kw)`` (channel-major).

    Returns:
        (N, T, D) with ``T = H_out * W_out`` and ``D = C_in * kh * kw`` (a transposed view).
    """
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"unfold_conv_input expects an nn.Conv2d; got {type(conv).__name__}")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ConfigError(f"unfold_conv_input expects x (N, {conv.in_channels}, H, W) for {conv}; got {tuple(x.shape)}")
    pad = _conv_pad(conv)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    # one strided slice per kernel offset, copied into place: the numbers of F.unfold (im2col),
    # which on a CPU is several times slower than these plain copies
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    n, c = x.shape[:2]
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = x.new_empty((n, c, kh * kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i * kw + j] = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.view(n, c * kh * kw, ho * wo).transpose(1, 2)
