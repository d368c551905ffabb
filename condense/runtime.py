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
    devices (MPS, ...): ``False``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        cpu = torch.cpu
        checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(bool(f()) for f in checks if f is not None)
    return False


def resolve_bf16(value: object, device: torch.device | str, where: str = "bf16") -> object:
    """``"auto"`` -> :func:`native_bf16` of ``device``; booleans and other values pass through
    (the strict config conversion checks them). Any other string fails naming the choices."""
    from condense.errors import ConfigError

    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{where} must be one of {', '.join(BF16_CHOICES)}, got {value!r}")
        return native_bf16(device)
    return value
