"""The whole pipeline for Python users: :func:`distil` and :func:`evaluate`. The CLI calls these.

    import condense

    result = condense.distil(method="dm", dataset="fashion_mnist", ipc=10, budget="cpu")
    result.record["eval"]["summary"]       # {"convnet": {"mean": ..., "std": ..., "n": 3}}
    report = condense.evaluate(result.run_dir, eval="cross_arch")

A run is configured exactly like ``condense key=value ...`` on the command line: group choices
(``method``, ``dataset``, ``budget``, ``model``, ``eval``, ``logger``) pick files of ``conf/``,
other keywords set keys (``seed=1``, ``evaluate=False``; dotted paths through ``**{...}`` or
with ``__``: ``method__batch_real=32`` or ``**{"model.kwargs.width": 16}``). Composition goes
through ``condense.cli.build`` (the only Hydra user); a ready plain dict can be passed as
``config=`` instead. The pipeline itself (Hydra-free, on the plain dict) is :mod:`condense.pipeline`,
which the CLI calls too. Errors are :class:`~condense.errors.ConfigError` with one line naming the bad
value and the valid choices.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from condense import config as C
from condense.errors import ConfigError
from condense.pipeline import (
    RUN_DIR,
    DistilResult,
    default_run_dir,
    distil_config,
    evaluate_config,
    export,
    result_record,
)
from condense.synth import runner
from condense.types import EvalReport, SyntheticSet

__all__ = ["RUN_DIR", "DistilResult", "compose", "default_run_dir", "distil", "evaluate", "evaluate_config",
           "export", "result_record"]


def _group_choices(overrides: Mapping[str, Any]) -> dict[str, str]:
    """The overrides that choose a group's file by name (a group key with a string value)."""
    return {k: v for k, v in overrides.items() if k in C.ALL_GROUPS and isinstance(v, str)}


def compose(method: str | None = None, dataset: str | None = None, ipc: int | None = None,
            budget: str | None = None, *, config: Mapping[str, Any] | None = None,
            config_name: str = "config", **overrides: Any) -> tuple[dict[str, Any], list[str]]:
    """The plain config dict of a run, and the same run as command-line overrides.

    Args:
        method, dataset, budget: group choices (files of ``conf/<group>/``); None: the default.
        ipc: images per class (None: the default, 10).
        config: a ready config dict (the resolved composition); ``overrides`` are set on a copy.
            Group choices by name need composition, so they are not accepted with it.
        config_name: ``config`` (a distillation) or ``eval_app`` (an evaluation).
        **overrides: group choices by name (``model="convnet_bn"``), keys (``seed=1``), dotted
            paths (``**{"method.batch_real": 32}`` or ``method__batch_real=32``).

    Raises:
        ConfigError: an unknown group choice or key (one line, with the valid choices).
    """
    named = {"method": method, "dataset": dataset, "ipc": ipc, "budget": budget}
    overrides = {**{k: v for k, v in named.items() if v is not None}, **overrides}
    groups = _group_choices(overrides)
    if config is not None:
        if groups:
            raise ConfigError(f"with config=..., groups cannot be chosen by name ({', '.join(groups)}); "
                              f"set their nodes in the dict, or compose without config=")
        base = copy.deepcopy(dict(config))
    else:
        from condense.cli.build import compose_groups

        base = compose_groups(groups, config_name)
    cfg, args = base, []
    for key, value in overrides.items():  # the caller's order (method, dataset, ipc, budget first)
        if key in groups:
            args.append(f"{key}={value}")
        else:
            cfg, cli = C.apply_overrides(cfg, {key: value})
            args += cli
    return cfg, args


