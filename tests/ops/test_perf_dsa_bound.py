"""The DSA budget-bound script end to end at a toy size: its derived fields follow from its
measurements (no timing is asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[2] / "benchmarks" / "perf"


@pytest.fixture
def bound_module(monkeypatch):
    monkeypatch.syspath_prepend(str(PERF))
    import dsa_budget_bound

    yield dsa_budget_bound
    for name in ("_common", "gradient_matching", "dsa_budget_bound"):
        sys.modules.pop(name, None)


def test_dsa_budget_bound_tiny(bound_module, tmp_path):
    out = tmp_path / "bound.json"
    rec = bound_module.main(["--classes", "2", "--batches", "4", "8", "--repeats", "1", "--width", "8",
                             "--fp32", "--no-compile", "--deadline", "5", "--out", str(out)])
    assert json.loads(out.read_text())["name"] == "dsa_ipc1_budget_bound"
    assert rec["kind"] == "study" and isinstance(rec["question"], str)
    best = rec["best_conv_gflops"]
    assert best == max(rec["conv_gflops"].values()) and best > 0
    small, big = rec["batches"]["4"], rec["batches"]["8"]
    assert 0 < small["flops_per_iteration"] < big["flops_per_iteration"]
    for b in (small, big):
        assert b["projected_1000_s"] == pytest.approx(1000 * b["s_per_iteration"])
        assert b["bound_1000_s"] == pytest.approx(1000 * b["flops_per_iteration"] / (best * 1e9))
        assert b["fits_measured"] == (b["projected_1000_s"] <= 5)
        assert b["fits_bound"] == (b["bound_1000_s"] <= 5)
        assert b["iterations_in_deadline"] == int(5 // b["s_per_iteration"])
    assert 0 < rec["time_split"]["conv_share"] < 1
    assert big["conv_kernels_1000_s"] == pytest.approx(rec["time_split"]["conv_share"] * big["projected_1000_s"])
    # the Winograd floor: conv2 and conv3 of the real side at the biggest batch (2 classes x 8)
    wino = rec["winograd_floor"]
    # 28x28 images: the first conv pads by 3, so conv2 / conv3 run at 16x16 / 8x8 (not 14 / 7)
    assert [(layer["size"], layer["images"], layer["channels"]) for layer in wino] == [(16, 16, 8), (8, 16, 8)]
    assert all(layer["flop_ratio"] == pytest.approx(2.25) for layer in wino)  # even sizes: exact 2x2 tiles
    for layer in wino:
        assert set(layer["gemm_s"]) == {"forward", "input_grad", "weight_grad"}
        t = (layer["size"] + 1) // 2  # 2x2 output tiles per side; 4x4 input tiles at stride 2
        elems = 2 * 16 * 8 * (2 * t + 2) ** 2 + 2 * 16 * 8 * layer["size"] ** 2 + 4 * 16 * 16 * t * t * 8
        assert layer["transform_bytes"] == 4 * elems  # fp32 here
        assert layer["transform_s"] == pytest.approx(layer["transform_bytes"] / (rec["copy_gbps"] * 1e9))
        assert layer["floor_s"] == pytest.approx(sum(layer["gemm_s"].values()) + layer["transform_s"])
        assert layer["saving_s"] == pytest.approx(max(0.0, layer["stock_s"] - layer["floor_s"]))
    saving = 1000 * sum(layer["saving_s"] for layer in wino)
    assert big["winograd_saving_1000_s"] == pytest.approx(saving)
    assert big["projected_1000_s_winograd_floor"] == pytest.approx(big["projected_1000_s"] - saving)


def test_make_synth_uses_the_batch(bound_module):
    data, _ = bound_module.load_data("no_such_dataset_here")  # random tensors of Fashion-MNIST's shape
    synth, syn = bound_module.make_synth(data, 16, bf16=False, compile=False, width=8)
    assert synth.cfg.batch_real == 16 and synth.cfg.dsa and synth.ctx.ipc == 1
    assert syn.images.shape[0] == data.spec.num_classes


@pytest.mark.parametrize(("im_size", "expected"), [((28, 28), [16, 8]), ((32, 32), [16, 8]), ((20, 20), [10, 5])])
def test_square_conv_sizes_follow_the_network(bound_module, im_size, expected):
    """The Winograd floor's layer sizes are what the matching network runs (28x28 inputs are padded
    to 32x32 maps by the first conv), read off a forward pass, not derived from the image size."""
    import dataclasses

    import torch

    data, _ = bound_module.load_data("no_such_dataset_here")
    spec = dataclasses.replace(data.spec, im_size=im_size)
    k = data.spec.num_classes
    images = torch.zeros(k, data.spec.channels, *im_size)
    data = dataclasses.replace(data, spec=spec, train_images=images, train_labels=torch.arange(k))
    synth, _ = bound_module.make_synth(data, 1, bf16=False, compile=False, width=8)
    assert bound_module.square_conv_sizes(synth, images[:1]) == expected


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_gflops_layout(bound_module, monkeypatch, channels_last):
    """``channels_last`` reaches the timed convolution (the Winograd floor's stock side runs the
    step's layout), forward and backward."""
    import torch

    seen = []
    conv2d = torch.nn.functional.conv2d

    def spy(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    for backward in (False, True):
        rate = bound_module.conv_gflops(bf16=False, backward=backward, batch=2, channels=4, size=6, repeats=1,
                                        channels_last=channels_last)
        assert rate > 0
    assert seen and all(s == channels_last for s in seen)
