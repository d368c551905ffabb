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


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 autocast is a speed-up, not a loss).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: AVX-512 BF16 or AMX tiles (x86). Without them
    PyTorch emulates bfloat16 through float32 conversions: on an AVX2-only AMD EPYC (Zen 3) a
    DC ipc 1 matching iteration took 166 s in bf16 autocast against 11 s in float32. Other
    devices (MPS, ...): ``False``. Native is necessary, not sufficient, for a speed-up (a Xeon
    with AVX-512 BF16 but no AMX ran a matching step at 0.8x the fp32 speed): there, choose
    ``precision=fp32``; :func:`bf16_speedup` measures it (recorded, never used to decide).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        cpu = torch.cpu
        checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(bool(f()) for f in checks if f is not None)
    return False


def default_precision(device: torch.device | str) -> str:
    """The precision of the distillation networks when a config does not choose one: ``"bf16"``
    where ``device`` computes bfloat16 natively (:func:`native_bf16`: CUDA with bf16 support, a
    CPU with AVX-512 BF16 or AMX), else ``"fp32"``. Decided by the hardware alone, never by a
    timing: the same config makes the same choice on every run on one machine."""
    return "bf16" if native_bf16(device) else "fp32"


_BF16_SPEEDUP: dict[str, float] = {}


def bf16_speedup(device: torch.device | str = "cpu", *, repeats: int = 7) -> float | None:
    """Measured speed of bfloat16 autocast relative to float32 on a CPU: ``t_fp32 / t_bf16``.

    Recorded with every result (``machine.bf16_speedup``) to read its speed by; it decides
    nothing (the default precision is :func:`default_precision`, from the ISA). "Native" bf16
    does not mean fast: on an Intel Xeon with AVX-512 BF16 but no AMX, a ConvNet-3 matching step
    ran 0.8x as fast under bf16 autocast as in fp32, while a Xeon with fast bf16 ran a DM
    iteration 2.7x faster with it (``benchmarks/results/perf/``). The probe times the block
    every matcher spends its time in: Conv3x3(128 -> 128) -> instance norm -> ReLU -> AvgPool2
    on a ``(32, 128, 16, 16)`` batch, forward and backward (weights and input), fp32 and bf16
    alternately, the fastest of ``repeats`` calls each (a shared machine only ever adds time).
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
