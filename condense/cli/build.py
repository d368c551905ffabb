"""Config (OmegaConf/Hydra) -> objects. Strict: unknown keys and bad values raise ConfigError."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from condense.errors import ConfigError
from condense.eval import EvalConfig
from condense.synth import SYNTHESIZERS
from condense.synth.base import SynthContext, Synthesizer
from condense.synth.runner import RunConfig
from condense.types import RealData

# The smallest class of each fixed dataset's training split (ipc above it is impossible).
MIN_CLASS_SIZE = {"fashion_mnist": 6000, "mnist": 5421, "cifar10": 5000, "cifar100": 500,
                  "svhn": 4659, "tiny_imagenet": 500}


def to_plain(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


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
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def to_dataclass(cls: type, node: Any, where: str, *, skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from ``node`` strictly: unknown keys and wrong types fail."""
    data = {k: v for k, v in (to_plain(node) or {}).items() if k not in skip}
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


def method_class(cfg: DictConfig) -> type[Synthesizer]:
    return SYNTHESIZERS.get(str(cfg.method.name))


def cli_method_keys() -> set[str]:
    """Method fields set on this run's command line (``method.batch_real=32`` -> ``batch_real``);
    empty outside a Hydra run (e.g. the compose API)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return set()
    keys = (o.split("=", 1)[0].lstrip("+~") for o in task)
    return {k.removeprefix("method.") for k in keys if k.startswith("method.")}


def method_config(cfg: DictConfig, explicit: set[str] | None = None) -> Any:
    """The method's Config dataclass, with the budget's overrides for that method applied,
    except for fields set explicitly (``explicit``; default: this run's command line)."""
    cls = method_class(cfg)
    node = to_plain(cfg.method)
    explicit = cli_method_keys() if explicit is None else explicit
    budget = {k: v for k, v in budget_method_overrides(cfg).items() if k not in explicit}
    merged = {**node, **budget}
    if "bf16" in merged:  # "auto": bf16 autocast only where it is native and measured faster
        from condense.provenance import resolve_device
        from condense.runtime import resolve_bf16

        merged["bf16"] = resolve_bf16(merged["bf16"], resolve_device(str(cfg.get("device", "auto"))),
                                      "method.bf16")
    return to_dataclass(cls.Config, merged, "method", skip=("name",))


def per_ipc(value: Any, ipc: int) -> Any:
    """A budget value that is either plain or a table ``{ipcN: v, default: v}`` -> the value for ``ipc``."""
    if isinstance(value, dict):
        return value.get(f"ipc{ipc}", value.get("default"))
    return value


def budget_method_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The budget's settings for this run's method: ``method_overrides.<method>`` with its
    ``ipcN`` sub-table for this ipc (if any) merged on top."""
    table = (to_plain(cfg.budget.get("method_overrides")) or {}).get(cfg.method.name) or {}
    flat = {k: v for k, v in table.items() if not re.fullmatch(r"ipc\d+", str(k))}
    flat.update(table.get(f"ipc{cfg.ipc}") or {})
    return flat


def resolve_iterations(cfg: DictConfig, method_cfg: Any) -> int:
    """Iterations for this run: cli ``iterations`` > budget table > published (cap) > budget default."""
    published = int(getattr(method_cfg, "iterations", 0))
    if published == 0:
        return 0  # pure selection methods
    table = to_plain(cfg.budget.get("iterations")) or {}
    per = table.get(cfg.method.name, {}) or {}
    if cfg.get("iterations") is not None:
        n = int(cfg.iterations)
    elif f"ipc{cfg.ipc}" in per:
        n = int(per[f"ipc{cfg.ipc}"])
    elif cfg.budget.get("published_iterations"):
        n = published
    elif cfg.budget.get("default_iterations") is not None:
        n = int(cfg.budget.default_iterations)
    else:
        raise ConfigError(
            f"budget {cfg.budget.name!r} has no iteration count for method {cfg.method.name!r} "
            f"at ipc {cfg.ipc} (it lists {', '.join(sorted(per)) or 'none'}); pass iterations=N "
            f"or budget=paper")
    if n < 0:
        raise ConfigError(f"iterations must be >= 0, got {n}")
    return n


def run_config(cfg: DictConfig, run_dir: Path | None, callbacks: list) -> RunConfig:
    max_s = cfg.get("max_seconds")
    if max_s is None:
        max_s = per_ipc(to_plain(cfg.budget.get("max_seconds")), int(cfg.ipc))
    if max_s is not None and not float(max_s) > 0:
        raise ConfigError(f"max_seconds must be > 0 seconds (or null), got {max_s!r}")
    ckpt_every = int(cfg.budget.get("ckpt_every") or 0)
    if ckpt_every < 0:
        raise ConfigError(f"budget.ckpt_every must be >= 0, got {ckpt_every}")
    return RunConfig(iterations=None, max_seconds=None if max_s is None else float(max_s),
                     run_dir=run_dir, ckpt_every=ckpt_every, resume=bool(cfg.resume),
                     progress=bool(cfg.progress), callbacks=callbacks)


def eval_config(cfg: DictConfig) -> EvalConfig:
    """EvalConfig from ``cfg.eval`` with nulls filled from the budget for this ipc."""
    node = to_plain(cfg.eval) or {}
    beval = to_plain(cfg.budget.get("eval")) or {}
    if node.get("num_models") is None:
        node["num_models"] = beval.get("num_models", 3)
    if node.get("dsa") is None:
        node["dsa"] = beval.get("dsa", True)
    if node.get("test_size") is None:
        node["test_size"] = beval.get("test_size", 0)
    if node.get("epochs") is None:
        ep = beval.get("epochs", {})
        ep = ep.get(f"ipc{cfg.ipc}", ep.get("default")) if isinstance(ep, dict) else ep
        if ep is None:
            raise ConfigError(f"budget {cfg.budget.name!r} gives no eval epochs for ipc {cfg.ipc}")
        node["epochs"] = ep
    return to_dataclass(EvalConfig, node, "eval")


def check_names(cfg: DictConfig) -> None:
    """Registry names in the config exist (dataset, model, eval archs, method)."""
    from condense.data import DATASETS
    from condense.models import MODELS

    SYNTHESIZERS.get(str(cfg.method.name))
    DATASETS.get(str(cfg.dataset.name))
    MODELS.get(str(cfg.model.name))
    for a in cfg.eval.archs:
        MODELS.get(str(a))
    if str(cfg.logger.name) not in ("none", "wandb"):
        raise ConfigError(f"unknown logger {cfg.logger.name!r}; valid choices: none, wandb")


def check_ipc(cfg: DictConfig, min_class: int | None = None) -> None:
    ipc = cfg.ipc
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"ipc must be an integer >= 1, got {ipc!r}")
    smallest = min_class if min_class is not None else MIN_CLASS_SIZE.get(str(cfg.dataset.name))
    if smallest is not None and ipc > smallest:
        raise ConfigError(f"ipc {ipc} exceeds the smallest class of {cfg.dataset.name} "
                          f"({smallest} training images); valid: 1..{smallest}")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Everything that can be checked without data. Returns the built configs."""
    check_names(cfg)
    check_ipc(cfg)
    mcfg = method_config(cfg)
    iters = resolve_iterations(cfg, mcfg)
    ecfg = eval_config(cfg)
    run_config(cfg, None, [])
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    tag = cfg.get("tag")
    if tag is not None and not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.]+", tag)):
        raise ConfigError(f"tag must be letters, digits, '_' or '.' (or null), got {tag!r}")
    valid_exports = ("imagefolder", "tensors")
    for e in cfg.export or []:
        if e not in valid_exports:
            raise ConfigError(f"unknown export {e!r}; valid choices: {', '.join(valid_exports)}")
    return {"method": mcfg, "iterations": iters, "eval": ecfg}


def load_data(cfg: DictConfig, device: torch.device) -> RealData:
    from condense.data import build_dataset

    kw: dict[str, Any] = {}
    if cfg.dataset.get("im_size") is not None:
        kw["im_size"] = int(cfg.dataset.im_size)
    return build_dataset(str(cfg.dataset.name), root=cfg.dataset.get("root"), device=device, **kw)


def synth_context(cfg: DictConfig, data: RealData, device: torch.device) -> SynthContext:
    from condense.augment import DSA, default_strategy
    from condense.data import ClassIndex

    gen = torch.Generator(device=device)
    gen.manual_seed(int(cfg.seed))
    return SynthContext(
        data=data,
        index=ClassIndex(data.train_labels, data.spec.num_classes),
        ipc=int(cfg.ipc),
        seed=int(cfg.seed),
        device=device,
        generator=gen,
        model_name=str(cfg.model.name),
        model_kwargs=to_plain(cfg.model.get("kwargs")) or {},
        augment=DSA(default_strategy(data.spec.name)),
        cache_dir=Path(str(cfg.cache_dir)) if cfg.get("cache_dir") else None,
    )
