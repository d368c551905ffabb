"""Expert trajectories (MTT, FTD, TESLA, DATM): N networks trained on real data, their
parameters saved after every epoch, cached and read lazily.

Layout under ``cache_dir``::

    experts/<dataset>-<model>-<key>/        one recipe (data, model, training settings, code)
        recipe.json                         what the key hashes (for humans)
        seed<s>/trajectory.safetensors      "trajectory": (epochs + 1, P) float32, row e = after epoch e
        seed<s>/manifest.json               layout, recipe, seed, test accuracy per epoch, checksums, time
        .work-seed<s>/checkpoint.pt         resume state while expert s trains (removed when done)
        .seed<s>.lock                       flock: one process trains expert s, others wait and load

Expert ``k`` of a set with base seed ``b`` is the entry of seed ``b + k``: experts are independent
jobs, and the experts of a set written by separate processes are found together.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from condense.errors import ArtifactError, ConfigError
from condense.provenance import atomic_write_bytes, code_version, write_json_atomic
from condense.teachers import _store
from condense.teachers._training import Outcome, Recipe, check_model, resolve_augment
from condense.teachers._training import train as train_model
from condense.train import FitConfig
from condense.types import RealData

log = logging.getLogger(__name__)

FORMAT = "condense.expert-trajectory"
TRAJECTORY = "trajectory.safetensors"
TENSOR = "trajectory"

#: METHODS.md, trajectory section: SGD lr 0.01, no momentum, no weight decay, batch 256, constant lr.
EXPERT_EPOCHS = 50


def expert_fit_config(epochs: int = EXPERT_EPOCHS, **overrides: Any) -> FitConfig:
    """The MTT expert recipe: SGD lr 0.01, no momentum, no weight decay, batch 256, constant lr.

    Args:
        epochs: passes over the training data (the trajectory has ``epochs + 1`` rows).
        **overrides: any other :class:`~condense.train.FitConfig` field.
    """
    base = {"epochs": epochs, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.0,
            "weight_decay": 0.0, "schedule": "constant"}
    return FitConfig(**{**base, **overrides})


def unflatten(flat: Tensor, layout: Sequence[tuple[str, Sequence[int]]]) -> dict[str, Tensor]:
    """Split a flat ``(P,)`` parameter vector into named tensors (views of ``flat``).

    Args:
        flat: ``(P,)``, parameters concatenated in ``layout`` order.
        layout: ``(name, shape)`` pairs in flattening order (an expert's :attr:`Expert.layout`).

    Returns:
        ``{name: tensor of that shape}`` in layout order.
    """
    sizes = [int(torch.Size(shape).numel()) for _, shape in layout]
    if flat.dim() != 1 or flat.shape[0] != sum(sizes):
        raise ConfigError(f"unflatten: got a tensor of shape {tuple(flat.shape)}, the layout needs ({sum(sizes)},)")
    parts = torch.split(flat, sizes)
    return {name: p.view(*shape) for (name, shape), p in zip(layout, parts, strict=True)}


class Expert:
    """One expert's trajectory on disk, read row by row (safetensors ``safe_open`` / mmap).

    Attributes:
        path: the expert's directory. manifest: its manifest (recipe, seed, accuracies, ...).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._file: Any = None
        self._slice: Any = None

    def __getstate__(self) -> dict[str, Any]:  # the open file handle does not travel
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["manifest"])

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def epochs(self) -> int:
        """Epochs trained; the trajectory has ``epochs + 1`` rows."""
        return int(self.manifest["epochs"])

    @property
    def num_params(self) -> int:
        return int(self.manifest["num_params"])

    @property
    def layout(self) -> list[tuple[str, list[int]]]:
        """``(name, shape)`` of every parameter, in flattening (``named_parameters()``) order."""
        return [(p["name"], list(p["shape"])) for p in self.manifest["params"]]

    @property
    def test_acc(self) -> list[float | None]:
        """Test accuracy (percent) after each epoch, entry 0 at initialisation."""
        return list(self.manifest["test_acc"])

    def _rows(self) -> Any:
        if self._slice is None:
            try:
                self._file = safe_open(str(self.path / TRAJECTORY), framework="pt", device="cpu")
                self._slice = self._file.get_slice(TENSOR)
            except (SafetensorError, OSError) as e:
                raise ArtifactError(f"{self.path / TRAJECTORY} is not a readable trajectory ({e}); delete "
                                    f"{self.path} to retrain it") from None
        return self._slice

    def _check(self, epoch: int) -> int:
        if isinstance(epoch, bool) or not 0 <= int(epoch) <= self.epochs:
            raise ConfigError(f"epoch {epoch!r} out of range for an expert of {self.epochs} epochs; "
                              f"valid: 0..{self.epochs}")
        return int(epoch)

    def params(self, epoch: int, device: torch.device | str | None = None) -> Tensor:
        """``(P,)`` float32 parameters after ``epoch`` epochs (0: the initialisation); reads one row."""
        row = self._rows()[self._check(epoch)]
        return row if device is None else row.to(device)

    def params_range(self, start: int, stop: int, device: torch.device | str | None = None) -> Tensor:
        """``(stop - start, P)`` rows ``start..stop-1`` (one read)."""
        self._check(start)
        self._check(stop - 1)
        rows = self._rows()[start:stop]
        return rows if device is None else rows.to(device)

    def trajectory(self) -> Tensor:
        """The whole ``(epochs + 1, P)`` trajectory (eager)."""
        return self.params_range(0, self.epochs + 1)

    def named_params(self, epoch: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """:meth:`params` split into ``{name: tensor}`` with the model's shapes."""
        return unflatten(self.params(epoch, device), self.layout)

    def __repr__(self) -> str:
        return f"Expert(seed={self.seed}, epochs={self.epochs}, P={self.num_params}, path={str(self.path)!r})"


class ExpertSet(Sequence[Expert]):
    """N experts of one recipe (ordered by seed); ``experts[k].params(epoch) -> (P,)``."""

    def __init__(self, root: Path, experts: list[Expert]) -> None:
        self.root = Path(root)
        self.experts = experts

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, k: int) -> Expert:  # type: ignore[override]
        return self.experts[k]

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts)

    @property
    def epochs(self) -> int:
        return self.experts[0].epochs

    @property
    def num_params(self) -> int:
        return self.experts[0].num_params

    @property
    def layout(self) -> list[tuple[str, list[int]]]:
        return self.experts[0].layout

    @property
    def manifest(self) -> dict[str, Any]:
        """The first expert's manifest (the recipe is shared; seed and accuracies are per expert)."""
        return self.experts[0].manifest

    def params(self, k: int, epoch: int, device: torch.device | str | None = None) -> Tensor:
        """``(P,)`` parameters of expert ``k`` after ``epoch`` epochs."""
        return self.experts[k].params(epoch, device)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return unflatten(flat, self.layout)

    def __repr__(self) -> str:
        return f"ExpertSet(n={len(self)}, epochs={self.epochs}, P={self.num_params}, root={str(self.root)!r})"


