"""The gradient-matching perf script end to end at a toy size: same loss as its per-class loop,
and its FLOP-rate fields consistent with the counted arithmetic (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parents[2] / "benchmarks" / "perf"


@pytest.fixture
def perf_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    import _common
    import gradient_matching

    yield _common, gradient_matching
    for name in ("_common", "gradient_matching", "pool"):
        sys.modules.pop(name, None)


def test_counted_flops_of_a_matmul(perf_modules):
    common, _ = perf_modules
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert common.counted_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_gm_script_tiny(perf_modules, tmp_path):
    _, gm = perf_modules
    out = tmp_path / "gm.json"
    rec = gm.main(["--classes", "2", "--batch-real", "8", "--ipc", "2", "--width", "16", "--repeats", "1",
                   "--no-compile", "--no-vmap", "--out", str(out)])
    assert out.exists() and rec["loss_check"]["rel_diff"] < 1e-4
    fr = rec["flop_rate"]
    assert fr["flops_per_step"] > 0
    for name, v in rec["variants"].items():
        assert fr["gflops"][name] == pytest.approx(fr["flops_per_step"] / v["median_s"] / 1e9)
    assert fr["fp32_ratio_bound"] == pytest.approx(fr["conv_peak_gflops"]["fp32"] / fr["gflops"]["baseline"])
    ts = rec["time_split"]
    best = ts["fastest_variant"]
    assert best in rec["variants"] and best != "loop_fastpool"
    assert rec["variants"][best]["median_s"] == min(v["median_s"] for n, v in rec["variants"].items() if n != "loop_fastpool")
    for split in ts["steps"].values():
        assert 0 < split["conv_s"] < split["profiled_s"] and 0 < split["conv_share"] < 1
    assert ts["conv_only_ratio_bound"] == pytest.approx(
        rec["baseline_s"] / (rec["variants"][best]["median_s"] * ts["steps"][best]["conv_share"]))


def test_time_split_counts_convolutions(perf_modules):
    common, _ = perf_modules
    x, w = torch.randn(8, 16, 12, 12), torch.randn(16, 16, 3, 3)
    only_conv = common.time_split(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    assert only_conv["conv_share"] > 0.5
    no_conv = common.time_split(lambda: (x * 2).sum())
    assert no_conv["conv_s"] == 0 and no_conv["conv_share"] == 0


def test_stock_pooling_swaps_the_fast_pool_and_keeps_the_function(perf_modules):
    common, _ = perf_modules
    from condense.models import create_model
    from condense.models._pool import AvgPool2x2

    net = create_model("convnet", channels=1, num_classes=10, im_size=28, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 1, 28, 28)
    before = net(x)
    assert common.stock_pooling(net) is net
    assert not any(isinstance(m, AvgPool2x2) for m in net.modules())
    assert sum(type(m) is torch.nn.AvgPool2d for m in net.modules()) == 3
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_pool_script_tiny(perf_modules, tmp_path):
    import pool

    out = tmp_path / "pool.json"
    rec = pool.main(["--batch", "4", "--channels", "64", "--sizes", "16", "--repeats", "1", "--out", str(out)])
    assert out.exists() and rec["kind"] == "perf" and set(rec["sizes"]) == {"16x16"}
    assert rec["ratio"] == pytest.approx(rec["baseline_s"] / rec["ours_s"])


@pytest.mark.parametrize("augment", [False, True])
def test_synth_context_is_the_clis(perf_modules, augment):
    """The perf scripts run the pipeline's context (same class index, generator seeding, DSA
    strategy), on ConvNet-3 of the asked width, with augmentation only when asked."""
    common, _ = perf_modules
    from condense.config import synth_context as run_synth_context

    data, _ = common.load_data("no_such_dataset_here")
    ctx = common.synth_context(data, ipc=3, width=16, seed=7, augment=augment)
    cfg = {"seed": 7, "ipc": 3, "model": {"name": "convnet", "kwargs": {"width": 16}}}
    cli = run_synth_context(cfg, data, torch.device("cpu"))
    assert (ctx.ipc, ctx.seed, ctx.model_name, ctx.model_kwargs) == (3, 7, "convnet", {"width": 16})
    assert torch.equal(ctx.generator.get_state(), cli.generator.get_state())
    if augment:
        assert ctx.augment is not None and ctx.augment.strategy == cli.augment.strategy
    else:
        assert ctx.augment is None
