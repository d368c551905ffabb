"""The synthesizer contract: one object per method, one outer iteration per ``step``.

The runner (``condense.synth.runner``) owns the loop, budget, checkpoints and logging; a
synthesizer only knows how to initialise a set, improve it by one iteration, and finish it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from condense.errors import ConfigError
from condense.registry import Registry
from condense.types import RealData, SyntheticSet


def derive_generator(gen: torch.Generator, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded by one draw from ``gen`` (advances ``gen``)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    out = torch.Generator(device=device)
    out.manual_seed(seed)
    return out


@dataclass
class SynthContext:
    """Everything a synthesizer needs, built by the CLI or a script.

    Attributes:
        data: real data as tensors on ``device``.
        index: per-class sampler over ``data.train_labels`` (``condense.data.ClassIndex``).
        ipc: images per class.
        seed: the run's seed (metadata; randomness comes from ``generator``).
        device: where tensors and networks live.
        generator: the single source of randomness, on ``device``.
        model_name / model_kwargs: the matching/feature network (``condense.models`` registry).
        augment: a ``condense.augment.DSA`` or ``None`` (siamese augmentation).
        cache_dir: where cached artefacts (trained feature nets, experts) may be kept.
        shard: in a class-parallel run (``torchrun``), this rank's classes and the collectives
            (:class:`condense.distributed.ClassShard`); ``None`` in a one-process run. A method
            that supports it (``class_parallel``) holds only its rank's classes' images.
        decoder: how a stored image turns into training images (:class:`condense.ops.formation.Decoder`):
            plain pixels (identity) or multi-formation; only methods whose ``params`` name it get
            a non-identity one.
    """

    data: RealData
    index: Any
    ipc: int
    seed: int
    device: torch.device
    generator: torch.Generator
    model_name: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: Any = None
    cache_dir: Path | None = None
    shard: Any = None
    decoder: Any = None

    def __post_init__(self) -> None:
        if self.decoder is None:
            from condense.ops.formation import PIXELS

            self.decoder = PIXELS

    @property
    def spec(self):  # noqa: ANN201 - DatasetSpec, avoids an import cycle in type checkers
        return self.data.spec

    def make_model(self, name: str | None = None, **overrides: Any) -> nn.Module:
        """A freshly initialised network on ``device``; weights drawn from ``generator``."""
        from condense.models import create_model

        kwargs = {**self.model_kwargs, **overrides}
        g = derive_generator(self.generator)
        model = create_model(
            name or self.model_name,
            channels=self.spec.channels,
            num_classes=self.spec.num_classes,
            im_size=self.spec.im_size,
            generator=g,
            **kwargs,
        )
        return model.to(self.device)


class Synthesizer(abc.ABC):
    """Base class of every method. Subclasses set ``Config`` (a dataclass) and ``name``.

    ``Config`` must have an ``iterations: int`` field (0 for pure selection methods).
    """

    Config: ClassVar[type]
    name: ClassVar[str]
    #: Whether the method runs class-parallel (``ctx.shard`` set, several ranks under torchrun):
    #: it then holds its rank's classes only (``init_set``/``step`` on them, random draws as one
    #: process makes them) and ``step`` returns its rank's SHARES of the metrics (the runner sums them).
    class_parallel: ClassVar[bool] = False
    #: Parametrizations of the stored set the method composes with (``param=...``,
    #: :mod:`condense.ops.formation`): every matcher decodes through ``ctx.decoder``.
    params: ClassVar[tuple[str, ...]] = ("pixels",)

    def __init__(self, cfg: Any, ctx: SynthContext) -> None:
        require_param(type(self), ctx.decoder.kind)
        ctx.decoder.check_size(ctx.spec.im_size)
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg: Any, ipc: int) -> None:
        """Check ``cfg`` without data or context (ranges, choices), so that a bad value fails in
        :func:`condense.config.validate` before anything is loaded or written. One line naming
        the bad value and the valid choices (:class:`~condense.errors.ConfigError`). Default: nothing."""
        return None

    @property
    def iterations(self) -> int:
        return int(getattr(self.cfg, "iterations", 0))

    #: Facts about the prepare phase for the run's record (``record["prepare"]``), e.g. whether
    #: the teachers came from the cache and what training them cost when they were trained.
    prepare_info: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance, never mutated

    def prepare(self) -> None:
        """Obtain what the method needs before distillation starts (teachers, expert trajectories).

        Runs once per run, before :meth:`init_set`, also when a run resumes. Its wall time is kept
        apart (``RunResult.prepare_s``): it is neither distillation time nor part of a wall-clock
        budget. Implementations should load from / save to a cache under ``self.ctx.cache_dir``
        (``condense.teachers``), so that only a cold run pays for training. Default: nothing.
        """
        return None

    @abc.abstractmethod
    def init_set(self) -> SyntheticSet:
        """The starting synthetic set (class-major, ``images`` a leaf tensor if optimized)."""

    def step(self, syn: SyntheticSet, it: int) -> dict[str, float]:
        """One outer iteration, in place on ``syn``. Returns scalars to log (e.g. ``loss``)."""
        raise NotImplementedError(f"{type(self).__name__} has no iterations")

    def finalize(self, syn: SyntheticSet) -> SyntheticSet:
        """Post-processing after the last iteration (relabel, detach...)."""
        return syn

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints: tensors, numbers, strings, lists, dicts only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (called after ``init_set``)."""
        return None

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    #: Config fields a resumed run may change (everything else must match the checkpoint's).
    resume_free_fields: ClassVar[tuple[str, ...]] = ("iterations",)

    def resume_fingerprint(self) -> str:
        """The config a checkpoint must have been written with to be resumed (JSON, sorted keys)."""
        cfg = {k: v for k, v in self.config_dict().items() if k not in self.resume_free_fields}
        if not self.ctx.decoder.identity:  # a multi-formation checkpoint holds slots, not images
            cfg["param"] = self.ctx.decoder.to_dict()
        return json.dumps(cfg, sort_keys=True, default=str)


SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("method")


def require_class_parallel(cls: type[Synthesizer], ctx: SynthContext | None = None) -> None:
    """``cls`` may run with ``ctx.shard`` (class-parallel): it supports it, and the context's
    network has no BatchNorm (:func:`condense.distributed.check_class_parallel`; skipped without
    ``ctx``).

    Raises:
        ConfigError: one line naming the method or the network and what to do.
    """
    if not cls.class_parallel:
        ok = ", ".join(n for n in SYNTHESIZERS.names() if SYNTHESIZERS.get(n).class_parallel)
        raise ConfigError(f"{cls.name} does not run class-parallel (under torchrun with several ranks); "
                          f"methods that do: {ok}; run {cls.name} with one process")
    if ctx is not None:
        from condense.distributed import check_class_parallel

        check_class_parallel(ctx, cls.name)


def require_param(cls: type[Synthesizer], kind: str) -> None:
    """``cls`` composes with the parametrization ``kind``, else one line naming the methods that do."""
    if kind not in cls.params:
        ok = ", ".join(n for n in SYNTHESIZERS.names() if kind in SYNTHESIZERS.get(n).params)
        raise ConfigError(f"method {cls.name} does not support param={kind}; methods that do: {ok}")


def register_synthesizer(name: str) -> Callable[[type[Synthesizer]], type[Synthesizer]]:
    """Class decorator: registers a Synthesizer subclass under ``name`` and sets ``cls.name``."""

    def deco(cls: type[Synthesizer]) -> type[Synthesizer]:
        cls.name = name
        SYNTHESIZERS.add(name, cls)
        return cls

    return deco
