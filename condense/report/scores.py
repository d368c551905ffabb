"""DD-Ranking style scores (Li et al. 2025, NUS-HPC-AI-Lab/DD-Ranking, "Label-Robust Score").

With accuracies in percent:

- HLR (hard-label recovery) = acc(whole data, hard labels) - acc(synthetic, hard labels); lower is
  better.
- IOR (improvement over random) = acc(synthetic) - acc(random real subset of the same size, same
  evaluation); higher is better.
- LRS (label-robust score): alpha = w * IOR - (1 - w) * HLR with the accuracies as fractions in
  [0, 1] (so alpha lies in [-1, 1]); LRS = (exp(alpha) - exp(-1)) / (exp(1) - exp(-1)) * 100, in
  [0, 100]. DD-Ranking's leaderboard uses w = 0.5.

DD-Ranking averages HLR / IOR / LRS over repeated evaluations; here they are computed from the mean
accuracies of the result files (one number per cell).
"""

from __future__ import annotations

import math

LRS_WEIGHT = 0.5

FORMULA = ("HLR = Acc(whole) - Acc(syn); IOR = Acc(syn) - Acc(random, same ipc and budget); "
           "alpha = w·IOR - (1-w)·HLR with accuracies as fractions (w = 0.5); "
           "LRS = (e^alpha - e^-1) / (e - e^-1) × 100")


def hlr(whole_acc: float | None, syn_acc: float | None) -> float | None:
    """Hard-label recovery in percentage points; ``None`` if either accuracy is missing."""
    if whole_acc is None or syn_acc is None:
        return None
    return whole_acc - syn_acc


def ior(syn_acc: float | None, random_acc: float | None) -> float | None:
    """Improvement over random in percentage points; ``None`` if either accuracy is missing."""
    if syn_acc is None or random_acc is None:
        return None
    return syn_acc - random_acc


def lrs(hlr_pp: float | None, ior_pp: float | None, weight: float = LRS_WEIGHT) -> float | None:
    """Label-robust score in [0, 100] from HLR and IOR given in percentage points.

    Args:
        hlr_pp: hard-label recovery (percentage points).
        ior_pp: improvement over random (percentage points).
        weight: ``w`` of DD-Ranking, the weight of IOR (``1 - w`` goes to -HLR).

    Returns:
        ``None`` when either input is missing.
    """
    if hlr_pp is None or ior_pp is None:
        return None
    if not 0.0 <= weight <= 1.0:
        from condense.errors import ConfigError

        raise ConfigError(f"LRS weight must be in [0, 1], got {weight!r}")
    alpha = weight * ior_pp / 100.0 - (1.0 - weight) * hlr_pp / 100.0
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0)) * 100.0
