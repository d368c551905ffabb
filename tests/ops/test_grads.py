"""Per-class / per-sample gradients and gradient distances against plain per-class loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condense.errors import ConfigError
from condense.ops import (
    METRICS,
    freeze_bn_stats,
    gradient_distance,
    matching_params,
    per_class_grads,
    per_sample_grads,
    resolve_impl,
)

K, B, S = 3, 5, 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyConvNet(nn.Module):
    """Conv -> instance norm -> ReLU -> avgpool, twice, then Linear (a ConvNet-3 in miniature)."""

    def __init__(self, norm: str = "instance") -> None:
        super().__init__()
        def norm_layer(c: int) -> nn.Module:
            return nn.GroupNorm(c, c) if norm == "instance" else nn.BatchNorm2d(c)
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), norm_layer(4), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), norm_layer(4), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Linear(4 * 2 * 2, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class TinyLNNet(nn.Module):
    """Has a 3-D LayerNorm weight (C, H, W), as the ConvNet layernorm variant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.ln = nn.LayerNorm([3, 8, 8])
        self.fc = nn.Linear(3 * 8 * 8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.ln(self.conv(x))).flatten(1))


def make_net(kind: str) -> nn.Module:
    torch.manual_seed(0)  # test-only: module default init draws from the global RNG
    net = {"instance": lambda: TinyConvNet("instance"), "bn": lambda: TinyConvNet("bn"),
           "ln": TinyLNNet}[kind]().double()
    with torch.no_grad():  # non-trivial norm affines so their gradients are exercised
        for m in net.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen(1))
                m.bias.uniform_(-0.5, 0.5, generator=gen(2))
    return net


def data(n_per: int, seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(K, n_per, 1, 8, 8, generator=gen(seed), dtype=torch.float64)
    y = torch.arange(K).unsqueeze(1).expand(K, n_per)
    return x.requires_grad_(requires_grad), y


def ref_distance(gr: list[torch.Tensor], gs: list[torch.Tensor], metric: str) -> torch.Tensor:
    """The reference's per-class distance, written out per tensor shape."""
    if metric == "ours":
        total = torch.zeros((), dtype=gr[0].dtype)
        for a, b in zip(gr, gs, strict=True):
            if a.dim() == 1:
                continue
            if a.dim() in (3, 4):
                a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    a = torch.cat([t.reshape(-1) for t in gr])
    b = torch.cat([t.reshape(-1) for t in gs])
    if metric == "mse":
        return ((b - a) ** 2).sum()
    return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6)


def loop_reference(net: nn.Module, xr, yr, xs, ys, metric: str):
    """Plain per-class loop: autograd.grad (create_graph for syn), distance, summed, backward."""
    plist = list(net.parameters())
    loss = torch.zeros((), dtype=torch.float64)
    grads_real = []
    for k in range(K):
        gr = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(xr[k]), yr[k]), plist)]
        gs = torch.autograd.grad(F.cross_entropy(net(xs[k]), ys[k]), plist, create_graph=True)
        grads_real.append(gr)
        loss = loss + ref_distance(gr, gs, metric)
    (gx,) = torch.autograd.grad(loss, xs)
    return loss.detach(), gx, grads_real


# ---------------------------------------------------------------- per-class gradients


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["instance", "bn", "ln"])
@pytest.mark.parametrize("metric", METRICS)
def test_per_class_matches_loop(impl: str, kind: str, metric: str) -> None:
    net = make_net(kind)
    xr, yr = data(B, 10)
    xs, ys = data(S, 11, requires_grad=True)
    if kind == "bn":
        freeze_bn_stats(net, torch.randn(12, 1, 8, 8, generator=gen(3), dtype=torch.float64))
    ref_loss, ref_gx, ref_real = loop_reference(net, xr, yr, xs, ys, metric)

    params = matching_params(net, metric)
    g_real = per_class_grads(net, xr, yr, create_graph=False, params=params, impl=impl, micro_batch=2)
    g_syn = per_class_grads(net, xs, ys, create_graph=True, params=params, impl=impl)
    dist = gradient_distance(g_real, g_syn, metric)
    assert dist.shape == (K,)
    loss = dist.sum()
    (gx,) = torch.autograd.grad(loss, xs)

    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-10)
    names = [n for n, _ in net.named_parameters()]
    for name, g in g_real.items():
        assert g.grad_fn is None
        i = names.index(name)
        torch.testing.assert_close(g, torch.stack([r[i] for r in ref_real]), rtol=1e-5, atol=1e-10)
    assert gx.abs().sum() > 0


