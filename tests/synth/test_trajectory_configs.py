"""The trajectory family's configs: ``budget=paper`` on CIFAR-10 resolves to the published tables
(METHODS.md), and a smoke run of each method works on CIFAR-10 files fabricated in the true format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import condense
from condense.api import compose
from condense.artifacts import load_synset
from condense.config import method_config
from condense.synth.trajectory import resolve_config

MTT_TABLE = {  # ipc: syn_steps, max_start_epoch, lr_img, lr_lr, lr_teacher (MTT's CIFAR-10 table)
    1: (50, 2, 100.0, 1e-7, 0.01), 10: (30, 20, 100.0, 1e-5, 0.001), 50: (30, 40, 1000.0, 1e-5, 0.001)}
DATM_TABLE = {  # ipc: lr_img, batch_syn, lr_y, lr_lr, (min, current, max) window or None, expansion_end
    1: (100.0, 10, 5.0, 1e-7, None), 10: (100.0, 100, 2.0, 1e-5, (0, 10, 20, 1000)),
    50: (1000.0, 500, 2.0, 1e-5, (0, 20, 40, 2000))}


@pytest.mark.parametrize("ipc", [1, 10, 50])
@pytest.mark.parametrize("method", ["mtt", "tesla", "ftd"])
def test_paper_budget_on_cifar10_is_the_published_table(method, ipc):
    cfg, _ = compose(method, "cifar10", ipc, "paper")
    m = resolve_config(method_config(cfg, device="cpu"), ipc)
    steps, max_start, lr_img, lr_lr, lr_teacher = MTT_TABLE[ipc]
    if method == "ftd" and ipc == 50:
        lr_teacher = 0.01
    assert (m.syn_steps, m.max_start_epoch, m.lr_img, m.lr_lr, m.lr_teacher) == (
        steps, max_start, lr_img, lr_lr, lr_teacher)
    assert (m.expert_epochs, m.num_experts, m.expert_train_epochs, m.expert_lr) == (2, 10, 50, 0.01)
    assert m.iterations == 5000 and m.unroll == ("tesla" if method == "tesla" else "full")
    assert (m.expert_sam, m.ema_decay) == (("gsam", 0.999) if method == "ftd" else ("none", 0.0))
    assert m.zca == (ipc in (1, 10))


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_paper_budget_datm_on_cifar10(ipc):
    cfg, _ = compose("datm", "cifar10", ipc, "paper")
    m = method_config(cfg, device="cpu")
    lr_img, batch_syn, lr_y, lr_lr, window = DATM_TABLE[ipc]
    assert (m.lr_img, m.batch_syn, m.lr_y, m.lr_lr, m.syn_steps, m.iterations) == (
        lr_img, batch_syn, lr_y, lr_lr, 80, 10000)
    assert m.soft_labels and m.init == "expert_correct" and m.zca
    if window is None:
        assert not m.sequential and (m.min_start_epoch, m.max_start_epoch, m.skip_threshold) == (0, 4, 1.1)
    else:
        assert m.sequential and (m.min_start_epoch, m.current_max_start_epoch, m.max_start_epoch,
                                 m.expansion_end) == window
        assert m.skip_threshold == 1.0


def _fabricate_cifar10(folder, per_batch=60):
    """CIFAR-10 python batches (bytes keys), every class present in every batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, fh, protocol=2)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck")]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh, protocol=2)


@pytest.mark.parametrize("method", ["mtt", "tesla", "ftd", "datm"])
def test_smoke_run_on_fabricated_cifar10(tmp_path, method):
    _fabricate_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    res = condense.distil(method=method, dataset="cifar10", ipc=1, budget="smoke", run_dir=tmp_path / "run",
                          cache_dir=str(tmp_path / "cache"), progress=False, evaluate=True,
                          **{"dataset.root": str(tmp_path / "data"), "model.kwargs.width": 8,
                             "method.expert_train_size": 0, "method.expert_test_size": 0,
                             "method.init": "real", "eval.test_size": 0, "method.zca": method == "mtt"})
    syn = load_synset(res.run_dir)
    assert syn.images.shape == (10, 3, 32, 32) and syn.lr is not None and float(syn.lr) > 0
    assert res.record["eval"]["protocol"]["learned_lr"] == pytest.approx(float(syn.lr))
    assert syn.soft == (method == "datm")
    assert syn.meta.zca == (method == "mtt")  # ZCA end to end: whitened distillation and evaluation
