"""The evaluator: retrain fresh networks on a set and report test accuracy.

Hyper-parameters are only ever chosen on a validation split carved from the real TRAINING
images (``select_lr``); the test set is touched once per trained model, for the final number.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condense.errors import ConfigError
from condense.provenance import write_json_atomic
from condense.train import FitConfig, TrainCallback, accuracy, fit
from condense.types import EvalReport, RealData, SyntheticSet

log = logging.getLogger(__name__)

#: T of the soft-label KL when neither the config nor the set names one (teacher logits, SRe2L's 3).
DEFAULT_SOFT_TEMPERATURE = 3.0

#: The protocol's learning-rate schedule (METHODS.md): x0.1 once, at half the epochs.
LR_DECAY_AT = 0.5
LR_DECAY_FACTOR = 0.1


@dataclass
class EvalConfig:
    """Evaluation protocol (defaults: METHODS.md common protocol, DSA during training).

    Attributes:
        archs: registered model names to train.
        num_models: fresh models per architecture.
        epochs: training epochs (lr x0.1 once at half).
        lr: SGD learning rate, unless the set carries a learned lr and ``use_learned_lr``.
        dsa: DSA augmentation of every training batch (``dsa_strategy`` None = dataset default).
        select_lr: candidate lrs; when non-empty one model per candidate is trained and scored on
            ``val_size`` held-out REAL TRAINING images, the best is used (never the test set).
        report_val: also score every model on the ``val_size`` held-out REAL TRAINING images
            (``val_acc`` per run, ``val_mean`` / ``val_std`` per architecture): a yardstick for
            choosing distillation settings without looking at the test set.
        vectorize: train the models of one architecture together (torch.func vmap) where possible;
            None = auto: on CUDA only (measured on a 2-core CPU: 0.79x, i.e. slower than one model
            after the other; benchmarks/perf/eval_ensemble.py).
        seed: model i of an architecture uses seed ``seed * 1000 + i``.
        soft_temperature: T of the soft-label KL loss; ``None`` = the set's own
            (``meta.extra["label_temperature"]``: 1 for labels learned as softmax targets, e.g.
            DATM), else :data:`DEFAULT_SOFT_TEMPERATURE` (teacher logits).
    """

    archs: list[str] = field(default_factory=lambda: ["convnet"])
    num_models: int = 3
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str | None = None
    soft_temperature: float | None = None
    use_learned_lr: bool = True
    select_lr: list[float] = field(default_factory=list)
    val_size: int = 5000
    test_size: int = 0  # 0: the whole test split; else a fixed class-agnostic random subset (quick looks)
    report_val: bool = False
    vectorize: bool | None = None
    bf16: bool = False
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_models", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.archs:
            raise ConfigError("eval.archs is empty; name at least one model, e.g. [convnet]")
        checks = {"lr": self.lr > 0, "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
                  "val_size": self.val_size >= 1, "test_size": self.test_size >= 0,
                  "soft_temperature": self.soft_temperature is None or self.soft_temperature > 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"eval.{name} is invalid: {getattr(self, name)!r} (lr > 0, 0 <= momentum < 1, "
                                  "weight_decay >= 0, val_size >= 1, test_size >= 0, soft_temperature > 0 or null)")
        if any(not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0) for v in self.select_lr):
            raise ConfigError(f"eval.select_lr must be positive learning rates, got {self.select_lr!r}")


class Evaluator:
    """Trains fresh models on a set and measures them on ``data``'s test split."""

    def __init__(self, cfg: EvalConfig, data: RealData, device: torch.device | str = "cpu") -> None:
        from condense.models import MODELS

        for a in cfg.archs:
            MODELS.get(a)  # fail early with the valid choices
        self.cfg = cfg
        self.data = data
        self.device = torch.device(device)
        self._augment = None
        if cfg.dsa:
            from condense.augment import DSA, default_strategy

            self._augment = DSA(cfg.dsa_strategy or default_strategy(data.spec.name))

    @property
    def vectorize(self) -> bool:
        if self.cfg.vectorize is None:
            return self.device.type == "cuda"
        return bool(self.cfg.vectorize)

    def _train_cfg(self, lr: float, temperature: float | None = None) -> FitConfig:
        """The protocol as a training-engine config: SGD, lr x0.1 once at half the epochs."""
        c = self.cfg
        return FitConfig(epochs=c.epochs, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay,
                         batch_size=c.batch_size, schedule="step", milestones=[LR_DECAY_AT],
                         gamma=LR_DECAY_FACTOR, temperature=self.temperature(temperature), bf16=c.bf16)

    def temperature(self, label_temperature: float | None = None) -> float:
        """The soft-label KL temperature: the config's, else the set's, else the default."""
        if self.cfg.soft_temperature is not None:
            return float(self.cfg.soft_temperature)
        return float(label_temperature) if label_temperature is not None else DEFAULT_SOFT_TEMPERATURE

    def train(self, arch: str, images: torch.Tensor, targets: torch.Tensor, seeds: list[int],
              lr: float, *, vectorize: bool | None = None,
              label_temperature: float | None = None, callbacks: Sequence[TrainCallback] = ()) -> list[torch.nn.Module]:
        """Fresh ``arch`` models (one per seed) trained on ``images``/``targets`` under the protocol.

        ``label_temperature``: the set's soft-label temperature (see :meth:`temperature`).
        ``callbacks``: training-engine observers (e.g. a per-epoch test curve); never change the result.

        Returns:
            The trained modules (in eval mode).
        """
        vec = self.vectorize if vectorize is None else vectorize
        from condense.models import model_factory

        make = model_factory(arch, self.data.spec, self.device, **self.cfg.model_kwargs)
        result = fit(make, (images, targets), self._train_cfg(float(lr), label_temperature), seeds=seeds,
                     augment=self._augment_fn(), vectorize=vec, callbacks=callbacks)
        for m in result.models:
            m.eval()
        return result.models

    def _augment_fn(self):  # noqa: ANN202
        if self._augment is None:
            return None
        dsa = self._augment
        return lambda x, g: dsa(x, g)

    def _val_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator()
        g.manual_seed(self.cfg.seed + 7919)
        n = self.data.train_images.shape[0]
        idx = torch.randperm(n, generator=g)[: min(self.cfg.val_size, n)].to(self.device)
        return self.data.train_images[idx], self.data.train_labels[idx]

    def _test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        return eval_test_split(self.data, self.cfg.test_size)

    def _select_lr(self, arch: str, images: torch.Tensor, targets: torch.Tensor,
                   label_temperature: float | None = None) -> tuple[float, dict]:
        vx, vy = self._val_split()
        scores = {}
        for lr in self.cfg.select_lr:
            models = self.train(arch, images, targets, [self.cfg.seed * 1000 + 999], float(lr),
                                vectorize=False, label_temperature=label_temperature)
            scores[float(lr)] = accuracy(models, vx, vy)[0]
        best = max(scores, key=lambda k: scores[k])
        return best, {"candidates": scores, "chosen": best, "on": f"{vx.shape[0]} real training images"}

    def evaluate_tensors(
        self, images: torch.Tensor, targets: torch.Tensor, *, learned_lr: float | None = None,
        label_temperature: float | None = None, callbacks: Sequence[TrainCallback] = (),
    ) -> EvalReport:
        """Evaluate any labelled tensor set (synthetic, a random real subset, the whole data).

        Args:
            images: ``(N,C,H,W)`` normalized images.
            targets: ``(N,)`` int64 hard labels or ``(N,classes)`` soft-label logits.
            learned_lr: used instead of ``cfg.lr`` when given and ``cfg.use_learned_lr``.
            label_temperature: the soft labels' own temperature (:meth:`temperature`).
        """
        c = self.cfg
        t0 = time.perf_counter()
        images = images.detach().to(self.device, torch.float32)
        targets = targets.detach().to(self.device)
        runs: list[dict[str, Any]] = []
        summary: dict[str, dict[str, float]] = {}
        selection: dict[str, Any] = {}
        val = self._val_split() if c.report_val else None
        for arch in c.archs:
            lr = learned_lr if (learned_lr is not None and c.use_learned_lr) else c.lr
            if c.select_lr:
                lr, selection[arch] = self._select_lr(arch, images, targets, label_temperature)
            seeds = [c.seed * 1000 + i for i in range(c.num_models)]
            models = self.train(arch, images, targets, seeds, float(lr), label_temperature=label_temperature,
                                callbacks=callbacks)
            tx, ty = self._test_split()
            accs = accuracy(models, tx, ty, bf16=c.bf16, vectorize=self.vectorize)
            for s, a in zip(seeds, accs, strict=True):
                runs.append({"arch": arch, "seed": s, "epochs": c.epochs, "lr": float(lr),
                             "test_acc": round(a, 4)})
            summary[arch] = {
                "mean": round(statistics.fmean(accs), 4),
                "std": round(statistics.pstdev(accs), 4),
                "n": len(accs),
            }
            if val is not None:
                vaccs = accuracy(models, *val, bf16=c.bf16, vectorize=self.vectorize)
                for run, a in zip(runs[-len(vaccs):], vaccs, strict=True):
                    run["val_acc"] = round(a, 4)
                summary[arch]["val_mean"] = round(statistics.fmean(vaccs), 4)
                summary[arch]["val_std"] = round(statistics.pstdev(vaccs), 4)
            log.info("eval %s: %.2f +- %.2f (n=%d)", arch, summary[arch]["mean"], summary[arch]["std"], len(accs))
        protocol = {**dataclasses.asdict(c), "train_size": int(images.shape[0]),
                    "test_images": int(self._test_split()[0].shape[0]),
                    "lr_decay_at": LR_DECAY_AT, "lr_decay_factor": LR_DECAY_FACTOR,
                    "labels": "soft" if targets.dim() == 2 else "hard",
                    "soft_temperature": self.temperature(label_temperature) if targets.dim() == 2 else None,
                    "learned_lr": learned_lr, "lr_selection": selection or None,
                    "vectorized": self.vectorize,
                    **({"val_images": int(val[0].shape[0])} if val is not None else {}),
                    "dsa_strategy": self._augment.strategy if self._augment is not None else None}
        return EvalReport(runs=runs, summary=summary, protocol=protocol,
                          wall_s=time.perf_counter() - t0)

    def evaluate(self, syn: SyntheticSet) -> EvalReport:
        """Evaluate a synthetic set (its learned lr is used where present; a multi-formation set
        trains on its decoded images, :func:`condense.ops.formation.decoded_set`)."""
        from condense.ops.formation import decoded_set

        syn = decoded_set(syn)
        if syn.meta.dataset.name != self.data.spec.name:
            raise ConfigError(f"synthetic set is for dataset {syn.meta.dataset.name!r} but the "
                              f"evaluator holds {self.data.spec.name!r}")
        lr = float(syn.lr) if syn.lr is not None else None
        temp = syn.meta.extra.get("label_temperature") if syn.soft else None
        target = self if syn.zca_matrix is None else self.whitened(syn)
        return target.evaluate_tensors(syn.images, syn.labels, learned_lr=lr, label_temperature=temp)

    def whitened(self, syn: SyntheticSet) -> Evaluator:
        """This evaluator on ZCA-whitened data, for a set that lives in the whitened space.

        The transform (matrix and mean) is refitted on this evaluator's training images with the
        set's ``zca_reg`` and must reproduce the set's stored matrix: the models then see test
        images whitened exactly as the set's images were.

        Raises:
            ConfigError: the set records no ``zca_reg``, or the refitted matrix differs (other data).
        """
        from condense.data import ZCA

        reg = syn.meta.extra.get("zca_reg")
        if reg is None:
            raise ConfigError("the set is ZCA-whitened but records no zca_reg (meta.extra); cannot rebuild "
                              "its transform to whiten the test images")
        zca = ZCA.fit(self.data.train_images, float(reg))
        stored = syn.zca_matrix.to(zca.matrix.device, zca.matrix.dtype)
        if stored.shape != zca.matrix.shape or not torch.allclose(stored, zca.matrix, rtol=1e-3, atol=1e-4):
            raise ConfigError("the set's ZCA matrix does not match one fitted on this evaluator's training "
                              f"images (zca_reg {reg}): it was distilled from other data")
        d = self.data
        white = dataclasses.replace(d, train_images=zca.apply(d.train_images), test_images=zca.apply(d.test_images))
        return Evaluator(self.cfg, white, self.device)

    def evaluate_whole(self, callbacks: Sequence[TrainCallback] = ()) -> EvalReport:
        """The whole-training-set reference under the same protocol."""
        return self.evaluate_tensors(self.data.train_images, self.data.train_labels, callbacks=callbacks)


def eval_test_split(data: RealData, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels every protocol scores on: the whole split (``size`` 0), else a
    fixed class-agnostic random subset of ``size`` (quick looks)."""
    x, y = data.test_images, data.test_labels
    if not size or size >= x.shape[0]:
        return x, y
    g = torch.Generator()
    g.manual_seed(104729)
    idx = torch.randperm(x.shape[0], generator=g)[:size].to(x.device)
    return x[idx], y[idx]


def write_eval_json(report: EvalReport, path: str | Path, **extra: Any) -> Path:
    """``eval.json`` (atomic): the report plus ``extra`` top-level fields."""
    path = Path(path)
    write_json_atomic(path, {**extra, **report.to_dict()})
    return path
