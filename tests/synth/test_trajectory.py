"""The trajectory family (condense.synth.trajectory): TESLA's gradient against the full unroll,
the student against a hand-flattened network, DATM's window and labels, AST's switches, the
learned lr / soft labels / EMA reaching the artifact and the evaluator."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from condense.augment import DSA
from condense.errors import ConfigError
from condense.models import create_model
from condense.synth import SYNTHESIZERS
from condense.synth.trajectory import (
    Student,
    Unroll,
    balanced_scale,
    checkpoints,
    full_unroll,
    perturb_conv_weights,
    tesla_unroll,
)
from tests.conftest import make_ctx


def _student(dtype=torch.float64, width=4, depth=2):
    model = create_model("convnet", 1, 4, (28, 28), generator=torch.Generator().manual_seed(0), width=width,
                         depth=depth).to(dtype)
    layout = [(n, list(p.shape)) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return Student(model, layout), flat


def _problem(n=8, soft=False, steps=1, augment=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    student, start = _student()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=start.dtype)
    images = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = (torch.randn(n, 4, generator=g, dtype=torch.float64) if soft
              else torch.arange(n) % 4)
    if soft:
        labels.requires_grad_(True)
    batches = [torch.randperm(n, generator=g)[: n // 2] for _ in range(steps)]
    dsa = DSA()
    seeds = [int(s) for s in torch.randint(0, 2**31, (steps,), generator=g)]

    def aug(i, x):
        return dsa(x, torch.Generator().manual_seed(seeds[i]))

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    u = Unroll(images, labels, batches, aug if augment else None)
    return student, start, target, lr, u


def _grads(fn, *leaves):
    return [None if t.grad is None else t.grad.clone() for t in leaves]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("soft", [False, True])
def test_tesla_equals_the_full_unroll_at_one_step(soft):
    """float64, relative 1e-10: image, lr (and label) gradients are MTT's exactly for syn_steps = 1."""
    student, start, target, lr, u = _problem(soft=soft, steps=1)
    full_unroll(student, start, {1: target}, lr, u).backward()
    full = [u.images.grad.clone(), lr.grad.clone()] + ([u.targets.grad.clone()] if soft else [])
    for t in (u.images, lr, u.targets):
        t.grad = None
    tesla_unroll(student, start, {1: target}, lr, u, [u.images, u.targets])
    ours = [u.images.grad, lr.grad] + ([u.targets.grad] if soft else [])
    for a, b in zip(ours, full, strict=True):
        assert float(b.norm()) > 0
        assert _rel(a, b) <= 1e-10


def test_tesla_beyond_one_step_is_an_approximation_close_in_direction():
    """syn_steps = 5: the dropped cross-step terms change the gradient, but it points the same way
    (the cosine is reported in benchmarks/perf/trajectory_memory.py and NOTES.md)."""
    student, start, target, lr, u = _problem(steps=5)
    full_unroll(student, start, {5: target}, lr, u).backward()
    full = u.images.grad.clone()
    u.images.grad = None
    tesla_unroll(student, start, {5: target}, lr, u, [u.images])
    cos = float(F.cosine_similarity(u.images.grad.flatten(), full.flatten(), dim=0))
    assert 0.5 < cos < 1.0 - 1e-12


def test_student_equals_a_hand_flattened_network():
    """functional_call over the sliced flat vector == the ConvNet written out with F.conv2d."""
    student, flat = _student(width=4, depth=1)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    p = student.params(flat)
    h = F.conv2d(x, p["features.0.0.weight"], p["features.0.0.bias"], padding=3)
    h = F.group_norm(h, 4, p["features.0.1.weight"], p["features.0.1.bias"], eps=1e-5)
    h = F.avg_pool2d(F.relu(h), 2)
    ref = F.linear(h.flatten(1), p["classifier.weight"], p["classifier.bias"])
    assert torch.allclose(student(flat, x), ref, rtol=0, atol=1e-12)


def test_full_unroll_loss_is_the_normalised_distance_of_plain_sgd():
    student, start, target, lr, u = _problem(steps=3, augment=False)
    loss = full_unroll(student, start, {3: target}, lr, u)
    theta = start.clone()
    for i in range(3):
        p = theta.clone().requires_grad_(True)
        x, y = u.batch(i)
        (g,) = torch.autograd.grad(F.cross_entropy(student(p, x), y), p)
        theta = theta - 0.05 * g
    want = (theta - target).pow(2).sum() / (start - target).pow(2).sum()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-12)