def load_expert(path: str | Path, seed: int | None = None, *, verify: bool = True) -> Expert:
    """Open a cached expert without reading its trajectory.

    Args:
        path: an expert directory, or a set directory together with ``seed``.
        seed: which expert of the set directory ``path``.
        verify: check size and SHA-256 of the trajectory file (streamed, constant memory).

    Raises:
        ArtifactError: missing, foreign or corrupted files (one line, with the fix).
    """
    path = Path(path) if seed is None else Path(path) / f"seed{int(seed)}"
    manifest = _store.read_manifest(path, FORMAT)
    if verify:
        _store.verify_files(path, manifest)
    return Expert(path, manifest)


def set_dir(cache_dir: str | Path, data: RealData, recipe: Recipe) -> tuple[Path, dict[str, Any]]:
    """The set directory of ``recipe`` on ``data`` and the payload its key hashes."""
    payload = {"kind": "experts", "dataset": data.spec.to_dict(), "train_sha256": _store.data_fingerprint(data),
               **recipe.to_dict(), "code_key": _store.code_key(recipe.model, recipe.augment != "none")}
    key = _store.content_key(payload)
    return Path(cache_dir) / "experts" / f"{data.spec.name}-{recipe.model}-{key}", {"key": key, **payload}


def _write_expert(final: Path, out: Outcome, payload: dict[str, Any], seed: int, device: str) -> None:
    traj = out.trajectory
    assert traj is not None
    layout = [{"name": n, "shape": list(p.shape)} for n, p in out.model.named_parameters()]
    with _store.staging_dir(final) as tmp:
        atomic_write_bytes(tmp / TRAJECTORY, st_save({TENSOR: traj.contiguous()},
                                                     metadata={"format": f"{FORMAT};schema_version=1"}))
        manifest = {
            "format": FORMAT, "schema_version": _store.SCHEMA_VERSION, "kind": "expert", "key": payload["key"],
            "seed": seed, "epochs": int(traj.shape[0]) - 1, "num_params": int(traj.shape[1]), "params": layout,
            "dataset": payload["dataset"], "train_sha256": payload["train_sha256"],
            "train_images": int(payload["train_images"]), "test_images": int(payload["test_images"]),
            "test_sha256": payload["test_sha256"],
            "model": {"name": payload["model"], "kwargs": payload["model_kwargs"]}, "fit": payload["fit"],
            "augment": payload["augment"], "test_acc": out.test_acc,
            "loss": [h["loss"][0] for h in out.history], "code_key": payload["code_key"],
            "code_version": code_version(), "wall_s": round(out.wall_s, 3), "device": device,
            "torch": torch.__version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": {TRAJECTORY: _store.file_entry(tmp / TRAJECTORY)},
        }
        write_json_atomic(tmp / _store.MANIFEST, manifest)


