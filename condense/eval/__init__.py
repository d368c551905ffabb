"""Evaluation: retrain fresh networks on a set and measure test accuracy.

Two protocols: :class:`Evaluator` (hard labels, SGD, DSA; ``EvalConfig``) and
:class:`SoftEvaluator` (a teacher's soft labels, KL, AdamW, crops + CutMix; ``SoftEvalConfig``).
:func:`make_evaluator` picks the one a config names.
"""

from __future__ import annotations

from typing import Any

import torch

from condense.eval.evaluator import EvalConfig, Evaluator, write_eval_json
from condense.eval.soft import SoftEvalConfig, SoftEvaluator
from condense.types import RealData

__all__ = ["EvalConfig", "Evaluator", "SoftEvalConfig", "SoftEvaluator", "make_evaluator", "write_eval_json"]


def make_evaluator(cfg: EvalConfig | SoftEvalConfig, data: RealData,
                   device: torch.device | str = "cpu") -> Any:
    """The evaluator of ``cfg``'s protocol: :class:`SoftEvaluator` for a :class:`SoftEvalConfig`,
    else :class:`Evaluator`."""
    if isinstance(cfg, SoftEvalConfig):
        return SoftEvaluator(cfg, data, device)
    return Evaluator(cfg, data, device)
