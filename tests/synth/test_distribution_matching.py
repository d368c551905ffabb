"""DM and DataDAM: batched losses against a per-class loop reference, and the synthesizer contract."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from condense.errors import ConfigError, NonFiniteError
from condense.ops.mmd import class_mmd, group_means, mean_sq_distance
from condense.synth._matching import IMAGE_OPTIMIZER_DEFAULTS
from condense.synth.base import SYNTHESIZERS, SynthContext
from condense.synth.distribution_matching import (
    AttentionMatching,
    DistributionMatching,
    DMConfig,
    datadam_loss,
    dm_loss,
)
from condense.types import DatasetSpec, RealData

models = pytest.importorskip("condense.models")
data_mod = pytest.importorskip("condense.data")
augment = pytest.importorskip("condense.augment")

K, N_PER_CLASS, IPC = 4, 20, 2
REPO = Path(__file__).resolve().parents[2]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- kernels


def test_group_means_and_distance() -> None:
    x = torch.arange(12.0).reshape(6, 2)  # 3 groups of 2 rows
    torch.testing.assert_close(group_means(x, 3), torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]))
    assert group_means(x.bfloat16(), 3).dtype == torch.float32
    with pytest.raises(ConfigError, match="cannot be split"):
        group_means(x, 4)
    y = torch.zeros(3, 2)  # 3 groups of 1 row (ipc 1: must not be read as (G, B))
    assert class_mmd(x, y, 3).item() == pytest.approx(1 + 4 + 25 + 36 + 81 + 100)
    with pytest.raises(ConfigError, match="shapes differ"):
        mean_sq_distance(torch.zeros(2, 3), torch.zeros(3, 3))


# ---------------------------------------------------------------- reference: per-class loop


def _net(seed: int = 0, **kw: object) -> nn.Module:
    net = models.create_model("convnet", 1, K, (28, 28), generator=gen(seed), width=8, **kw)
    return net.double().requires_grad_(False)


def _blocks_forward(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Obvious forward of a ConvNet: every block's pre-pool map, and the embedding."""
    maps = []
    for block in net.features:
        for layer in block:
            if isinstance(layer, (nn.AvgPool2d, nn.MaxPool2d)):
                maps.append(x)
            x = layer(x)
    return maps, x.flatten(1)


def _attention(f: torch.Tensor, p: float) -> torch.Tensor:
    a = (f.abs() ** p).sum(1).reshape(f.shape[0], -1)
    return a / a.norm(dim=1, keepdim=True)


def _loop_loss(net, real, syn, *, datadam: bool, power: float = 4.0, lam: float = 0.01, factor: float = 100.0):
    attn, emb = 0.0, 0.0
    for c in range(real.shape[0]):
        with torch.no_grad():
            maps_r, emb_r = _blocks_forward(net, real[c])
        maps_s, emb_s = _blocks_forward(net, syn[c])
        emb = emb + ((emb_r.mean(0) - emb_s.mean(0)) ** 2).sum()
        for fr, fs in zip(maps_r[:-1], maps_s[:-1], strict=True):
            attn = attn + ((_attention(fr, power).mean(0) - _attention(fs, power).mean(0)) ** 2).sum()
    return factor * (attn + lam * emb) if datadam else emb


def _draw(b: int = 6, s: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.randn(K, b, 1, 28, 28, generator=gen(1), dtype=torch.float64)
    syn = torch.randn(K, s, 1, 28, 28, generator=gen(2), dtype=torch.float64).requires_grad_(True)
    return real, syn


def _grad(loss: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, syn)
    return g


@pytest.mark.parametrize("chunk", [0, 3])
def test_dm_loss_equals_per_class_loop(chunk: int) -> None:
    net = _net()
    real, syn = _draw()
    ours = dm_loss(net, real, syn, chunk_classes=chunk)["loss"]
    ref = _loop_loss(net, real, syn, datadam=False)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(ours, syn), _grad(_loop_loss(net, real, syn, datadam=False), syn))