def ensure_expert(data: RealData, recipe: Recipe, seed: int, root: Path, payload: dict[str, Any], *,
                  train_missing: bool = True, verify: bool = True) -> tuple[Expert, bool]:
    """The expert of ``seed`` in set ``root``: loaded if cached, else trained (resumable) and written.

    Returns:
        ``(expert, trained)``; ``trained`` is False for a cache hit.
    """
    final = root / f"seed{seed}"
    work = root / f".work-seed{seed}"
    with _store.locked(root / f".seed{seed}.lock"):
        if final.exists():
            shutil.rmtree(work, ignore_errors=True)  # left over by a kill after the rename
            return load_expert(final, verify=verify), False
        if not train_missing:
            raise ArtifactError(f"expert of seed {seed} is not in the cache ({final}); train it with "
                                f"condense-teachers kind=experts (or call get_experts with train=True)")
        if not (root / "recipe.json").exists():
            write_json_atomic(root / "recipe.json", payload)
        log.info("training expert seed %d (%s, %d epochs) into %s", seed, recipe.model, recipe.fit.epochs, final)
        out = train_model(data, recipe, seed, work, payload["key"], trajectory=True)
        full = {**payload, "train_images": data.train_images.shape[0], "test_images": data.test_images.shape[0],
                "test_sha256": _store.data_fingerprint(data, "test")}
        _write_expert(final, out, full, seed, str(data.train_images.device))
        shutil.rmtree(work, ignore_errors=True)
        expert = load_expert(final, verify=False)
        log.info("expert seed %d: test accuracy %s%% after %d epochs, %.0f s", seed, out.test_acc[-1],
                 recipe.fit.epochs, out.wall_s)
        return expert, True


def get_experts(data: RealData, n: int, epochs: int | None = None, *, model: str = "convnet",
                model_kwargs: dict[str, Any] | None = None, cfg: FitConfig | None = None,
                augment: str | None = "default", cache_dir: str | Path, seed: int = 0, train: bool = True,
                verify: bool = True) -> ExpertSet:
    """N expert trajectories of one recipe: cached ones are loaded, missing ones trained.

    Expert ``k`` uses seed ``seed + k`` (initialisation, shuffling, augmentation), so experts
    trained by separate processes (``condense-teachers ... n=1 expert=k``) form one set.

    Args:
        data: real data; experts train on ``data.train_*`` on its device and are scored on
            ``data.test_*`` after every epoch.
        n: number of experts.
        epochs: epochs per expert (default: ``cfg.epochs``, else :data:`EXPERT_EPOCHS`).
        model / model_kwargs: the network (``condense.models`` registry).
        cfg: engine settings (default :func:`expert_fit_config`); ``epochs`` overrides its epochs.
        augment: DSA strategy during training: ``default`` (the dataset's), ``none``, or ops.
        cache_dir: cache root.
        seed: base seed.
        train: train missing experts (False: a miss raises ArtifactError).
        verify: check the SHA-256 of every cached trajectory file.

    Returns:
        :class:`ExpertSet` of the ``n`` experts, ordered by seed.

    Raises:
        ArtifactError: a corrupted cached file, or a miss with ``train=False``.
        ConfigError: bad arguments.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (number of experts) must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    fcfg = cfg if cfg is not None else expert_fit_config(EXPERT_EPOCHS if epochs is None else epochs)
    if epochs is not None:
        fcfg = dataclasses.replace(fcfg, epochs=int(epochs))
    recipe = Recipe(model, dict(model_kwargs or {}), fcfg, resolve_augment(augment, data.spec.name))
    check_model(recipe)
    root, payload = set_dir(cache_dir, data, recipe)
    experts, trained = [], 0
    for s in range(seed, seed + n):
        e, t = ensure_expert(data, recipe, s, root, payload, train_missing=train, verify=verify)
        experts.append(e)
        trained += int(t)
    log.info("%d expert(s) of %s in %s (%d trained now, %d from the cache)", n, model, root, trained, n - trained)
    return ExpertSet(root, experts)
