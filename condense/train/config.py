"""Training settings of the engine: optimizer, learning-rate schedule, loss (plain dataclass)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from condense.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SAMS = ("none", "sam", "gsam")
SCHEDULES = ("constant", "step", "cosine")
LOSSES = ("auto", "ce", "kl")


@dataclass
class FitConfig:
    """How :func:`condense.train.fit` trains.

    Attributes:
        epochs: passes over the data.
        batch_size: images per optimizer step (the last batch of an epoch may be smaller).
        optimizer: ``sgd`` | ``adam`` | ``adamw``.
        lr: base learning rate.
        momentum / nesterov: SGD only.
        betas: Adam / AdamW only.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
        schedule: ``constant``; ``step`` (lr x ``gamma`` at the start of each epoch
            ``int(epochs * m)`` for ``m`` in ``milestones``); ``cosine`` (per step, from ``lr``
            to 0 at the last step).
        milestones / gamma: the step schedule.
        warmup_epochs: linear warm-up over this many epochs (per step, from ``lr / steps`` to
            ``lr``) before the schedule, which then runs over the remaining epochs.
        loss: ``ce`` (hard labels ``(N,)`` int64), ``kl`` (soft targets ``(N, K)`` logits,
            ``KL(softmax(t / T) || softmax(z / T)) * T^2``) or ``auto`` (by the targets' shape).
        temperature: ``T`` of the KL loss.
        bf16: bfloat16 autocast of the forwards (the loss in float32).
        micro_batch: accumulate each batch's gradient over forwards of this many images (same
            gradient, less memory); ignored for BatchNorm networks (their batch statistics
            depend on the forward's batch). 0 = one forward per batch.
        sam: sharpness-aware minimization (FTD's flat experts): ``none``; ``sam`` (gradient
            at ``w + rho * g / ||g||``, per model); ``gsam`` (that gradient minus
            ``gsam_alpha`` times the part of ``g`` orthogonal to it, Zhuang et al. 2022).
        sam_rho / gsam_alpha: the perturbation radius and GSAM's ascent weight.
        loss_ramp_epochs / loss_ramp_start: scale the loss of epoch ``e < loss_ramp_epochs`` by
            ``start + (1 - start) * e / loss_ramp_epochs`` (AST's "clipping": 0.5 + 0.05 e for
            10 epochs); 0 = off.
        input_grad_penalty: ``lambda`` of AST's penalty on the un-augmented batch: mean over
            pixels of ``(||d sum f(x) / dx||_2 over channels - 1)^2``, added to the loss; 0 = off.
    """

    epochs: int = 1
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.5])
    gamma: float = 0.1
    warmup_epochs: int = 0
    loss: str = "auto"
    temperature: float = 3.0
    bf16: bool = False
    micro_batch: int = 0
    sam: str = "none"
    sam_rho: float = 0.05
    gsam_alpha: float = 0.0
    loss_ramp_epochs: int = 0
    loss_ramp_start: float = 0.5
    input_grad_penalty: float = 0.0

    def __post_init__(self) -> None:
        for key, value, valid in (("optimizer", self.optimizer, OPTIMIZERS),
                                  ("schedule", self.schedule, SCHEDULES), ("loss", self.loss, LOSSES),
                                  ("sam", self.sam, SAMS)):
            if value not in valid:
                raise ConfigError(f"train: unknown {key} {value!r}; valid choices: {', '.join(valid)}")
        checks = {"epochs": self.epochs >= 0, "batch_size": self.batch_size >= 1, "lr": self.lr >= 0,
                  "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
                  "gamma": self.gamma > 0, "warmup_epochs": 0 <= self.warmup_epochs,
                  "temperature": self.temperature > 0, "micro_batch": self.micro_batch >= 0,
                  "sam_rho": self.sam_rho >= 0, "gsam_alpha": self.gsam_alpha >= 0,
                  "loss_ramp_epochs": self.loss_ramp_epochs >= 0, "loss_ramp_start": self.loss_ramp_start >= 0,
                  "input_grad_penalty": self.input_grad_penalty >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"train: invalid {key}={getattr(self, key)!r} (epochs >= 0, batch_size >= 1, "
                                  "lr >= 0, 0 <= momentum < 1, weight_decay >= 0, gamma > 0, "
                                  "warmup_epochs >= 0, temperature > 0, micro_batch >= 0, sam_rho >= 0, "
                                  "gsam_alpha >= 0, loss_ramp_epochs >= 0, loss_ramp_start >= 0, "
                                  "input_grad_penalty >= 0)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.milestones = [float(m) for m in self.milestones]


def make_optimizer(cfg: FitConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``params`` at ``cfg.lr``.

    All three are elementwise, so one optimizer over K stacked models' parameters is exactly K
    independent optimizers (what vectorized training relies on).
    """
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_at(cfg: FitConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based, within ``epoch``, 0-based).

    Args:
        steps_per_epoch: optimizer steps per epoch (``ceil(N / batch_size)``).
    """
    warm = cfg.warmup_epochs * steps_per_epoch
    t = epoch * steps_per_epoch + step
    if t < warm:
        return cfg.lr * (t + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        drops = sum(1 for m in cfg.milestones if 0 < int(cfg.epochs * m) <= epoch)
        return cfg.lr * cfg.gamma ** drops
    total = max(1, cfg.epochs * steps_per_epoch - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / total))


def loss_scale(cfg: FitConfig, epoch: int) -> float:
    """The loss factor of ``epoch`` (0-based) under ``cfg.loss_ramp_epochs`` (1.0 when off)."""
    ramp = cfg.loss_ramp_epochs
    if ramp <= 0 or epoch >= ramp:
        return 1.0
    return cfg.loss_ramp_start + (1.0 - cfg.loss_ramp_start) * epoch / ramp
