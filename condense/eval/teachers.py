"""Teachers named by a spec and referenced from artifacts (recovery methods, soft-label evaluation).

A :class:`TeacherSpec` names a single trained network (``condense.teachers.get_teacher``: the
engine's teacher recipe, cached under a content key); :func:`obtain_teacher` returns the module
and a *reference*, a JSON-able dict that an artifact stores to say which teacher labels its
images (``meta.extra["teachers"]``)::

    {"dir": "fashion_mnist-convnet_bn-<key>",    # the entry under <cache_dir>/teachers/
     "key", "model", "model_kwargs", "seed", "epochs", "train_size",
     "test_acc": 91.6,                           # percent, from the teacher's manifest
     "weight": 1.0,                              # relabel weight; the refs of one set sum to 1
     "spec": {...}}                              # TeacherSpec.to_dict(): how to retrain it

:func:`load_teacher_refs` loads them back (the soft-label evaluator's teachers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condense.errors import ArtifactError, ConfigError
from condense.types import RealData


@dataclass
class TeacherSpec:
    """One teacher: trained with ``condense.teachers.teacher_fit_config(epochs, bf16=bf16)``.

    Attributes:
        model / model_kwargs: the network (``condense.models`` registry), e.g. ``convnet_bn``.
        epochs: training epochs (the cache key includes them).
        seed: initialisation / shuffling / augmentation seed.
        train_size: 0 = the whole training split; else a class-balanced subset of this many
            images (``condense.teachers.balanced_subset``: cheap teachers for tests and smoke runs).
        test_size: 0 = score the teacher on the whole test split after each epoch (recorded in its
            manifest); else a class-balanced subset (not part of the cache key).
        bf16: bfloat16 autocast while training (and while labelling).
    """

    model: str = "convnet_bn"
    epochs: int = 15
    seed: int = 0
    train_size: int = 0
    test_size: int = 0
    bf16: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "seed", "train_size", "test_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "epochs" else 0):
                low = 1 if name == "epochs" else 0
                raise ConfigError(f"teacher.{name} must be an integer >= {low}, got {v!r}")
        from condense.models import MODELS

        MODELS.get(self.model)  # one line with the valid choices

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | TeacherSpec) -> TeacherSpec:
        """A spec from a mapping (unknown keys are an error naming the valid ones)."""
        if isinstance(d, TeacherSpec):
            return d
        names = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(d) - set(names))
        if bad:
            raise ConfigError(f"teacher: unknown key(s) {', '.join(bad)}; valid keys: {', '.join(names)}")
        return cls(**{k: (dict(v) if k == "model_kwargs" else v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``condense-teachers`` command that trains this teacher into the cache."""
        extra = (f" train_size={self.train_size}" if self.train_size else "") + \
            (f" test_size={self.test_size}" if self.test_size else "")
        kw = "".join(f" +model.kwargs.{k}={v}" for k, v in self.model_kwargs.items())
        return (f"condense-teachers kind=teacher model={self.model} epochs={self.epochs} seed={self.seed} "
                f"train.bf16={str(self.bf16).lower()}{extra}{kw}")


def obtain_teacher(spec: TeacherSpec | Mapping[str, Any], data: RealData, cache_dir: str | Path, *,
                   train: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher ``spec`` names: from the cache, else trained on ``data`` and cached.

    Returns:
        ``(module in eval mode on the data's device, ref)`` with ``ref["weight"] = 1.0``.
    """
    from condense.teachers import balanced_subset, get_teacher, teacher_fit_config

    spec = TeacherSpec.from_dict(spec)
    d = balanced_subset(data, spec.train_size, spec.test_size) if spec.train_size or spec.test_size else data
    cfg = teacher_fit_config(spec.epochs, bf16=bool(spec.bf16))
    model, manifest = get_teacher(d, spec.model, model_kwargs=spec.model_kwargs, cfg=cfg, cache_dir=cache_dir,
                                  seed=spec.seed, train=train)
    ref = {"dir": f"{data.spec.name}-{spec.model}-{manifest['key']}", "key": manifest["key"],
           "model": spec.model, "model_kwargs": dict(spec.model_kwargs), "seed": spec.seed,
           "epochs": spec.epochs, "train_size": spec.train_size, "test_acc": float(manifest["test_acc"]),
           "wall_s": manifest.get("wall_s"), "weight": 1.0, "spec": spec.to_dict()}
    return model, ref


def accuracy_weights(accs: Sequence[float], temperature: float) -> list[float]:
    """CV-DD's committee weights: ``softmax(accuracy / temperature)`` (accuracies in percent)."""
    if not accs:
        return []
    z = [a / temperature for a in accs]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def load_teacher_refs(refs: Sequence[Mapping[str, Any]], cache_dir: str | Path,
                      device: torch.device | str = "cpu") -> list[tuple[nn.Module, float]]:
    """The teachers an artifact references, as ``(module in eval mode, weight)``.

    Raises:
        ArtifactError: an entry is missing from the cache or malformed (one line: how to retrain it).
    """
    from condense.teachers import load_teacher

    out = []
    for ref in refs:
        try:
            path = Path(cache_dir) / "teachers" / str(ref["dir"])
            weight = float(ref.get("weight", 1.0))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"malformed teacher reference {dict(ref)!r}: needs 'dir' and 'weight'") from None
        if not path.exists():
            how = TeacherSpec.from_dict(ref["spec"]).command() if isinstance(ref.get("spec"), Mapping) else \
                "condense-teachers kind=teacher ..."
            raise ArtifactError(f"teacher {ref['dir']} is not in the cache {Path(cache_dir) / 'teachers'}; "
                                f"train it with: {how} (cache_dir={cache_dir})")
        model, _ = load_teacher(path, device)
        out.append((model, weight))
    return out
