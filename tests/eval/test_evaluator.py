import pytest
import torch

from condense.errors import ConfigError, UnknownNameError
from condense.eval import EvalConfig, Evaluator, TrainConfig, ensemble_accuracy, train_classifiers
from condense.models import create_model
from condense.types import SetMeta, SyntheticSet


def _maker(data, **kw):
    s = data.spec

    def make(g):
        return create_model("convnet", s.channels, s.num_classes, s.im_size, generator=g,
                            width=8, depth=2, **kw)

    return make


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_vectorized_training_equals_sequential(tiny_data):
    """K models trained as one vmapped model == the same K models trained one by one.

    In float64: in float32 the two summation orders drift apart over four epochs by an amount
    that depends on the CPU's SIMD width (a CI machine showed 3e-4), which is not what this
    test is about.
    """
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    x, y = tiny_data.train_images.double(), tiny_data.train_labels
    from condense.augment import DSA

    dsa = DSA()
    aug = lambda xb, g: dsa(xb, g)  # noqa: E731

    def make64(g):
        return _maker(tiny_data)(g).double()

    vec = train_classifiers(make64, x, y, [0, 1, 2], cfg, augment=aug, vectorize=True)
    seq = train_classifiers(make64, x, y, [0, 1, 2], cfg, augment=aug, vectorize=False)
    assert vec.vectorize and not seq.vectorize
    for k in range(3):
        stacked = torch.cat([p[k].detach().flatten() for p in vec.params.values()])
        assert stacked.dtype == torch.float64
        torch.testing.assert_close(stacked, _flat(seq.models[k]), rtol=1e-9, atol=1e-11)
    a_vec = ensemble_accuracy(vec, tiny_data.test_images.double(), tiny_data.test_labels)
    a_seq = ensemble_accuracy(seq, tiny_data.test_images.double(), tiny_data.test_labels)
    assert a_vec == a_seq


def test_batchnorm_falls_back_to_sequential(tiny_data):
    s = tiny_data.spec

    def make(g):
        return create_model("convnet_bn", s.channels, s.num_classes, s.im_size, generator=g, width=8, depth=2)

    ens = train_classifiers(make, tiny_data.train_images, tiny_data.train_labels, [0, 1],
                            TrainConfig(epochs=1, batch_size=32), vectorize=True)
    assert not ens.vectorize


def test_evaluator_learns_separable_data_and_reports(tiny_data):
    ev = Evaluator(EvalConfig(num_models=2, epochs=30, dsa=False, model_kwargs={"width": 8, "depth": 2}),
                   tiny_data)
    rep = ev.evaluate_tensors(tiny_data.train_images, tiny_data.train_labels)
    assert len(rep.runs) == 2 and {r["arch"] for r in rep.runs} == {"convnet"}
    assert rep.summary["convnet"]["n"] == 2
    assert rep.summary["convnet"]["mean"] > 90.0
    assert rep.protocol["epochs"] == 30 and rep.protocol["train_size"] == 96 and rep.wall_s > 0


def test_learned_lr_and_soft_labels(tiny_data):
    ev = Evaluator(EvalConfig(num_models=1, epochs=2, dsa=True, model_kwargs={"width": 8, "depth": 2}),
                   tiny_data)
    n = 8
    meta = SetMeta(dataset=tiny_data.spec, ipc=2, method="x")
    syn = SyntheticSet(images=tiny_data.train_images[:n], labels=torch.randn(n, 4), meta=meta,
                       lr=torch.tensor(0.003))
    rep = ev.evaluate(syn)
    assert rep.runs[0]["lr"] == pytest.approx(0.003) and rep.protocol["labels"] == "soft"


def test_lr_selection_uses_training_data_not_test(tiny_data):
    # poison the test labels: selection must not depend on them
    cfg = EvalConfig(num_models=1, epochs=5, dsa=False, select_lr=[1e-5, 0.05], val_size=40,
                     model_kwargs={"width": 8, "depth": 2})
    ev = Evaluator(cfg, tiny_data)
    rep = ev.evaluate_tensors(tiny_data.train_images, tiny_data.train_labels)
    sel = rep.protocol["lr_selection"]["convnet"]
    assert sel["chosen"] == 0.05 and "real training images" in sel["on"]


def test_report_val_scores_the_same_models_on_held_out_training_images(tiny_data):
    import dataclasses

    kw = dict(num_models=2, epochs=3, dsa=False, val_size=40, model_kwargs={"width": 8, "depth": 2})
    x, y = tiny_data.train_images[:20], tiny_data.train_labels[:20]
    plain = Evaluator(EvalConfig(**kw), tiny_data).evaluate_tensors(x, y)
    ev = Evaluator(EvalConfig(report_val=True, **kw), tiny_data)
    rep = ev.evaluate_tensors(x, y)
    # the same models: test accuracies unchanged, val accuracies added
    assert [r["test_acc"] for r in rep.runs] == [r["test_acc"] for r in plain.runs]
    assert all("val_acc" not in r for r in plain.runs) and "val_mean" not in plain.summary["convnet"]
    assert rep.protocol["val_images"] == 40 and "val_images" not in plain.protocol
    # val_acc is those models' accuracy on the val split: make the val split the test split
    vx, vy = ev._val_split()
    swapped = dataclasses.replace(tiny_data, test_images=vx, test_labels=vy)
    on_val = Evaluator(EvalConfig(**kw), swapped).evaluate_tensors(x, y)
    assert [r["val_acc"] for r in rep.runs] == [r["test_acc"] for r in on_val.runs]
    vals = [r["val_acc"] for r in rep.runs]
    assert rep.summary["convnet"]["val_mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-3)


def test_bad_config_errors(tiny_data):
    with pytest.raises(UnknownNameError, match="valid choices"):
        Evaluator(EvalConfig(archs=["nope"]), tiny_data)
    with pytest.raises(ConfigError, match="num_models"):
        EvalConfig(num_models=0)
    other = SetMeta(dataset=type(tiny_data.spec)(**{**tiny_data.spec.__dict__, "name": "other"}), ipc=1, method="x")
    syn = SyntheticSet(images=tiny_data.train_images[:4], labels=tiny_data.train_labels[:4], meta=other)
    with pytest.raises(ConfigError, match="dataset"):
        Evaluator(EvalConfig(num_models=1, epochs=1), tiny_data).evaluate(syn)
