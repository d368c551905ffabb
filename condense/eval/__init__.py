"""Evaluation: retrain fresh networks on a set and measure test accuracy."""

from condense.eval.evaluator import EvalConfig, Evaluator, write_eval_json

__all__ = ["EvalConfig", "Evaluator", "write_eval_json"]
