"""Plain dataclasses shared across the package (no behaviour beyond small helpers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    """What a network and an artifact need to know about a dataset.

    ``mean``/``std`` have one entry per channel; images inside condense always live in the
    normalized space ``(x - mean) / std`` with ``x`` in [0, 1].
    """

    name: str
    channels: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["im_size"] = list(self.im_size)
        d["class_names"] = list(self.class_names)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=str(d["name"]),
            channels=int(d["channels"]),
            im_size=(int(d["im_size"][0]), int(d["im_size"][1])),
            num_classes=int(d["num_classes"]),
            class_names=tuple(str(c) for c in d["class_names"]),
            mean=tuple(float(m) for m in d["mean"]),
            std=tuple(float(s) for s in d["std"]),
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,C,H,W)`` in [0,1] -> normalized space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized ``(N,C,H,W)`` -> [0,1] (not clamped)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean


@dataclass
class RealData:
    """A labelled dataset held as tensors (normalized float images, int64 labels).

    Attributes:
        spec: the dataset description.
        train_images: ``(N, C, H, W)`` float32, normalized.
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        test_images: ``(M, C, H, W)`` float32, normalized.
        test_labels: ``(M,)`` int64.
        root: the folder the files were actually read from (absolute), ``None`` for data that
            did not come from files (fabricated tensors).
    """

    spec: DatasetSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: str | None = None

    def to(self, device: torch.device | str) -> RealData:
        return RealData(
            self.spec,
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.root,
        )


@dataclass
class SetMeta:
    """Metadata that travels with every synthetic set (see artifacts.py)."""

    dataset: DatasetSpec
    ipc: int
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    zca: bool = False
    code_version: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def class_order(self) -> list[int]:
        return list(range(self.dataset.num_classes))


@dataclass
class SyntheticSet:
    """A distilled (or selected) set, class-major: class ``c`` owns rows ``c*ipc:(c+1)*ipc``.

    Attributes:
        images: ``(N, C, H, W)`` float in the dataset's normalized space.
        labels: ``(N,)`` int64 hard labels or ``(N, K)`` float soft labels (logits/probs).
        meta: dataset, ipc, method, config, seed, code version.
        lr: optional learned learning rate (0-d tensor), MTT family.
        zca_matrix: optional ``(D, D)`` whitening matrix the images live in.
    """

    images: torch.Tensor
    labels: torch.Tensor
    meta: SetMeta
    lr: torch.Tensor | None = None
    zca_matrix: torch.Tensor | None = None

    @property
    def soft(self) -> bool:
        return self.labels.dim() == 2

    @property
    def hard_labels(self) -> torch.Tensor:
        """``(N,)`` int64: the labels themselves, or argmax of soft labels."""
        return self.labels.argmax(1) if self.soft else self.labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def detach_clone(self) -> SyntheticSet:
        return dataclasses.replace(
            self,
            images=self.images.detach().clone(),
            labels=self.labels.detach().clone(),
            lr=None if self.lr is None else self.lr.detach().clone(),
        )


def class_major_labels(num_classes: int, ipc: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(num_classes*ipc,)`` int64 labels ``[0]*ipc + [1]*ipc + ...``."""
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


@dataclass
class EvalReport:
    """Result of evaluating one synthetic (or real) set.

    Attributes:
        runs: one record per trained model ``{"arch", "seed", "epochs", "test_acc"}`` (percent).
        summary: per arch ``{"mean", "std", "n"}`` (percent; std is the population std, ddof=0,
            as the reference repos report).
        protocol: the evaluation settings that produced the numbers.
        wall_s: wall-clock seconds spent.
    """

    runs: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    protocol: dict[str, Any]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "runs": self.runs, "summary": self.summary,
                "wall_s": round(self.wall_s, 3)}
