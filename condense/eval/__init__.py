"""Evaluation: retrain fresh networks on a set and measure test accuracy."""

from condense.eval.evaluator import EvalConfig, Evaluator, write_eval_json
from condense.eval.train import TrainConfig, ensemble_accuracy, has_batchnorm, train_classifiers

__all__ = ["EvalConfig", "Evaluator", "TrainConfig", "ensemble_accuracy", "has_batchnorm",
           "train_classifiers", "write_eval_json"]
