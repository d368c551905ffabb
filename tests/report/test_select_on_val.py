"""benchmarks/select_on_val.py: the pieces that decide (the evaluation itself is the Evaluator's)."""

import importlib.util
import math
from pathlib import Path

import pytest

from condense.eval import EvalConfig

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "select_on_val.py"
_spec = importlib.util.spec_from_file_location("select_on_val", _PATH)
sov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sov)


def test_eval_config_is_the_records_protocol_plus_val():
    import dataclasses

    proto = {**dataclasses.asdict(EvalConfig(num_models=3, epochs=1000, seed=0)),
             "train_size": 10, "test_images": 10000, "labels": "hard", "vectorized": False}
    cfg = sov.eval_config(proto)
    assert cfg.report_val and cfg.epochs == 1000 and cfg.num_models == 3 and cfg.val_size == 5000


def test_parse_arm_and_bad_arm():
    assert sov.parse_arm("b128=a.json,b.json") == ("b128", ["a.json", "b.json"])
    for bad in ("b128", "=a.json", "b128="):
        with pytest.raises(SystemExit, match="NAME=RECORD"):
            sov.parse_arm(bad)


def test_arm_result_pools_models_and_gives_the_se_of_seed_means():
    sets = [{"val_acc": [80.0, 82.0], "test_acc": [70.0, 71.0]},
            {"val_acc": [84.0, 86.0], "test_acc": [72.0, 73.0]}]
    res = sov.arm_result(sets)
    assert res["summary"]["val"] == {"mean": 83.0, "std": pytest.approx(math.sqrt(5), abs=1e-4), "n": 4}
    assert res["summary"]["test"]["mean"] == 71.5
    assert res["val_seed_means"] == [81.0, 85.0]
    assert res["val_se_of_seed_mean"] == pytest.approx(2.0)  # stdev(81, 85) / sqrt(2)


def test_choose_takes_the_higher_validation_mean_whatever_the_test_says():
    low_val = sov.arm_result([{"val_acc": [80.0], "test_acc": [75.0]}, {"val_acc": [81.0], "test_acc": [76.0]}])
    high_val = sov.arm_result([{"val_acc": [82.0], "test_acc": [60.0]}, {"val_acc": [83.0], "test_acc": [61.0]}])
    chosen, runner_up, margin, se = sov.choose({"a": low_val, "b": high_val})
    assert (chosen, runner_up) == ("b", "a") and margin == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(2 * 0.5**2))