def test_all_params_default_and_chunking() -> None:
    net = make_net("instance")
    x, y = data(B, 4)
    full = per_class_grads(net, x, y, create_graph=False, impl="vmap")
    assert list(full) == [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        assert full[name].shape == (K, *p.shape)
    chunked = per_class_grads(net, x, y, create_graph=False, impl="vmap", chunk_size=2)
    looped = per_class_grads(net, x, y, create_graph=False, impl="loop")
    micro = per_class_grads(net, x, y, create_graph=False, impl="loop", micro_batch=2)  # 2+2+1
    for name in full:
        torch.testing.assert_close(chunked[name], full[name])
        torch.testing.assert_close(looped[name], full[name])
        torch.testing.assert_close(micro[name], full[name])
    assert all(p.grad is None for p in net.parameters())  # nothing accumulated on the module


def test_frozen_module_and_errors() -> None:
    net = make_net("instance").requires_grad_(False)
    x, y = data(B, 5)
    params = {n: p for n, p in net.named_parameters() if p.dim() > 1}
    for impl in ("vmap", "loop"):
        out = per_class_grads(net, x, y, create_graph=False, params=params, impl=impl)
        assert set(out) == set(params)
    with pytest.raises(ConfigError, match="valid choices: auto, vmap, loop"):
        per_class_grads(net, x, y, create_graph=False, params=params, impl="fast")
    with pytest.raises(ConfigError, match="not parameters"):
        per_class_grads(net, x, y, create_graph=False, params={"nope": torch.zeros(1)})
    with pytest.raises(ConfigError, match="leading dims"):
        per_class_grads(net, x, y[:, :2], create_graph=False, params=params)
    bn = make_net("bn")  # train mode
    with pytest.raises(ConfigError, match="freeze_bn_stats"):
        per_class_grads(bn, x, y, create_graph=False)
    assert resolve_impl("auto", torch.device("cpu")) == "loop"
    assert resolve_impl("auto", torch.device("cuda")) == "vmap"


def test_matching_params() -> None:
    net = make_net("ln")
    ours = matching_params(net, "ours")
    # LayerNorm's weight and bias are (3, 8, 8): 3-D, so ``ours`` counts them (as the reference)
    assert list(ours) == ["conv.weight", "ln.weight", "ln.bias", "fc.weight"]
    assert list(matching_params(net, "mse")) == [n for n, _ in net.named_parameters()]
    with pytest.raises(ConfigError, match="valid choices: ours, mse, cos"):
        matching_params(net, "l1")


# ---------------------------------------------------------------- distances


def test_distance_ours_hand_computed() -> None:
    # class 0: rows parallel (0), orthogonal (1) -> 1 ; class 1: rows opposite (2), equal (0) -> 2
    real = {"w": torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]]),
            "b": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    syn = {"w": torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[-1.0, -1.0], [5.0, 0.0]]]),
           "b": torch.tensor([[-1.0, 0.0], [0.0, 0.0]])}
    d = gradient_distance(real, syn, "ours")
    torch.testing.assert_close(d, torch.tensor([1.0, 2.0]), rtol=0, atol=1e-5)  # bias ignored
    # the epsilon sits on the product of the norms: zero syn rows give exactly 1 per row
    zero = {"w": torch.zeros(2, 2, 2), "b": torch.zeros(2, 2)}
    torch.testing.assert_close(gradient_distance(real, zero, "ours"), torch.tensor([2.0, 2.0]))
    # 4-D conv weight (out=2, in*kh*kw=2): rows are the flattened filters
    conv_r = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 1, 2, 1)
    conv_s = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 2, 1, 2, 1)
    d4 = gradient_distance({"c": conv_r}, {"c": conv_s}, "ours")
    torch.testing.assert_close(d4, torch.tensor([1.0 - 1.0 / math.sqrt(2)]), rtol=0, atol=1e-5)


