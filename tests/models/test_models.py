"""Model zoo contract: every registered model x input shape, plus ConvNet-3 facts, init, vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from condense.errors import ConfigError, UnknownNameError
from condense.models import (
    MODELS,
    ClassifierNet,
    ConvNet,
    create_model,
    has_batchnorm,
    model_kwargs,
    reinitialize,
)
from condense.models._pool import AvgPool2x2

NAMES = MODELS.names()
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
SHAPE_IDS = ["1x28x28", "3x32x32", "3x64x64"]
NUM_CLASSES = 10
BN_NAMES = {"convnet_bn", "alexnet_bn", "vgg11_bn", "resnet18_bn"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(shape: tuple[int, int, int], n: int = 2, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, *shape, generator=gen(seed))


def build(name: str, shape: tuple[int, int, int], seed: int = 0, **kw: object) -> ClassifierNet:
    c, h, w = shape
    return create_model(name, c, NUM_CLASSES, (h, w), generator=gen(seed), **kw)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_contract(name: str, shape: tuple[int, int, int]) -> None:
    torch.set_num_threads(1)
    model = build(name, shape)
    x = batch(shape)
    assert isinstance(model, ClassifierNet)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == NUM_CLASSES

    mods = model.feature_modules()
    assert len(mods) > 0
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in mods]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(mods)
    assert all(isinstance(f, torch.Tensor) and f.shape[0] == 2 and torch.isfinite(f).all() for f in seen)

    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    emb = model.embed(x)
    assert emb.shape == (2, model.classifier.in_features) == (2, model.embed_dim)
    torch.testing.assert_close(model.classifier(emb), logits)

    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_generator_determinism(name: str, shape: tuple[int, int, int]) -> None:
    torch.set_num_threads(1)
    a, b, c = build(name, shape, seed=7), build(name, shape, seed=7), build(name, shape, seed=8)
    assert states_equal(a, b)
    assert not states_equal(a, c)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in a.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_generator_init_reproduces_pytorch_default(name: str) -> None:
    """Generator init = PyTorch's own reset_parameters drawn from an equally seeded global RNG."""
    torch.set_num_threads(1)
    ours = build(name, (3, 32, 32), seed=11)
    rng_before = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ref = create_model(name, 3, NUM_CLASSES, (32, 32))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert states_equal(ours, ref)


def test_generator_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    build("resnet18", (3, 32, 32))
    assert torch.equal(torch.get_rng_state(), before)


def test_norm_layers_start_at_identity() -> None:
    model = build("convnet_bn", (3, 32, 32), seed=3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        assert int(m.num_batches_tracked) == 0


def test_reinitialize_is_deterministic_and_fresh() -> None:
    model = build("convnet", (1, 28, 28), seed=0)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialize(model, gen(5))
    assert not torch.equal(model.classifier.weight, first["classifier.weight"])
    assert states_equal(model, build("convnet", (1, 28, 28), seed=5))


def test_convnet3_on_28x28_structure() -> None:
    model = build("convnet", (1, 28, 28))
    assert isinstance(model, ConvNet)
    assert model.embed_dim == 2048
    assert model.feature_shape == (128, 4, 4)
    blocks = model.feature_modules()
    assert len(blocks) == 3
    for d, block in enumerate(blocks):
        conv, norm, act, pool = block
        assert isinstance(conv, nn.Conv2d)
        assert conv.in_channels == (1 if d == 0 else 128) and conv.out_channels == 128
        assert conv.kernel_size == (3, 3) and conv.padding == ((3, 3) if d == 0 else (1, 1))
        assert conv.bias is not None
        assert isinstance(norm, nn.GroupNorm)
        assert norm.num_groups == 128 and norm.num_channels == 128 and norm.affine
        assert isinstance(act, nn.ReLU)
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    assert model.classifier.in_features == 2048 and model.classifier.out_features == NUM_CLASSES

    maps: list[tuple[int, ...]] = []
    handles = [b.register_forward_hook(lambda _m, _i, out: maps.append(tuple(out.shape))) for b in blocks]
    x = batch((1, 28, 28))
    emb = model.embed(x)
    for h in handles:
        h.remove()
    assert maps == [(2, 128, 16, 16), (2, 128, 8, 8), (2, 128, 4, 4)]
    assert emb.shape == (2, 2048)


@pytest.mark.parametrize(
    ("name", "shape", "dim"),
    [
        ("convnet", (3, 32, 32), 2048),
        ("convnet", (3, 64, 64), 128 * 8 * 8),
        ("convnet_d4", (3, 64, 64), 128 * 4 * 4),
        ("convnet_w32", (1, 28, 28), 32 * 4 * 4),
        ("convnet_np", (1, 28, 28), 128 * 32 * 32),
        ("mlp", (1, 28, 28), 128),
        ("lenet", (1, 28, 28), 84),
        ("alexnet", (1, 28, 28), 192 * 4 * 4),
        ("alexnet", (3, 32, 32), 192 * 4 * 4),
        ("vgg11", (1, 28, 28), 512),
        ("vgg11", (3, 32, 32), 512),
        ("resnet18", (1, 28, 28), 512),
        ("resnet18_ap", (1, 28, 28), 512 * 3 * 3),
        ("resnet18_ap", (3, 32, 32), 512 * 4 * 4),
    ],
)
def test_embedding_sizes(name: str, shape: tuple[int, int, int], dim: int) -> None:
    with torch.device("meta"):  # shapes only, nothing allocated
        model = create_model(name, shape[0], NUM_CLASSES, shape[1:])
    assert model.embed_dim == dim


def test_non_square_and_int_im_size() -> None:
    model = create_model("convnet", 3, 4, (32, 48), generator=gen())
    assert model.embed_dim == 128 * 4 * 6
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 4)
    assert states_equal(
        create_model("lenet", 3, 4, 32, generator=gen()),
        create_model("lenet", 3, 4, (32, 32), generator=gen()),
    )


