"""The soft-label evaluation protocol (condense.eval.soft): any set evaluates under it, its own
teachers label it where it has some, stored labels replay bit for bit, label bytes are recorded,
and bad settings or files are one line each."""

from __future__ import annotations

import json

import pytest
import torch

from condense.artifacts import LABELS, load_labels, load_synset, save_synset
from condense.errors import ArtifactError, ConfigError
from condense.eval import SoftEvalConfig, SoftEvaluator, make_evaluator
from condense.eval.soft import (
    FILL_LOGIT,
    SOFT_LABELS,
    BatchPlan,
    Teachers,
    batch_seed,
    dense,
    quantize,
    relabel,
)
from condense.eval.teachers import obtain_teacher
from condense.types import SetMeta, SyntheticSet, class_major_labels

TINY = {"width": 8, "depth": 2}
TEACHER = {"epochs": 2, "model_kwargs": TINY}


def _cfg(tmp_path, **kw) -> SoftEvalConfig:
    base = {"num_models": 1, "epochs": 2, "batch_size": 4, "teacher": TEACHER, "cache_dir": str(tmp_path / "cache"),
            "model_kwargs": TINY}
    return SoftEvalConfig(**{**base, **kw})


def _random_set(data, ipc: int = 2, extra: dict | None = None) -> SyntheticSet:
    """A selection-like set: the first ``ipc`` training images of each class, hard labels."""
    k = data.spec.num_classes
    idx = torch.cat([torch.nonzero(data.train_labels == c).flatten()[:ipc] for c in range(k)])
    meta = SetMeta(dataset=data.spec, ipc=ipc, method="random", extra=dict(extra or {}))
    return SyntheticSet(images=data.train_images[idx].clone(), labels=class_major_labels(k, ipc), meta=meta)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_soft_evaluation_of_a_hard_label_set_uses_the_config_teacher(tiny_data, tmp_path):
    syn = _random_set(tiny_data)
    ev = make_evaluator(_cfg(tmp_path), tiny_data)
    assert isinstance(ev, SoftEvaluator)
    rep = ev.evaluate(syn)
    p = rep.protocol
    assert p["labels"] == SOFT_LABELS and p["label_mode"] == "online" and p["teacher_source"] == "config"
    assert len(p["teachers"]) == 1 and p["teacher_acc"] == [p["teachers"][0]["test_acc"]]
    assert p["label_bytes"] == 0 and p["image_bytes"] == syn.images.numel() * 4
    assert p["teacher_bytes"] == sum(q.numel() * 4 for q in ev.teachers(syn).members[0][0].parameters())
    assert p["temperature"] == 4.0 and p["optimizer"] == "adamw" and p["top_k"] == 4
    assert p["augmentation"]["crop_scale"] == [0.25, 1.0] and p["augmentation"]["cutmix_alpha"] == 1.0
    assert rep.summary["convnet"]["n"] == 1 and len(rep.runs) == 1
    json.dumps(rep.to_dict())  # the report is a record


def test_a_set_with_teacher_refs_is_labelled_by_its_committee(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    members, refs = [], []
    for seed, w in ((0, 0.25), (1, 0.75)):
        m, ref = obtain_teacher({**TEACHER, "seed": seed}, tiny_data, cache)
        members.append(m)
        refs.append({**ref, "weight": w})
    syn = _random_set(tiny_data, extra={"teachers": refs})
    ev = SoftEvaluator(_cfg(tmp_path, teacher={"epochs": 99}), tiny_data)  # never trained: the set has its own
    teachers = ev.teachers(syn)
    assert teachers.source == "set" and [w for _, w in teachers.members] == [0.25, 0.75]
    x = tiny_data.train_images[:5]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the teachers' spec: bf16
        want = sum(w * m(x).float() for m, w in zip(members, (0.25, 0.75), strict=True))
    assert torch.equal(teachers.logits(x), want)
    rep = ev.evaluate(syn)
    assert rep.protocol["teacher_source"] == "set" and [t["weight"] for t in rep.protocol["teachers"]] == [0.25, 0.75]


def test_batch_plan_is_a_function_of_the_seed_alone(tiny_data):
    plan = BatchPlan(n=10, batch_size=4, seed=3, crop_scale=(0.25, 1.0), crop_ratio=(0.75, 4 / 3), flip=True,
                     cutmix_alpha=1.0)
    x = tiny_data.train_images[:10]
    torch.manual_seed(123)  # the global generator plays no part
    a = list(plan.epoch(x, 5))
    torch.manual_seed(7)
    b = list(plan.epoch(x, 5))
    assert len(a) == plan.steps == 3 and [t.shape[0] for t in a] == [4, 4, 2]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], next(iter(plan.epoch(x, 6))))
    assert len({batch_seed(0, 0), batch_seed(0, 0, 0), batch_seed(0, 1, 0), batch_seed(1, 0, 0)}) == 4


def test_quantize_top_k_fills_the_rest():
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    v, i = quantize(logits, 4)
    assert i is None and v.dtype == torch.float16 and torch.equal(dense(v, i, 4), logits)
    v, i = quantize(logits, 2)
    assert i.dtype == torch.uint8 and i.tolist() == [[0, 2]]
    assert dense(v, i, 4).tolist() == [[3.0, FILL_LOGIT, 2.0, FILL_LOGIT]]