def test_distance_mse_cos_hand_computed() -> None:
    real = {"w": torch.tensor([[[1.0, 0.0]]]), "b": torch.tensor([[0.0]])}
    syn = {"w": torch.tensor([[[0.0, 1.0]]]), "b": torch.tensor([[1.0]])}
    torch.testing.assert_close(gradient_distance(real, syn, "mse"), torch.tensor([3.0]))
    # concatenated: a = (1,0,0), b = (0,1,1): cosine 0 -> 1 ; then a parallel case
    torch.testing.assert_close(gradient_distance(real, syn, "cos"), torch.tensor([1.0]))
    same = gradient_distance(real, real, "cos")
    torch.testing.assert_close(same, torch.tensor([1.0 - 1.0 / (1.0 + 1e-6)]))


def test_distance_errors() -> None:
    g = {"w": torch.zeros(2, 3, 3)}
    with pytest.raises(ConfigError, match="valid choices: ours, mse, cos"):
        gradient_distance(g, g, "l2")
    with pytest.raises(ConfigError, match="different weights"):
        gradient_distance(g, {"v": torch.zeros(2, 3, 3)}, "ours")
    with pytest.raises(ConfigError, match="shapes differ"):
        gradient_distance(g, {"w": torch.zeros(2, 3, 4)}, "ours")


# ---------------------------------------------------------------- per-sample gradients


@pytest.mark.parametrize("chunk", [None, 3])
def test_per_sample_grads_match_loop(chunk: int | None) -> None:
    net = make_net("instance")
    x = torch.randn(7, 1, 8, 8, generator=gen(6), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    out = per_sample_grads(net, x, y, chunk_size=chunk)
    plist = list(net.named_parameters())
    for i in range(x.shape[0]):
        ref = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), [p for _, p in plist])
        for (name, _), r in zip(plist, ref, strict=True):
            torch.testing.assert_close(out[name][i], r, rtol=1e-7, atol=1e-12)
    bn = make_net("bn")
    with pytest.raises(ConfigError, match="eval"):
        per_sample_grads(bn, x, y)


# ---------------------------------------------------------------- BatchNorm freezing


def test_freeze_bn_stats() -> None:
    net = make_net("bn")
    net.train()
    images = torch.randn(16, 1, 8, 8, generator=gen(7), dtype=torch.float64)
    freeze_bn_stats(net, images)
    bn = net.features[1]
    z = net.features[0](images)
    torch.testing.assert_close(bn.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, z.var((0, 2, 3), unbiased=True))
    assert bn.momentum == 0.1  # restored
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.training and net.features[0].training  # other modules keep their mode
    # reference behaviour: one running-average update with momentum 0.1 on top of the current stats
    net2 = make_net("bn")
    freeze_bn_stats(net2, images, momentum=0.1)
    torch.testing.assert_close(net2.features[1].running_mean, 0.1 * z.mean((0, 2, 3)))
    # no BatchNorm: a no-op
    plain = make_net("instance")
    assert freeze_bn_stats(plain, images) is plain


def test_compiled_first_order_matches_eager() -> None:
    """compile=True (torch.compile of forward + loss) gives the eager per-class gradients,
    also for a second, fresh network of the same architecture (reuses the compiled code)."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = make_net("instance")
        x, y = data(B, 6 + seed)
        params = matching_params(net, "ours")
        eager = per_class_grads(net, x, y, create_graph=False, params=params, impl="loop", micro_batch=2)
        comp = per_class_grads(net, x, y, create_graph=False, params=params, impl="loop", micro_batch=2,
                               compile=True)
        for name in eager:
            torch.testing.assert_close(comp[name], eager[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="create_graph=False"):
        per_class_grads(net, x, y, create_graph=True, params=params, compile=True)
    frozen = {n: p.detach() for n, p in params.items()}
    with pytest.raises(ConfigError, match="own trainable parameters"):
        per_class_grads(net, x, y, create_graph=False, params=frozen, compile=True)


def test_has_batchnorm_lives_in_ops_and_models_reexport_it() -> None:
    """``has_batchnorm`` is an ops helper (ops import no models); ``condense.models`` re-exports it."""
    import condense.models
    from condense.ops import has_batchnorm

    assert condense.models.has_batchnorm is has_batchnorm
    assert has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2))))
    assert has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)))
    assert not has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(2, 2), nn.LayerNorm(4)))
