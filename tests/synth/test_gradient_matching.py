"""DC / DSA synthesizers on a tiny fabricated dataset with the real components."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from condense.errors import ConfigError, NonFiniteError
from condense.synth import gradient_matching as gm
from condense.synth._matching import IMAGE_OPTIMIZER_DEFAULTS
from condense.synth.base import SYNTHESIZERS
from condense.synth.gradient_matching import (
    DSAConfig,
    DSAGradientMatching,
    GradientMatching,
    GradientMatchingConfig,
    default_loops,
)
from tests.conftest import make_ctx, make_tiny_data

pytest.importorskip("condense.models")
pytest.importorskip("condense.augment")

REPO = Path(__file__).resolve().parents[2]
K, PER_CLASS, IPC = 4, 20, 2
FAST = {"batch_real": 8, "outer_loop": 2, "inner_loop": 1, "batch_train": 8}


def ctx_for(seed: int = 0, augment: bool = True, **kw: Any):
    data = make_tiny_data(num_classes=K, per_class=PER_CLASS, seed=1)
    return make_ctx(data, ipc=IPC, seed=seed, width=8, depth=2, augment=augment, **kw)


def make(cls: type[GradientMatching], ctx, **overrides: Any) -> GradientMatching:
    cfg = cls.Config(**{**FAST, **overrides})
    return cls(cfg, ctx)


@dataclass
class SpyAug:
    """Delegates to a DSA and records which methods were called."""

    inner: Any
    flip_first: bool = False
    calls: list[str] = field(default_factory=list)

    def sample_per_group(self, *a: Any, **k: Any):
        self.calls.append("sample_per_group")
        return self.inner.sample_per_group(*a, **k)

    def apply_grouped(self, *a: Any, **k: Any):
        self.calls.append("apply_grouped")
        return self.inner.apply_grouped(*a, **k)

    def sample(self, *a: Any, **k: Any):
        self.calls.append("sample")
        return self.inner.sample(*a, **k)

    def apply(self, *a: Any, **k: Any):
        self.calls.append("apply")
        return self.inner.apply(*a, **k)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Non-siamese use (the training engine's per-batch augmentation): sample, then apply."""
        return self.apply(x, self.sample(x.shape[0], generator, device=x.device))


# ---------------------------------------------------------------- registry and configs


def test_registry_and_defaults() -> None:
    assert SYNTHESIZERS.get("dc") is GradientMatching
    assert SYNTHESIZERS.get("dsa") is DSAGradientMatching
    assert issubclass(DSAGradientMatching, GradientMatching)
    dc, dsa = GradientMatchingConfig(), DSAConfig()
    assert (dc.dsa, dc.init, dsa.dsa, dsa.init) == (False, "noise", True, "real")
    assert (dc.iterations, dc.lr_img, dc.momentum, dc.batch_real, dc.lr_net, dc.batch_train) == (
        1000, 0.1, 0.5, 256, 0.01, 256)
    assert default_loops(1) == (1, 1) and default_loops(10) == (10, 50) and default_loops(50) == (50, 10)
    assert default_loops(20) == (20, 25)
    with pytest.raises(ConfigError, match="ipc=7"):
        default_loops(7)


@pytest.mark.parametrize("name,cls", [("dc", GradientMatchingConfig), ("dsa", DSAConfig)])
def test_yaml_matches_config(name: str, cls: type) -> None:
    node = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
    assert node.pop("name") == name
    # bf16: null = the run's precision (condense.config resolves it from precision=fp32|bf16)
    assert node.get("bf16", "absent") is None
    node["bf16"] = cls().bf16
    fields = {f.name for f in dataclasses.fields(cls)}
    # the image-optimizer fields may be absent (their dataclass defaults apply); all others are stated
    assert set(node) <= fields and fields - set(node) <= set(IMAGE_OPTIMIZER_DEFAULTS)
    assert cls(**node) == cls()  # the YAML states exactly the dataclass defaults


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="dis_metric 'l1'; valid: ours, mse, cos"):
        make(GradientMatching, ctx_for(), dis_metric="l1")
    with pytest.raises(ConfigError, match="lr_img"):
        make(GradientMatching, ctx_for(), lr_img=0.0)
    with pytest.raises(ConfigError, match="no augmenter"):
        make(DSAGradientMatching, ctx_for(augment=False))
    ctx = dataclasses.replace(ctx_for(), ipc=3)
    with pytest.raises(ConfigError, match="ipc=3"):
        GradientMatching(GradientMatchingConfig(), ctx)
    synth = GradientMatching(GradientMatchingConfig(outer_loop=3, inner_loop=2), ctx)
    assert (synth.cfg.outer_loop, synth.cfg.inner_loop) == (3, 2)


# ---------------------------------------------------------------- the step


