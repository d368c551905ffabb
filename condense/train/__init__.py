"""The one training engine: every network condense trains goes through :func:`fit`."""

from condense.train.config import (
    LOSSES,
    OPTIMIZERS,
    SAMS,
    SCHEDULES,
    FitConfig,
    loss_scale,
    lr_at,
    make_optimizer,
)
from condense.train.engine import (
    DataShard,
    EpochState,
    FitResult,
    Stack,
    TrainCallback,
    accuracy,
    fit,
    has_batchnorm,
    input_grad_penalty,
    per_model_loss,
)

__all__ = ["LOSSES", "OPTIMIZERS", "SAMS", "SCHEDULES", "DataShard", "EpochState", "FitConfig", "FitResult",
           "Stack", "TrainCallback", "accuracy", "fit", "has_batchnorm", "input_grad_penalty", "loss_scale",
           "lr_at", "make_optimizer", "per_model_loss"]
