import pytest
import torch

from condense.errors import ConfigError, UnknownNameError
from condense.eval import EvalConfig, Evaluator
from condense.train import accuracy
from condense.types import SetMeta, SyntheticSet


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


def _poisoned(data, images: bool = False):
    """``data`` with its test labels shifted by one class (a model that learned the task scores ~0 on
    them; one trained or selected on them learns the shift instead) and, with ``images``, its test
    images replaced by noise."""
    import dataclasses

    g = torch.Generator().manual_seed(99)
    x = torch.randn(data.test_images.shape, generator=g) if images else data.test_images
    return dataclasses.replace(data, test_images=x, test_labels=(data.test_labels + 1) % data.spec.num_classes)


def test_lr_selection_scores_held_out_training_images_never_the_test_set(tiny_data):
    """Poisoning the test split (labels shifted, images replaced) leaves the lr selection's scores
    exactly as they were, and they come from correctly labelled training images (the lr that learns
    wins by far); the final number does read the poisoned labels (models that learned miss them all)."""
    cfg = EvalConfig(num_models=1, epochs=5, dsa=False, select_lr=[1e-5, 0.05], val_size=40,
                     model_kwargs={"width": 8, "depth": 2})
    x, y = tiny_data.train_images, tiny_data.train_labels
    clean = Evaluator(cfg, tiny_data).evaluate_tensors(x, y)
    sel = clean.protocol["lr_selection"]["convnet"]
    assert sel["chosen"] == 0.05 and "40 real training images" == sel["on"]
    assert sel["candidates"][0.05] >= 90.0 > sel["candidates"][1e-5] + 30.0
    assert clean.summary["convnet"]["mean"] >= 90.0
    labels_only, both = (Evaluator(cfg, p).evaluate_tensors(x, y)
                         for p in (_poisoned(tiny_data), _poisoned(tiny_data, images=True)))
    for rep in (labels_only, both):
        assert rep.protocol["lr_selection"]["convnet"] == sel  # same candidates, same scores, same choice
        assert rep.runs[0]["lr"] == 0.05
    assert labels_only.summary["convnet"]["mean"] <= 10.0


def test_training_never_sees_the_test_set(tiny_data):
    """The trained models do not depend on the test split: on a set of randomly labelled images
    (memorized, so each model's accuracy on held-out training images is an idiosyncratic number
    that fingerprints its weights) the fingerprints are identical whatever the test split holds."""
    g = torch.Generator().manual_seed(5)
    x = tiny_data.train_images[:32]
    y = torch.randint(0, tiny_data.spec.num_classes, (32,), generator=g)
    cfg = EvalConfig(num_models=2, epochs=6, dsa=True, report_val=True, val_size=96, model_kwargs={"width": 8, "depth": 2})
    prints = [[r["val_acc"] for r in Evaluator(cfg, d).evaluate_tensors(x, y).runs]
              for d in (tiny_data, _poisoned(tiny_data), _poisoned(tiny_data, images=True))]
    assert prints[0] == prints[1] == prints[2]
    assert len(set(prints[0])) == 2  # two different models, each told apart from the other


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


def test_evaluator_trains_through_the_engine_and_its_modules_score_the_report(tiny_data):
    """The evaluator's numbers are the engine's trained modules' accuracies, vectorized or not."""
    for vec in (False, True):
        cfg = EvalConfig(num_models=2, epochs=3, dsa=True, vectorize=vec, model_kwargs={"width": 8, "depth": 2})
        ev = Evaluator(cfg, tiny_data)
        x, y = tiny_data.train_images[::3], tiny_data.train_labels[::3]
        rep = ev.evaluate_tensors(x, y)
        models = ev.train("convnet", x, y, [0, 1], cfg.lr)
        assert [r["test_acc"] for r in rep.runs] == [round(a, 4) for a in
                                                     accuracy(models, tiny_data.test_images, tiny_data.test_labels)]
        assert rep.protocol["vectorized"] is vec


def test_training_callbacks_observe_every_epoch_without_changing_the_models(tiny_data):
    from condense.train import TrainCallback

    class Curve(TrainCallback):
        def __init__(self) -> None:
            self.points = []

        def on_epoch_end(self, state) -> None:
            self.points.append((state.epoch, accuracy(state.models, tiny_data.test_images, tiny_data.test_labels)))

    cfg = EvalConfig(num_models=2, epochs=3, dsa=True, model_kwargs={"width": 8, "depth": 2})
    curve = Curve()
    seen = Evaluator(cfg, tiny_data).evaluate_whole(callbacks=[curve])
    plain = Evaluator(cfg, tiny_data).evaluate_whole()
    assert [r["test_acc"] for r in seen.runs] == [r["test_acc"] for r in plain.runs]
    assert [e for e, _ in curve.points] == [1, 2, 3]
    assert [round(a, 4) for a in curve.points[-1][1]] == [r["test_acc"] for r in seen.runs]
