"""Trained networks as cached artifacts: expert trajectories (MTT family) and single teachers.

Entry points::

    experts = get_experts(data, n=10, epochs=50, cache_dir=cache)      # ExpertSet, lazy
    theta = experts[3].params(12)                                       # (P,) after epoch 12
    named = experts.unflatten(theta)                                    # {name: tensor}
    net, manifest = get_teacher(data, "resnet18_bn", epochs=30, cache_dir=cache)   # eval mode

A hit loads (checksums verified), a miss trains through :func:`condense.train.fit` with a
checkpoint after every epoch (a killed process resumes with the same bytes) and writes the
entry atomically. Keys hash the data, the model, the training settings, the seed (teachers;
for experts the seed names the entry inside the set) and the source of the training path.
"""

from __future__ import annotations

import torch

from condense.errors import ConfigError
from condense.teachers._store import code_key, data_fingerprint
from condense.teachers._training import Recipe, resolve_augment
from condense.teachers.experts import (
    EXPERT_EPOCHS,
    Expert,
    ExpertSet,
    expert_fit_config,
    get_experts,
    load_expert,
    unflatten,
)
from condense.teachers.teacher import TEACHER_EPOCHS, get_teacher, load_teacher, teacher_fit_config
from condense.types import RealData

__all__ = ["EXPERT_EPOCHS", "TEACHER_EPOCHS", "Expert", "ExpertSet", "Recipe", "balanced_subset", "code_key",
           "data_fingerprint", "expert_fit_config", "get_experts", "get_teacher", "load_expert", "load_teacher",
           "resolve_augment", "teacher_fit_config", "unflatten"]


def _first_per_class(labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """Indices (ascending) of the first ``per_class`` items of every class in ``labels`` ``(N,)``."""
    y = labels.to("cpu")
    onehot = torch.nn.functional.one_hot(y, num_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position of each item within its class
    return torch.nonzero(rank < per_class).flatten()


def balanced_subset(data: RealData, train_size: int = 0, test_size: int = 0) -> RealData:
    """The first ``size // classes`` images of every class (file order) of each split; 0 keeps a split.

    A deterministic, class-balanced subset (cheap teachers for tests and smoke runs).

    Raises:
        ConfigError: a size that is negative or smaller than the number of classes.
    """
    k = data.spec.num_classes
    out = []
    for name, size, x, y in (("train_size", train_size, data.train_images, data.train_labels),
                             ("test_size", test_size, data.test_images, data.test_labels)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or 0 < size < k:
            raise ConfigError(f"{name} must be 0 (all) or an integer >= the number of classes ({k}), got {size!r}")
        if size == 0:
            out += [x, y]
            continue
        idx = _first_per_class(y, k, size // k).to(y.device)
        out += [x[idx], y[idx]]
    return RealData(data.spec, *out)
