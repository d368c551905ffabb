"""Where a result came from: code version, machine, and atomic JSON/file writes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from condense.runtime import bf16_speedup, native_bf16

_REPO = Path(__file__).resolve().parent.parent


def code_version() -> dict[str, Any]:
    """``{"git_sha": str | None, "dirty": bool | None}`` of the checkout condense runs from."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return {"git_sha": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"git_sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "dirty": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """PyTorch's CPU kernel level (``AVX512``, ``AVX2``, ``DEFAULT``, ...) plus the bf16 units
    (``+AVX512_BF16``, ``+AMX``): CPUs sold under one model name ("Intel(R) Xeon(R) Processor")
    differ here, and with them the speed of bf16 and of the matching step."""
    cpu = torch.cpu
    parts = [str(torch.backends.cpu.get_cpu_capability())]
    for tag, probe in (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        f = getattr(cpu, probe, None)
        if f is not None and f():
            parts.append(tag)
    return "+".join(parts)


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model, core count, its ISA (:func:`cpu_isa`), torch version, device, native bf16,
    the measured bf16/fp32 speed ratio on a CPU (:func:`condense.runtime.bf16_speedup`: recorded
    to read a run's speed by, it decides nothing; ``None`` elsewhere), and the GPU name where
    there is one."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": dev.type,
        "cpu_isa": cpu_isa(),
        "native_bf16": native_bf16(dev),
        "bf16_speedup": bf16_speedup(dev),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


#: The probe's matrix product: the im2col GEMM of ConvNet-3's dominant layer (128 -> 128 channels,
#: 3x3, 16x16 maps, batch 32): (32*16*16, 128*9) @ (128*9, 128), fp32.
PROBE_SHAPE = (32 * 16 * 16, 128 * 9, 128)
PROBE_FLOP = 2 * PROBE_SHAPE[0] * PROBE_SHAPE[1] * PROBE_SHAPE[2]


def speed_probe(device: torch.device | str | None = None, *, seconds: float = 0.3) -> float:
    """This machine's fp32 GEMM throughput now, in GFLOP/s (median of calls over ~``seconds``).

    Wall-clock budgets make a run's iteration count depend on the machine, and machines with
    the same CPU name have run the same step 1.7-4.7x apart here; a result records this number
    at the start and the end of its distillation so that its speed (and any contention during
    the run) can be read next to its iteration count. The product writes into a preallocated
    output: a convolution's fresh output tensor made the number depend on the allocator's state
    (150 vs 220 GFLOP/s on one machine with glibc's heap trimmed or kept), this does not.

    Args:
        device: where to measure (default: CPU).
        seconds: time to spend measuring, after one warm-up call.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, k, n = PROBE_SHAPE
    a = torch.randn(m, k, generator=gen).to(dev)
    b = torch.randn(k, n, generator=gen).to(dev)
    out = torch.empty(m, n, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times: list[float] = []
    torch.mm(a, b, out=out)
    sync()
    end = time.perf_counter() + seconds
    while not times or (time.perf_counter() < end and len(times) < 1000):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return round(PROBE_FLOP / times[len(times) // 2] / 1e9, 1)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def relative_path(path: str | Path) -> str:
    """``path`` relative to the current working directory when it lies under it, else absolute:
    how records name run directories and data folders (a results tree moves with its repo)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p)


def portable_path(path: str | Path) -> str:
    """How a record names a path so that it means the same on every machine: relative to the
    working directory when under it (a repository's results and runs), ``~/...`` under the home
    directory (caches), else absolute (a system location such as a distribution's data folder).
    For recording only: ``~`` is not expanded by the code reading paths back."""
    p = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        try:
            return prefix + p.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(p)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda > mps > cpu; otherwise ``torch.device(name)`` (checked to exist)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from condense.errors import ConfigError

    valid = "auto, cpu, cuda, cuda:N, mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; valid: {valid}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; valid: {valid}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; valid: auto, cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} requested but MPS is not available; valid: auto, cpu")
    return dev
