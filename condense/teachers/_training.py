"""Training a teacher or an expert through the engine, resumable after every epoch.

After each finished epoch a checkpoint (the engine's :meth:`EpochState.checkpoint`: model,
optimizer and generator states; plus the trajectory and test accuracies so far and the elapsed
time) is written atomically; a process killed at any moment restarts from the last finished
epoch and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from condense.errors import ArtifactError, ConfigError
from condense.provenance import atomic_write_bytes
from condense.train import EpochState, FitConfig, TrainCallback, accuracy, fit
from condense.types import DatasetSpec, RealData

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Recipe:
    """How a teacher or an expert is trained; all of it goes into the cache key.

    Attributes:
        model: ``condense.models`` registry key, e.g. ``convnet``, ``convnet_bn``, ``resnet18_bn``.
        model_kwargs: the model's options (e.g. ``{"width": 64}``).
        fit: the engine's settings (optimizer, schedule, epochs, batch size, precision).
        augment: DSA strategy used on every training batch (ops joined by ``_``), or ``none``.
    """

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    fit: FitConfig = field(default_factory=FitConfig)
    augment: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_kwargs": dict(self.model_kwargs),
                "fit": dataclasses.asdict(self.fit), "augment": self.augment}


def resolve_augment(augment: str | None, dataset: str) -> str:
    """``default`` -> the dataset's DSA strategy; ``None``/``none``/``""`` -> ``none``; else checked.

    Raises:
        ConfigError: an unknown DSA op (the message lists the valid ones).
    """
    from condense.augment import DSA, default_strategy

    if augment is None or str(augment).strip().lower() in ("", "none"):
        return "none"
    if augment == "default":
        return default_strategy(dataset)
    DSA(str(augment))  # validates
    return str(augment)


def check_model(recipe: Recipe) -> None:
    """Fail fast on an unknown model or model kwarg (UnknownNameError / ConfigError listing the valid ones)."""
    from condense.models import model_kwargs

    valid = model_kwargs(recipe.model)
    for key in recipe.model_kwargs:
        if key not in valid:
            raise ConfigError(f"unknown kwarg {key!r} for model {recipe.model!r}; valid kwargs: "
                              f"{', '.join(valid) or '(none)'}")


def make_factory(spec: DatasetSpec, recipe: Recipe, device: torch.device) -> Callable[[torch.Generator], nn.Module]:
    """``make(generator) -> model`` on ``device``, its weights drawn from the (CPU) generator."""
    from condense.models import model_factory

    return model_factory(recipe.model, spec, device, **recipe.model_kwargs)


def build_model(spec: DatasetSpec, recipe: Recipe, device: torch.device | str = "cpu") -> nn.Module:
    """An untrained model of ``recipe`` (weights from a fixed generator; to be overwritten by a load)."""
    return make_factory(spec, recipe, torch.device(device))(torch.Generator().manual_seed(0))


def test_accuracy(model: nn.Module, data: RealData) -> float | None:
    """Top-1 test accuracy (percent) of ``model``; ``None`` without test images."""
    if data.test_images.shape[0] == 0:
        return None
    return round(float(accuracy(model, data.test_images, data.test_labels)[0]), 4)


@dataclass
class Outcome:
    """A finished training: the model, per-epoch records and the (cumulative) wall time.

    Attributes:
        model: the trained module (train mode, on the data's device).
        trajectory: ``(epochs + 1, P)`` float32 CPU parameters after every epoch (row 0: the
            initialisation), or ``None`` when not recorded.
        test_acc: ``epochs + 1`` test accuracies (percent; entry 0: the initialisation).
        history: the engine's per-epoch history (``{"epoch", "loss", "lr"}``).
        wall_s: training seconds, summed over the processes that worked on it.
        resumed_from: the epoch this process started at (0: a fresh start).
    """

    model: nn.Module
    trajectory: Tensor | None
    test_acc: list[float | None]
    history: list[dict[str, Any]]
    wall_s: float
    resumed_from: int


class _Recorder(TrainCallback):
    """Records parameters / test accuracy after every epoch and writes the resume checkpoint."""

    def __init__(self, data: RealData, ckpt: Path, key: str, trajectory: bool, saved: dict[str, Any] | None,
                 t0: float) -> None:
        self.data, self.ckpt, self.key, self.trajectory = data, ckpt, key, trajectory
        self.rows: list[Tensor] = list(saved["trajectory"].unbind(0)) if saved and trajectory else []
        self.acc: list[float | None] = list(saved["test_acc"]) if saved else []
        self.elapsed0 = float(saved["elapsed_s"]) if saved else 0.0
        self.t0 = t0

    def _record(self, state: EpochState) -> None:
        if self.trajectory:
            self.rows.append(state.flat_params(0).to("cpu", torch.float32))
        self.acc.append(test_accuracy(state.models[0], self.data))

    def on_fit_start(self, state: EpochState) -> None:
        if state.epoch == 0:
            self._record(state)

    def on_epoch_end(self, state: EpochState) -> None:
        self._record(state)
        payload = {"key": self.key, "fit": state.checkpoint(), "test_acc": self.acc,
                   "trajectory": torch.stack(self.rows) if self.trajectory else None,
                   "elapsed_s": self.elapsed()}
        save_checkpoint(self.ckpt, payload)
        log.info("epoch %d/%d: test accuracy %s%%", state.epoch, state.epochs, self.acc[-1])

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a resume checkpoint atomically (readable with ``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and belongs to ``key`` (a foreign one is ignored)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start over
        log.warning("ignoring unreadable checkpoint %s (%s); training from the start", path, e)
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        log.warning("ignoring checkpoint %s of another recipe; training from the start", path)
        return None
    return saved


def train(data: RealData, recipe: Recipe, seed: int, work_dir: Path, key: str, *,
          trajectory: bool) -> Outcome:
    """Train one model of ``recipe`` on ``data`` with ``seed``, resuming from ``work_dir`` if possible.

    Args:
        data: the training / test tensors; training runs on their device.
        recipe: model, engine settings and augmentation.
        seed: seeds the model's generator (initialisation, shuffling, augmentation).
        work_dir: where the per-epoch checkpoint lives (``work_dir/checkpoint.pt``).
        key: the entry's cache key (a checkpoint of another key is not resumed).
        trajectory: record the ``(epochs + 1, P)`` parameter trajectory.
    """
    from condense.augment import DSA

    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    ckpt = work_dir / CKPT_NAME
    saved = load_checkpoint(ckpt, key)
    start = int(saved["fit"]["epoch"]) if saved else 0
    if saved:
        log.info("resuming %s (seed %d) after epoch %d from %s", recipe.model, seed, start, ckpt)
    device = data.train_images.device
    augment = None if recipe.augment == "none" else DSA(recipe.augment)
    rec = _Recorder(data, ckpt, key, trajectory, saved, time.perf_counter())
    result = fit(make_factory(data.spec, recipe, device), (data.train_images, data.train_labels), recipe.fit,
                 seeds=[seed], augment=augment, callbacks=[rec], resume=saved["fit"] if saved else None)
    model = result.models[0]
    losses = [h["loss"][0] for h in result.history]
    if any(not math.isfinite(v) for v in losses):
        raise ArtifactError(f"training {recipe.model} (seed {seed}) diverged: loss {losses}; lower train.lr")
    traj = torch.stack(rec.rows) if trajectory else None
    if traj is not None and traj.shape[0] != recipe.fit.epochs + 1:
        raise ArtifactError(f"trajectory has {traj.shape[0]} rows, expected {recipe.fit.epochs + 1}; delete "
                            f"{work_dir} and retrain")
    return Outcome(model, traj, rec.acc, result.history, rec.elapsed(), start)
