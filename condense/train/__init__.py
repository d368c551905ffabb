"""The one training engine: every network condense trains goes through :func:`fit`."""

from condense.train.config import LOSSES, OPTIMIZERS, SCHEDULES, FitConfig, lr_at, make_optimizer
from condense.train.engine import (
    EpochState,
    FitResult,
    Stack,
    TrainCallback,
    accuracy,
    fit,
    has_batchnorm,
    per_model_loss,
)

__all__ = ["LOSSES", "OPTIMIZERS", "SCHEDULES", "EpochState", "FitConfig", "FitResult", "Stack",
           "TrainCallback", "accuracy", "fit", "has_batchnorm", "lr_at", "make_optimizer", "per_model_loss"]
