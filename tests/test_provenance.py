import math

import pytest

import condense.provenance as prov
from condense.provenance import PROBE_FLOP, machine_info, speed_probe
from condense.runtime import native_bf16


def test_machine_info_says_whether_bf16_is_native():
    info = machine_info("cpu")
    assert info["native_bf16"] is native_bf16("cpu")
    assert info["device"] == "cpu" and info["cores"] >= 1


def test_speed_probe_is_flop_over_the_median_call_time(monkeypatch):
    # a fake clock: the warm-up product "takes" 100 s (not timed), then the timed ones 0.5, 0.5,
    # 4 s in turn: the median is 0.5 s (a mean would be 1.67 s), so PROBE_FLOP / 0.5 s
    clock = {"t": 0.0}
    monkeypatch.setattr(prov.time, "perf_counter", lambda: clock["t"])
    real_mm = prov.torch.mm
    durations = iter([100.0] + [0.5, 0.5, 4.0] * 100)

    def slow_mm(*args, **kwargs):
        clock["t"] += next(durations)
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(prov.torch, "mm", slow_mm)
    assert speed_probe("cpu", seconds=2.0) == pytest.approx(round(PROBE_FLOP / 0.5 / 1e9, 1))


def test_speed_probe_measures_this_machine():
    gflops = speed_probe("cpu", seconds=0.05)
    assert math.isfinite(gflops) and 0 < gflops < 1e5
