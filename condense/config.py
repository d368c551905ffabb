"""A run's configuration as a plain dict (the resolved composition of ``conf/``) -> objects.

Hydra-free: ``condense/cli`` composes the YAML files into a plain dict, this module checks and
interprets it. Strict: unknown keys and bad values raise :class:`~condense.errors.ConfigError`
with one line naming the bad value and the valid choices.

The dict has the shape of ``conf/config.yaml``: top-level keys (``ipc``, ``seed``, ``device``,
``precision``, ...) and one node per group (``method``, ``dataset``, ``model``, ``eval``,
``budget``, ``logger``), each with its ``name``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from condense.errors import ConfigError

log = logging.getLogger(__name__)

GROUPS = ("method", "dataset", "model", "eval", "budget", "logger")
#: Groups a run config may lack (their absence means the default: ``param`` -> plain pixels).
OPTIONAL_GROUPS = ("param",)
#: Every group a choice can name (``condense param=multi``, ``condense.distil(param="multi")``).
ALL_GROUPS = GROUPS + OPTIONAL_GROUPS
PRECISIONS = ("fp32", "bf16")
EXPORTS = ("imagefolder", "tensors")
LOGGERS = ("none", "wandb")

# The smallest class of each fixed dataset's training split (ipc above it is impossible).
MIN_CLASS_SIZE = {"fashion_mnist": 6000, "mnist": 5421, "cifar10": 5000, "cifar100": 500,
                  "svhn": 4659, "tiny_imagenet": 500}


# ----------------------------------------------------------------------------- generic helpers

def node(cfg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``cfg[key]`` as a dict (``{}`` when absent or null)."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping (a config group), got {value!r}")
    return dict(value)


def group_name(cfg: Mapping[str, Any], group: str) -> str:
    """The ``name`` of a group node (``cfg["method"]["name"]``)."""
    return str(node(cfg, group).get("name"))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def to_dataclass(cls: type, data: Mapping[str, Any] | None, where: str, *, skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types fail."""
    data = {k: v for k, v in (data or {}).items() if k not in skip}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(repr(u) for u in unknown)} in {where}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def per_ipc(value: Any, ipc: int) -> Any:
    """A budget value that is either plain or a table ``{ipcN: v, default: v}`` -> the value for ``ipc``."""
    if isinstance(value, Mapping):
        return value.get(f"ipc{ipc}", value.get("default"))
    return value


# ----------------------------------------------------------------------------- overrides

def apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``cfg`` (deep-copied) with ``overrides`` set; also the equivalent command-line overrides.

    A key is a top-level key (``seed``), or a dotted path (``method.batch_real``,
    ``model.kwargs.width``; ``__`` may stand for ``.`` so that it can be a Python keyword:
    ``method__batch_real``). The path's parent must exist; a top-level key must exist too, a
    key inside a node may be new (like ``+key=...`` on the command line): nodes are checked where
    they are used (a method's unknown key fails its strict conversion, ``model.kwargs`` go to the
    model). A mapping value is merged into an existing mapping.

    Returns:
        The new config and the overrides in the CLI's syntax (``+key=value`` for a new key).

    Raises:
        ConfigError: an unknown top-level key or a path through a non-mapping.
    """
    out = copy.deepcopy(cfg)
    cli: list[str] = []
    for raw, value in overrides.items():
        _set(out, raw.replace("__", ".").split("."), _plain_value(value), cli)
    return out, cli


def _set(cfg: dict[str, Any], parts: list[str], value: Any, cli: list[str]) -> None:
    """Set ``cfg[parts[0]]...[parts[-1]] = value`` (a mapping onto a mapping: key by key)."""
    key = ".".join(parts)
    parent: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(parent.get(p), dict):
            where = ".".join(parts[:i + 1])
            raise ConfigError(f"unknown config key {key!r}: {where!r} is not a mapping in this config; "
                              f"valid top-level keys: {', '.join(sorted(cfg))}")
        parent = parent[p]
    leaf = parts[-1]
    new = leaf not in parent
    if new and len(parts) == 1:
        raise ConfigError(f"unknown config key {key!r}; valid top-level keys: {', '.join(sorted(cfg))}")
    if isinstance(value, dict) and value and isinstance(parent.get(leaf), dict):
        for k, v in value.items():
            _set(cfg, [*parts, str(k)], v, cli)
        return
    parent[leaf] = value
    cli.append(f"{'+' if new else ''}{key}={cli_value(value)}")


def _plain_value(value: Any) -> Any:
    """Python values -> the plain YAML types of a config (paths -> str, tuples -> lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return value


def cli_value(value: Any) -> str:
    """A plain value in Hydra's override syntax (``true``, ``null``, ``[a,b]``, ``{k:v}``, quoted text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{cli_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[\w/.+\-]+", text) and text.lower() not in ("true", "false", "null"):
        try:
            float(text)
        except ValueError:
            return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def method_keys(overrides: Collection[str]) -> set[str]:
    """The method fields named by overrides (``method.batch_real`` / ``+method.x`` -> ``batch_real``)."""
    keys = (o.split("=", 1)[0].lstrip("+~").replace("__", ".") for o in overrides)
    return {k.removeprefix("method.").split(".")[0] for k in keys if k.startswith("method.")}


# ----------------------------------------------------------------------------- precision

@dataclass(frozen=True)
class Precision:
    """The precision the distillation networks run in, and where that choice came from.

    Attributes:
        value: ``fp32`` or ``bf16`` (bfloat16 autocast of the network forwards).
        source: ``explicit`` (``precision=...`` or a method's ``bf16: true|false``), ``default``
            (:func:`condense.runtime.default_precision`: the device's ISA), or ``fixed`` (a method
            without a ``bf16`` option, e.g. the selection methods: always fp32).
    """

    value: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return {"value": self.value, "source": self.source}


def resolve_precision(cfg: Mapping[str, Any], method_bf16: Any, device: torch.device | str,
                      has_option: bool = True) -> Precision:
    """The run's precision: explicit ``precision`` / ``method.bf16``, else the device's default.

    The default is :func:`condense.runtime.default_precision` (bf16 where the device computes it
    natively: CUDA with bf16 support, a CPU with AVX-512 BF16 or AMX), never a timing, so one
    config makes the same choice on every run on the same machine.

    Raises:
        ConfigError: a value outside the choices, ``method.bf16=auto`` (gone), or ``precision``
            contradicting an explicit ``method.bf16``.
    """
    from condense.runtime import default_precision

    p = cfg.get("precision")
    if p is not None and p not in PRECISIONS:
        raise ConfigError(f"precision must be one of fp32, bf16 or null (null: bf16 where the device "
                          f"computes it natively, else fp32), got {p!r}")
    if method_bf16 is not None and not isinstance(method_bf16, bool):
        raise ConfigError(f"method.bf16 must be true, false or null (null: the run's precision), got "
                          f"{method_bf16!r}; for the device's default set precision=null, to choose set "
                          f"precision=fp32 or precision=bf16")
    if not has_option:
        if p == "bf16":
            log.warning("precision=bf16 has no effect on method %s (it trains no network in autocast)",
                        group_name(cfg, "method"))
        return Precision("fp32", "fixed")
    if method_bf16 is not None:
        if p is not None and (p == "bf16") != method_bf16:
            raise ConfigError(f"precision={p} contradicts method.bf16={str(method_bf16).lower()}; set only "
                              f"one of them (precision: fp32, bf16)")
        return Precision("bf16" if method_bf16 else "fp32", "explicit")
    if p is not None:
        return Precision(p, "explicit")
    return Precision(default_precision(device), "default")


# ----------------------------------------------------------------------------- method, budget

def method_class(cfg: Mapping[str, Any]) -> type:
    from condense.synth import SYNTHESIZERS

    return SYNTHESIZERS.get(group_name(cfg, "method"))


def budget_method_overrides(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The budget's settings for this run's method: ``method_overrides.<method>`` with its
    ``ipcN`` sub-table for this ipc (if any) merged on top."""
    table = (node(cfg, "budget").get("method_overrides") or {}).get(group_name(cfg, "method")) or {}
    flat = {k: v for k, v in table.items() if not re.fullmatch(r"ipc\d+", str(k))}
    flat.update(table.get(f"ipc{cfg.get('ipc')}") or {})
    return flat


def _device(cfg: Mapping[str, Any]) -> torch.device:
    from condense.provenance import resolve_device

    return resolve_device(str(cfg.get("device") or "auto"))


def method_config(cfg: Mapping[str, Any], explicit: Collection[str] = (),
                  device: torch.device | str | None = None) -> Any:
    """The method's Config dataclass, with the budget's overrides for that method applied
    (except for the fields in ``explicit``, which the caller set on purpose) and ``bf16`` from
    the run's precision (:func:`resolve_precision`)."""
    return _method_and_precision(cfg, explicit, device)[0]


def _method_and_precision(cfg: Mapping[str, Any], explicit: Collection[str],
                          device: torch.device | str | None) -> tuple[Any, Precision]:
    cls = method_class(cfg)
    budget = {k: v for k, v in budget_method_overrides(cfg).items() if k not in set(explicit)}
    merged = {**node(cfg, "method"), **budget}
    has_option = "bf16" in {f.name for f in dataclasses.fields(cls.Config)}
    prec = resolve_precision(cfg, merged.get("bf16"), device if device is not None else _device(cfg),
                             has_option)
    if has_option:
        merged["bf16"] = prec.value == "bf16"
    labels = labels_choice(cfg)
    if labels is not None:
        if "soft_labels" in {f.name for f in dataclasses.fields(cls.Config)}:
            merged["soft_labels"] = labels == LEARNED
        elif labels == LEARNED:
            from condense.synth import SYNTHESIZERS

            ok = ", ".join(n for n in SYNTHESIZERS.names()
                           if "soft_labels" in {f.name for f in dataclasses.fields(SYNTHESIZERS.get(n).Config)})
            raise ConfigError(f"labels=learned: method {cls.name} does not learn labels (its loss does not "
                              f"depend on them); methods that do: {ok}")
    return to_dataclass(cls.Config, merged, "method", skip=("name",)), prec


#: ``labels=``: keep the method's own labels (null), force hard ones, or learn soft labels.
LABELS = ("hard", "learned")
LEARNED = "learned"


def labels_choice(cfg: Mapping[str, Any]) -> str | None:
    """``cfg["labels"]``: ``None`` (the method's default), ``hard`` or ``learned``.

    Raises:
        ConfigError: another value (one line with the valid choices).
    """
    v = cfg.get("labels")
    if v is not None and v not in LABELS:
        raise ConfigError(f"unknown labels {v!r}; valid choices: null (the method's own), {', '.join(LABELS)}")
    return v


def variant(cfg: Mapping[str, Any]) -> str:
    """What a run changes against its method's plain form, as a record / leaderboard label part:
    the parametrization (``multi2``) and ``learned`` / ``hard`` where ``labels=`` departs from the
    method config's own ``soft_labels``; ``""`` for a plain run."""
    parts = []
    dec = param_decoder(cfg)
    if not dec.identity:
        parts.append(dec.label)
    labels = labels_choice(cfg)
    if labels is not None:
        own = bool(node(cfg, "method").get("soft_labels", False))
        if (labels == LEARNED) != own:
            parts.append(labels)
    return "+".join(parts)


def resolve_iterations(cfg: Mapping[str, Any], method_cfg: Any) -> int:
    """Iterations for this run: ``iterations`` > budget table > published (cap) > budget default."""
    n = cfg.get("iterations")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"iterations must be an integer >= 0 (or null), got {n!r}")
    published = int(getattr(method_cfg, "iterations", 0))
    if published == 0:
        return 0  # pure selection methods
    budget, method, ipc = node(cfg, "budget"), group_name(cfg, "method"), cfg.get("ipc")
    per = (budget.get("iterations") or {}).get(method, {}) or {}
    if cfg.get("iterations") is not None:
        n = cfg["iterations"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(f"iterations must be an integer >= 0 (or null), got {n!r}")
    elif f"ipc{ipc}" in per:
        n = int(per[f"ipc{ipc}"])
    elif budget.get("published_iterations"):
        n = published
    elif budget.get("default_iterations") is not None:
        n = int(budget["default_iterations"])
    else:
        raise ConfigError(
            f"budget {budget.get('name')!r} has no iteration count for method {method!r} at ipc {ipc} "
            f"(it lists {', '.join(sorted(per)) or 'none'}); pass iterations=N or budget=paper")
    if n < 0:
        raise ConfigError(f"iterations must be >= 0, got {n}")
    return n


def run_config(cfg: Mapping[str, Any], run_dir: Path | None, callbacks: list) -> Any:
    """The runner's :class:`~condense.synth.runner.RunConfig` (deadline, checkpoints, resume)."""
    from condense.synth.runner import RunConfig

    budget = node(cfg, "budget")
    max_s = cfg.get("max_seconds")
    if max_s is None:
        max_s = per_ipc(budget.get("max_seconds"), int(cfg.get("ipc") or 0))
    if max_s is not None and (isinstance(max_s, bool) or not isinstance(max_s, (int, float)) or not max_s > 0):
        raise ConfigError(f"max_seconds must be > 0 seconds (or null), got {max_s!r}")
    ckpt_every = budget.get("ckpt_every") or 0
    if isinstance(ckpt_every, bool) or not isinstance(ckpt_every, int) or ckpt_every < 0:
        raise ConfigError(f"budget.ckpt_every must be an integer >= 0, got {ckpt_every!r}")
    for key in ("resume", "progress"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    return RunConfig(iterations=None, max_seconds=None if max_s is None else float(max_s),
                     run_dir=run_dir, ckpt_every=ckpt_every, resume=bool(cfg.get("resume", False)),
                     progress=bool(cfg.get("progress", True)), callbacks=callbacks)


EVAL_PROTOCOLS = ("hard", "soft")


#: Keys a hard-label eval group (conf/eval/default.yaml, cross_arch.yaml) hands to the soft-label
#: protocol when the budget asks for it (``budget=cpu_soft`` without ``eval=soft``): the same meaning
#: under both protocols.
SHARED_EVAL_KEYS = ("archs", "num_models", "epochs", "test_size", "seed", "model_kwargs")


def eval_protocol(cfg: Mapping[str, Any]) -> str:
    """The evaluation protocol of a config: ``soft`` when the eval group is conf/eval/soft.yaml
    (``protocol: soft``; the hard-label files have no such key) or the budget's ``eval.protocol``
    is ``soft`` (``cpu_soft``), else ``hard``.

    Raises:
        ConfigError: an unknown protocol.
    """
    spec, budget = node(cfg, "eval"), node(cfg, "budget")
    beval = budget.get("eval") or {}
    for where, value in (("eval.protocol", spec.get("protocol", "hard")),
                         ("budget.eval.protocol", beval.get("protocol", "hard"))):
        if value not in EVAL_PROTOCOLS:
            raise ConfigError(f"unknown {where} {value!r}; valid choices: {', '.join(EVAL_PROTOCOLS)}")
    return "soft" if "soft" in (spec.get("protocol"), beval.get("protocol")) else "hard"


def _hard_node_for_soft(spec: dict[str, Any], budget: str) -> dict[str, Any]:
    """A hard-label eval node under a soft-label budget: its :data:`SHARED_EVAL_KEYS`; any other
    setting changed from the hard protocol's default cannot apply and is an error (not ignored)."""
    from condense.eval import EvalConfig

    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(EvalConfig)}
    changed = sorted(k for k, v in spec.items() if k not in (*SHARED_EVAL_KEYS, "protocol")
                     and (k not in defaults or (v is not None and defaults[k] != v)))
    if changed:
        k = changed[0]
        raise ConfigError(f"eval.{k}={spec[k]!r} is a hard-label protocol setting, but budget {budget!r} evaluates "
                          f"under the soft-label protocol; add eval=soft and set its keys (conf/eval/soft.yaml)")
    return {k: spec[k] for k in SHARED_EVAL_KEYS if k in spec}


def _soft_eval_config(cfg: Mapping[str, Any], spec: dict[str, Any], ipc: int) -> Any:
    """:class:`~condense.eval.SoftEvalConfig`: nulls from ``budget.eval.soft`` (epochs per ipc,
    num_models, test_size, teacher), then from ``budget.eval`` (num_models, test_size), then the
    protocol's defaults; ``cache_dir`` null: the run's ``cache_dir``."""
    from condense.eval import SoftEvalConfig
    from condense.eval.soft import DEFAULT_EPOCHS

    budget = node(cfg, "budget")
    beval = budget.get("eval") or {}
    if spec.get("protocol") != "soft":
        spec = _hard_node_for_soft(spec, str(budget.get("name")))
    soft = beval.get("soft") or {}
    if not isinstance(soft, Mapping):
        raise ConfigError(f"budget.eval.soft must be a mapping (epochs, num_models, test_size, teacher), got {soft!r}")
    for key in ("num_models", "test_size"):
        if spec.get(key) is None:
            spec[key] = soft.get(key, beval.get(key, 3 if key == "num_models" else 0))
    if spec.get("epochs") is None:
        ep = per_ipc(soft.get("epochs"), ipc)
        spec["epochs"] = DEFAULT_EPOCHS if ep is None else ep
    teacher = spec.get("teacher") or {}
    if not isinstance(teacher, Mapping) or not isinstance(soft.get("teacher") or {}, Mapping):
        raise ConfigError(f"eval.teacher must be a mapping of teacher settings (model, epochs, seed, train_size, "
                          f"bf16, model_kwargs), got {teacher!r}")
    spec["teacher"] = {**(soft.get("teacher") or {}), **teacher}
    if spec.get("cache_dir") is None and cfg.get("cache_dir"):
        spec["cache_dir"] = str(cfg["cache_dir"])
    return to_dataclass(SoftEvalConfig, spec, "eval")


def eval_config(cfg: Mapping[str, Any], ipc: int | None = None) -> Any:
    """:class:`~condense.eval.EvalConfig` (or, for ``eval.protocol: soft``,
    :class:`~condense.eval.SoftEvalConfig`) from ``cfg["eval"]`` with nulls filled from the budget
    for ``ipc`` (default ``cfg["ipc"]``)."""
    from condense.eval import EvalConfig

    ipc = int(cfg.get("ipc") if ipc is None else ipc)
    spec = node(cfg, "eval")
    if eval_protocol(cfg) == "soft":
        return _soft_eval_config(cfg, spec, ipc)
    budget = node(cfg, "budget")
    beval = budget.get("eval") or {}
    if spec.get("num_models") is None:
        spec["num_models"] = beval.get("num_models", 3)
    if spec.get("dsa") is None:
        spec["dsa"] = beval.get("dsa", True)
    if spec.get("test_size") is None:
        spec["test_size"] = beval.get("test_size", 0)
    if spec.get("epochs") is None:
        ep = per_ipc(beval.get("epochs", {}), ipc)
        if ep is None:
            raise ConfigError(f"budget {budget.get('name')!r} gives no eval epochs for ipc {ipc}")
        spec["epochs"] = ep
    return to_dataclass(EvalConfig, spec, "eval", skip=("protocol",))


# ----------------------------------------------------------------------------- checks

def check_names(cfg: Mapping[str, Any]) -> None:
    """Registry names in the config exist (dataset, model, eval archs, method, logger)."""
    from condense.data import DATASETS
    from condense.models import MODELS
    from condense.synth import SYNTHESIZERS

    SYNTHESIZERS.get(group_name(cfg, "method"))
    DATASETS.get(group_name(cfg, "dataset"))
    MODELS.get(group_name(cfg, "model"))
    for a in node(cfg, "eval").get("archs") or []:
        MODELS.get(str(a))
    if group_name(cfg, "logger") not in LOGGERS:
        raise ConfigError(f"unknown logger {group_name(cfg, 'logger')!r}; valid choices: {', '.join(LOGGERS)}")


def param_decoder(cfg: Mapping[str, Any]) -> Any:
    """The stored set's parametrization (``cfg["param"]``, :class:`condense.ops.formation.Decoder`);
    plain pixels when the config has no ``param`` node.

    Raises:
        ConfigError: unknown param name, a bad factor / mode (one line, the valid choices).
    """
    from condense.ops.formation import Decoder

    p = node(cfg, "param")
    if not p:
        return Decoder()
    return Decoder(kind=str(p.get("name", "pixels")), factor=p.get("factor", 1), mode=str(p.get("mode", "bilinear")))


def check_models(cfg: Mapping[str, Any]) -> None:
    """The distillation network's and the evaluation's model kwargs exist; the dataset's
    ``im_size`` is null or a positive integer; ``device`` is one this machine has."""
    from condense.models import model_kwargs

    model = node(cfg, "model")
    for where, name, kwargs in (("model.kwargs", model.get("name"), model.get("kwargs")),
                                ("eval.model_kwargs", None, (cfg.get("eval") or {}).get("model_kwargs"))):
        if kwargs in (None, {}):
            continue
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{where} must be a mapping of model options, got {kwargs!r}")
        names = [name] if name else list((cfg.get("eval") or {}).get("archs") or [])
        for arch in names:
            valid = model_kwargs(str(arch))
            for key in kwargs:
                if key not in valid:
                    raise ConfigError(f"unknown {where} key {key!r} for model {arch!r}; valid: "
                                      f"{', '.join(valid) or '(none)'}")
    size = node(cfg, "dataset").get("im_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"dataset.im_size must be a positive integer (or null), got {size!r}")
    _device(cfg)


def check_ipc(cfg: Mapping[str, Any], min_class: int | None = None) -> None:
    ipc = cfg.get("ipc")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"ipc must be an integer >= 1, got {ipc!r}")
    dataset = group_name(cfg, "dataset")
    smallest = min_class if min_class is not None else MIN_CLASS_SIZE.get(dataset)
    if smallest is not None and ipc > smallest:
        raise ConfigError(f"ipc {ipc} exceeds the smallest class of {dataset} "
                          f"({smallest} training images); valid: 1..{smallest}")


def check_exports(exports: Any) -> list[str]:
    if exports is None:
        return []
    if not isinstance(exports, (list, tuple)):
        raise ConfigError(f"export must be a list of {', '.join(EXPORTS)}, got {exports!r}")
    for e in exports:
        if e not in EXPORTS:
            raise ConfigError(f"unknown export {e!r}; valid choices: {', '.join(EXPORTS)}")
    return list(exports)


@dataclass(frozen=True)
class Built:
    """What :func:`validate` builds from a config (everything checkable without data).

    Attributes:
        method: the method's Config dataclass, ``iterations`` set to this run's count.
        iterations: outer iterations of this run (0 for selection methods).
        eval: the evaluation protocol.
        precision: the distillation networks' precision and its source.
    """

    method: Any
    iterations: int
    eval: Any
    precision: Precision


def validate(cfg: Mapping[str, Any], explicit: Collection[str] = (),
             device: torch.device | str | None = None) -> Built:
    """Check a whole run config without touching data; ``explicit``: method fields the budget
    must not replace. Raises :class:`ConfigError` (one line) on the first problem."""
    missing = [g for g in GROUPS if not isinstance(cfg.get(g), Mapping)
               or (g != "eval" and not cfg[g].get("name"))]
    if missing:
        raise ConfigError(f"config lacks the group(s) {', '.join(missing)}; a run config names all of "
                          f"{', '.join(GROUPS)} (compose it with condense.distil(method=..., ...))")
    check_names(cfg)
    check_ipc(cfg)
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    mcfg, prec = _method_and_precision(cfg, explicit, device)
    iters = resolve_iterations(cfg, mcfg)
    method_class(cfg).check_config(mcfg, int(cfg["ipc"]))
    from condense.synth.base import require_param

    require_param(method_class(cfg), param_decoder(cfg).kind)
    check_models(cfg)
    if hasattr(mcfg, "iterations"):
        mcfg = dataclasses.replace(mcfg, iterations=iters)
    ecfg = eval_config(cfg)
    run_config(cfg, None, [])
    tag = cfg.get("tag")
    if tag is not None and not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.]+", tag)):
        raise ConfigError(f"tag must be letters, digits, '_' or '.' (or null), got {tag!r}")
    check_exports(cfg.get("export"))
    if not isinstance(cfg.get("evaluate", True), bool):
        raise ConfigError(f"evaluate must be true or false, got {cfg.get('evaluate')!r}")
    return Built(method=mcfg, iterations=iters, eval=ecfg, precision=prec)


# ----------------------------------------------------------------------------- objects

def load_data(cfg: Mapping[str, Any], device: torch.device) -> Any:
    """The dataset of ``cfg["dataset"]`` as :class:`~condense.types.RealData` on ``device``."""
    from condense.data import build_dataset

    ds = node(cfg, "dataset")
    kw: dict[str, Any] = {}
    if ds.get("im_size") is not None:
        kw["im_size"] = int(ds["im_size"])
    return build_dataset(str(ds["name"]), root=ds.get("root"), device=device, **kw)


def synth_context(cfg: Mapping[str, Any], data: Any, device: torch.device) -> Any:
    """The :class:`~condense.synth.base.SynthContext` of a run: class index, a generator seeded
    with ``cfg["seed"]``, ``cfg["model"]``, the dataset's DSA strategy, ``cfg["cache_dir"]``, the
    parametrization ``cfg["param"]``."""
    from condense.augment import DSA, default_strategy
    from condense.data import ClassIndex
    from condense.synth.base import SynthContext

    gen = torch.Generator(device=device)
    gen.manual_seed(int(cfg["seed"]))
    model = node(cfg, "model")
    return SynthContext(
        data=data,
        index=ClassIndex(data.train_labels, data.spec.num_classes),
        ipc=int(cfg["ipc"]),
        seed=int(cfg["seed"]),
        device=device,
        generator=gen,
        model_name=str(model.get("name", "convnet")),
        model_kwargs=dict(model.get("kwargs") or {}),
        augment=DSA(default_strategy(data.spec.name)),
        cache_dir=Path(str(cfg["cache_dir"])) if cfg.get("cache_dir") else None,
        decoder=param_decoder(cfg),
    )
