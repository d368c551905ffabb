"""Save, load and export synthetic sets. Nothing here ever unpickles.

A run directory holds:

- ``synset.safetensors``: ``images`` (N,C,H,W) float32 normalized, ``labels`` (N,) int64 or
  (N,K) float32, optional ``lr`` (0-d), optional ``zca_matrix`` (D,D).
- ``preview.png``: denormalized grid, one row per class.
- ``manifest.json``: schema_version, dataset spec with normalization, ipc, class order, method and
  its resolved config, seed, code version, creation time, SHA-256 and size of every file, total
  storage bytes. Written LAST, so a crash never leaves a manifest that vouches for half a set.

Every file is written to a temp file and renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condense.errors import ArtifactError
from condense.provenance import atomic_write_bytes, code_version, write_json_atomic
from condense.types import SCHEMA_VERSION, DatasetSpec, SetMeta, SyntheticSet

log = logging.getLogger(__name__)

FORMAT = "condense.synthetic-set"
SYNSET = "synset.safetensors"
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
PREVIEW_MAX_PER_CLASS = 10


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors(syn: SyntheticSet) -> dict[str, torch.Tensor]:
    out = {
        "images": syn.images.detach().to("cpu", torch.float32).contiguous(),
        "labels": syn.labels.detach().cpu().contiguous(),
    }
    if syn.soft:
        out["labels"] = out["labels"].float()
    if syn.lr is not None:
        out["lr"] = syn.lr.detach().to("cpu", torch.float32).reshape(()).contiguous()
    if syn.zca_matrix is not None:
        out["zca_matrix"] = syn.zca_matrix.detach().to("cpu", torch.float32).contiguous()
    return out


def preview_png(syn: SyntheticSet, max_per_class: int = PREVIEW_MAX_PER_CLASS) -> bytes:
    """PNG bytes of a grid: one row per class, up to ``max_per_class`` images each."""
    from PIL import Image
    from torchvision.utils import make_grid

    k, ipc = syn.meta.dataset.num_classes, syn.meta.ipc
    imgs = syn.images.detach().cpu().float()
    cols = min(ipc, max_per_class)
    imgs = imgs.reshape(k, ipc, *imgs.shape[1:])[:, :cols].reshape(k * cols, *imgs.shape[1:])
    imgs = syn.meta.dataset.denormalize(imgs).clamp(0, 1)
    grid = make_grid(imgs, nrow=cols, padding=2, pad_value=1.0)
    arr = (grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _check_shapes(syn: SyntheticSet) -> None:
    spec, ipc = syn.meta.dataset, syn.meta.ipc
    n = spec.num_classes * ipc
    want = (n, spec.channels, *spec.im_size)
    if tuple(syn.images.shape) != want:
        raise ArtifactError(f"images have shape {tuple(syn.images.shape)}, expected {want} "
                            f"({spec.num_classes} classes x ipc {ipc}, class-major)")
    if syn.labels.shape[0] != n:
        raise ArtifactError(f"labels have {syn.labels.shape[0]} rows, expected {n}")


def save_synset(
    syn: SyntheticSet, run_dir: str | Path, *, eval_recipe: dict[str, Any] | None = None
) -> Path:
    """Write ``synset.safetensors``, ``preview.png`` and ``manifest.json`` into ``run_dir``.

    Returns:
        The manifest path.
    """
    _check_shapes(syn)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = syn.meta
    blobs = {
        # ONE metadata entry: safetensors orders metadata keys by a hash map, so several keys would
        # make the bytes differ between processes (the synset must be byte-identical per seed).
        SYNSET: st_save(_tensors(syn), metadata={"format": f"{FORMAT};schema_version={SCHEMA_VERSION}"}),
        PREVIEW: preview_png(syn),
    }
    for name, data in blobs.items():
        atomic_write_bytes(run_dir / name, data)
    files = {name: {"sha256": _sha256(d), "bytes": len(d)} for name, d in blobs.items()}
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "dataset": meta.dataset.to_dict(),
        "normalization": {"mean": list(meta.dataset.mean), "std": list(meta.dataset.std),
                          "space": "(x/255 - mean) / std" + (", then ZCA" if meta.zca else "")},
        "ipc": meta.ipc,
        "num_images": len(syn),
        "class_order": meta.class_order,
        "labels": "soft" if syn.soft else "hard",
        "learned_lr": None if syn.lr is None else float(syn.lr),
        "zca": meta.zca,
        "method": meta.method,
        "config": meta.config,
        "seed": meta.seed,
        "code_version": meta.code_version or code_version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "files": files,
        "storage_bytes": sum(f["bytes"] for f in files.values()),
        "tensor_bytes": files[SYNSET]["bytes"],
        "eval_recipe": eval_recipe,
        "extra": meta.extra,
    }
    write_json_atomic(run_dir / MANIFEST, manifest)
    log.info("saved synthetic set (%d images, %d bytes) to %s", len(syn), manifest["storage_bytes"], run_dir)
    return run_dir / MANIFEST


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``run_dir``, checked for format and schema version."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {run_dir} is not a condense artifact directory "
                            f"(expected {MANIFEST} and {SYNSET})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a condense manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r})")
    ver = manifest.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {ver!r}; this condense reads "
                            f"schema_version {SCHEMA_VERSION} only")
    return manifest


def _verified_bytes(run_dir: Path, name: str, entry: dict[str, Any]) -> bytes:
    path = run_dir / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (listed in {MANIFEST})")
    data = path.read_bytes()
    if len(data) != entry.get("bytes"):
        raise ArtifactError(f"{path} has {len(data)} bytes but the manifest records "
                            f"{entry.get('bytes')}: truncated or replaced")
    if _sha256(data) != entry.get("sha256"):
        raise ArtifactError(f"{path} fails its SHA-256 check: the file was modified after saving")
    return data


def load_synset(run_dir: str | Path, device: torch.device | str = "cpu") -> SyntheticSet:
    """Load and verify an artifact directory written by :func:`save_synset`."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    files = manifest.get("files") or {}
    if SYNSET not in files:
        raise ArtifactError(f"{run_dir / MANIFEST} lists no {SYNSET}")
    for name, entry in files.items():
        data = _verified_bytes(run_dir, name, entry)
        if name == SYNSET:
            blob = data
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{run_dir / SYNSET} is not a readable safetensors file: {e}") from None
    for key in ("images", "labels"):
        if key not in tensors:
            raise ArtifactError(f"{run_dir / SYNSET} has no {key!r} tensor")
    try:
        spec = DatasetSpec.from_dict(manifest["dataset"])
        meta = SetMeta(
            dataset=spec, ipc=int(manifest["ipc"]), method=str(manifest["method"]),
            config=manifest.get("config") or {}, seed=int(manifest.get("seed", 0)),
            zca=bool(manifest.get("zca", False)), code_version=manifest.get("code_version") or {},
            extra=manifest.get("extra") or {},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{run_dir / MANIFEST} misses or mangles field {e}") from None
    syn = SyntheticSet(
        images=tensors["images"].to(device),
        labels=tensors["labels"].to(device),
        meta=meta,
        lr=tensors["lr"].to(device) if "lr" in tensors else None,
        zca_matrix=tensors["zca_matrix"].to(device) if "zca_matrix" in tensors else None,
    )
    _check_shapes(syn)
    return syn


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def export_imagefolder(syn: SyntheticSet, out_dir: str | Path) -> Path:
    """PNG files ``out_dir/NNN-<class name>/<i>.png`` (denormalized, clamped to [0,1]).

    The zero-padded prefix keeps torchvision's ImageFolder class order equal to ours.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    spec = syn.meta.dataset
    imgs = spec.denormalize(syn.images.detach().cpu().float()).clamp(0, 1)
    arr = imgs.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    labels = syn.hard_labels.cpu().tolist()
    counters: dict[int, int] = {}
    for i, c in enumerate(labels):
        folder = out_dir / f"{c:03d}-{_safe_name(spec.class_names[c])}"
        folder.mkdir(parents=True, exist_ok=True)
        j = counters.get(c, 0)
        counters[c] = j + 1
        img = arr[i][:, :, 0] if arr.shape[3] == 1 else arr[i]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        atomic_write_bytes(folder / f"{j:05d}.png", buf.getvalue())
    return out_dir


def export_tensors(syn: SyntheticSet, out_dir: str | Path) -> Path:
    """Plain tensor files readable with ``torch.load(path, weights_only=True)``.

    Writes ``images.pt``, ``labels.pt`` and (if learned) ``lr.pt`` — the MTT / DD-Ranking layout —
    and ``res.pt`` = ``{"data": [[images, labels]]}``, the DC/DSA/DM layout. Images stay in the
    normalized space (as those repos store them).
    """
    out_dir = Path(out_dir)
    t = _tensors(syn)
    files = {"images.pt": t["images"], "labels.pt": t["labels"], "res.pt": {"data": [[t["images"], t["labels"]]]}}
    if "lr" in t:
        files["lr.pt"] = t["lr"]
    for name, obj in files.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(out_dir / name, buf.getvalue())
    return out_dir
