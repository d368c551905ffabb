"""Helpers shared by the perf benchmarks (run as ``python benchmarks/perf/<name>.py``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from condense.errors import CondenseError
from condense.models._pool import AvgPool2x2
from condense.synth.base import SynthContext
from condense.types import DatasetSpec, RealData


def stock_pooling(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`AvgPool2x2` swapped for a stock ``nn.AvgPool2d(2, 2)``, in place.

    The baselines run on the network the reference repositories build (stock torch layers);
    the pool has no state, so the function computed, the weights and the draws are unchanged.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AvgPool2x2):
                setattr(parent, name, nn.AvgPool2d(2, 2))
    return model


def load_data(name: str) -> tuple[RealData, str]:
    """The dataset if its files are here (never downloads), else random tensors of its shape."""
    try:
        from condense.data import build_dataset

        return build_dataset(name, allow_download=False), name
    except (CondenseError, OSError, ImportError) as err:
        logging.warning("%s not available (%s); using random 1x28x28 tensors", name, err)
    k, per_class = 10, 600
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k * per_class, 1, 28, 28, generator=g)
    y = torch.arange(k).repeat_interleave(per_class)
    spec = DatasetSpec("random", 1, (28, 28), k, tuple(map(str, range(k))), (0.0,), (1.0,))
    return RealData(spec, x, y, x[:10], y[:10]), "random"


def first_classes(data: RealData, k: int) -> RealData:
    """The first ``k`` classes only (per-class work is the same, the step is ``K/k`` times shorter)."""
    if k >= data.spec.num_classes:
        return data
    keep_tr, keep_te = data.train_labels < k, data.test_labels < k
    spec = dataclasses.replace(data.spec, num_classes=k, class_names=data.spec.class_names[:k])
    return RealData(spec, data.train_images[keep_tr], data.train_labels[keep_tr],
                    data.test_images[keep_te], data.test_labels[keep_te])


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_same_draw(base: Any, variants: dict[str, Any], sets: dict[str, Any],
                    step: Callable[[Any, Any], float]) -> tuple[dict[str, float], float, float]:
    """One step of the baseline and of every variant from the same generator state (the warm-up).

    ``base`` has ``ctx``, ``images`` and ``step()``; ``step(variant, its set)`` runs one of ours.
    Asserts that fp32 ours and the baseline give the same loss and the same image update;
    returns the losses, their relative difference and that of bf16 ours from fp32 ours.
    """
    state = base.ctx.generator.get_state()
    before = base.images.detach().clone()
    for s in variants.values():
        s.ctx.generator.set_state(state)
    check = {name: step(s, sets[name]) for name, s in variants.items()}
    check["baseline"] = base.step()
    rel = abs(check["ours"] - check["baseline"]) / abs(check["baseline"])
    rel_bf16 = abs(check["ours_bf16"] - check["ours"]) / abs(check["ours"])
    print(f"loss same draw: ours {check['ours']:.6f}  loop {check['baseline']:.6f}  (rel {rel:.2e}); "
          f"bf16 {check['ours_bf16']:.6f} (rel {rel_bf16:.2e})")
    assert rel < 1e-4, f"ours and the per-class loop differ: {check}"
    # the same image update, up to fp32 summation order (condense's pooling sums in another order;
    # single pixels of the update can move by ~1e-4 relative to the update's scale)
    d_ours, d_base = sets["ours"].images.detach() - before, base.images.detach() - before
    upd_rel = float((d_ours - d_base).norm() / d_base.norm())
    assert upd_rel < 1e-3, f"ours and the per-class loop update the images differently (rel {upd_rel:.2e})"
    return check, rel, rel_bf16


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]],
                                                                              dict[str, float]]:
    """Time every run ``repeats`` times, rotating the order each round (drift hits all alike).

    Returns the per-run times and their medians.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order[r % len(order):] + order[: r % len(order)]:
            times[name].append(timed(runs[name]))
    return times, {name: statistics.median(ts) for name, ts in times.items()}


