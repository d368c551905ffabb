"""The training engine against plain references: vectorized == sequential, a hand-written SGD
loop, the schedule formulas, the losses, callbacks, resume, targets_fn, micro-batches."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from condense.augment import DSA
from condense.errors import ConfigError
from condense.models import create_model
from condense.train import EpochState, FitConfig, TrainCallback, accuracy, fit, lr_at, per_model_loss


def _make(data, arch="convnet", dtype=torch.float32):
    s = data.spec

    def make(g):
        return create_model(arch, s.channels, s.num_classes, s.im_size, generator=g, width=8, depth=2).to(dtype)

    return make


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("opt,schedule", [("sgd", "step"), ("adam", "cosine"), ("adamw", "constant")])
def test_vectorized_equals_sequential_float64(tiny_data, opt, schedule):
    """K models as one vmapped model == the same K models one by one (float64, relative 1e-10).

    Relative to the weights' norm: Adam divides by sqrt(v), which turns last-bit differences of
    the two summation orders into ~1e-10 absolute differences on the few weights with tiny v.
    """
    cfg = FitConfig(epochs=4, batch_size=32, lr=0.05 if opt == "sgd" else 0.003, optimizer=opt,
                    schedule=schedule, warmup_epochs=1 if schedule == "cosine" else 0)
    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    make = _make(tiny_data, dtype=torch.float64)
    vec = fit(make, (x, y), cfg, seeds=[0, 1, 2], augment=DSA(), vectorize=True)
    seq = fit(make, (x, y), cfg, seeds=[0, 1, 2], augment=DSA(), vectorize=False)
    init = make(torch.Generator().manual_seed(1))
    for k in range(3):
        a, b = _flat(vec.models[k]), _flat(seq.models[k])
        assert a.dtype == torch.float64
        assert float((a - b).norm() / b.norm()) <= 1e-10
        assert float((a - b).abs().max()) <= 1e-8
    # the returned modules are the trained ones (not their initial weights)
    assert float((_flat(vec.models[1]) - _flat(init)).abs().max()) > 1e-3
    for h_vec, h_seq in zip(vec.history, seq.history, strict=True):
        assert h_vec["loss"] == pytest.approx(h_seq["loss"], rel=1e-9)


def test_returned_modules_score_what_the_ensemble_scores(tiny_data):
    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    res = fit(_make(tiny_data, dtype=torch.float64), (x, y), FitConfig(epochs=3, batch_size=32, lr=0.05),
              seeds=[3, 4], vectorize=True)
    tx, ty = tiny_data.test_images.double(), tiny_data.test_labels
    each = accuracy(res.models, tx, ty, vectorize=False)
    together = accuracy(res.models, tx, ty, vectorize=True)
    assert each == together
    with torch.no_grad():
        m = res.models[0].eval()
        assert each[0] == pytest.approx(100.0 * float((m(tx).argmax(1) == ty).double().mean()))


def test_one_model_equals_a_plain_sgd_loop(tiny_data):
    """No augmentation, step schedule: the engine is the textbook loop, bit for bit."""
    cfg = FitConfig(epochs=4, batch_size=20, lr=0.05, momentum=0.9, weight_decay=5e-4,
                    schedule="step", milestones=[0.5], gamma=0.1)
    x, y = tiny_data.train_images, tiny_data.train_labels
    res = fit(_make(tiny_data), (x, y), cfg, seeds=[7])
    g = torch.Generator().manual_seed(7)
    model = _make(tiny_data)(g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for ep in range(4):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (0.1 if ep >= 2 else 1.0)
        perm = torch.randperm(x.shape[0], generator=g)
        for idx in perm.split(20):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.testing.assert_close(_flat(res.models[0]), _flat(model), rtol=0, atol=1e-6)


def test_schedules_follow_their_formulas():
    step = FitConfig(epochs=10, lr=1.0, schedule="step", milestones=[0.5, 0.8], gamma=0.1)
    assert [lr_at(step, e, 0, 5) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = FitConfig(epochs=4, lr=2.0, schedule="cosine")
    total = 4 * 5
    for t in (0, 7, 19):
        assert lr_at(cos, t // 5, t % 5, 5) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * t / total)))
    warm = FitConfig(epochs=4, lr=1.0, schedule="cosine", warmup_epochs=1)
    assert [lr_at(warm, 0, s, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(warm, 1, 0, 4) == pytest.approx(1.0)
    assert lr_at(warm, 3, 3, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 12)))
    assert lr_at(FitConfig(lr=0.3, schedule="constant"), 5, 3, 9) == 0.3


def test_losses_are_ce_and_temperature_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5), generator=g)
    soft = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    ce = per_model_loss(logits, labels, FitConfig())
    for k in range(2):
        assert float(ce[k]) == pytest.approx(float(F.cross_entropy(logits[k], labels[k])), rel=1e-12)
    t = 4.0
    kl = per_model_loss(logits, soft, FitConfig(loss="kl", temperature=t))
    for k in range(2):
        p = F.softmax(soft[k] / t, -1)
        ref = (p * (p.log() - F.log_softmax(logits[k] / t, -1))).sum(-1).mean() * t * t
        assert float(kl[k]) == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(ConfigError, match="kl"):
        per_model_loss(logits, soft, FitConfig(loss="ce"))
    custom = per_model_loss(logits, labels, FitConfig(), loss_fn=lambda z, y: z.sum() * 0 + 3.0)
    assert custom.tolist() == [3.0, 3.0]


def test_targets_fn_sees_the_augmented_batch_and_its_targets_train(tiny_data):
    seen = []

    def augment(xb, g):
        return xb + 1.0

    def targets_fn(xb, yb):
        seen.append((xb.clone(), yb.clone()))
        return F.one_hot(yb, 4).double() * 5.0

    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    cfg = FitConfig(epochs=1, batch_size=32, lr=0.05)
    res = fit(_make(tiny_data, dtype=torch.float64), (x, y), cfg, seeds=[0], augment=augment,
              targets_fn=targets_fn)
    assert len(seen) == 3
    g = torch.Generator().manual_seed(0)
    _make(tiny_data)(g)  # the factory draws the model's init from the model's generator first
    perm = torch.randperm(96, generator=g)
    torch.testing.assert_close(seen[0][0], x[perm[:32]] + 1.0)
    assert torch.equal(seen[0][1], y[perm[:32]])
    # the same training with those soft targets stored instead: same model (KL on the same logits)
    ref = fit(_make(tiny_data, dtype=torch.float64), (x, F.one_hot(y, 4).double() * 5.0), cfg, seeds=[0],
              augment=augment)
    torch.testing.assert_close(_flat(res.models[0]), _flat(ref.models[0]), rtol=0, atol=1e-12)


class _Recorder(TrainCallback):
    def __init__(self):
        self.params: list[list[torch.Tensor]] = []
        self.epochs: list[int] = []

    def on_fit_start(self, state: EpochState) -> None:
        self.epochs.append(state.epoch)
        self.params.append([state.flat_params(k) for k in range(len(state.models))])

    def on_epoch_end(self, state: EpochState) -> None:
        self.epochs.append(state.epoch)
        self.params.append([state.flat_params(k) for k in range(len(state.models))])
        for k, m in enumerate(state.models):  # the modules a callback sees are the current ones
            assert torch.equal(_flat(m), self.params[-1][k])


@pytest.mark.parametrize("vectorize", [False, True])
def test_epoch_callbacks_see_every_epochs_parameters(tiny_data, vectorize):
    x, y = tiny_data.train_images, tiny_data.train_labels
    cfg = FitConfig(epochs=3, batch_size=32, lr=0.05, schedule="constant")
    rec = _Recorder()
    res = fit(_make(tiny_data), (x, y), cfg, seeds=[0, 1], vectorize=vectorize, callbacks=[rec])
    assert rec.epochs == [0, 1, 2, 3]
    init = _make(tiny_data)(torch.Generator().manual_seed(1))
    assert torch.equal(rec.params[0][1], _flat(init))
    for k in range(2):
        assert torch.equal(rec.params[-1][k], _flat(res.models[k]))
    short = fit(_make(tiny_data), (x, y), FitConfig(epochs=2, batch_size=32, lr=0.05, schedule="constant"),
                seeds=[0, 1], vectorize=vectorize)
    for k in range(2):
        assert torch.equal(rec.params[2][k], _flat(short.models[k]))


class _StopAt(TrainCallback):
    def __init__(self, epoch: int):
        self.epoch = epoch
        self.saved = None

    def on_epoch_end(self, state: EpochState) -> None:
        if state.epoch == self.epoch:
            buf = io.BytesIO()
            torch.save(state.checkpoint(), buf)
            self.saved = buf.getvalue()


@pytest.mark.parametrize("vectorize,opt", [(False, "sgd"), (True, "adam")])
def test_resume_from_a_checkpoint_gives_the_same_bytes(tiny_data, vectorize, opt):
    x, y = tiny_data.train_images, tiny_data.train_labels
    cfg = FitConfig(epochs=4, batch_size=32, lr=0.01, optimizer=opt, schedule="cosine")
    stop = _StopAt(2)
    full = fit(_make(tiny_data), (x, y), cfg, seeds=[0, 1], augment=DSA(), vectorize=vectorize, callbacks=[stop])
    state = torch.load(io.BytesIO(stop.saved), weights_only=True)
    assert state["epoch"] == 2
    resumed = fit(_make(tiny_data), (x, y), cfg, seeds=[0, 1], augment=DSA(), vectorize=vectorize,
                  resume=state)
    for a, b in zip(full.models, resumed.models, strict=True):
        assert torch.equal(_flat(a), _flat(b))
    assert resumed.history == full.history


def test_micro_batches_accumulate_the_same_gradient(tiny_data):
    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    base = dict(epochs=2, batch_size=48, lr=0.05)
    one = fit(_make(tiny_data, dtype=torch.float64), (x, y), FitConfig(**base), seeds=[0])
    micro = fit(_make(tiny_data, dtype=torch.float64), (x, y), FitConfig(**base, micro_batch=10), seeds=[0])
    assert float((_flat(one.models[0]) - _flat(micro.models[0])).abs().max()) <= 1e-12


def test_an_iterable_of_batches_and_a_continued_optimizer(tiny_data):
    x, y = tiny_data.train_images, tiny_data.train_labels
    batches = list(zip(x.split(32), y.split(32), strict=True))
    model = _make(tiny_data)(torch.Generator().manual_seed(0))
    res = fit(model, batches, FitConfig(epochs=5, lr=0.05, schedule="cosine"), seeds=[0])
    assert res.models[0] is model and len(res.history) == 5
    assert res.history[-1]["loss"][0] < res.history[0]["loss"][0]
    with pytest.raises(ConfigError, match="sized"):
        fit(model, iter(batches), FitConfig(epochs=1, schedule="cosine"), seeds=[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.123)
    fit(model, (x, y), FitConfig(epochs=1, schedule="constant", lr=9.0), seeds=[0], optimizer=opt)
    assert opt.param_groups[0]["lr"] == 0.123  # a continued optimizer keeps its learning rate


def test_batchnorm_models_train_one_by_one(tiny_data):
    """BatchNorm: vectorize is ignored (one model after another) and micro_batch too (batch
    statistics depend on the forward's batch): the same bytes as the plain sequential run without
    micro-batches, running statistics included."""
    x, y = tiny_data.train_images, tiny_data.train_labels
    asked = fit(_make(tiny_data, "convnet_bn"), (x, y), FitConfig(epochs=2, batch_size=32, micro_batch=8),
                seeds=[0, 1], vectorize=True)
    plain = fit(_make(tiny_data, "convnet_bn"), (x, y), FitConfig(epochs=2, batch_size=32), seeds=[0, 1])
    init = _make(tiny_data, "convnet_bn")(torch.Generator().manual_seed(0))
    for a, b in zip(asked.models, plain.models, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    stats = [k for k in init.state_dict() if k.endswith("running_mean")]
    assert stats and not torch.equal(asked.models[0].state_dict()[stats[0]], init.state_dict()[stats[0]])


def test_bad_settings_name_the_choices(tiny_data):
    with pytest.raises(ConfigError, match="valid choices: sgd, adam, adamw"):
        FitConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="valid choices: constant, step, cosine"):
        FitConfig(schedule="poly")
    with pytest.raises(ConfigError, match="seeds"):
        fit(_make(tiny_data), (tiny_data.train_images, tiny_data.train_labels), FitConfig())
    with pytest.raises(ConfigError, match="one per model"):
        fit([_make(tiny_data)(torch.Generator())] * 2, (tiny_data.train_images, tiny_data.train_labels),
            FitConfig(), seeds=[0])