def distil(method: str | None = None, dataset: str | None = None, ipc: int | None = None,
           budget: str | None = None, *, config: Mapping[str, Any] | None = None,
           run_dir: str | Path | None = None, callbacks: Sequence[runner.Callback] = (),
           keep_method: Collection[str] = (), command: str | None = None, **overrides: Any) -> DistilResult:
    """Distil a dataset, save the artifact, evaluate it, export it and write the run's record.

    The pipeline of ``condense method=... dataset=... ipc=... budget=...``: validate the whole
    config (nothing is written before it passes), load the data, synthesize (the runner owns the
    budget, checkpoints and resume), save ``synset.safetensors`` + ``manifest.json`` +
    ``preview.png`` in ``run_dir``, evaluate (``eval.json``), export, and write ``result.json``
    (and ``result_json`` if set).

    Called in every process of ``torchrun --nproc-per-node N script.py`` (``dm``, ``datadam``,
    ``dc``, ``dsa``), it is one class-parallel run (:mod:`condense.distributed`): each rank
    distils its block of classes; rank 0 writes the files; every rank returns the whole set.

    Args:
        method, dataset, ipc, budget, config, **overrides: the run (see :func:`compose`), e.g.
            ``seed=1``, ``evaluate=False``, ``precision="fp32"``, ``resume=True``.
        run_dir: the artifact directory (default :func:`default_run_dir`, relative to the cwd).
        callbacks: extra runner callbacks (they observe; e.g. logging, an interrupt).
        keep_method: method fields the budget's per-method settings must not replace (the
            CLI's ``method.*`` arguments); ``method.*`` overrides given here are added.
        command: the command line stored in the record (default: the equivalent ``condense``
            call, when composed here).

    Returns:
        A :class:`DistilResult`.

    Raises:
        ConfigError: a bad config value (one line; nothing written).
        DatasetNotFoundError: the dataset's files are not there (nothing written).
        RunInterrupted: SIGINT/SIGTERM during synthesis (a checkpoint was written: call again
            with ``resume=True`` and the same ``run_dir``).
        condense.distributed.RankLostError: class-parallel, another rank died or hangs (every
            rank's checkpoints are kept: rerun with ``resume=True``).
    """
    cfg, cli = compose(method, dataset, ipc, budget, config=config, **overrides)
    explicit = set(keep_method) | C.method_keys(cli)
    if command is None and config is None:
        command = "condense " + " ".join(shlex.quote(a) for a in cli)
    return distil_config(cfg, explicit=explicit, run_dir=run_dir, callbacks=callbacks, command=command)


def evaluate(target: SyntheticSet | str | Path, budget: str | None = None, *,
             config: Mapping[str, Any] | None = None, out: str | Path | None = None,
             **overrides: Any) -> EvalReport | None:
    """Evaluate a synthetic set or an artifact directory under the evaluation protocol.

    The pipeline of ``condense-eval artifact=DIR ...``: fresh networks are trained on the set
    (``eval`` group: architectures, models, epochs; nulls from the ``budget`` for the set's ipc)
    and tested on the real test split. For an artifact, ``eval.json`` goes into it (or to
    ``out``) and ``export=[...]`` writes exports there.

    Args:
        target: a :class:`~condense.types.SyntheticSet` or a run directory (``manifest.json`` +
            ``synset.safetensors``; verified on load).
        budget: budget group for the nulls of the protocol (default: ``cpu``).
        config: a ready ``eval_app`` config dict instead of composing one.
        out: where ``eval.json`` goes (default: ``<artifact>/eval.json``; a set in memory: none).
        **overrides: ``eval="cross_arch"``, ``device="auto"``, ``data_root=...``,
            ``**{"eval.epochs": 300}``, ``export=["tensors"]``, ``evaluate=False`` (exports only).

    Returns:
        The :class:`~condense.types.EvalReport` (``None`` with ``evaluate=False``).

    Raises:
        ConfigError: bad settings (one line). ArtifactError: a missing, truncated or tampered artifact.
    """
    if budget is not None:
        overrides["budget"] = budget
    if out is not None:
        overrides["out"] = out
    overrides.setdefault("artifact", None if isinstance(target, SyntheticSet) else str(target))
    cfg, _ = compose(config=config, config_name="eval_app", **overrides)
    return evaluate_config(target, cfg)[0]