def variant_table(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """The one ``variants`` layout of every perf record: per variant of ours (not ``baseline``)
    its median, ``ratio`` = baseline median / its median, and its times (the report reads this)."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {name: {"median_s": med[name], "ratio": med["baseline"] / med[name], "times_s": ts}
            for name, ts in times.items() if name != "baseline"}


def counted_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call as PyTorch's FlopCounterMode counts them (matmuls and
    convolutions, forward and every backward, double backward included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv_gflops(*, bf16: bool, backward: bool = False, batch: int = 256, channels: int = 128, size: int = 16,
                repeats: int = 5, channels_last: bool = False) -> float:
    """This machine's GFLOP/s (best of ``repeats`` calls) on the convolution that dominates a
    ConvNet-3 step on 28x28 images (the second 3x3 layer, ``channels`` in and out at ``size`` x
    ``size``; the first layer pads 28 to 32): its forward, or with ``backward`` the gradients of
    its input and weights together (twice the forward's FLOPs); under bf16 autocast when ``bf16``;
    the input in channels-last layout when ``channels_last``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(backward)
    w = torch.randn(channels, channels, 3, 3, generator=g, requires_grad=backward)
    flops = 2 * batch * channels * size * size * channels * 9
    if backward:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = torch.nn.functional.conv2d(x, w, padding=1)
        gy = torch.randn_like(y)

        def call() -> None:
            torch.autograd.grad(y, (x, w), gy, retain_graph=True)

        flops *= 2
    else:
        def call() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.nn.functional.conv2d(x, w, padding=1)

    call()  # warm-up
    return flops / min(timed(call) for _ in range(repeats)) / 1e9


def conv_peak_gflops(batch: int = 256, channels: int = 128, size: int = 16, repeats: int = 5) -> dict[str, float]:
    """:func:`conv_gflops` of the forward in fp32 and under bf16 autocast. The yardstick for how
    close to the machine a step runs: a step at this rate is compute-bound, so no reorganisation
    of the same arithmetic can make it much faster."""
    return {tag: conv_gflops(bf16=bf16, batch=batch, channels=channels, size=size, repeats=repeats)
            for tag, bf16 in (("fp32", False), ("bf16", True))}


def synth_context(data: RealData, *, ipc: int, width: int, seed: int, augment: bool) -> SynthContext:
    """The pipeline's synthesis context (:func:`condense.config.synth_context`, what
    ``condense.distil`` and the CLI build: class index, seeded generator, the dataset's DSA
    strategy) on the CPU for ConvNet-3 of ``width``, without the augmentation unless ``augment``:
    what every perf script's synthesizers run in."""
    from condense.config import synth_context as run_synth_context

    cfg = {"seed": seed, "ipc": ipc, "model": {"name": "convnet", "kwargs": {"width": width}}}
    ctx = run_synth_context(cfg, data, torch.device("cpu"))
    return ctx if augment else dataclasses.replace(ctx, augment=None)


def flop_rates(flops: int, medians: dict[str, float], peak: dict[str, float]) -> dict[str, Any]:
    """GFLOP/s of every timed run for ``flops`` per call, against the machine's conv throughput.

    ``flops`` is the baseline's count; every variant does that same work (ours skips only the
    gradients of 1-D weights, a negligible share), so a rate is the baseline's arithmetic per second.
    """
    rates = {name: flops / t / 1e9 for name, t in medians.items()}
    return {
        "flops_per_step": flops,
        "gflops": rates,
        "conv_peak_gflops": peak,
        # the same arithmetic at the measured fp32 conv rate: an estimate of the best fp32 speed-up
        # any implementation of the baseline's work can reach on this machine
        "fp32_ratio_bound": peak["fp32"] / rates["baseline"],
        "bf16_ratio_bound": peak["bf16"] / rates["baseline"],
    }


def time_split(fn: Callable[[], object]) -> dict[str, float]:
    """One profiled call of ``fn``: its time (the profiler's self time summed over every op on the
    calling thread) and the share of it inside convolution kernels (forward, backward, transposed,
    double-backward terms; ops named ``aten::*conv*``). A step that spends most of its time in
    convolutions running at about :func:`conv_peak_gflops` is bound by them: the ratio a variant
    could reach if everything else took no time is ``baseline_s / (its_s * conv_share)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::") and "conv" in e.key)
    return {"profiled_s": total / 1e6, "conv_s": conv / 1e6, "conv_share": conv / total if total else 0.0}


def command_line() -> str:
    """This invocation as a shell line, with the thread-count environment that shaped it."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    return " ".join([*env, *(shlex.quote(a) for a in ["python", *sys.argv])])


def provenance() -> dict[str, Any]:
    """The fields every perf or study record ends with: machine, code version, command line."""
    from condense.provenance import code_version, machine_info

    return {"machine": machine_info("cpu"), "code_version": code_version(), "command": command_line()}


def write_record(out: Any, rec: dict[str, Any]) -> None:
    """Write ``rec`` atomically to ``out`` (a path) when one was given, and say where."""
    if out:
        from condense.provenance import write_json_atomic

        write_json_atomic(out, rec)
        print(f"wrote {out}")
