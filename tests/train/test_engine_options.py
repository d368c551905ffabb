"""Engine options of the trajectory family's experts: SAM / GSAM (FTD), AST's loss ramp and
input-gradient penalty, each against a hand-written step, and vectorized == sequential."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from condense.errors import ConfigError
from condense.models import create_model
from condense.train import FitConfig, fit, loss_scale


def _make(data, dtype=torch.float64):
    s = data.spec

    def make(g):
        return create_model("convnet", s.channels, s.num_classes, s.im_size, generator=g, width=4,
                            depth=1).to(dtype)

    return make


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _one_batch(data, n=16):
    return data.train_images[:n].double(), data.train_labels[:n]


def _hand_step(model, x, y, lr, sam="none", rho=0.0, alpha=0.0, scale=1.0, penalty=0.0):
    """One plain SGD step (no momentum / wd) of the objective, written out by hand."""
    params = dict(model.named_parameters())

    def objective(p):
        out = functional_call(model, p, (x,))
        loss = F.cross_entropy(out, y) * scale
        if penalty:
            xr = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(functional_call(model, p, (xr,)).sum(), xr, create_graph=True)
            loss = loss + penalty * ((gx.pow(2).sum(1) + 1e-12).sqrt() - 1).pow(2).mean()
        return loss

    g = torch.autograd.grad(objective(params), list(params.values()))
    if sam != "none":
        norm = torch.sqrt(sum((v * v).sum() for v in g))
        pert = {k: v.detach() + rho * gv / (norm + 1e-12) for (k, v), gv in zip(params.items(), g, strict=True)}
        pert = {k: v.requires_grad_(True) for k, v in pert.items()}
        gh = torch.autograd.grad(objective(pert), list(pert.values()))
        if sam == "gsam":
            along = sum((a * b).sum() for a, b in zip(g, gh, strict=True)) / (sum((v * v).sum() for v in gh) + 1e-12)
            g = [b - alpha * (a - along * b) for a, b in zip(g, gh, strict=True)]
        else:
            g = gh
    with torch.no_grad():
        for p, gv in zip(params.values(), g, strict=True):
            p.sub_(lr * gv)
    return model


@pytest.mark.parametrize("kw", [
    {"sam": "sam", "sam_rho": 0.05},
    {"sam": "gsam", "sam_rho": 0.05, "gsam_alpha": 0.3},
    {"loss_ramp_epochs": 4, "loss_ramp_start": 0.5},
    {"input_grad_penalty": 2.0},
])
def test_one_step_equals_the_hand_written_step(tiny_data, kw):
    x, y = _one_batch(tiny_data)
    cfg = FitConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", **kw)
    res = fit(_make(tiny_data), (x, y), cfg, seeds=[3])
    # the engine shuffles; a full batch's gradient does not depend on the order
    model = _make(tiny_data)(torch.Generator().manual_seed(3))
    _hand_step(model, x, y, 0.1, sam=kw.get("sam", "none"), rho=kw.get("sam_rho", 0.0),
               alpha=kw.get("gsam_alpha", 0.0), scale=loss_scale(cfg, 0), penalty=kw.get("input_grad_penalty", 0.0))
    a, b = _flat(res.models[0]), _flat(model)
    assert float((a - b).abs().max()) <= 1e-12
    plain = fit(_make(tiny_data), (x, y), FitConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0,
                                                  weight_decay=0.0, schedule="constant"), seeds=[3])
    assert float((a - _flat(plain.models[0])).abs().max()) > 1e-6  # the option changed the step


@pytest.mark.parametrize("kw", [{"sam": "gsam", "sam_rho": 0.05, "gsam_alpha": 0.3},
                                {"input_grad_penalty": 1.0, "loss_ramp_epochs": 2}])
def test_vectorized_equals_sequential_with_the_options(tiny_data, kw):
    """Per-model norms: the stacked SAM perturbation is each model's own."""
    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    cfg = FitConfig(epochs=2, batch_size=32, lr=0.05, **kw)
    vec = fit(_make(tiny_data), (x, y), cfg, seeds=[0, 1, 2], vectorize=True)
    seq = fit(_make(tiny_data), (x, y), cfg, seeds=[0, 1, 2], vectorize=False)
    for a, b in zip(vec.models, seq.models, strict=True):
        assert float((_flat(a) - _flat(b)).norm() / _flat(b).norm()) <= 1e-10


def test_loss_ramp_formula():
    cfg = FitConfig(loss_ramp_epochs=10, loss_ramp_start=0.5)
    assert [loss_scale(cfg, e) for e in (0, 1, 9, 10, 30)] == pytest.approx([0.5, 0.55, 0.95, 1.0, 1.0])
    assert loss_scale(FitConfig(), 0) == 1.0


def test_bad_options_name_the_choices():
    with pytest.raises(ConfigError, match="unknown sam 'asam'.*none, sam, gsam"):
        FitConfig(sam="asam")
    with pytest.raises(ConfigError, match="sam_rho"):
        FitConfig(sam_rho=-1.0)
