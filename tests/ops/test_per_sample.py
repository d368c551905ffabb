"""Per-sample gradients: every backend against ``torch.func`` on every zoo model, and the edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condense.errors import ConfigError
from condense.models import create_model
from condense.ops import per_sample_grad_norms, per_sample_grads
from condense.ops.per_sample import ghost_sqnorm, unsupported_layers, use_ghost

# (registry name, channels, im_size, kwargs): each model family and norm the zoo has
ZOO = [
    ("convnet", 1, 16, {"width": 8}),          # instance norm (GroupNorm(C, C))
    ("convnet_bn", 1, 16, {"width": 8}),
    ("convnet_nn", 3, 16, {"width": 8}),       # no norm
    ("convnet_ln", 1, 16, {"width": 8}),
    ("convnet_gn", 1, 16, {"width": 8}),
    ("lenet", 1, 28, {}),
    ("alexnet", 3, 32, {}),
    ("alexnet_bn", 1, 32, {}),
    ("vgg11", 1, 32, {}),
    ("vgg11_bn", 3, 32, {}),
    ("resnet18", 1, 16, {}),
    ("resnet18_bn", 3, 16, {}),
]


def _model(name: str, ch: int, size: int, kw: dict, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = create_model(name, ch, 10, size, generator=g, **kw).to(dtype)
    with torch.no_grad():  # non-trivial affine weights and running statistics
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def _data(ch: int, size: int, n: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ch, size, size, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float = 0.0) -> float:
    """Relative error; ``scale`` floors the denominator (a weight whose gradient is exactly zero
    in exact arithmetic, e.g. a conv bias right before an instance norm, carries rounding noise)."""
    return float((a - b).norm() / max(float(b.norm()), scale, 1e-30))


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def _scale(grads: dict[str, torch.Tensor], frac: float = 1e-6) -> float:
    return frac * float(_flat(grads).norm())


@pytest.mark.parametrize(("name", "ch", "size", "kw"), ZOO, ids=[z[0] for z in ZOO])
def test_every_backend_equals_func_float64(name: str, ch: int, size: int, kw: dict) -> None:
    net = _model(name, ch, size, kw, torch.float64)
    x, y = _data(ch, size, 3, torch.float64)
    ref = per_sample_grads(net, x, y, backend="func")
    ref_norm = torch.stack([g.flatten(1).square().sum(1) for g in ref.values()]).sum(0).sqrt()
    for backend in ("hooks", "auto"):
        got = per_sample_grads(net, x, y, backend=backend)
        assert list(got) == list(ref)
        for n in ref:
            assert got[n].shape == ref[n].shape, n
            assert _rel(got[n], ref[n], _scale(ref)) < 1e-10, (backend, n)
    for backend in ("func", "hooks", "ghost", "auto"):
        norms = per_sample_grad_norms(net, x, y, backend=backend)
        assert norms.shape == (3,) and norms.dtype == torch.float64
        assert _rel(norms, ref_norm) < 1e-10, backend


@pytest.mark.parametrize(("name", "ch", "size", "kw"), [ZOO[0], ZOO[1], ZOO[-2]], ids=["convnet", "convnet_bn", "resnet18"])
def test_float32_and_batch_of_one(name: str, ch: int, size: int, kw: dict) -> None:
    """float32 against the float64 truth: within 1e-5, or as close as ``func`` itself gets.

    ResNet-18's float32 backward (``func`` included) is ~4e-5 off its float64 gradient, so a
    fixed 1e-5 between two float32 backends would test rounding, not the backend.
    """
    net64 = _model(name, ch, size, kw, torch.float64)
    net = _model(name, ch, size, kw, torch.float64).float()
    for n in (1, 4):
        x64, y = _data(ch, size, n, torch.float64)
        x = x64.float()
        truth = per_sample_grads(net64, x64, y, backend="func")
        ref = per_sample_grads(net, x, y, backend="func")
        bound = max(1e-5, 2 * _rel(_flat(ref).double(), _flat(truth)))
        got = per_sample_grads(net, x, y, backend="hooks")
        assert list(got) == list(ref) and all(got[k].dtype == torch.float32 for k in got)
        assert _rel(_flat(got).double(), _flat(truth)) < bound
        true_norm = _flat(truth).norm(dim=1)
        for backend in ("hooks", "ghost", "auto"):
            assert _rel(per_sample_grad_norms(net, x, y, backend=backend).double(), true_norm) < bound, backend


def test_norms_are_the_norms_of_the_gradients_of_single_samples() -> None:
    """The func reference itself: one plain backward per sample, no vmap."""
    net = _model("convnet", 1, 16, {"width": 8}, torch.float64)
    x, y = _data(1, 16, 3, torch.float64)
    norms = per_sample_grad_norms(net, x, y, backend="auto")
    for i in range(3):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        sq = sum(p.grad.square().sum() for p in net.parameters())
        assert abs(float(sq.sqrt()) - float(norms[i])) < 1e-10 * float(norms[i])


def test_frozen_parameters_and_named_subsets() -> None:
    net = _model("convnet", 1, 16, {"width": 8}, torch.float64)
    x, y = _data(1, 16, 3, torch.float64)
    first = next(n for n, _ in net.named_parameters())
    net.get_parameter(first).requires_grad_(False)
    ref = per_sample_grads(net, x, y, backend="func")
    assert first not in ref
    for backend in ("hooks", "auto"):
        got = per_sample_grads(net, x, y, backend=backend)
        assert list(got) == list(ref)
        assert all(_rel(got[n], ref[n], _scale(ref)) < 1e-10 for n in ref)
    # a frozen weight asked for by name is still differentiated, and a subset is only that
    names = [first, "classifier.bias"]
    sub = per_sample_grads(net, x, y, backend="hooks", params=names)
    sub_ref = per_sample_grads(net, x, y, backend="func", params=names)
    assert list(sub) == names and all(_rel(sub[n], sub_ref[n]) < 1e-10 for n in names)
    # every weight frozen: the graph still exists (the input carries it)
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no weights"):
        per_sample_grads(net, x, y)
    got = per_sample_grad_norms(net, x, y, backend="ghost", params=["classifier.weight"])
    exp = per_sample_grad_norms(net, x, y, backend="func", params=["classifier.weight"])
    assert _rel(got, exp) < 1e-10


def test_per_layer_norms_add_up() -> None:
    net = _model("convnet", 1, 16, {"width": 8}, torch.float64)
    x, y = _data(1, 16, 4, torch.float64)
    total = per_sample_grad_norms(net, x, y)
    for backend in ("func", "hooks", "ghost", "auto"):
        layers = per_sample_grad_norms(net, x, y, backend=backend, per_layer=True)
        assert set(layers) == {n.rsplit(".", 1)[0] for n, _ in net.named_parameters()}
        assert _rel(torch.stack(list(layers.values())).square().sum(0).sqrt(), total) < 1e-10


class _Odd(nn.Module):
    """Grouped / strided / dilated / reflect-padded convs, a Linear used twice, LayerNorm on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1, dilation=2, bias=True)
        self.c2 = nn.Conv2d(6, 6, 3, groups=3, padding="same", padding_mode="reflect")
        self.c3 = nn.Conv2d(6, 4, (3, 2), padding=(2, 1), padding_mode="circular", bias=False)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.ln = nn.LayerNorm(4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the instance norm feeds a conv: with a non-contiguous output gradient and a batch of 1,
        # torch 2.14's CPU InstanceNorm2d backward is wrong (benchmarks/NOTES.md), whoever calls it
        h = self.c3(self.inorm(torch.relu(self.c2(torch.relu(self.c1(x))))))
        tok = h.flatten(2).transpose(1, 2)  # (B, T, 4): a Linear on a sequence
        tok = self.shared(torch.tanh(self.shared(self.ln(tok))))
        return self.head(tok.mean(1))


def test_unusual_layers_and_shared_weights() -> None:
    torch.manual_seed(0)
    net = _Odd().double()
    x = torch.randn(3, 2, 11, 9, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    ref = per_sample_grads(net, x, y, backend="func")
    got = per_sample_grads(net, x, y, backend="hooks", chunk_size=2)
    for n in ref:
        assert _rel(got[n], ref[n], _scale(ref)) < 1e-10, n
    ref_norm = per_sample_grad_norms(net, x, y, backend="func")
    for backend in ("ghost", "auto"):
        assert _rel(per_sample_grad_norms(net, x, y, backend=backend, chunk_size=1), ref_norm) < 1e-10


def test_callable_loss_and_soft_targets() -> None:
    net = _model("convnet", 1, 16, {"width": 8}, torch.float64)
    x, _ = _data(1, 16, 3, torch.float64)
    soft = torch.softmax(torch.randn(3, 10, dtype=torch.float64), 1)

    def mse(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (logits - t).square().sum(1)

    for loss, tgt in ((mse, soft), ("ce", soft)):
        ref = per_sample_grad_norms(net, x, tgt, loss=loss, backend="func")
        assert _rel(per_sample_grad_norms(net, x, tgt, loss=loss, backend="auto"), ref) < 1e-10


def test_ghost_formula_and_rule() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    full = torch.bmm(b.transpose(1, 2), a).square().sum((1, 2))
    assert _rel(ghost_sqnorm(a, b), full) < 1e-12
    assert _rel(ghost_sqnorm(a[:, :1], b[:, :1]), torch.bmm(b[:, :1].transpose(1, 2), a[:, :1]).square().sum((1, 2))) < 1e-12
    # ConvNet-3 (width 128) on 28 px: T = 1024 / 256 / 64 (METHODS.md)
    assert not use_ghost(1024, 128, 9)
    assert use_ghost(256, 128, 128 * 9) and use_ghost(64, 128, 128 * 9)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def test_unsupported_layers_and_bad_input() -> None:
    net = _Custom()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert unsupported_layers(net) == ["<root> (_Custom)"]
    with pytest.raises(ConfigError, match="not supported by the hooks"):
        per_sample_grads(net, x, y, backend="hooks")
    with pytest.raises(ConfigError, match="not supported by the hooks"):
        per_sample_grad_norms(net, x, y, backend="ghost")
    ref = per_sample_grad_norms(net, x, y, backend="func")
    assert _rel(per_sample_grad_norms(net, x, y, backend="auto"), ref) < 1e-12  # falls back to func
    # only the supported part asked for: hooks can do it
    got = per_sample_grads(net, x, y, backend="hooks", params=["fc.weight"])
    assert _rel(got["fc.weight"], per_sample_grads(net, x, y, backend="func", params=["fc.weight"])["fc.weight"]) < 1e-12
    with pytest.raises(ConfigError, match="valid choices: auto, func, hooks, ghost"):
        per_sample_grad_norms(net, x, y, backend="vmap")
    with pytest.raises(ConfigError, match="'ghost'.*valid choices: auto, func, hooks"):
        per_sample_grads(net, x, y, backend="ghost")
    with pytest.raises(ConfigError, match="unknown per-sample loss 'mse'"):
        per_sample_grads(net, x, y, loss="mse")
    with pytest.raises(ConfigError, match="not parameters"):
        per_sample_grads(net, x, y, params=["nope"])
    with pytest.raises(ConfigError, match="same B"):
        per_sample_grads(net, x, y[:2])
    bn = _model("convnet_bn", 1, 16, {"width": 8}, torch.float32).train()
    with pytest.raises(ConfigError, match="batch statistics"):
        per_sample_grad_norms(bn, *_data(1, 16, 2, torch.float32))


def test_bf16_model_gives_float32_norms_close_to_float32() -> None:
    net = _model("convnet", 1, 16, {"width": 8}, torch.float32)
    x, y = _data(1, 16, 4, torch.float32)
    ref = per_sample_grad_norms(net, x, y, backend="func")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = per_sample_grad_norms(net, x, y, backend="auto")
    assert got.dtype == torch.float32
    assert _rel(got, ref) < 0.05