@pytest.mark.parametrize("cls", [GradientMatching, DSAGradientMatching])
def test_step_runs_and_changes_images(cls: type[GradientMatching]) -> None:
    synth = make(cls, ctx_for())
    syn = synth.init_set()
    assert syn.images.shape == (K * IPC, 1, 28, 28) and syn.images.requires_grad
    before = syn.images.detach().clone()
    out = synth.step(syn, 0)
    assert set(out) == {"loss"} and math.isfinite(out["loss"]) and out["loss"] > 0
    assert not torch.equal(before, syn.images.detach())
    assert syn.meta.method == cls.name


def test_flip_doubles_synthetic_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[bool, tuple[int, ...]]] = []
    inner: list[int] = []
    real_pcg, real_train = gm.per_class_grads, gm._train_epochs

    def spy_pcg(model, x, y, **kw):
        shapes.append((kw["create_graph"], tuple(x.shape)))
        return real_pcg(model, x, y, **kw)

    def spy_train(model, opt, images, labels, **kw):
        inner.append(images.shape[0])
        if images.shape[0] > K * IPC:  # flipped: [x; hflip(x)], labels duplicated
            assert torch.equal(labels[: K * IPC], labels[K * IPC:])
            assert torch.equal(images[K * IPC:], images[: K * IPC].flip(-1))
        return real_train(model, opt, images, labels, **kw)

    monkeypatch.setattr(gm, "per_class_grads", spy_pcg)
    monkeypatch.setattr(gm, "_train_epochs", spy_train)
    for flip, s in ((False, IPC), (True, 2 * IPC)):
        shapes.clear(), inner.clear()
        synth = make(DSAGradientMatching, ctx_for(), flip=flip)
        synth.step(synth.init_set(), 0)
        syn_shapes = [shape for graph, shape in shapes if graph]
        real_shapes = [shape for graph, shape in shapes if not graph]
        assert syn_shapes == [(K, s, 1, 28, 28)] * FAST["outer_loop"]
        assert real_shapes == [(K, FAST["batch_real"], 1, 28, 28)] * FAST["outer_loop"]
        assert inner == [K * s]  # one inner phase (not after the last outer loop)
        if flip:
            assert synth._aug.flip_first  # FYI with DSA: flip applied first


def test_dc_ignores_augmenter_dsa_uses_it() -> None:
    from condense.augment import DSA

    spy = SpyAug(DSA())
    dc = make(GradientMatching, dataclasses.replace(ctx_for(), augment=spy))
    dc.step(dc.init_set(), 0)
    assert spy.calls == []
    spy = SpyAug(DSA())
    dsa = make(DSAGradientMatching, dataclasses.replace(ctx_for(), augment=spy))
    dsa.step(dsa.init_set(), 0)
    # siamese views in both matching steps, fresh (non-siamese) DSA in the inner training
    assert spy.calls.count("apply_grouped") == 2 * FAST["outer_loop"]
    assert spy.calls.count("sample_per_group") == FAST["outer_loop"]
    assert spy.calls.count("apply") == 1


def test_batchnorm_network() -> None:
    ctx = dataclasses.replace(ctx_for(), model_name="convnet_bn")
    synth = make(GradientMatching, ctx)
    syn = synth.init_set()
    before = syn.images.detach().clone()
    out = synth.step(syn, 0)
    assert math.isfinite(out["loss"]) and not torch.equal(before, syn.images.detach())


@pytest.mark.parametrize("overrides", [{"bf16": True}, {"dis_metric": "mse"}, {"dis_metric": "cos"}])
def test_variants_run(overrides: dict[str, Any]) -> None:
    synth = make(GradientMatching, ctx_for(), **overrides)
    out = synth.step(synth.init_set(), 0)
    assert math.isfinite(out["loss"])


@pytest.mark.parametrize("other", [{"grad_impl": "vmap"}, {"compile": True}, {"compile": True, "fuse_stem": False}])
def test_same_step_as_eager_loop(other: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """vmap and compile=True (compiled real-batch forward; on a CPU with the fused first block
    of condense.ops.stem unless fuse_stem=False) take the eager loop's step."""
    import condense.ops.stem as stem

    fused_calls: list[int] = []
    real_apply = stem.stem_apply
    monkeypatch.setattr(stem, "stem_apply", lambda *a, **k: fused_calls.append(1) or real_apply(*a, **k))
    results = []
    for kw in ({"grad_impl": "loop"}, other):
        synth = make(DSAGradientMatching, ctx_for(seed=3), **kw)
        syn = synth.init_set()
        out = synth.step(syn, 0)
        results.append((out["loss"], syn.images.detach().clone()))
    # the fused block ran exactly where it should (compile on a CPU, fuse_stem not False)
    assert bool(fused_calls) == (other.get("compile", False) and other.get("fuse_stem") is not False)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


def test_non_finite_raises() -> None:
    synth = make(GradientMatching, ctx_for())
    syn = synth.init_set()
    with torch.no_grad():
        syn.images[0] = float("nan")
    with pytest.raises(NonFiniteError, match="iteration 5"):
        synth.step(syn, 5)


# ---------------------------------------------------------------- state and determinism


def test_state_dict_round_trip() -> None:
    synth = make(DSAGradientMatching, ctx_for())
    syn = synth.init_set()
    synth.step(syn, 0)
    state = synth.state_dict()
    other = make(DSAGradientMatching, ctx_for())
    other.init_set()
    other.load_state_dict(state)
    buf_a = synth.opt.state_dict()["state"][0]["momentum_buffer"]
    buf_b = other.opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf_a, buf_b) and buf_a.abs().sum() > 0