@pytest.mark.parametrize("power", [1.0, 4.0])
def test_datadam_loss_equals_per_class_loop(power: float) -> None:
    from condense.ops.features import pre_pool

    net = _net()
    real, syn = _draw()
    modules = [pre_pool(m) for m in net.feature_modules()[:-1]]
    kw = dict(modules=modules, power=power, lambda_mmd=0.01, factor=100.0)
    terms = datadam_loss(net, real, syn, **kw)
    ref = _loop_loss(net, real, syn, datadam=True, power=power)
    torch.testing.assert_close(terms["loss"], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        terms["loss"], 100.0 * (terms["loss_attention"] + 0.01 * terms["loss_embed"])
    )
    g_ref = _grad(_loop_loss(net, real, syn, datadam=True, power=power), syn)
    torch.testing.assert_close(_grad(datadam_loss(net, real, syn, **kw)["loss"], syn), g_ref)


@pytest.mark.slow
@pytest.mark.parametrize("fuse_stem", [True, False, None])
def test_compiled_real_pass_matches_eager(fuse_stem: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import condense.ops.stem as stem

    fused_calls: list[int] = []
    real_apply = stem.stem_apply
    monkeypatch.setattr(stem, "stem_apply", lambda *a, **k: fused_calls.append(1) or real_apply(*a, **k))
    net = models.create_model("convnet", 1, K, (28, 28), generator=gen(0), width=8).requires_grad_(False)
    real, syn = (t.detach().float() for t in _draw())
    syn.requires_grad_(True)
    eager = dm_loss(net, real, syn)["loss"]
    compiled = dm_loss(net, real, syn, compile=True, chunk_classes=3, fuse_stem=fuse_stem)["loss"]
    assert bool(fused_calls) == (fuse_stem is not False)  # None = on a CPU: fused here
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grad(compiled, syn), _grad(dm_loss(net, real, syn)["loss"], syn))


def test_bf16_loss_close_to_fp32() -> None:
    net = models.create_model("convnet", 1, K, (28, 28), generator=gen(0), width=8)
    real, syn = (t.detach().float() for t in _draw())
    full = dm_loss(net, real, syn)["loss"].item()
    half = dm_loss(net, real, syn, bf16=True)["loss"].item()
    assert half == pytest.approx(full, rel=0.1)


# ---------------------------------------------------------------- synthesizer contract


@pytest.fixture(scope="module")
def real_data() -> RealData:
    spec = DatasetSpec("fake", 1, (28, 28), K, tuple("abcd"), (0.5,), (0.5,))
    x = torch.randn(K * N_PER_CLASS, 1, 28, 28, generator=gen(0))
    y = torch.arange(K).repeat_interleave(N_PER_CLASS)[torch.randperm(K * N_PER_CLASS, generator=gen(1))]
    return RealData(spec, x, y, x[:8].clone(), y[:8].clone())


def _ctx(real_data: RealData, seed: int = 3, dsa: bool = True, ipc: int = IPC) -> SynthContext:
    return SynthContext(
        data=real_data,
        index=data_mod.ClassIndex(real_data.train_labels, K),
        ipc=ipc,
        seed=seed,
        device=torch.device("cpu"),
        generator=gen(seed),
        model_kwargs={"width": 8},
        augment=augment.DSA() if dsa else None,
    )


def _synth(name: str, real_data: RealData, seed: int = 3, **cfg: object):
    cls = SYNTHESIZERS.get(name)
    return cls(cls.Config(batch_real=8, **cfg), _ctx(real_data, seed))


METHODS = ["dm", "datadam"]


