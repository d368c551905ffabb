"""Pruning-score selection (``grand``, ``el2n``, ``forgetting``): the scores against hand
computations and ``torch.func``, ``keep`` on hand-made score vectors, and each method end to end
through ``condense.distil`` under ``budget=smoke`` on Fashion-MNIST files fabricated in the IDX
format."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.func import functional_call, grad, vmap

import condense
from condense.api import compose
from condense.artifacts import load_synset
from condense.config import validate
from condense.errors import ConfigError
from condense.models import create_model
from condense.synth import SYNTHESIZERS
from condense.synth.pruning import (
    EL2N,
    CorrectnessLog,
    EL2NConfig,
    Forgetting,
    ForgettingConfig,
    GraNd,
    GraNdConfig,
    el2n_scores,
    embedding_and_logits,
    forgetting_events,
    grad_norms,
    last_layer_grad_norms,
    select_by_scores,
)
from condense.train import FitConfig, fit
from tests.conftest import make_ctx, make_tiny_data
from tests.fabricated import fabricate_fashion_mnist

REPO = Path(__file__).resolve().parents[2]
METHODS = {"grand": (GraNd, GraNdConfig), "el2n": (EL2N, EL2NConfig), "forgetting": (Forgetting, ForgettingConfig)}
TINY = {"grand": {"runs": 2, "grand_epochs": 1}, "el2n": {"runs": 2, "el2n_epochs": 2},
        "forgetting": {"runs": 2, "forgetting_epochs": 3}}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synth(name: str, seed: int = 0, cache_dir: Path | None = None, ipc: int = 2, **kw):
    cls, cfg_cls = METHODS[name]
    ctx = make_ctx(make_tiny_data(num_classes=4, per_class=12, seed=2), ipc=ipc, seed=seed, width=8, depth=2,
                   augment=False, cache_dir=cache_dir)
    return cls(cfg_cls(**{**TINY[name], "score_batch": 16, "train_batch": 16, **kw}), ctx)


# ----------------------------------------------------------------------------- keep


def test_hardest_and_easiest_take_the_extreme_scores_in_order() -> None:
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert select_by_scores(s, 2, "hardest", gen()).tolist() == [1, 3]
    assert sorted(select_by_scores(s, 2, "easiest", gen()).tolist()) == [0, 4]
    assert select_by_scores(s, 5, "hardest", gen()).tolist() == [1, 3, 2, 4, 0]


@pytest.mark.parametrize("seed", range(8))
def test_stratified_takes_one_image_per_stratum(seed: int) -> None:
    """Scores in 4 well separated pairs: 4 equal-width strata over [0, 3.05], one image from each."""
    s = torch.tensor([3.0, 0.0, 1.1, 2.0, 0.1, 3.05, 1.0, 2.1])
    got = select_by_scores(s, 4, "stratified", gen(seed)).tolist()
    strata = [{1, 4}, {2, 6}, {3, 7}, {0, 5}]
    assert sorted(len(st & set(got)) for st in strata) == [1, 1, 1, 1]
    assert got == sorted(got, key=lambda i: -float(s[i]))  # hardest first


def test_stratified_gives_an_empty_stratums_share_to_the_others() -> None:
    """CCS's allocation: strata [0, 1) = {0, 1, 2}, [1, 2) empty, [2, 3] = {3}; the smallest
    stratum gives min(1, 3 // 2) = 1, the other the remaining 2."""
    s = torch.tensor([0.0, 0.05, 0.1, 3.0])
    got = select_by_scores(s, 3, "stratified", gen())
    assert got[0] == 3 and len(set(got.tolist())) == 3


def test_prune_hard_fraction_drops_the_hardest_first() -> None:
    s = torch.arange(10.0)
    assert select_by_scores(s, 2, "hardest", gen(), prune_hard_fraction=0.2).tolist() == [7, 6]
    assert select_by_scores(s, 3, "hardest", gen(), prune_hard_fraction=0.9).tolist() == [2, 1, 0]  # keeps ipc
    assert sorted(select_by_scores(s, 2, "easiest", gen(), prune_hard_fraction=0.5).tolist()) == [0, 1]
    got = select_by_scores(s, 3, "stratified", gen(), prune_hard_fraction=0.4)  # strata of 0..5: [0,2) [2,4) [4,5]
    assert max(got.tolist()) <= 5 and sorted(int(v) // 2 for v in got.tolist()) == [0, 1, 2]


def test_ties_are_broken_by_the_generator() -> None:
    s = torch.zeros(50)
    a, b = select_by_scores(s, 5, "hardest", gen(1)), select_by_scores(s, 5, "hardest", gen(1))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 5
    assert any(select_by_scores(s, 5, "hardest", gen(k)).tolist() != a.tolist() for k in range(2, 6))


def test_keep_needs_a_valid_mode_and_enough_images() -> None:
    with pytest.raises(ConfigError, match="keep 'hard'; valid choices: hardest, easiest, stratified"):
        select_by_scores(torch.zeros(3), 1, "hard", gen())
    with pytest.raises(ConfigError, match="ipc <= 3"):
        select_by_scores(torch.zeros(3), 4, "hardest", gen())


# ----------------------------------------------------------------------------- scores


def test_forgetting_events_on_written_sequences() -> None:
    seqs = [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]
    correct = torch.tensor(seqs, dtype=torch.bool).T  # (T, N)
    assert forgetting_events(correct).tolist() == [2.0, 6.0, 0.0, 1.0, 0.0, 1.0]  # never learned: T + 1


def test_el2n_against_a_hand_computation() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    e = [math.exp(1.0), math.exp(2.0)]
    p = [e[0] / sum(e), e[1] / sum(e)]
    want = [math.sqrt(0.5), 0.75 * math.sqrt(2.0), math.sqrt((p[0] - 1) ** 2 + p[1] ** 2)]
    assert el2n_scores(logits, labels).tolist() == pytest.approx(want, rel=1e-6)
    bf = el2n_scores(logits.bfloat16(), labels)
    assert bf.dtype == torch.float32


def _tiny_net() -> nn.Module:
    return create_model("convnet", 1, 3, (8, 8), generator=gen(3), width=4, depth=1).eval()


def test_last_layer_shortcut_equals_the_final_linear_gradient_norm() -> None:
    """||g|| sqrt(1 + ||h||^2) == the per-sample CE gradient norm of the classifier's weight and
    bias, computed by torch.func (vmap of grad over functional_call)."""
    model = _tiny_net()
    x, y = torch.randn(6, 1, 8, 8, generator=gen(4)), torch.tensor([0, 1, 2, 0, 1, 2])
    params = {n: p.detach() for n, p in model.named_parameters()}
    head = {n: params[n] for n in ("classifier.weight", "classifier.bias")}

    def loss(hp, xi, yi):
        return F.cross_entropy(functional_call(model, {**params, **hp}, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(head, x, y)
    want = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    with torch.no_grad():
        h, z = embedding_and_logits(model, x)
    torch.testing.assert_close(last_layer_grad_norms(h, z, y), want, rtol=1e-5, atol=1e-6)


def test_embedding_of_a_model_without_embed_comes_from_a_hook() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(5, 3))
    x = torch.randn(4, 1, 8, 8, generator=gen(5))
    h, z = embedding_and_logits(model, x)
    torch.testing.assert_close(h, body(x))
    torch.testing.assert_close(z, model(x))
    assert not model[1]._forward_pre_hooks  # the hook removed itself


def test_full_grand_is_the_norm_of_the_per_sample_gradients() -> None:
    """``grad_norms`` (condense.ops) against the norm of torch.func's per-sample gradients of every weight."""
    model = _tiny_net()
    x, y = torch.randn(5, 1, 8, 8, generator=gen(6)), torch.tensor([2, 0, 1, 1, 0])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    want = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    torch.testing.assert_close(grad_norms(model, x, y).float(), want, rtol=1e-4, atol=1e-6)


def test_correctness_log_records_every_epoch_end_and_restores_train_mode() -> None:
    data = make_tiny_data(num_classes=3, per_class=6, seed=1)
    x, y = data.train_images, data.train_labels
    make = lambda g: create_model("convnet", 1, 3, (28, 28), generator=g, width=4, depth=1)  # noqa: E731
    log = CorrectnessLog(x, y, batch=5, bf16=False)
    models = fit(make, (x, y), FitConfig(epochs=3, batch_size=8), seeds=[0, 1], callbacks=[log]).models
    assert len(log.history) == 3 and log.history[0].shape == (2, 18) and log.history[0].dtype == torch.bool
    assert all(m.training for m in models)
    with torch.no_grad():
        final = torch.stack([m.eval()(x).argmax(-1) == y for m in models])
    assert torch.equal(log.history[-1], final)


# ----------------------------------------------------------------------------- the synthesizers


@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_keep_picks_per_class_by_score(keep: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = synth("el2n", keep=keep, ipc=3)
    n = s.ctx.data.train_images.shape[0]
    monkeypatch.setattr(s, "compute_scores", lambda x, y: torch.arange(n, dtype=torch.float32))
    syn = s.init_set()
    idx = syn.meta.extra["selected_indices"]
    want = []
    for c in range(4):
        rows = s.ctx.index.indices_of(c).tolist()
        want += rows[::-1][:3] if keep == "hardest" else sorted(rows[:3])
    got = idx if keep == "hardest" else [r for c in range(4) for r in sorted(idx[3 * c:3 * c + 3])]
    assert got == want
    assert torch.equal(syn.images, s.ctx.data.train_images[idx]) and syn.labels.tolist() == [0] * 3 + [1] * 3 + \
        [2] * 3 + [3] * 3


def test_pool_per_class_selects_within_a_random_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    s = synth("el2n", pool_per_class=5, ipc=2)
    seen = {}

    def scores(x, y):
        seen["n"] = x.shape[0]
        return torch.arange(x.shape[0], dtype=torch.float32)

    monkeypatch.setattr(s, "compute_scores", scores)
    syn = s.init_set()
    idx = syn.meta.extra["selected_indices"]
    assert seen["n"] == 20 and len(set(idx)) == 8
    assert s.ctx.data.train_labels[idx].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert syn.meta.extra["scores"]["pool"]["n"] == 20


@pytest.mark.parametrize("name", list(METHODS))
def test_same_seed_same_indices_and_cached_scores(name: str, tmp_path: Path) -> None:
    a = synth(name, cache_dir=tmp_path).init_set().meta.extra
    b = synth(name, cache_dir=tmp_path).init_set().meta.extra
    c = synth(name).init_set().meta.extra  # no cache: computed again
    assert a["selected_indices"] == b["selected_indices"] == c["selected_indices"]
    assert not a["scores"]["cached"] and b["scores"]["cached"] and not c["scores"]["cached"]
    assert a["scores"]["pool"] == b["scores"]["pool"] == c["scores"]["pool"]
    assert len(list(tmp_path.glob(f"scores-tiny-{name}-*.safetensors"))) == 1
    sel, pool = a["scores"]["selected"], a["scores"]["pool"]
    assert sel["n"] == 8 and pool["n"] == 48 and sel["mean"] >= pool["mean"]  # hardest


def test_a_changed_recipe_does_not_reuse_cached_scores(tmp_path: Path) -> None:
    synth("el2n", cache_dir=tmp_path).init_set()
    again = synth("el2n", cache_dir=tmp_path, el2n_epochs=1).init_set()
    other_keep = synth("el2n", cache_dir=tmp_path, keep="stratified").init_set()
    assert not again.meta.extra["scores"]["cached"] and other_keep.meta.extra["scores"]["cached"]


def test_grand_last_layer_and_forgetting_never_learned_run() -> None:
    syn = synth("grand", last_layer=True, grand_epochs=0).init_set()
    assert syn.meta.extra["scores"]["pool"]["min"] > 0
    scores = synth("forgetting", runs=1, forgetting_epochs=3).scores(None)[0]
    assert set(scores.unique().tolist()) <= {0.0, 1.0, 4.0}  # at most 3 // 2 events; never learned: 3 + 1


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", list(METHODS))
def test_method_yaml_matches_config(name: str) -> None:
    node = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
    assert node.pop("name") == name and SYNTHESIZERS.get(name) is METHODS[name][0]
    cfg_cls = METHODS[name][1]
    assert node.pop("bf16", "absent") is None  # null = the run's precision
    assert set(node) | {"bf16"} == {f.name for f in dataclasses.fields(cfg_cls)}
    assert cfg_cls(**node) == cfg_cls()  # the YAML states exactly the defaults


@pytest.mark.parametrize(("name", "override", "match"), [
    ("grand", {"keep": "hard"}, "grand: unknown keep 'hard'; valid choices: hardest, easiest, stratified"),
    ("grand", {"grad_backend": "fast"}, "grad_backend 'fast'; valid choices: auto, func, hooks, ghost"),
    ("grand", {"grand_epochs": -1}, r"invalid grand_epochs=-1 \(.*grand_epochs >= 0"),
    ("el2n", {"runs": 0}, r"el2n: invalid runs=0 \(.*runs >= 1"),
    ("el2n", {"el2n_epochs": -2}, "invalid el2n_epochs=-2"),
    ("el2n", {"prune_hard_fraction": 1.0}, r"invalid prune_hard_fraction=1.0 \(.*0 <= prune_hard_fraction < 1"),
    ("forgetting", {"prune_hard_fraction": -0.1}, "invalid prune_hard_fraction=-0.1"),
    ("forgetting", {"forgetting_epochs": 0}, r"invalid forgetting_epochs=0 \(.*forgetting_epochs >= 1"),
    ("forgetting", {"pool_per_class": -1}, "invalid pool_per_class=-1"),
])
def test_bad_settings_are_one_config_error(name, override, match) -> None:
    with pytest.raises(ConfigError, match=match):
        synth(name, **override)
    cfg, _ = compose(name, "fashion_mnist", 1, "paper", **{f"method.{k}": v for k, v in override.items()})
    with pytest.raises(ConfigError, match=match):  # before any data is loaded
        validate(cfg, device="cpu")


def test_dsa_needs_an_augmenter() -> None:
    with pytest.raises(ConfigError, match="no augmenter"):
        synth("el2n", dsa=True)


@pytest.mark.parametrize("name", list(METHODS))
def test_budgets_keep_the_published_settings_for_paper(name: str) -> None:
    paper = validate(compose(name, "fashion_mnist", 10, "paper")[0], device="cpu").method
    assert paper == dataclasses.replace(METHODS[name][1](), bf16=paper.bf16)
    smoke = validate(compose(name, "fashion_mnist", 10, "smoke")[0], device="cpu").method
    assert 0 < smoke.pool_per_class <= 100 and smoke.runs <= 2


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", list(METHODS))
def test_smoke_run_on_fabricated_fashion_mnist(tmp_path: Path, name: str) -> None:
    fabricate_fashion_mnist(tmp_path / "fm", per_class=12, test_per_class=3)
    res = condense.distil(method=name, dataset="fashion_mnist", ipc=2, budget="smoke", run_dir=tmp_path / "run",
                          cache_dir=str(tmp_path / "cache"), progress=False, evaluate=True,
                          **{"dataset.root": str(tmp_path / "fm"), "model.kwargs.width": 8})
    syn = load_synset(res.run_dir)
    assert syn.images.shape == (20, 1, 28, 28) and syn.meta.method == name
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(2)]
    idx = syn.meta.extra["selected_indices"]
    assert len(set(idx)) == 20 and [i // 12 for i in idx] == syn.labels.tolist()  # rows are class-major in the file
    assert syn.meta.extra["scores"]["pool"]["n"] == 120  # the pool (>= 50 per class) covers all 12 per class
    assert res.record["distill"]["iterations"] == 0 and res.record["eval"]["summary"]["convnet"]["n"] == 1