@pytest.mark.parametrize("cls", [GradientMatching, DSAGradientMatching])
def test_deterministic(cls: type[GradientMatching]) -> None:
    runs = []
    for _ in range(2):
        synth = make(cls, ctx_for(seed=7), flip=True)
        syn = synth.init_set()
        losses = [synth.step(syn, it)["loss"] for it in range(2)]
        runs.append((losses, syn.images.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_inner_training_micro_batch_same_update() -> None:
    from condense.models import create_model

    images = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(K).repeat_interleave(3)[:10]
    for name in ("convnet", "convnet_bn"):
        nets = []
        for micro in (0, 3):
            net = create_model(name, 1, K, 28, generator=torch.Generator().manual_seed(1), width=8, depth=2)
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
            gm._train_epochs(net, opt, images, labels, epochs=2, batch_size=8,
                             generator=torch.Generator().manual_seed(2), micro_batch=micro)
            nets.append(net)
        for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- image optimizer: Adam + cosine


ADAM_COSINE = {"opt_img": "adam", "betas_img": [0.5, 0.9], "lr_img": 0.25, "schedule_img": "cosine"}


def test_adam_cosine_steps_once_per_iteration_and_resumes() -> None:
    """The cosine lr advances once per outer iteration (not per outer loop); a run resumed from
    the state after 1 iteration ends on the same images and lr as an uninterrupted one."""
    iters = 3
    a = make(DSAGradientMatching, ctx_for(seed=3), iterations=iters, **ADAM_COSINE)
    syn_a = a.init_set()
    assert isinstance(a.opt, torch.optim.Adam) and a.opt.param_groups[0]["betas"] == (0.5, 0.9)
    lrs = []
    for it in range(iters):
        a.step(syn_a, it)
        lrs.append(a.opt.param_groups[0]["lr"])
    expected = [0.25 * 0.5 * (1 + math.cos(math.pi * t / iters)) for t in range(1, iters + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)

    b = make(DSAGradientMatching, ctx_for(seed=3), iterations=iters, **ADAM_COSINE)
    syn_b = b.init_set()
    b.step(syn_b, 0)
    state, images, rng = b.state_dict(), syn_b.images.detach().clone(), b.ctx.generator.get_state()
    c = make(DSAGradientMatching, ctx_for(seed=11), iterations=iters, **ADAM_COSINE)
    syn_c = c.init_set()
    with torch.no_grad():
        syn_c.images.copy_(images)
    c.ctx.generator.set_state(rng)
    c.load_state_dict(state)
    for it in range(1, iters):
        c.step(syn_c, it)
    assert torch.equal(syn_a.images.detach(), syn_c.images.detach())
    assert c.opt.param_groups[0]["lr"] == a.opt.param_groups[0]["lr"]


def test_default_image_optimizer_is_sgd_with_momentum() -> None:
    synth = make(GradientMatching, ctx_for(augment=False))
    synth.init_set()
    assert isinstance(synth.opt, torch.optim.SGD) and synth.sched is None
    assert synth.opt.param_groups[0]["lr"] == 0.1 and synth.opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ConfigError, match="unknown opt_img 'lbfgs'; valid: sgd, adam"):
        make(GradientMatching, ctx_for(), opt_img="lbfgs")
    with pytest.raises(ConfigError, match="valid: constant, cosine"):
        make(DSAGradientMatching, ctx_for(), schedule_img="linear")


def test_real_batch_capped_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    """The shared real batch: batch_real above the smallest class is capped, warned once."""
    synth = make(GradientMatching, ctx_for(augment=False), batch_real=64)
    syn = synth.init_set()
    real, syn_v = synth.views(syn)
    assert real.shape == (K, PER_CLASS, 1, 28, 28) and syn_v.shape == (K, IPC, 1, 28, 28)
    synth.views(syn)
    assert caplog.text.count("exceeds the smallest class") == 1