def test_ast_pieces():
    assert balanced_scale(10, 20) == pytest.approx(math.log(8, 5))
    assert balanced_scale(0, 20) == pytest.approx(1 / math.log(18, 5))
    assert checkpoints(30, 2, False) == [30] and checkpoints(30, 3, True) == [10, 20, 30]
    student, flat = _student()
    alpha = 0.3
    out = perturb_conv_weights(flat, student, alpha, torch.Generator().manual_seed(0))
    # the exact formula, conv weights in layout order drawing from one generator: W (1 + alpha d / ||d||)
    g = torch.Generator().manual_seed(0)
    before, after = student.params(flat), student.params(out)
    for name, w in before.items():
        if w.dim() == 4:
            d = torch.randn(w.numel(), generator=g).to(w).reshape(w.shape)
            torch.testing.assert_close(after[name], w + alpha * d / d.norm() * w, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(after[name], w), name  # biases, norms, the classifier: untouched
    assert any(w.dim() == 4 for w in before.values())


def _synth(name, tiny_data, tmp_path, ipc=2, **kw):
    ctx = make_ctx(tiny_data, ipc=ipc, cache_dir=tmp_path)
    cls = SYNTHESIZERS.get(name)
    base = {"num_experts": 2, "expert_train_epochs": 3, "max_start_epoch": 2, "syn_steps": 3}
    if name == "datm":
        base["current_max_start_epoch"] = 1
    return cls(cls.Config(**{**base, **kw}), ctx)


def test_datm_window_widens_and_labels_start_from_correct_experts(tiny_data, tmp_path):
    s = _synth("datm", tiny_data, tmp_path, expansion_end=10, max_start_epoch=3, current_max_start_epoch=1,
               expert_train_epochs=4)
    assert [s.start_window(it) for it in (0, 5, 10, 50)] == [(0, 1), (0, 2), (0, 3), (0, 3)]
    s.prepare()
    syn = s.init_set()
    assert syn.soft and syn.labels.shape == (8, 4) and syn.labels.requires_grad
    # every initial image is classified correctly (by its own soft label, the experts' mean logits)
    assert syn.labels.argmax(1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    before = syn.labels.detach().clone()
    for it in range(3):
        s.step(syn, it)
    assert not torch.equal(before, syn.labels.detach())  # labels are learned
    out = s.finalize(syn)
    assert out.meta.extra["label_temperature"] == 1.0


def test_ftd_exports_the_moving_average(tiny_data, tmp_path):
    s = _synth("ftd", tiny_data, tmp_path, ema_decay=0.5, lr_img=1000.0)
    s.prepare()
    syn = s.init_set()
    start = syn.images.detach().clone()
    ema = start.clone()
    for it in range(2):
        s.step(syn, it)
        ema = 0.5 * ema + 0.5 * syn.images.detach()
    out = s.finalize(syn)
    assert torch.allclose(out.images, ema) and not torch.equal(out.images, syn.images.detach())
    assert s.experts.manifest["fit"]["sam"] == "gsam"


@pytest.mark.parametrize("lr_param", ["direct", "log"])
def test_the_step_size_is_learned_and_stays_positive(tiny_data, tmp_path, lr_param):
    s = _synth("mtt", tiny_data, tmp_path, lr_param=lr_param, lr_lr=1e-3, lr_teacher=0.01)
    s.prepare()
    syn = s.init_set()
    for it in range(3):
        s.step(syn, it)
    out = s.finalize(syn)
    assert out.lr is not None and float(out.lr) > 0 and float(out.lr) != pytest.approx(0.01, abs=1e-9)


def test_kmeans_init_takes_one_image_near_each_centre(tiny_data, tmp_path):
    s = _synth("mtt", tiny_data, tmp_path, init="kmeans", ipc=1)
    s.prepare()
    state = s.ctx.generator.get_state()
    syn = s.init_set()
    assert syn.images.shape[0] == 4
    # the image k-means on expert 0's final logits picks, class by class, from the same draws
    from condense.synth.selection import kmeans_select

    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    for c in range(4):
        pool = tiny_data.train_images[s.ctx.index.indices_of(c)]
        pick = kmeans_select(s.expert_logits(0, s.experts.epochs, pool), 1, g)
        assert torch.equal(syn.images[c], pool[pick[0]])


def test_bad_settings_name_the_valid_choices(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown unroll 'tes'.*full, tesla"):
        _synth("mtt", tiny_data, tmp_path, unroll="tes")
    with pytest.raises(ConfigError, match="expert_train_epochs"):
        _synth("mtt", tiny_data, tmp_path, max_start_epoch=3, expert_epochs=2, expert_train_epochs=3)
    with pytest.raises(ConfigError, match="zca_reg"):
        _synth("mtt", tiny_data, tmp_path, zca=True, zca_reg=-1.0)
    with pytest.raises(ConfigError, match="current_max_start_epoch"):
        _synth("datm", tiny_data, tmp_path, current_max_start_epoch=5)


def test_zca_sets_live_in_the_whitened_space_and_the_evaluator_whitens_its_test_images(tiny_data, tmp_path):
    from condense.artifacts import load_synset, save_synset
    from condense.data import ZCA
    from condense.eval import EvalConfig, Evaluator

    s = _synth("mtt", tiny_data, tmp_path, zca=True, zca_reg=0.1)
    s.prepare()
    syn = s.init_set()
    zca = ZCA.fit(tiny_data.train_images, 0.1)
    # the initial images are whitened real images of their class
    white = zca.apply(tiny_data.train_images)
    for i, c in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        assert bool((white[tiny_data.train_labels == c] - syn.images[i]).flatten(1).abs().amax(1).lt(1e-5).any())
    s.step(syn, 0)
    out = s.finalize(syn)
    assert out.meta.zca and torch.allclose(out.zca_matrix, zca.matrix) and out.meta.extra["zca_reg"] == 0.1
    save_synset(out, tmp_path / "run")
    back = load_synset(tmp_path / "run")
    ev = Evaluator(EvalConfig(num_models=1, epochs=2, dsa=False), tiny_data)
    w = ev.whitened(back)
    assert torch.allclose(w.data.test_images, zca.apply(tiny_data.test_images))
    assert ev.evaluate(back).summary["convnet"]["n"] == 1
    # a set whitened on other data is refused
    other = dataclasses.replace(back, zca_matrix=back.zca_matrix * 1.5)
    with pytest.raises(ConfigError, match="does not match"):
        ev.evaluate(other)
