"""Multi-formation (IDC): the decoder, its composition with the matchers, artifacts, evaluator and exports."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from condense.errors import ArtifactError, ConfigError
from condense.ops.formation import PIXELS, Decoder, decoded_set, set_decoder
from condense.types import SetMeta, SyntheticSet, class_major_labels
from tests.conftest import make_ctx


def test_decode_layout_is_slot_major_and_each_tile_is_upsampled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 28, 28, generator=g)
    for f in (2, 3):
        dec = Decoder("multi", f)
        out = dec.decode(x)
        assert out.shape == (3 * f * f, 2, 28, 28)
        bounds = [0, *np.cumsum([t.shape[0] for t in torch.tensor_split(torch.empty(28), f)]).tolist()]
        for n in range(3):
            for i in range(f):
                for j in range(f):
                    tile = x[n:n + 1, :, bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]]
                    want = F.interpolate(tile, size=(28, 28), mode="bilinear", align_corners=False)
                    torch.testing.assert_close(out[n * f * f + i * f + j], want[0], rtol=0, atol=0)
        if f == 3:
            assert bounds == [0, 10, 19, 28]  # 28 / 3: tiles of 10, 9, 9 pixels
    labels = torch.tensor([4, 0, 7])
    assert Decoder("multi", 2).decode_labels(labels).tolist() == [4] * 4 + [0] * 4 + [7] * 4
    assert PIXELS.decode(x) is x and PIXELS.decode_labels(labels) is labels


def test_decode_gradients_are_exact():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    for f in (2, 3):
        assert torch.autograd.gradcheck(Decoder("multi", f).decode, (x,))
    # the decoder is linear: its gradient is the adjoint, and every stored pixel feeds some image
    w = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    (g,) = torch.autograd.grad((Decoder("multi", 2).decode(x) * w).sum(), x)
    assert bool((g != 0).all())


def test_encode_puts_each_image_area_downsampled_into_its_tile():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(8, 1, 28, 28, generator=g)
    dec = Decoder("multi", 2)
    slots = dec.encode(imgs)
    assert slots.shape == (2, 1, 28, 28)
    small = F.interpolate(imgs, size=(14, 14), mode="area")
    torch.testing.assert_close(slots[1, :, 14:, :14], small[4 + 2])  # slot 1, tile (1, 0)
    const = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 28, 28)  # constant images survive a round trip
    torch.testing.assert_close(dec.decode(dec.encode(const)), const)
    with pytest.raises(ConfigError, match="multiple of factor"):
        dec.encode(imgs[:3])


def test_bad_parametrizations_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match="unknown param 'tiles'; valid choices: pixels, multi"):
        Decoder("tiles", 2)
    with pytest.raises(ConfigError, match=r"param.factor=1 .* valid: 2..8"):
        Decoder("multi", 1)
    with pytest.raises(ConfigError, match="must be an integer"):
        Decoder("multi", 2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="too large for 14x14"):
        Decoder("multi", 8).check_size((14, 14))
    with pytest.raises(ConfigError, match="unknown param label 'multiX'"):
        Decoder.from_label("multiX")
    assert Decoder.from_label("multi3") == Decoder("multi", 3) and Decoder.from_label("pixels") == PIXELS
    assert Decoder("multi", 2, "nearest").label == "multi2-nearest"
    assert Decoder.from_label(Decoder("multi", 2, "nearest").label) == Decoder("multi", 2, "nearest")


def _multi_set(tiny_data, f: int = 2, ipc: int = 2) -> SyntheticSet:
    k = tiny_data.spec.num_classes
    meta = SetMeta(dataset=tiny_data.spec, ipc=ipc, method="dm", extra={"decoder": Decoder("multi", f).to_dict()})
    g = torch.Generator().manual_seed(3)
    return SyntheticSet(images=torch.randn(k * ipc, 1, 28, 28, generator=g), labels=class_major_labels(k, ipc),
                        meta=meta)


def test_artifact_round_trip_keeps_the_compact_form_and_the_decoder(tiny_data, tmp_path):
    from condense.artifacts import load_synset, save_synset

    syn = _multi_set(tiny_data)
    save_synset(syn, tmp_path / "a")
    back = load_synset(tmp_path / "a")
    assert back.images.shape == syn.images.shape and set_decoder(back) == Decoder("multi", 2)
    torch.testing.assert_close(back.images, syn.images)
    d = decoded_set(back)
    assert d.images.shape[0] == 4 * syn.images.shape[0]
    assert d.labels.tolist() == class_major_labels(4, 8).tolist()
    assert d.meta.extra["decoded_from"]["stored_images"] == 8 and "decoder" not in d.meta.extra
    assert decoded_set(d) is d  # never decoded twice


def test_artifact_with_a_bad_decoder_is_refused_in_one_line(tiny_data, tmp_path):
    import json

    from condense.artifacts import load_synset, save_synset

    save_synset(_multi_set(tiny_data), tmp_path / "a")
    man = tmp_path / "a" / "manifest.json"
    m = json.loads(man.read_text())
    m["extra"]["decoder"]["factor"] = 40
    man.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="extra.decoder") as e:
        load_synset(tmp_path / "a")
    assert "\n" not in str(e.value)


def test_evaluator_and_imagefolder_export_decode_identically(tiny_data, tmp_path):
    from PIL import Image

    from condense.artifacts import export_imagefolder
    from condense.eval import EvalConfig, Evaluator

    syn = _multi_set(tiny_data)
    dec = Decoder("multi", 2)
    images, labels = dec.decode(syn.images), dec.decode_labels(syn.labels)
    cfg = EvalConfig(num_models=1, epochs=2, dsa=False, model_kwargs={"width": 8, "depth": 2})
    via_set = Evaluator(cfg, tiny_data).evaluate(syn)
    direct = Evaluator(cfg, tiny_data).evaluate_tensors(images, labels)
    assert via_set.runs == direct.runs and via_set.protocol["train_size"] == 32
    out = export_imagefolder(syn, tmp_path / "x")
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 32
    spec = tiny_data.spec
    want = spec.denormalize(images).clamp(0, 1).mul(255).round().byte()
    for i, f in enumerate(files):  # class folders in class order, images in decoded order
        got = torch.from_numpy(np.array(Image.open(f)))
        assert torch.equal(got, want[i, 0]), f


def test_flip_and_multi_compose_in_the_matchers_views(tiny_data):
    from condense.synth import SYNTHESIZERS

    ctx = dataclasses.replace(make_ctx(tiny_data, ipc=1, augment=False), decoder=Decoder("multi", 2))
    cls = SYNTHESIZERS.get("dm")
    cfg = dataclasses.replace(cls.Config(), flip=True, batch_real=4, iterations=1, dsa=False)
    dm = cls(cfg, ctx)
    syn = dm.init_set()
    assert syn.images.shape == (4, 1, 28, 28) and syn.meta.extra["decoder"]["factor"] == 2
    real, views = dm.views(syn)
    decoded = Decoder("multi", 2).decode(syn.images).view(4, 4, 1, 28, 28)
    assert views.shape == (4, 8, 1, 28, 28)  # per class: 1 slot -> 4 images, then [x; flip(x)]
    torch.testing.assert_close(views[:, :4], decoded)
    torch.testing.assert_close(views[:, 4:], decoded.flip(-1))
    loss = views.square().sum()
    (g,) = torch.autograd.grad(loss, syn.images)  # the stored slots get the gradient
    assert g.shape == syn.images.shape and bool(g.abs().sum() > 0)


def test_real_init_fills_every_tile_with_a_real_image_of_the_slots_class(tiny_data):
    from condense.synth._matching import init_images

    ctx = dataclasses.replace(make_ctx(tiny_data, ipc=2), decoder=Decoder("multi", 2))
    slots = init_images(ctx, "real")
    assert slots.shape == (8, 1, 28, 28)
    small = F.interpolate(tiny_data.train_images, size=(14, 14), mode="area")
    for n in range(8):
        c = n // 2
        for t, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            tile = slots[n, :, 14 * i:14 * (i + 1), 14 * j:14 * (j + 1)]
            d = (small - tile).flatten(1).abs().amax(1)
            hit = int(d.argmin())
            assert float(d[hit]) < 1e-6 and int(tiny_data.train_labels[hit]) == c, (n, t)


def test_methods_without_multi_refuse_it_in_one_line():
    from condense.api import compose
    from condense.config import validate

    cfg, _ = compose("rded", "fashion_mnist", 1, "smoke", param="multi")
    with pytest.raises(ConfigError, match=r"method rded does not support param=multi; methods that do: .*dm"):
        validate(cfg)
    cfg, _ = compose("dm", "fashion_mnist", 1, "smoke", param="multi", **{"param.factor": 9})
    with pytest.raises(ConfigError, match="param.factor=9"):
        validate(cfg)


# ------------------------------------------------------------------ learned labels (labels=learned)

def test_soft_one_hot_targets_give_the_hard_label_class_gradients():
    from condense.ops.grads import per_class_grads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(3, 4, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4).view(3, 4)
    for impl in ("loop", "vmap"):
        hard = per_class_grads(model, x, y, create_graph=False, impl=impl)
        soft = per_class_grads(model, x, F.one_hot(y, 3).double(), create_graph=False, impl=impl)
        for n in hard:
            torch.testing.assert_close(soft[n], hard[n], rtol=1e-10, atol=1e-12)
    logits = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    g = per_class_grads(model, x, torch.softmax(logits, -1), create_graph=True, impl="loop")
    (gy,) = torch.autograd.grad(sum(t.square().sum() for t in g.values()), logits)
    assert bool(gy.abs().sum() > 0)  # the matching loss reaches the labels through the gradients
    with pytest.raises(ConfigError, match="leading dims"):
        per_class_grads(model, x, torch.zeros(3, 4, 3, dtype=torch.long), create_graph=False)


def test_learned_labels_in_gradient_matching_step_and_compose_with_multi_and_flip(tiny_data):
    from condense.synth import SYNTHESIZERS

    ctx = dataclasses.replace(make_ctx(tiny_data, ipc=1), decoder=Decoder("multi", 2))
    cls = SYNTHESIZERS.get("dsa")
    cfg = dataclasses.replace(cls.Config(), soft_labels=True, flip=True, batch_real=4, iterations=2,
                              outer_loop=2, inner_loop=1, label_init=0.9)
    gm = cls(cfg, ctx)
    syn = gm.init_set()
    assert syn.labels.shape == (4, 4) and syn.labels.requires_grad
    p0 = torch.softmax(syn.labels.detach(), -1)
    torch.testing.assert_close(p0.diagonal(), torch.full((4,), 0.9))
    assert gm.label_views(syn).shape == (4, 8, 4)  # 1 slot -> 4 decoded -> 8 with flip, per class
    before = syn.labels.detach().clone()
    gm.step(syn, 1)
    assert not torch.equal(before, syn.labels.detach())  # the labels moved
    out = gm.finalize(syn)
    assert out.soft and out.meta.extra["label_temperature"] == 1.0 and not out.labels.requires_grad
    assert "opt_y" in gm.state_dict()


def test_labels_learned_is_refused_where_the_loss_ignores_labels_and_marks_the_variant():
    from condense.api import compose
    from condense.config import validate, variant

    cfg, _ = compose("dm", "fashion_mnist", 1, "smoke", labels="learned")
    with pytest.raises(ConfigError, match=r"labels=learned: method dm does not learn labels .* methods that do: .*dsa"):
        validate(cfg)
    cfg, _ = compose("dsa", "fashion_mnist", 1, "smoke", labels="learned", param="multi")
    assert validate(cfg).method.soft_labels is True and variant(cfg) == "multi2+learned"
    cfg, _ = compose("datm", "fashion_mnist", 1, "smoke", labels="learned")
    assert variant(cfg) == ""  # datm learns labels anyway
    cfg, _ = compose("datm", "fashion_mnist", 1, "smoke", labels="hard")
    assert validate(cfg).method.soft_labels is False and variant(cfg) == "hard"
    cfg, _ = compose("dsa", "fashion_mnist", 1, "smoke", labels="soft")
    with pytest.raises(ConfigError, match="unknown labels 'soft'; valid choices"):
        validate(cfg)