def _artifact(tiny_data, tmp_path, name: str = "art"):
    syn = _random_set(tiny_data)
    run_dir = tmp_path / name
    save_synset(syn, run_dir)
    return load_synset(run_dir), run_dir


def test_stored_labels_replay_the_crops_bit_for_bit_and_train_the_online_student(tiny_data, tmp_path):
    syn, run_dir = _artifact(tiny_data, tmp_path)
    ev = SoftEvaluator(_cfg(tmp_path, labels="stored"), tiny_data)
    rep = ev.evaluate(syn, artifact=run_dir)
    size = (run_dir / LABELS).stat().st_size
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert rep.protocol["label_bytes"] == size == manifest["files"][LABELS]["bytes"] > 0
    assert manifest["storage_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    values, indices, proto, nbytes = load_labels(run_dir)
    assert indices is None and values.dtype == torch.float16 and values.shape == (2, len(syn), 4) and nbytes == size
    assert proto["label_seed"] == 0 and proto["epochs"] == 2 and "crop_scale" in proto
    # crop replay from the seed + the teacher again == the stored labels, exactly (k = all)
    images = syn.images.float()
    plan, teachers = ev.plan(len(syn)), ev.teachers(syn)
    again = relabel(images, plan, teachers, 2, 4, 4, proto)
    assert torch.equal(again.values, values)
    # a student from the stored labels is the student trained online, weight for weight
    online = SoftEvaluator(_cfg(tmp_path), tiny_data)
    a = online.train("convnet", images, plan, lambda e, s, x: dense(*quantize(teachers.logits(x), 4), 4), seed=0)
    b = ev.train("convnet", images, plan, again.targets(4, plan, torch.device("cpu")), seed=0)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the whole evaluation: stored (read back) == online
    assert ev.evaluate(syn, artifact=run_dir).runs == online.evaluate(syn).runs
    load_synset(run_dir)  # the artifact with its labels still loads


def test_top_k_labels_store_indices_and_match_online(tiny_data, tmp_path):
    syn, run_dir = _artifact(tiny_data, tmp_path)
    stored = SoftEvaluator(_cfg(tmp_path, labels="stored", top_k=2), tiny_data).evaluate(syn, artifact=run_dir)
    values, indices, proto, _ = load_labels(run_dir)
    assert values.shape[-1] == 2 and indices.dtype == torch.uint8 and proto["top_k"] == 2
    online = SoftEvaluator(_cfg(tmp_path, top_k=2), tiny_data).evaluate(syn)
    assert stored.runs == online.runs and stored.protocol["label_bytes"] == (run_dir / LABELS).stat().st_size


def test_stored_labels_of_another_protocol_are_an_error_unless_relabel(tiny_data, tmp_path):
    syn, run_dir = _artifact(tiny_data, tmp_path)
    SoftEvaluator(_cfg(tmp_path, labels="stored"), tiny_data).evaluate(syn, artifact=run_dir)
    with pytest.raises(ConfigError, match=r"another protocol \(epochs 2 \(stored\) vs 3.*eval.relabel=true") as e:
        SoftEvaluator(_cfg(tmp_path, labels="stored", epochs=3), tiny_data).evaluate(syn, artifact=run_dir)
    assert "\n" not in str(e.value)
    rep = SoftEvaluator(_cfg(tmp_path, labels="stored", epochs=3, relabel=True), tiny_data).evaluate(
        syn, artifact=run_dir)
    assert load_labels(run_dir)[2]["epochs"] == 3 and rep.protocol["label_bytes"] == (run_dir / LABELS).stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_labels_file_is_one_artifact_error_line(tiny_data, tmp_path, damage):
    syn, run_dir = _artifact(tiny_data, tmp_path)
    SoftEvaluator(_cfg(tmp_path, labels="stored"), tiny_data).evaluate(syn, artifact=run_dir)
    path = run_dir / LABELS
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-3] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:-10]))
    else:
        path.unlink()
    for call in (lambda: load_labels(run_dir), lambda: load_synset(run_dir),
                 lambda: SoftEvaluator(_cfg(tmp_path, labels="stored"), tiny_data).evaluate(syn, artifact=run_dir)):
        with pytest.raises(ArtifactError) as e:
            call()
        assert "\n" not in str(e.value) and LABELS in str(e.value)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"labels": "cached"}, r"unknown eval.labels 'cached'; valid choices: online, stored"),
    ({"top_k": 0}, r"eval.top_k must be >= 1 .*got 0"),
    ({"crop_scale": [0.5, 0.2]}, r"eval.crop_scale must be two numbers with 0 < lo <= hi <= 1, got \[0.5, 0.2\]"),
    ({"temperature": 0}, r"eval.temperature is invalid: 0"),
    ({"teacher": {"epoch": 3}}, r"teacher: unknown key\(s\) epoch; valid keys: "),
    ({"protocol": "hard"}, r"must be 'soft', got 'hard'"),
])
def test_bad_settings_are_one_config_error_line(kw, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle) as e:
        _cfg(tmp_path, **kw)
    assert "\n" not in str(e.value)


