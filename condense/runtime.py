"""Process-level settings for entry points (CLI, benchmarks, tests) — never applied on import."""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

log = logging.getLogger(__name__)
_KEPT = False


def keep_freed_memory() -> bool:
    """glibc only: serve large blocks from the heap and never trim it (``mallopt``).

    By default glibc gives every allocation over its mmap threshold (up to 32 MB) a fresh
    ``mmap`` that is unmapped on free, so each training/matching iteration page-faults its big
    activation tensors in again (zero-filled by the kernel): measured here as most of the system
    time of a DM iteration and 2x its wall time. Same effect as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1``. Returns whether it was applied.
    """
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    _KEPT = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    log.debug("glibc heap kept: %s", _KEPT)
    return _KEPT


BF16_CHOICES = ("true", "false", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 autocast is a speed-up, not a loss).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: AVX-512 BF16 or AMX tiles (x86). Without them
    PyTorch emulates bfloat16 through float32 conversions: on an AVX2-only AMD EPYC (Zen 3) a
    DC ipc 1 matching iteration took 166 s in bf16 autocast against 11 s in float32. Other
    devices (MPS, ...): ``False``. Native is necessary, not sufficient, for a speed-up: see
    :func:`bf16_speedup`, which ``bf16: auto`` also consults (:func:`bf16_pays`).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        cpu = torch.cpu
        checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(bool(f()) for f in checks if f is not None)
    return False


#: ``bf16: auto`` on a CPU turns bf16 on only where the probe block runs at least this much
#: faster in bf16 autocast than in fp32 (a margin against timing noise).
BF16_MIN_SPEEDUP = 1.15
_BF16_SPEEDUP: dict[str, float] = {}


def bf16_speedup(device: torch.device | str = "cpu", *, repeats: int = 7) -> float | None:
    """Measured speed of bfloat16 autocast relative to float32 on a CPU: ``t_fp32 / t_bf16``.

    "Native" bf16 does not mean fast: on an Intel Xeon with AVX-512 BF16 but no AMX, a
    ConvNet-3 matching step ran 0.8x as fast under bf16 autocast as in fp32 (oneDNN's bf16
    convolution backward was slower than the fp32 one), while a Xeon with fast bf16 ran a DM
    iteration 2.7x faster with it (``benchmarks/results/perf/``). So the probe times the block
    every matcher spends its time in: Conv3x3(128 -> 128) -> instance norm -> ReLU -> AvgPool2
    on a ``(32, 128, 16, 16)`` batch, forward and backward (weights and input), fp32 and bf16
    alternately, the fastest of ``repeats`` calls each (a shared machine only ever adds time: a
    median of 5 read 1.29 once and 0.65-0.83 in three other processes on the same idle Xeon).
    Measured once per process (~0.7 s).

    Returns:
        The ratio (> 1: bf16 faster), or ``None`` for a device that is not a CPU.
    """
    dev = torch.device(device)
    if dev.type != "cpu":
        return None
    if "cpu" in _BF16_SPEEDUP:
        return _BF16_SPEEDUP["cpu"]
    import time

    import torch.nn.functional as F

    from condense.models._pool import avg_pool2x2

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 128, 16, 16, generator=gen).requires_grad_(True)
    w = (torch.randn(128, 128, 3, 3, generator=gen) * 0.03).requires_grad_(True)

    def block(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = avg_pool2x2(F.relu(F.group_norm(F.conv2d(x, w, padding=1), 128)))
        torch.autograd.grad(y.float().square().mean(), (x, w))
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.enable_grad():
        block(False), block(True)  # warm-up (first calls pick kernels)
        for _ in range(repeats):
            for bf16 in (False, True):
                times[bf16].append(block(bf16))
    ratio = min(times[False]) / min(times[True])
    _BF16_SPEEDUP["cpu"] = round(ratio, 3)
    log.info("bf16 probe: bf16 autocast runs %.2fx the fp32 speed on this CPU", ratio)
    return _BF16_SPEEDUP["cpu"]


def bf16_pays(device: torch.device | str) -> bool:
    """What ``bf16: auto`` resolves to: native bf16 (:func:`native_bf16`) and, on a CPU, measured
    faster than fp32 by :data:`BF16_MIN_SPEEDUP` (:func:`bf16_speedup`); CUDA: native is enough."""
    dev = torch.device(device)
    if not native_bf16(dev):
        return False
    if dev.type == "cpu":
        return (bf16_speedup(dev) or 0.0) >= BF16_MIN_SPEEDUP
    return True


def resolve_bf16(value: object, device: torch.device | str, where: str = "bf16") -> object:
    """``"auto"`` -> :func:`bf16_pays` on ``device``; booleans and other values pass through
    (the strict config conversion checks them). Any other string fails naming the choices."""
    from condense.errors import ConfigError

    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{where} must be one of {', '.join(BF16_CHOICES)}, got {value!r}")
        return bf16_pays(device)
    return value