def test_variant_keys_match_convnet_kwargs() -> None:
    a = build("convnet_w64", (3, 32, 32), depth=2)
    b = build("convnet", (3, 32, 32), width=64, depth=2)
    assert states_equal(a, b)
    assert isinstance(build("convnet_mp", (3, 32, 32)).features[0][-1], nn.MaxPool2d)
    assert isinstance(build("convnet_swish", (3, 32, 32)).features[0][2], nn.SiLU)
    gn = build("convnet_gn", (3, 32, 32)).features[0][1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    ln = build("convnet_ln", (3, 32, 32)).features[1][1]
    assert isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (128, 16, 16)
    for block in build("convnet_nn", (3, 32, 32)).features:  # conv, act, pool
        assert [type(m) for m in block] == [nn.Conv2d, nn.ReLU, AvgPool2x2]
    for block in build("convnet_np", (3, 32, 32)).features:  # conv, norm, act
        assert [type(m) for m in block] == [nn.Conv2d, nn.GroupNorm, nn.ReLU]


def test_has_batchnorm() -> None:
    for name in NAMES:
        with torch.device("meta"):
            model = create_model(name, 3, NUM_CLASSES, 32)
        assert has_batchnorm(model) == (name in BN_NAMES), name
        assert model.has_batchnorm == (name in BN_NAMES)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("convnett", 1, 10, 28)
    msg = str(info.value)
    assert "convnett" in msg and "valid choices" in msg
    assert all(n in msg for n in ("convnet", "resnet18_ap", "vgg11_bn", "mlp"))
    assert isinstance(info.value, ConfigError)


def test_unknown_kwarg_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"'widht'.*width.*depth.*norm.*pooling.*activation"):
        create_model("convnet", 1, 10, 28, widht=64)
    with pytest.raises(ConfigError, match=r"'norm'.*'convnet_bn'"):
        create_model("convnet_bn", 1, 10, 28, norm="none")  # fixed by the variant key
    with pytest.raises(ConfigError, match=r"'width'.*'lenet'.*\(none\)"):
        create_model("lenet", 1, 10, 28, width=3)
    assert model_kwargs("convnet") == {
        "width": 128,
        "depth": 3,
        "norm": "instancenorm",
        "pooling": "avgpool",
        "activation": "relu",
    }
    assert "norm" not in model_kwargs("convnet_bn")


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("convnet", {"norm": "weird"}, r"'weird'.*instancenorm.*batchnorm.*layernorm.*groupnorm.*none"),
        ("convnet", {"pooling": "avgpooling"}, r"'avgpooling'.*avgpool.*maxpool.*none"),
        ("convnet", {"activation": "gelu"}, r"'gelu'.*relu.*sigmoid.*leakyrelu.*swish"),
        ("convnet", {"width": 0}, r"width.*0"),
        ("convnet_gn", {"width": 30}, r"30.*4"),
        ("vgg11", {"norm": "layernorm"}, r"'layernorm'.*instancenorm.*batchnorm"),
    ],
)
def test_bad_values(name: str, kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        create_model(name, 3, 10, 32, **kwargs)


def test_too_small_input_and_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="too small"):
        create_model("vgg11", 3, 10, 16)
    with pytest.raises(ConfigError, match="im_size"):
        create_model("convnet", 3, 10, (32, 32, 32))
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("convnet", 3, 0, 32)


def test_vmap_over_stacked_convnets_matches_separate_runs() -> None:
    torch.set_num_threads(1)
    models = [build("convnet", (1, 28, 28), seed=s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = build("convnet", (1, 28, 28), seed=99)
    x = batch((1, 28, 28), n=4)

    def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    stacked = vmap(run)(params, buffers)
    expected = torch.stack([m(x) for m in models])
    assert stacked.shape == (3, 4, NUM_CLASSES)
    torch.testing.assert_close(stacked, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in BN_NAMES])
def test_vmap_works_for_every_non_batchnorm_model(name: str) -> None:
    torch.set_num_threads(1)
    models = [build(name, (3, 32, 32), seed=s) for s in range(2)]
    params, buffers = stack_module_state(models)
    x = batch((3, 32, 32))
    out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out[1], models[1](x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name: str) -> None:
    torch.set_num_threads(1)
    model = build(name, (3, 32, 32))
    x = batch((3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        emb = model.embed(x)
    assert logits.shape == (2, NUM_CLASSES) and emb.shape == (2, model.embed_dim)
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["convnet", "resnet18_bn", "mlp"])
def test_cuda_generator_builds_on_cuda(name: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    model = create_model(name, 3, NUM_CLASSES, 32, generator=g)
    assert all(p.device.type == "cuda" for p in model.parameters())
    again = create_model(name, 3, NUM_CLASSES, 32, generator=torch.Generator(device="cuda").manual_seed(0))
    assert states_equal(model, again)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(x).shape == (2, NUM_CLASSES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reinitialize_cuda_model_from_cpu_generator() -> None:
    model = build("convnet", (1, 28, 28), seed=0).cuda()
    reinitialize(model, gen(4))
    ref = build("convnet", (1, 28, 28), seed=4)
    assert all(p.device.type == "cuda" for p in model.parameters())
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p.cpu(), q)
