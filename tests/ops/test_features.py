"""Feature hooks (capture_features), layer selection and the DataDAM attention map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condense.errors import ConfigError
from condense.ops.features import (
    attention_map,
    capture_features,
    feature_modules,
    pre_pool,
    resolve_layers,
)


class _Blocks(nn.Module):
    """Three conv blocks; ``feature_modules`` = the blocks (the zoo's protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)),
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)),
            nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)

    def feature_modules(self) -> list[nn.Module]:
        return list(self.blocks)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_outputs_in_order_with_shapes() -> None:
    model = _Blocks()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with capture_features(model) as feats:
        model.embed(x)
        assert [tuple(f.shape) for f in feats] == [(3, 4, 4, 4), (3, 6, 2, 2), (3, 8, 2, 2)]
        assert _hook_count(model) == 3
        feats.clear()
        model.embed(x[:1])
        assert len(feats) == 3 and feats[0].shape[0] == 1
    assert _hook_count(model) == 0


def test_hooks_removed_on_exception() -> None:
    model = _Blocks()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_features(model):
            assert _hook_count(model) == 3
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_hooks_removed_when_transform_raises() -> None:
    model = _Blocks()

    def bad(t: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad transform")

    with pytest.raises(ValueError, match="bad transform"):
        with capture_features(model, transform=bad):
            model.embed(torch.zeros(1, 1, 8, 8))
    assert _hook_count(model) == 0


def test_transform_applied_in_hook_and_selected_modules() -> None:
    model = _Blocks()
    mods = resolve_layers(feature_modules(model), [0, -1])
    with capture_features(model, mods, transform=lambda t: t.sum((2, 3))) as feats:
        model.embed(torch.randn(2, 1, 8, 8))
    assert [tuple(f.shape) for f in feats] == [(2, 4), (2, 8)]


def test_foreign_module_and_missing_protocol_raise() -> None:
    model = _Blocks()
    with pytest.raises(ConfigError, match="not a submodule"):
        with capture_features(model, [nn.ReLU()]):
            pass
    with pytest.raises(ConfigError, match="feature_modules"):
        with capture_features(nn.Linear(2, 2)):
            pass
    assert _hook_count(model) == 0


def test_resolve_layers_default_negative_and_range() -> None:
    mods = feature_modules(_Blocks())
    assert resolve_layers(mods, None) == mods[:2]
    assert resolve_layers(mods[:1], None) == []
    assert resolve_layers(mods, [-1, 0]) == [mods[2], mods[0]]
    with pytest.raises(ConfigError, match="valid indices are -3..2"):
        resolve_layers(mods, [3])


def test_pre_pool_picks_the_layer_before_the_pool() -> None:
    mods = feature_modules(_Blocks())
    assert isinstance(pre_pool(mods[0]), nn.ReLU) and pre_pool(mods[0]) is mods[0][1]
    assert pre_pool(mods[2]) is mods[2]  # no trailing pool
    lin = nn.Linear(2, 2)
    assert pre_pool(lin) is lin


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 4.0, 6.0, 0.5])
def test_attention_map_formula_and_unit_norm(power: float) -> None:
    f = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = attention_map(f, power)
    raw = (f.abs() ** power).sum(1).reshape(5, -1)
    assert a.shape == (5, 24) and a.dtype == torch.float64
    torch.testing.assert_close(a, raw / raw.norm(dim=1, keepdim=True))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_attention_map_zero_bf16_and_bad_inputs() -> None:
    z = attention_map(torch.zeros(2, 3, 4, 4))
    assert torch.equal(z, torch.zeros(2, 16))  # no NaN for an all-zero map
    f = torch.randn(2, 3, 4, 4).bfloat16()
    assert attention_map(f, 4.0).dtype == torch.float32
    with pytest.raises(ConfigError, match="spatial feature map"):
        attention_map(torch.randn(2, 8))
    with pytest.raises(ConfigError, match="power"):
        attention_map(torch.randn(2, 3, 4, 4), 0.0)


def test_attention_map_gradient_flows() -> None:
    f = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attention_map(t, 4.0), (f,))


# ---------------------------------------------------------------- the registered model zoo

_ZOO = [
    ("convnet", [(128, 16, 16), (128, 8, 8), (128, 4, 4)]),
    ("convnet_d2", [(128, 16, 16), (128, 8, 8)]),
    ("lenet", [(6, 14, 14), (16, 5, 5)]),
    ("alexnet", [(128, 16, 16), (192, 8, 8), (192, 4, 4)]),
    ("resnet18", [(64, 28, 28), (128, 14, 14), (256, 7, 7), (512, 4, 4)]),
]


@pytest.mark.parametrize(("name", "shapes"), _ZOO, ids=[z[0] for z in _ZOO])
def test_zoo_models_capture_block_maps(name: str, shapes: list[tuple[int, ...]]) -> None:
    models = pytest.importorskip("condense.models")
    model = models.create_model(name, 1, 10, (28, 28), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_features(model) as feats:
        emb = model.embed(x)
    assert [tuple(f.shape[1:]) for f in feats] == shapes
    assert all(f.shape[0] == 2 for f in feats) and emb.shape[0] == 2
    assert _hook_count(model) == 0
    # pre-pool maps of the DataDAM layers (all but the last) have 4x the area where pooled
    mods = [pre_pool(m) for m in resolve_layers(feature_modules(model), None)]
    with torch.no_grad(), capture_features(model, mods, transform=attention_map) as att:
        model.embed(x)
    assert len(att) == len(shapes) - 1
    for a in att:
        torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
