"""Teacher-based recovery (condense.synth.recovery): SRe2L, CDA's curriculum, the committee, RDED."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from condense.errors import ConfigError
from condense.eval.teachers import TeacherSpec, accuracy_weights, load_teacher_refs
from condense.ops import crops
from condense.synth.base import derive_generator
from condense.synth.recovery import (
    CDA,
    RDED,
    CDAConfig,
    Committee,
    CommitteeConfig,
    RDEDConfig,
    RecoveryConfig,
    SRe2L,
    _stitch,
    curriculum_min_scale,
)
from tests.conftest import make_ctx

TINY_TEACHER = {"model": "convnet_bn", "epochs": 2, "seed": 0, "train_size": 0, "test_size": 0, "bf16": False,
                "model_kwargs": {"width": 8, "depth": 2}}


def test_curriculum_values() -> None:
    T = 100
    assert curriculum_min_scale("step", 0, T) == 1.0 and curriculum_min_scale("step", 99, T) == 1.0
    assert curriculum_min_scale("step", 50, T, milestone=0.5) == 0.08
    assert curriculum_min_scale("linear", 0, T) == 1.0
    assert math.isclose(curriculum_min_scale("linear", 25, T), 0.08 + 0.92 * 0.75)
    assert math.isclose(curriculum_min_scale("linear", 25, T, milestone=0.5), 0.08 + 0.92 * 0.5)
    assert curriculum_min_scale("cosine", 0, T) == 1.0
    assert math.isclose(curriculum_min_scale("cosine", 50, T), 0.08 + 0.92 * 0.5)
    assert math.isclose(curriculum_min_scale("cosine", 25, T), 0.08 + 0.92 * (1 + math.cos(math.pi / 4)) / 2)
    assert curriculum_min_scale("cosine", 80, T, milestone=0.8) == 0.08
    assert curriculum_min_scale("none", 0, T) == 0.08
    assert curriculum_min_scale("cosine", 0, T, floor=0.3) == 1.0
    assert math.isclose(curriculum_min_scale("linear", 50, T, floor=0.3), 0.3 + 0.7 * 0.5)
    with pytest.raises(ConfigError, match="valid choices: none, step, linear, cosine"):
        curriculum_min_scale("exp", 0, T)
    with pytest.raises(ConfigError, match="milestone"):
        curriculum_min_scale("step", 0, T, milestone=0)


def _synth(cls, cfg_cls, tiny_data, tmp_path, ipc: int = 2, **kw):
    ctx = make_ctx(tiny_data, ipc=ipc, cache_dir=tmp_path / "cache")
    base = {"teacher": dict(TINY_TEACHER), "iterations": 12}
    cfg = cfg_cls(**{**base, **kw}) if "iterations" in {f.name for f in dataclasses.fields(cfg_cls)} else None
    s = cls(cfg, ctx)
    s.prepare()
    return s, ctx


def test_sre2l_recovers_toward_the_teacher(tiny_data, tmp_path) -> None:
    s, ctx = _synth(SRe2L, RecoveryConfig, tiny_data, tmp_path, iterations=30, lr=0.1)
    syn = s.init_set()
    lo = ((0 - 0.5) / 0.25)
    hi = ((1 - 0.5) / 0.25)
    first = s.step(syn, 0)
    for it in range(1, 30):
        last = s.step(syn, it)
    assert last["ce"] < first["ce"] and last["loss"] < first["loss"]
    assert syn.images.min() >= lo - 1e-6 and syn.images.max() <= hi + 1e-6  # clipped to [0, 1] pixels
    assert last["lr"] < 0.1 * 0.05  # cosine to 0 over the 30 iterations
    out = s.finalize(syn)
    assert not out.images.requires_grad and out.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    refs = out.meta.extra["teachers"]
    assert len(refs) == 1 and refs[0]["weight"] == 1.0 and refs[0]["spec"]["model_kwargs"] == {"width": 8, "depth": 2}
    (net, w), = load_teacher_refs(refs, ctx.cache_dir)
    loaded, used = net.state_dict(), s.nets[0].state_dict()
    assert w == 1.0 and loaded.keys() == used.keys() and all(torch.equal(loaded[k], used[k]) for k in used)


def test_sre2l_groups_and_bn_loss_per_group(tiny_data, tmp_path) -> None:
    s, _ = _synth(SRe2L, RecoveryConfig, tiny_data, tmp_path, ipc=3, batch_ipc=2)
    groups = s.groups()
    assert [g.tolist() for g in groups] == [[0, 1, 3, 4, 6, 7, 9, 10], [2, 5, 8, 11]]
    s.cfg.batch_ipc = 0
    assert [g.tolist() for g in s.groups()] == [list(range(12))]


def test_cda_crops_follow_the_curriculum(tiny_data, tmp_path) -> None:
    s, ctx = _synth(CDA, CDAConfig, tiny_data, tmp_path, iterations=10)
    assert s.min_scale(0) == 1.0 and s.min_scale(10) == 0.08
    assert math.isclose(s.min_scale(5), 0.08 + 0.92 * 0.5)
    # at iteration 0 the crop is the whole image (scale 1, ratio range contains 1): only flip + jitter
    x = torch.randn(4, 1, 28, 28)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = s.augment(x, 0, g1)
    boxes = crops.sample_resized_crops(4, 28, 28, scale=(1.0, 1.0), generator=g2)
    want = crops.resized_crop(x, boxes)
    want = crops.flip(want, crops.sample_flips(4, generator=g2))
    want = crops.random_shift(want, 4, generator=g2)
    assert torch.allclose(got, want)
    syn = s.init_set()
    m = s.step(syn, 0)
    assert m["min_scale"] == 1.0


def test_committee_votes_and_relabel_weights(tiny_data, tmp_path) -> None:
    t0 = dict(TINY_TEACHER)
    t1 = {**TINY_TEACHER, "seed": 1}
    s, _ = _synth(Committee, CommitteeConfig, tiny_data, tmp_path, teachers=[t0, t1], voters=1)
    assert len(s.nets) == 2
    accs = [r["test_acc"] for r in s.refs]
    assert [r["weight"] for r in s.refs] == pytest.approx(accuracy_weights(accs, 10.0))
    assert sum(r["weight"] for r in s.refs) == pytest.approx(1.0)
    picks = {tuple(s.voters()) for _ in range(30)}
    assert picks == {(0,), (1,)}
    s.cfg.voters = 0
    assert s.voters() == [0, 1]
    syn = s.init_set()  # real init
    assert any(torch.equal(syn.images[0], r) for r in s.ctx.data.train_images)
    s.step(syn, 0)
    assert accuracy_weights([90.0, 80.0], 5.0) == pytest.approx([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))])


def test_rded_keeps_each_class_lowest_ce_crops(tiny_data, tmp_path) -> None:
    s, ctx = _synth(RDED, RDEDConfig, tiny_data, tmp_path, ipc=3)
    s.cfg.candidates_per_class = 10
    s.cfg.crops_per_image = 4
    state = ctx.generator.get_state()
    syn = s.init_set()
    # brute force with the same draws: every crop scored alone, loops instead of tensor ops
    ctx.generator.set_state(state)
    idx = ctx.index.sample(10, ctx.generator)
    gen = derive_generator(ctx.generator, ctx.device)
    net = s.nets[0]
    for c in range(4):
        real = ctx.data.train_images[idx[c]].repeat_interleave(4, 0)
        cand = crops.resized_crop(real, crops.sample_resized_crops(40, 28, 28, scale=(0.5, 1.0), generator=gen))
        with torch.no_grad():
            ce = [F.cross_entropy(net(cand[i:i + 1]), torch.tensor([c])).item() for i in range(40)]
        best = [min(range(4), key=lambda j, i=i: ce[4 * i + j]) for i in range(10)]
        order = sorted(range(10), key=lambda i: ce[4 * i + best[i]])[:3]
        want = torch.stack([cand[4 * i + best[i]] for i in order])
        assert torch.allclose(syn.images[3 * c:3 * c + 3], want, atol=1e-6)
    assert syn.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert syn.meta.extra["teachers"][0]["dir"].startswith("tiny-convnet_bn-")


def test_stitch_layout() -> None:
    p = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    out = _stitch(p, 2, 2)
    assert out.shape == (2, 1, 4, 4)
    assert out[0, 0, ::2, ::2].tolist() == [[0, 1], [2, 3]] and out[1, 0, ::2, ::2].tolist() == [[4, 5], [6, 7]]


def test_rded_factor_two_stitches_shrunk_crops(tiny_data, tmp_path) -> None:
    s, _ = _synth(RDED, RDEDConfig, tiny_data, tmp_path, ipc=1)
    s.cfg.factor = 2
    s.cfg.candidates_per_class = 8
    syn = s.init_set()
    assert syn.images.shape == (4, 1, 28, 28)


def test_config_errors(tiny_data, tmp_path) -> None:
    ctx = make_ctx(tiny_data, ipc=2, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="set crop=true"):
        SRe2L(RecoveryConfig(curriculum="cosine"), ctx)
    with pytest.raises(ConfigError, match="valid choices: none, step, linear, cosine"):
        SRe2L(RecoveryConfig(curriculum="poly"), ctx)
    with pytest.raises(ConfigError, match="invalid crop_scale"):
        SRe2L(RecoveryConfig(crop=True, crop_scale=[0.5, 0.2]), ctx)
    with pytest.raises(ConfigError, match="unknown key.*colour.*valid keys"):
        SRe2L(RecoveryConfig(teacher={"model": "convnet_bn", "colour": 1}), ctx)
    with pytest.raises(ConfigError, match="unknown model"):
        SRe2L(RecoveryConfig(teacher={"model": "convnet_xx"}), ctx)
    with pytest.raises(ConfigError, match="factor 3 does not divide.*valid factors: 1, 2, 4"):
        RDED(RDEDConfig(factor=3, candidates_per_class=0), ctx)
    with pytest.raises(ConfigError, match="candidates_per_class=5 < ipc x factor"):
        RDED(RDEDConfig(factor=2, candidates_per_class=5), ctx)
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1"):
        TeacherSpec(epochs=0)


def test_missing_teacher_names_the_command(tmp_path) -> None:
    from condense.errors import ArtifactError

    ref = {"dir": "tiny-convnet_bn-0000", "weight": 1.0, "spec": {**TINY_TEACHER, "train_size": 40}}
    with pytest.raises(ArtifactError, match="condense-teachers kind=teacher model=convnet_bn epochs=2 seed=0 "
                                            "train.bf16=false train_size=40"):
        load_teacher_refs([ref], tmp_path)