@pytest.mark.parametrize("name", METHODS)
def test_init_and_step(name: str, real_data: RealData) -> None:
    s = _synth(name, real_data)
    syn = s.init_set()
    assert syn.images.shape == (K * IPC, 1, 28, 28) and syn.images.requires_grad
    assert syn.labels.tolist() == [c for c in range(K) for _ in range(IPC)]
    assert syn.meta.method == name and syn.meta.config["lr_img"] == 1.0
    before = syn.images.detach().clone()
    logs = s.step(syn, 0)
    assert set(logs) >= {"loss"} and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert not torch.equal(before, syn.images.detach())
    if name == "datadam":
        assert set(logs) == {"loss", "loss_attention", "loss_embed"}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("flip", [False, True])
def test_two_forwards_and_flip_doubles_syn_batch(name: str, flip: bool, real_data: RealData, monkeypatch) -> None:
    s = _synth(name, real_data, flip=flip)
    syn = s.init_set()
    seen: list[int] = []
    make = s.matching_model

    def spy() -> nn.Module:
        model = make()
        model.features[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        return model

    monkeypatch.setattr(s, "matching_model", spy)
    s.step(syn, 0)
    assert seen == [K * 8, K * IPC * (2 if flip else 1)]  # one real forward, one synthetic


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_images(name: str, real_data: RealData) -> None:
    runs = []
    for _ in range(2):
        s = _synth(name, real_data, seed=7)
        syn = s.init_set()
        for it in range(2):
            s.step(syn, it)
        runs.append(syn.images.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name: str, real_data: RealData) -> None:
    a = _synth(name, real_data, seed=5)
    syn_a = a.init_set()
    for it in range(2):
        a.step(syn_a, it)
    state = copy.deepcopy(a.state_dict())
    images = syn_a.images.detach().clone()
    gen_state = a.ctx.generator.get_state()
    a.step(syn_a, 2)

    b = _synth(name, real_data, seed=99)
    syn_b = b.init_set()
    with torch.no_grad():
        syn_b.images.copy_(images)
    b.ctx.generator.set_state(gen_state)
    b.load_state_dict(state)
    b.step(syn_b, 2)
    assert torch.equal(syn_a.images.detach(), syn_b.images.detach())


def test_config_validation_and_lr_by_ipc(real_data: RealData) -> None:
    with pytest.raises(ConfigError, match="ctx.augment is None"):
        DistributionMatching(DistributionMatching.Config(), _ctx(real_data, dsa=False))
    with pytest.raises(ConfigError, match="unknown init"):
        DistributionMatching(DistributionMatching.Config(init="zeros"), _ctx(real_data))
    with pytest.raises(ConfigError, match="batch_real"):
        DistributionMatching(DistributionMatching.Config(batch_real=0), _ctx(real_data))
    with pytest.raises(ConfigError, match="power"):
        AttentionMatching(AttentionMatching.Config(power=0), _ctx(real_data))
    with pytest.raises(ConfigError, match="compile=true is not supported"):
        AttentionMatching(AttentionMatching.Config(compile=True), _ctx(real_data))
    lr = lambda cls, ipc: cls(cls.Config(), _ctx(real_data, ipc=ipc)).cfg.lr_img  # noqa: E731
    assert (lr(DistributionMatching, 50), lr(DistributionMatching, 100)) == (1.0, 10.0)
    assert (lr(AttentionMatching, 50), lr(AttentionMatching, 51)) == (1.0, 10.0)
    s = DistributionMatching(DistributionMatching.Config(lr_img=3.0), _ctx(real_data, ipc=100))
    assert s.cfg.lr_img == 3.0


def test_without_dsa_and_batch_capped(real_data: RealData, caplog) -> None:
    s = DistributionMatching(DistributionMatching.Config(dsa=False, batch_real=256), _ctx(real_data, dsa=False))
    syn = s.init_set()
    real, syn_v = s.views(syn)
    assert real.shape == (K, N_PER_CLASS, 1, 28, 28) and syn_v.shape == (K, IPC, 1, 28, 28)
    assert "exceeds the smallest class" in caplog.text
    assert torch.isfinite(torch.tensor(s.step(syn, 0)["loss"]))


def test_datadam_bad_layer_and_non_finite(real_data: RealData) -> None:
    s = _synth("datadam", real_data, layers=[5])
    syn = s.init_set()
    with pytest.raises(ConfigError, match="layer index 5"):
        s.step(syn, 0)
    s = _synth("dm", real_data)
    syn = s.init_set()
    with torch.no_grad():
        syn.images[0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss became nan"):
        s.step(syn, 0)


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_matches_config(name: str) -> None:
    yaml = pytest.importorskip("yaml")
    path = REPO / "conf" / "method" / f"{name}.yaml"
    node = yaml.safe_load(path.read_text())
    assert node.pop("name") == name
    cls = SYNTHESIZERS.get(name)
    defaults = dataclasses.asdict(cls.Config())
    # bf16: null = the run's precision (condense.config resolves it from precision=fp32|bf16)
    assert node.get("bf16", "absent") is None
    node["bf16"] = defaults["bf16"]
    # The image-optimizer fields (condense.synth._matching) may be absent from the YAML: the
    # dataclass defaults (plain SGD, constant lr) apply then. Every other field is stated.
    missing = set(defaults) - set(node)
    assert missing <= set(IMAGE_OPTIMIZER_DEFAULTS), missing
    assert node == {k: v for k, v in defaults.items() if k in node}
    assert {k: defaults[k] for k in missing} == {k: IMAGE_OPTIMIZER_DEFAULTS[k] for k in missing}


# ---------------------------------------------------------------- against a written-out DM


def _reference_dm(ctx: SynthContext, iters: int, lr: float, momentum: float, batch_real: int) -> torch.Tensor:
    """DM written out with the same random draws: real init, per iteration a fresh frozen
    network, a real batch of every class (capped at the smallest class), one siamese DSA draw,
    mean embeddings, squared distance summed over classes; SGD with momentum by hand."""
    k, ipc, g = ctx.spec.num_classes, ctx.ipc, ctx.generator
    x = ctx.data.train_images[ctx.index.sample(ipc, g).reshape(-1)].clone()
    b = min(batch_real, int(torch.bincount(ctx.data.train_labels).min()))
    buf = None
    for _ in range(iters):
        model = ctx.make_model().requires_grad_(False).train()
        real = ctx.index.gather(ctx.data.train_images, b, g)
        leaf = x.clone().requires_grad_(True)
        params = ctx.augment.sample_per_group(k, 1, g)
        real_v = ctx.augment.apply_grouped(real, params)
        syn_v = ctx.augment.apply_grouped(leaf.view(k, ipc, *x.shape[1:]), params)
        with torch.no_grad():
            r = model.embed(real_v.flatten(0, 1)).reshape(k, b, -1).mean(1)
        s = model.embed(syn_v.flatten(0, 1)).reshape(k, ipc, -1).mean(1)
        (grad,) = torch.autograd.grad((r - s).pow(2).sum(), leaf)
        buf = grad.clone() if buf is None else buf * momentum + grad
        x = x - lr * buf
    return x


@pytest.mark.parametrize("batch_real", [5, 64])
def test_dm_default_steps_equal_written_out_sgd(batch_real: int) -> None:
    """With the default image optimizer (SGD, momentum 0.5, constant lr) three DM iterations give
    exactly the images of the written-out algorithm (also when batch_real is capped)."""
    from tests.conftest import make_ctx, make_tiny_data

    data = make_tiny_data(num_classes=4, per_class=12, seed=3)
    s = DistributionMatching(DMConfig(iterations=3, batch_real=batch_real), make_ctx(data, ipc=2, seed=5))
    syn = s.init_set()
    for it in range(3):
        s.step(syn, it)
    expected = _reference_dm(make_ctx(data, ipc=2, seed=5), 3, lr=1.0, momentum=0.5, batch_real=batch_real)
    assert torch.equal(syn.images.detach(), expected)
    assert isinstance(s.opt, torch.optim.SGD) and s.sched is None and set(s.state_dict()) == {"opt"}


# ---------------------------------------------------------------- image optimizer: Adam + cosine


ADAM_COSINE = {"opt_img": "adam", "betas_img": [0.5, 0.9], "lr_img": 0.25, "schedule_img": "cosine"}


def test_adam_cosine_lr_follows_the_formula(real_data: RealData) -> None:
    iters = 4
    s = _synth("dm", real_data, iterations=iters, **ADAM_COSINE)
    syn = s.init_set()
    assert isinstance(s.opt, torch.optim.Adam) and s.opt.param_groups[0]["betas"] == (0.5, 0.9)
    lrs = [s.opt.param_groups[0]["lr"]]
    for it in range(iters):
        s.step(syn, it)
        lrs.append(s.opt.param_groups[0]["lr"])
    expected = [0.25 * 0.5 * (1 + math.cos(math.pi * t / iters)) for t in range(iters + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs[0] == 0.25 and lrs[-1] == pytest.approx(0.0, abs=1e-15)


def test_adam_first_step_is_lr_times_sign(real_data: RealData) -> None:
    """Adam's bias-corrected first step moves each pixel by ~lr * sign(gradient)."""
    s = _synth("dm", real_data, iterations=4, **ADAM_COSINE)
    syn = s.init_set()
    before = syn.images.detach().clone()
    grads: list[torch.Tensor] = []
    syn.images.register_hook(lambda g: grads.append(g.clone()))
    s.step(syn, 0)
    moved = before - syn.images.detach()
    big = grads[0].abs() > 1e-4  # away from Adam's eps
    torch.testing.assert_close(moved[big], 0.25 * grads[0].sign()[big], rtol=1e-3, atol=1e-6)


def _saved(state: dict) -> dict:
    """Through ``torch.save`` / ``torch.load(weights_only=True)`` as the runner's checkpoints."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", METHODS)
def test_adam_cosine_resume_equals_uninterrupted(name: str, real_data: RealData) -> None:
    iters = 5
    a = _synth(name, real_data, seed=5, iterations=iters, **ADAM_COSINE)
    syn_a = a.init_set()
    for it in range(iters):
        a.step(syn_a, it)

    b = _synth(name, real_data, seed=5, iterations=iters, **ADAM_COSINE)
    syn_b = b.init_set()
    for it in range(2):
        b.step(syn_b, it)
    state, images, gen_state = _saved(b.state_dict()), syn_b.images.detach().clone(), b.ctx.generator.get_state()
    assert set(state) == {"opt", "sched"} and state["sched"]["last_epoch"] == 2

    c = _synth(name, real_data, seed=99, iterations=iters, **ADAM_COSINE)
    syn_c = c.init_set()
    with torch.no_grad():
        syn_c.images.copy_(images)
    c.ctx.generator.set_state(gen_state)
    c.load_state_dict(state)
    assert c.opt.param_groups[0]["lr"] == b.opt.param_groups[0]["lr"]
    assert c.sched.state_dict()["last_epoch"] == 2
    for it in range(2, iters):
        c.step(syn_c, it)
    assert torch.equal(syn_a.images.detach(), syn_c.images.detach())
    assert c.opt.param_groups[0]["lr"] == a.opt.param_groups[0]["lr"]


def test_image_optimizer_config_errors(real_data: RealData) -> None:
    with pytest.raises(ConfigError, match="unknown opt_img 'rmsprop'; valid: sgd, adam"):
        _synth("dm", real_data, opt_img="rmsprop")
    with pytest.raises(ConfigError, match="unknown schedule_img 'step'; valid: constant, cosine"):
        _synth("datadam", real_data, schedule_img="step")
    for betas in ([0.9], [0.9, 1.0], [-0.1, 0.9], "ab"):
        with pytest.raises(ConfigError, match="betas_img"):
            _synth("dm", real_data, betas_img=betas)
