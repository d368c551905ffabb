"""Single trained teachers (SRe2L / CDA / RDED recovery, relabelling): a network trained with the
engine, saved as a safetensors ``state_dict`` plus a manifest, cached under a content key.

Layout under ``cache_dir``::

    teachers/<dataset>-<model>-<key>/model.safetensors   the state_dict (parameters and buffers)
    teachers/<dataset>-<model>-<key>/manifest.json       recipe, seed, test accuracy per epoch, checksums
    teachers/.work-<dataset>-<model>-<key>/checkpoint.pt resume state while it trains
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

from condense.errors import ArtifactError, ConfigError
from condense.provenance import atomic_write_bytes, code_version, write_json_atomic
from condense.teachers import _store
from condense.teachers._training import Outcome, Recipe, build_model, check_model, resolve_augment
from condense.teachers._training import train as train_model
from condense.train import FitConfig
from condense.types import DatasetSpec, RealData

log = logging.getLogger(__name__)

FORMAT = "condense.teacher"
WEIGHTS = "model.safetensors"
TEACHER_EPOCHS = 50


def teacher_fit_config(epochs: int = TEACHER_EPOCHS, **overrides: Any) -> FitConfig:
    """Default teacher training: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, cosine.

    Args:
        epochs: passes over the training data.
        **overrides: any other :class:`~condense.train.FitConfig` field.
    """
    base = {"epochs": epochs, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
            "weight_decay": 5e-4, "schedule": "cosine"}
    return FitConfig(**{**base, **overrides})


def teacher_dir(cache_dir: str | Path, data: RealData, recipe: Recipe, seed: int) -> tuple[Path, dict[str, Any]]:
    """The cache directory of one teacher and the payload its key hashes."""
    payload = {"kind": "teacher", "dataset": data.spec.to_dict(), "train_sha256": _store.data_fingerprint(data),
               **recipe.to_dict(), "seed": int(seed),
               "code_key": _store.code_key(recipe.model, recipe.augment != "none")}
    key = _store.content_key(payload)
    return Path(cache_dir) / "teachers" / f"{data.spec.name}-{recipe.model}-{key}", {"key": key, **payload}


def _write_teacher(final: Path, out: Outcome, payload: dict[str, Any], device: str) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in out.model.state_dict().items()}
    with _store.staging_dir(final) as tmp:
        atomic_write_bytes(tmp / WEIGHTS, st_save(state, metadata={"format": f"{FORMAT};schema_version=1"}))
        manifest = {
            "format": FORMAT, "schema_version": _store.SCHEMA_VERSION, "kind": "teacher", "key": payload["key"],
            "seed": payload["seed"], "epochs": len(out.test_acc) - 1,
            "num_params": sum(p.numel() for p in out.model.parameters()),
            "dataset": payload["dataset"], "train_sha256": payload["train_sha256"],
            "train_images": int(payload["train_images"]), "test_images": int(payload["test_images"]),
            "test_sha256": payload["test_sha256"],
            "model": {"name": payload["model"], "kwargs": payload["model_kwargs"]}, "fit": payload["fit"],
            "augment": payload["augment"], "test_acc": out.test_acc[-1], "test_acc_per_epoch": out.test_acc,
            "loss": [h["loss"][0] for h in out.history], "code_key": payload["code_key"],
            "code_version": code_version(), "wall_s": round(out.wall_s, 3), "device": device,
            "torch": torch.__version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": {WEIGHTS: _store.file_entry(tmp / WEIGHTS)},
        }
        write_json_atomic(tmp / _store.MANIFEST, manifest)


def load_teacher(path: str | Path, device: torch.device | str = "cpu", *,
                 verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A cached teacher as an ``nn.Module`` in eval mode on ``device``, with its manifest.

    Raises:
        ArtifactError: missing, foreign or corrupted files (one line, with the fix).
    """
    path = Path(path)
    manifest = _store.read_manifest(path, FORMAT)
    if verify:
        _store.verify_files(path, manifest)
    try:
        spec = DatasetSpec.from_dict(manifest["dataset"])
        recipe = Recipe(str(manifest["model"]["name"]), dict(manifest["model"]["kwargs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path / _store.MANIFEST} misses or mangles field {e}; delete {path} to retrain") \
            from None
    try:
        state = st_load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS} is not a readable state_dict ({e}); delete {path} to retrain") \
            from None
    model = build_model(spec, recipe, "cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ArtifactError(f"{path / WEIGHTS} does not fit model {recipe.model} {recipe.model_kwargs} "
                            f"({first}); delete {path} to retrain") from None
    return model.to(device).eval(), manifest


def get_teacher(data: RealData, model: str = "convnet_bn", *, model_kwargs: dict[str, Any] | None = None,
                cfg: FitConfig | None = None, epochs: int | None = None, augment: str | None = "default",
                cache_dir: str | Path, seed: int = 0, train: bool = True,
                verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher trained on ``data`` with the engine: loaded from the cache, else trained and cached.

    Args:
        data: real data (training runs on its device; test accuracy is recorded per epoch).
        model / model_kwargs: the network (``condense.models`` registry), e.g. ``convnet_bn``,
            ``resnet18_bn``.
        cfg: engine settings (default :func:`teacher_fit_config`); ``epochs`` overrides its epochs.
        augment: DSA strategy during training: ``default`` (the dataset's), ``none``, or ops.
        cache_dir: cache root.
        seed: initialisation, shuffling and augmentation seed (part of the key).
        train: train on a miss (False: a miss raises ArtifactError).
        verify: check the SHA-256 of the cached weights.

    Returns:
        ``(module in eval mode on the data's device, manifest)``.
    """
    fcfg = cfg if cfg is not None else teacher_fit_config(TEACHER_EPOCHS if epochs is None else epochs)
    if epochs is not None:
        fcfg = dataclasses.replace(fcfg, epochs=int(epochs))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    recipe = Recipe(model, dict(model_kwargs or {}), fcfg, resolve_augment(augment, data.spec.name))
    check_model(recipe)
    final, payload = teacher_dir(cache_dir, data, recipe, seed)
    work = final.parent / f".work-{final.name}"
    device = data.train_images.device
    with _store.locked(final.parent / f".{final.name}.lock"):
        if final.exists():
            shutil.rmtree(work, ignore_errors=True)
            return load_teacher(final, device, verify=verify)
        if not train:
            raise ArtifactError(f"teacher {model} (seed {seed}) is not in the cache ({final}); train it with "
                                f"condense-teachers kind=teacher model={model} (or get_teacher(train=True))")
        log.info("training teacher %s (%d epochs, seed %d) into %s", model, fcfg.epochs, seed, final)
        out = train_model(data, recipe, seed, work, payload["key"], trajectory=False)
        sizes = {"train_images": data.train_images.shape[0], "test_images": data.test_images.shape[0],
                 "test_sha256": _store.data_fingerprint(data, "test")}
        _write_teacher(final, out, {**payload, **sizes}, str(device))
        shutil.rmtree(work, ignore_errors=True)
        log.info("teacher %s: test accuracy %s%% after %d epochs, %.0f s", model, out.test_acc[-1],
                 fcfg.epochs, out.wall_s)
        return load_teacher(final, device, verify=False)