def test_top_k_above_the_classes_is_a_config_error(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.top_k=5 is outside 1..4"):
        SoftEvaluator(_cfg(tmp_path, top_k=5), tiny_data).evaluate(_random_set(tiny_data))


def test_teachers_are_averaged_in_fp32_with_weights(tiny_data):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    t = Teachers([(a, 0.5), (b, 0.5)], [{"key": "a"}, {"key": "b"}], "set")
    x = torch.randn(2, 4)
    assert torch.allclose(t.logits(x), 0.5 * a(x) + 0.5 * b(x)) and t.parameter_bytes == 2 * 15 * 4


# ----------------------------------------------------------------------------- configs and the pipeline

def test_eval_soft_and_budget_cpu_soft_compose(tmp_path):
    from condense import config as C
    from condense.api import compose

    cfg, _ = compose(config_name="eval_app", eval="soft", budget="cpu_soft", artifact="x")
    for ipc, epochs in ((1, None), (10, None), (50, None)):
        ecfg = C.eval_config(cfg, ipc=ipc)
        assert isinstance(ecfg, SoftEvalConfig) and ecfg.num_models == 3
        want = C.per_ipc(cfg["budget"]["eval"]["soft"]["epochs"], ipc)
        assert ecfg.epochs == (epochs or want)
    smoke, _ = compose(config_name="eval_app", eval="soft", budget="smoke", artifact="x")
    s = C.eval_config(smoke, ipc=1)
    assert s.epochs == 2 and s.num_models == 1
    assert s.teacher == smoke["budget"]["method_overrides"]["sre2l"]["teacher"]  # the recovery methods' teacher
    plain, _ = compose(config_name="eval_app", eval="soft", artifact="x")  # budget cpu: the published 300
    assert C.eval_config(plain, ipc=10).epochs == 300
    # budget cpu_soft alone (the hard-label eval group): the soft protocol, the group's shared keys kept
    alone = C.eval_config(compose(config_name="eval_app", budget="cpu_soft", eval="cross_arch", artifact="x")[0],
                          ipc=10)
    assert isinstance(alone, SoftEvalConfig) and alone.epochs == C.eval_config(cfg, ipc=10).epochs
    assert len(alone.archs) == 6 and alone.lr == 1e-3
    hard_key, _ = compose(config_name="eval_app", budget="cpu_soft", artifact="x", **{"eval.lr": 0.05})
    with pytest.raises(ConfigError, match=r"eval.lr=0.05 is a hard-label protocol setting, but budget 'cpu_soft' "
                                          r"evaluates under the soft-label protocol; add eval=soft"):
        C.eval_config(hard_key, ipc=10)
    bad, _ = compose(config_name="eval_app", eval="soft", artifact="x", **{"eval.labels": "nope"})
    with pytest.raises(ConfigError, match="unknown eval.labels 'nope'"):
        C.eval_config(bad, ipc=10)
    dist, _ = compose(method="random", budget="cpu_soft", eval="soft", cache_dir=str(tmp_path))
    built = C.validate(dist)
    assert isinstance(built.eval, SoftEvalConfig) and built.eval.cache_dir == str(tmp_path)


def test_distil_and_evaluate_under_the_soft_protocol_store_labels_in_the_artifact(tmp_path, monkeypatch):
    import condense
    from tests.fabricated import fabricate_fashion_mnist

    monkeypatch.chdir(tmp_path)
    root = fabricate_fashion_mnist(tmp_path / "fm", per_class=8, test_per_class=2)
    small = {"eval.model_kwargs": TINY, "eval.teacher": {"model_kwargs": TINY}, "eval.labels": "stored"}
    res = condense.distil(method="random", dataset="fashion_mnist", ipc=1, budget="smoke", eval="soft",
                          cache_dir=str(tmp_path / "cache"), progress=False, run_dir=tmp_path / "run",
                          **{"dataset.root": str(root)}, **small)
    proto = res.record["eval"]["protocol"]
    assert proto["labels"] == SOFT_LABELS and proto["label_mode"] == "stored"
    assert res.paths["labels"] == tmp_path / "run" / LABELS
    assert proto["label_bytes"] == (tmp_path / "run" / LABELS).stat().st_size > 0
    assert proto["image_bytes"] == 10 * 28 * 28 * 4 and proto["teacher_bytes"] > 0
    load_synset(tmp_path / "run")  # manifest lists the labels; checksums hold
    # re-evaluating the artifact reads the stored labels (same protocol): the same students
    rep = condense.evaluate(tmp_path / "run", budget="smoke", eval="soft", data_root=str(root),
                            **{"eval.cache_dir": str(tmp_path / "cache")}, **small)
    assert rep.runs == res.record["eval"]["runs"] and rep.protocol["relabel_s"] == 0.0
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["protocol"]["label_bytes"] == proto["label_bytes"]
    assert not str(saved["eval_config"]["cache_dir"]).startswith("/")
