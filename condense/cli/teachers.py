"""``condense-teachers``: train (or find in the cache) expert trajectories or a single teacher.

    condense-teachers kind=experts dataset=fashion_mnist n=10 epochs=50
    condense-teachers -m hydra/launcher=joblib kind=experts n=1 expert=0,1     (one job per expert)
    condense-teachers kind=teacher model=convnet_bn epochs=30

Every job writes into the cache (``cache_dir``); its own output directory gets a ``teachers.json``
summary. Bad input is ONE line on stderr with exit status 2, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, NoReturn

from condense.errors import CondenseError, ConfigError, DatasetNotFoundError

log = logging.getLogger("condense")
KINDS = ("experts", "teacher")
INT_KEYS = {"n": 1, "expert": 0, "seed": 0, "train_size": 0, "test_size": 0}


def _die(msg: str, code: int) -> NoReturn:
    from condense.cli.main import _die as die

    die(msg, code, "condense-teachers")


@dataclasses.dataclass
class Job:
    """A validated ``condense-teachers`` call."""

    kind: str
    dataset: str
    data_root: str | None
    im_size: int | None
    model: str
    model_kwargs: dict[str, Any]
    fit: Any  # condense.train.FitConfig
    n: int
    expert: int
    seed: int
    augment: str
    train_size: int
    test_size: int
    device: str
    cache_dir: Path


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def job_from_config(cfg: Any) -> Job:
    """Check every value of a composed ``teachers`` config (DictConfig or plain dict) and build the
    :class:`Job`.

    Raises:
        ConfigError / UnknownNameError: the first bad value, with the valid choices.
    """
    from condense.config import to_dataclass
    from condense.data import DATASETS
    from condense.models import MODELS
    from condense.teachers import (
        EXPERT_EPOCHS,
        TEACHER_EPOCHS,
        expert_fit_config,
        resolve_augment,
        teacher_fit_config,
    )
    from condense.teachers._training import Recipe, check_model
    from condense.train import FitConfig

    cfg = _plain(cfg)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; valid choices: {', '.join(KINDS)}")
    for key, low in INT_KEYS.items():
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {v!r}")
    epochs = cfg.get("epochs")
    if epochs is None:
        epochs = EXPERT_EPOCHS if kind == "experts" else TEACHER_EPOCHS
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0 (or null for the default), got {epochs!r}")
    dset, mdl = cfg.get("dataset") or {}, cfg.get("model") or {}
    dataset, model = str(dset.get("name")), str(mdl.get("name"))
    DATASETS.get(dataset)
    MODELS.get(model)
    base = dataclasses.asdict((expert_fit_config if kind == "experts" else teacher_fit_config)(epochs))
    given = {k: v for k, v in (cfg.get("train") or {}).items() if v is not None}
    fit = to_dataclass(FitConfig, {**base, **given}, "train")
    kwargs = dict(mdl.get("kwargs") or {})
    check_model(Recipe(model, kwargs))
    augment = resolve_augment(cfg.get("augment"), dataset)
    if not cfg.get("cache_dir"):
        raise ConfigError("cache_dir must name a folder (or set $CONDENSE_CACHE)")
    im_size = dset.get("im_size")
    if im_size is not None and (isinstance(im_size, bool) or not isinstance(im_size, int) or im_size < 1):
        raise ConfigError(f"dataset.im_size must be a positive integer or null, got {im_size!r}")
    return Job(kind=kind, dataset=dataset, data_root=dset.get("root"), im_size=im_size, model=model,
               model_kwargs=kwargs, fit=fit, n=cfg["n"], expert=cfg["expert"], seed=cfg["seed"], augment=augment,
               train_size=cfg["train_size"], test_size=cfg["test_size"], device=str(cfg.get("device", "auto")),
               cache_dir=Path(str(cfg["cache_dir"])).expanduser())


def run_job(job: Job) -> dict[str, Any]:
    """Load the data, get the experts / the teacher (cache or training). Returns the summary."""
    from condense.data import build_dataset
    from condense.provenance import resolve_device
    from condense.teachers import balanced_subset, get_experts, get_teacher

    device = resolve_device(job.device)
    kw = {} if job.im_size is None else {"im_size": job.im_size}
    data = build_dataset(job.dataset, root=job.data_root, device=device, **kw)
    data = balanced_subset(data, job.train_size, job.test_size)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"kind": job.kind, "dataset": job.dataset, "model": job.model,
                               "model_kwargs": job.model_kwargs, "fit": dataclasses.asdict(job.fit),
                               "augment": job.augment, "train_images": int(data.train_images.shape[0]),
                               "test_images": int(data.test_images.shape[0]), "device": str(device)}
    if job.kind == "experts":
        first = job.seed + job.expert
        experts = get_experts(data, job.n, model=job.model, model_kwargs=job.model_kwargs, cfg=job.fit,
                              augment=job.augment, cache_dir=job.cache_dir, seed=first)
        summary.update(seeds=[e.seed for e in experts], path=str(experts.root),
                       entries=[str(e.path) for e in experts], test_acc=[e.test_acc[-1] for e in experts],
                       train_wall_s=[e.manifest["wall_s"] for e in experts])
    else:
        _, manifest = get_teacher(data, job.model, model_kwargs=job.model_kwargs, cfg=job.fit,
                                  augment=job.augment, cache_dir=job.cache_dir, seed=job.seed)
        summary.update(seeds=[job.seed], path=str(job.cache_dir / "teachers"), entries=[manifest["key"]],
                       test_acc=[manifest["test_acc"]], train_wall_s=[manifest["wall_s"]])
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    what = f"{len(s['seeds'])} expert(s)" if s["kind"] == "experts" else "teacher"
    accs = ", ".join("-" if a is None else f"{a:.2f}" for a in s["test_acc"])
    print(f"{what} {s['model']} on {s['dataset']} (seeds {s['seeds'][0]}..{s['seeds'][-1]}, "
          f"{s['fit']['epochs']} epochs): test accuracy {accs} %; {s['wall_s']:.0f} s in this job")
    print(f"cache: {s['path']}")


def _hydra_job(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from condense.provenance import write_json_atomic

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        job = job_from_config(cfg)
        summary = run_job(job)
    except (ConfigError, DatasetNotFoundError) as e:
        _die(str(e), 2)
    except CondenseError as e:
        _die(str(e), 1)
    except KeyboardInterrupt:
        _die("interrupted; rerun the same command to resume from the last finished epoch", 130)
    write_json_atomic(run_dir / "teachers.json", summary)
    _print_summary(summary)


def precheck(overrides: list[str]) -> None:
    """Compose and validate every requested value before any job starts (ConfigError on the first)."""
    from condense.cli.main import precheck as compose_check

    try:
        compose_check(overrides, "teachers", check=job_from_config)
    except ConfigError as e:
        raise ConfigError(str(e).replace("conf/config.yaml", "conf/teachers.yaml")) from None


def main() -> None:
    """Console script ``condense-teachers``."""
    from condense.cli.main import run_app

    run_app("teachers", _hydra_job, prog="condense-teachers", check=precheck)
