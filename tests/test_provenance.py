import math
import time

import pytest
import torch

import condense.provenance as prov
import condense.runtime as rt
from condense.provenance import PROBE_FLOP, machine_info, speed_probe
from condense.runtime import bf16_speedup, native_bf16


def test_machine_info_says_whether_bf16_is_native():
    info = machine_info("cpu")
    assert info["native_bf16"] is native_bf16("cpu")
    assert info["device"] == "cpu" and info["cores"] >= 1
    isa = info["cpu_isa"].split("+")
    assert isa[0] == torch.backends.cpu.get_cpu_capability() and ("AMX" in isa) == torch.cpu._is_amx_tile_supported()


def test_bf16_probe_is_the_ratio_of_the_fastest_times_measured_once(monkeypatch):
    # a fake clock: fp32 blocks "take" 3-5 s, bf16 ones 2-3 s with one 50 s outlier, so the
    # fastest calls give 3 / 2 = 1.5 (means: < 1; medians: 4 / 2.5 = 1.6); a second call
    # reuses the measured value
    monkeypatch.delitem(rt._BF16_SPEEDUP, "cpu", raising=False)
    clock = {"t": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    real_conv = rt.torch.nn.functional.conv2d
    # the first call of each is the untimed warm-up
    bf16_times = iter([1.0, 2.5, 50.0, 2.5, 2.0, 2.5, 3.0, 2.5])
    fp32_times = iter([1.0, 4.0, 5.0, 4.0, 3.0, 4.0, 4.0, 5.0])

    def conv(*args, **kwargs):
        clock["t"] += next(bf16_times) if rt.torch.is_autocast_enabled("cpu") else next(fp32_times)
        return real_conv(*args, **kwargs)

    monkeypatch.setattr(rt.torch.nn.functional, "conv2d", conv)
    assert bf16_speedup("cpu") == pytest.approx(1.5)
    monkeypatch.setattr(rt.torch.nn.functional, "conv2d", real_conv)
    assert bf16_speedup("cpu") == pytest.approx(1.5)  # cached: not measured again
    assert bf16_speedup("meta") is None


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


def test_relative_path_is_relative_under_the_working_directory_else_absolute(tmp_path, monkeypatch):
    from condense.provenance import relative_path

    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert relative_path("runs/a") == "runs/a"
    assert relative_path(tmp_path / "work" / "runs" / "b") == "runs/b"
    assert relative_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    assert relative_path(tmp_path / "work" / ".." / "x") == str(tmp_path / "x")


def test_default_precision_reads_the_isa_and_never_times(monkeypatch):
    monkeypatch.setattr(rt, "bf16_speedup", lambda *a, **k: pytest.fail("default_precision timed something"))
    for avx512bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert rt.default_precision("cpu") == want
    assert rt.default_precision("meta") == "fp32"


def test_portable_path_is_relative_to_cwd_then_home(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert prov.portable_path(work / "runs" / "x") == "runs/x"
    assert prov.portable_path(home / ".cache" / "condense") == "~/.cache/condense"
    assert prov.portable_path("/usr/share/datasets/fashion-mnist") == "/usr/share/datasets/fashion-mnist"
