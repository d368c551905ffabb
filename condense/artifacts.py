"""Save, load and export synthetic sets. Nothing here ever unpickles.

A run directory holds:

- ``synset.safetensors``: ``images`` (N,C,H,W) float32 normalized, ``labels`` (N,) int64 or
  (N,K) float32, optional ``lr`` (0-d), optional ``zca_matrix`` (D,D).
- ``preview.png``: denormalized grid, one row per class.
- ``labels.safetensors`` (optional): stored soft labels of the soft-label evaluation protocol
  (:mod:`condense.eval.soft`): ``values`` (epochs, N, k) float16 teacher logits in batch order and,
  when k is less than the classes, ``indices`` (epochs, N, k) of their classes; the crops are not
  stored but replayed from the seed in the manifest's ``soft_labels.protocol``.
- ``manifest.json``: schema_version, dataset spec with normalization, ipc, class order, method and
  its resolved config, seed, code version, creation time, SHA-256 and size of every file, total
  storage bytes. Written LAST, so a crash never leaves a manifest that vouches for half a set.

Every file is written to a temp file and renamed into place. Loading trusts nothing: it checks
every manifest field (types, ranges, and the fields that repeat one another), each file's size
from the file system before reading it, its SHA-256, and the tensors' names, dtypes and shapes
against the manifest; whatever is wrong is one :class:`~condense.errors.ArtifactError` line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condense.errors import ArtifactError, ConfigError
from condense.provenance import atomic_write_bytes, code_version, write_json_atomic
from condense.types import SCHEMA_VERSION, DatasetSpec, SetMeta, SyntheticSet

log = logging.getLogger(__name__)

FORMAT = "condense.synthetic-set"
SYNSET = "synset.safetensors"
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
PREVIEW_MAX_PER_CLASS = 10
LABELS = "labels.safetensors"
LABELS_FORMAT = "condense.soft-labels"
#: safetensors dtype of the stored class indices by torch dtype (the smallest that holds them).
INDEX_DTYPES = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}


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


#: Upper bound on the size of ``manifest.json`` (a real one is a few KB; config included).
MAX_MANIFEST_BYTES = 16 << 20
#: Upper bound on the JSON header of ``synset.safetensors`` (it lists at most four tensors).
MAX_HEADER_BYTES = 1 << 20
#: The tensors a synset file may hold: name -> required.
TENSORS = {"images": True, "labels": True, "lr": False, "zca_matrix": False}
#: Top-level manifest fields :func:`save_synset` always writes (the loader requires each).
MANIFEST_FIELDS = ("format", "schema_version", "dataset", "normalization", "ipc", "num_images", "class_order",
                   "labels", "learned_lr", "zca", "method", "config", "seed", "code_version", "created", "files",
                   "storage_bytes", "tensor_bytes", "eval_recipe", "extra")
_HASH_CHUNK = 1 << 20


def _line(text: object) -> str:
    """``text`` on one line (messages of wrapped exceptions may hold newlines)."""
    return " ".join(str(text).split())


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of ``run_dir``, checked for format and schema version (not yet for its fields)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {run_dir} is not a condense artifact directory "
                            f"(expected {MANIFEST} and {SYNSET})")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path} has {size} bytes, more than a manifest can hold "
                                f"({MAX_MANIFEST_BYTES}); the artifact is corrupted")
        manifest = json.loads(path.read_bytes())
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({_line(e)})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path} is not valid JSON ({_line(e)}); the artifact is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} is not a condense manifest (format {_line(repr(found))[:80]}, "
                            f"expected {FORMAT!r})")
    ver = manifest.get("schema_version")
    if ver != SCHEMA_VERSION or isinstance(ver, bool):
        raise ArtifactError(f"{path} has schema_version {_line(repr(ver))[:80]}; this condense reads "
                            f"schema_version {SCHEMA_VERSION} only")
    return manifest


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(where: Path, field: str, value: Any, want: str) -> ArtifactError:
    """The error for a manifest field that is not what :func:`save_synset` writes."""
    return ArtifactError(f"{where} field {field} is {_line(repr(value))[:60]}, expected {want}; the manifest "
                         f"was edited or corrupted")


def _check_dataset(d: Any, where: Path) -> DatasetSpec:
    """The manifest's ``dataset`` entry as a :class:`DatasetSpec`, each field checked."""
    if not isinstance(d, dict):
        raise _bad(where, "dataset", d, "an object")
    if not isinstance(d.get("name"), str):
        raise _bad(where, "dataset.name", d.get("name"), "a string")
    for key in ("channels", "num_classes"):
        if not _is_int(d.get(key), 1):
            raise _bad(where, f"dataset.{key}", d.get(key), "a positive integer")
    size = d.get("im_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v, 1) for v in size)):
        raise _bad(where, "dataset.im_size", size, "[height, width] (positive integers)")
    k, c = d["num_classes"], d["channels"]
    names = d.get("class_names")
    if not (isinstance(names, list) and len(names) == k and all(isinstance(n, str) for n in names)):
        raise _bad(where, "dataset.class_names", names, f"{k} class names")
    for key in ("mean", "std"):
        v = d.get(key)
        if not (isinstance(v, list) and len(v) == c and all(_is_num(x) and (key == "mean" or x > 0) for x in v)):
            raise _bad(where, f"dataset.{key}", v, f"{c} finite number(s)" + (" > 0" if key == "std" else ""))
    return DatasetSpec.from_dict(d)


def _manifest_meta(m: dict[str, Any], where: Path) -> tuple[SetMeta, dict[str, Any]]:
    """The :class:`SetMeta` a manifest describes and the label / lr facts the tensors must match,
    after checking every field :func:`save_synset` writes (types, ranges, and the fields that
    repeat one another: normalization vs dataset, counts vs ipc and classes).

    Raises:
        ArtifactError: naming the first bad field.
    """
    missing = [f for f in MANIFEST_FIELDS if f not in m]
    if missing:
        raise ArtifactError(f"{where} lacks field(s) {', '.join(missing)}; the manifest was edited or corrupted")
    spec = _check_dataset(m["dataset"], where)
    k = spec.num_classes
    if not isinstance(m["zca"], bool):
        raise _bad(where, "zca", m["zca"], "true or false")
    space = "(x/255 - mean) / std" + (", then ZCA" if m["zca"] else "")
    norm = {"mean": m["dataset"]["mean"], "std": m["dataset"]["std"], "space": space}
    if m["normalization"] != norm:
        raise _bad(where, "normalization", m["normalization"], f"the dataset's mean and std, space {space!r}")
    if not _is_int(m["ipc"], 1):
        raise _bad(where, "ipc", m["ipc"], "a positive integer")
    n = k * m["ipc"]
    if not _is_int(m["num_images"]) or m["num_images"] != n:
        raise _bad(where, "num_images", m["num_images"], f"{n} ({k} classes x ipc {m['ipc']})")
    order = m["class_order"]
    if not (isinstance(order, list) and len(order) == k and all(_is_int(v) and v == i for i, v in enumerate(order))):
        raise _bad(where, "class_order", order, f"[0, ..., {k - 1}]")
    if m["labels"] not in ("hard", "soft"):
        raise _bad(where, "labels", m["labels"], "'hard' or 'soft'")
    if m["learned_lr"] is not None and not _is_num(m["learned_lr"]):
        raise _bad(where, "learned_lr", m["learned_lr"], "null or a finite number")
    for key, kind in (("method", str), ("created", str), ("config", dict), ("code_version", dict), ("extra", dict)):
        if not isinstance(m[key], kind):
            raise _bad(where, key, m[key], "a string" if kind is str else "an object")
    if not _is_int(m["seed"]):
        raise _bad(where, "seed", m["seed"], "a non-negative integer")
    if m["eval_recipe"] is not None and not isinstance(m["eval_recipe"], dict):
        raise _bad(where, "eval_recipe", m["eval_recipe"], "null or an object")
    if "decoder" in m["extra"]:  # multi-formation: the evaluator and the exports decode with it
        from condense.ops.formation import Decoder

        try:
            Decoder.from_dict(m["extra"]["decoder"]).check_size(spec.im_size)
        except ConfigError as e:
            raise _bad(where, "extra.decoder", m["extra"]["decoder"], f"a valid parametrization ({e})") from None
    meta = SetMeta(dataset=spec, ipc=m["ipc"], method=m["method"], config=m["config"], seed=m["seed"],
                   zca=m["zca"], code_version=m["code_version"], extra=m["extra"])
    return meta, {"soft": m["labels"] == "soft", "learned_lr": m["learned_lr"]}


def _manifest_files(m: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` table: only the names :func:`save_synset` writes, each with a SHA-256 and a
    size, and the size totals that repeat them."""
    files = m["files"]
    if not isinstance(files, dict) or SYNSET not in files:
        raise ArtifactError(f"{where} lists no {SYNSET} under files; the manifest was edited or corrupted")
    known = (SYNSET, PREVIEW, LABELS) if "soft_labels" in m else (SYNSET, PREVIEW)
    for name, entry in files.items():
        if name not in known:
            raise ArtifactError(f"{where} lists an unknown file {_line(repr(name))[:60]}; an artifact holds "
                                f"{SYNSET}, {PREVIEW}" + (f" and {LABELS}" if "soft_labels" in m else "")
                                + (" (a soft_labels entry names it)" if name == LABELS else ""))
        if not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise ArtifactError(f"{where} files.{name} is not {{sha256: 64 hex digits, bytes: integer}}; "
                                f"the manifest was edited or corrupted")
    total = sum(e["bytes"] for e in files.values())
    if m["storage_bytes"] != total or m["tensor_bytes"] != files[SYNSET]["bytes"]:
        raise ArtifactError(f"{where} storage_bytes / tensor_bytes disagree with its files "
                            f"({total} / {files[SYNSET]['bytes']}); the manifest was edited or corrupted")
    return files


def _expected_tensors(meta: SetMeta, facts: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """safetensors dtype and shape of every tensor the manifest implies (``zca_matrix`` optional)."""
    spec = meta.dataset
    n, d = spec.num_classes * meta.ipc, spec.channels * spec.im_size[0] * spec.im_size[1]
    out = {"images": ("F32", [n, spec.channels, *spec.im_size]),
           "labels": ("F32", [n, spec.num_classes]) if facts["soft"] else ("I64", [n]),
           "zca_matrix": ("F32", [d, d])}
    if facts["learned_lr"] is not None:
        out["lr"] = ("F32", [])
    return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    return (8 if dtype == "I64" else 4) * math.prod(shape)


def _memory_bytes() -> int | None:
    """Physical memory of this machine (``None`` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_synset_size(declared: int, expected: dict[str, tuple[str, list[int]]], where: Path) -> None:
    """Refuse a declared synset size the manifest's own shapes cannot produce, or one this machine
    cannot hold, before anything is read."""
    low = 8 + sum(_nbytes(*expected[t]) for t in expected if t != "zca_matrix")
    high = low + _nbytes(*expected["zca_matrix"]) + MAX_HEADER_BYTES
    if not low <= declared <= high:
        raise ArtifactError(f"{where} declares {declared} bytes for {SYNSET}, but the tensors it describes take "
                            f"{low} to {high}; the manifest was edited or corrupted")
    mem = _memory_bytes()
    if mem is not None and declared > mem:
        raise ArtifactError(f"{where / SYNSET} needs {declared} bytes, more than this machine's memory ({mem})")


def _check_preview_size(declared: int, meta: SetMeta, where: Path) -> None:
    """Refuse a declared preview size far beyond any PNG of the set's grid (twice the raw RGBA
    pixels plus 64 KiB), before it is read."""
    spec = meta.dataset
    cols = min(meta.ipc, PREVIEW_MAX_PER_CLASS)
    width, height = cols * (spec.im_size[1] + 2) + 2, spec.num_classes * (spec.im_size[0] + 2) + 2
    high = 2 * (4 * width + 1) * height + (64 << 10)
    if declared > high:
        raise ArtifactError(f"{where} declares {declared} bytes for {PREVIEW}, more than a preview of this set "
                            f"takes (at most {high}); the manifest was edited or corrupted")


def _open_checked(path: Path, entry: dict[str, Any]) -> int:
    """Size of ``path`` after checking it is a regular file of the manifest's size (nothing read)."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        raise ArtifactError(f"{path} is missing (listed in {MANIFEST})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is not a regular file (listed in {MANIFEST})")
    if st.st_size != entry["bytes"]:
        raise ArtifactError(f"{path} has {st.st_size} bytes but the manifest records "
                            f"{entry['bytes']}: truncated or replaced")
    return st.st_size


def _verified_bytes(run_dir: Path, name: str, entry: dict[str, Any]) -> bytes:
    """The bytes of ``name`` after its size and SHA-256 checks."""
    path = run_dir / name
    size = _open_checked(path, entry)
    try:
        with path.open("rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({_line(e)})") from None
    if len(data) != size:
        raise ArtifactError(f"{path} changed size while being read: truncated or replaced")
    if _sha256(data) != entry["sha256"]:
        raise ArtifactError(f"{path} fails its SHA-256 check: the file was modified after saving")
    return data


def _verify_streamed(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Size and SHA-256 checks of ``name`` reading it in chunks (constant memory)."""
    path = run_dir / name
    size = _open_checked(path, entry)
    h, seen = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while seen <= size and (chunk := f.read(_HASH_CHUNK)):
                h.update(chunk)
                seen += len(chunk)
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({_line(e)})") from None
    if seen != size or h.hexdigest() != entry["sha256"]:
        raise ArtifactError(f"{path} fails its SHA-256 check: the file was modified after saving")


def _check_header(blob: bytes, expected: dict[str, tuple[str, list[int]]], where: Path) -> None:
    """The safetensors header names only known tensors, each of the dtype and shape the manifest
    implies, under condense's format tag (checked before any tensor is built)."""
    size = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 < size <= min(len(blob) - 8, MAX_HEADER_BYTES):
        raise ArtifactError(f"{where} is not a readable safetensors file: header size {size} "
                            f"(file of {len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + size])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{where} is not a readable safetensors file: header is not JSON ({_line(e)})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where} is not a readable safetensors file: header is not an object")
    tag = {"format": f"{FORMAT};schema_version={SCHEMA_VERSION}"}
    if header.pop("__metadata__", None) != tag:
        raise ArtifactError(f"{where} does not carry the format tag {tag['format']!r}; not a condense synset")
    for name, required in TENSORS.items():
        if required and name not in header:
            raise ArtifactError(f"{where} has no {name!r} tensor")
    if "lr" in expected and "lr" not in header:
        raise ArtifactError(f"{where} has no 'lr' tensor but the manifest records a learned lr")
    for name, info in header.items():
        if name not in expected:
            raise ArtifactError(f"{where} holds an unexpected tensor {_line(repr(name))[:60]}; valid: "
                                f"{', '.join(t for t in TENSORS if t in expected)}")
        got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else (None, None)
        if list(got) != list(expected[name]):
            want = expected[name]
            raise ArtifactError(f"{where} tensor {name!r} is {_line(repr(got[0]))[:20]} "
                                f"{_line(repr(got[1]))[:80]}, expected {want[0]} {want[1]} (from the manifest)")


def _read_tensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a verified safetensors ``blob`` (a header that lies: one-line ArtifactError)."""
    try:
        return st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, KeyError, TypeError, OverflowError, AssertionError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {_line(e)}") from None


def load_synset(run_dir: str | Path, device: torch.device | str = "cpu") -> SyntheticSet:
    """Load and verify an artifact directory written by :func:`save_synset`.

    Every check that can fail runs before the tensors are built: the manifest's fields (types,
    ranges, the fields that repeat one another), each file's size (from the file system, so a
    huge declared size is refused before anything is read) and SHA-256, then the tensors' names,
    dtypes and shapes against the manifest.

    Raises:
        ArtifactError: one line naming the file and what is wrong with it.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    where = run_dir / MANIFEST
    meta, facts = _manifest_meta(manifest, where)
    files = _manifest_files(manifest, where)
    expected = _expected_tensors(meta, facts)
    _check_synset_size(files[SYNSET]["bytes"], expected, where)
    if PREVIEW in files:
        _check_preview_size(files[PREVIEW]["bytes"], meta, where)
        _verify_streamed(run_dir, PREVIEW, files[PREVIEW])
    if "soft_labels" in manifest:
        _expected_labels(manifest, meta, files, where)
        _verify_streamed(run_dir, LABELS, files[LABELS])
    blob = _verified_bytes(run_dir, SYNSET, files[SYNSET])
    _check_header(blob, expected, run_dir / SYNSET)
    tensors = _read_tensors(blob, run_dir / SYNSET)
    labels = tensors["labels"]
    if not facts["soft"] and bool(((labels < 0) | (labels >= meta.dataset.num_classes)).any()):
        raise ArtifactError(f"{run_dir / SYNSET} holds labels outside [0, {meta.dataset.num_classes})")
    lr = tensors.get("lr")
    if lr is not None and not torch.equal(lr, torch.tensor(facts["learned_lr"], dtype=torch.float32)):
        raise ArtifactError(f"{run_dir / SYNSET} holds lr {float(lr)!r} but the manifest records learned_lr "
                            f"{facts['learned_lr']!r}")
    syn = SyntheticSet(
        images=tensors["images"].to(device),
        labels=labels.to(device),
        meta=meta,
        lr=lr.to(device) if lr is not None else None,
        zca_matrix=tensors["zca_matrix"].to(device) if "zca_matrix" in tensors else None,
    )
    _check_shapes(syn)
    return syn


# ----------------------------------------------------------------------------- stored soft labels

def labels_blob(values: torch.Tensor, indices: torch.Tensor | None) -> bytes:
    """The ``labels.safetensors`` bytes of stored labels (same tensors -> same bytes).

    Args:
        values: ``(epochs, N, k)`` float16 logits.
        indices: ``(epochs, N, k)`` uint8 / int16 / int32 class indices, or ``None`` (k = all classes).
    """
    tensors = {"values": values.detach().to("cpu", torch.float16).contiguous()}
    if indices is not None:
        if indices.dtype not in INDEX_DTYPES:
            raise ArtifactError(f"label indices must be one of {', '.join(map(str, INDEX_DTYPES))}, got {indices.dtype}")
        tensors["indices"] = indices.detach().cpu().contiguous()
    return st_save(tensors, metadata={"format": f"{LABELS_FORMAT};schema_version={SCHEMA_VERSION}"})


def _index_dtype_name(classes: int) -> str:
    return "U8" if classes <= 256 else "I16" if classes <= 32768 else "I32"


def _expected_labels(m: dict[str, Any], meta: SetMeta, files: dict[str, dict[str, Any]],
                     where: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors ``labels.safetensors`` must hold, from the manifest's ``soft_labels`` entry,
    after checking that entry (its protocol's counts against the set) and the file's declared size."""
    entry = m.get("soft_labels")
    proto = entry.get("protocol") if isinstance(entry, dict) else None
    if not isinstance(proto, dict) or entry.get("file") != LABELS or LABELS not in files:
        raise _bad(where, "soft_labels", entry, f"{{file: {LABELS!r} (listed under files), protocol: {{...}}}}")
    classes, n = meta.dataset.num_classes, meta.dataset.num_classes * meta.ipc
    epochs, k = proto.get("epochs"), proto.get("top_k")
    if not (_is_int(epochs, 1) and _is_int(k, 1) and k <= classes and proto.get("num_images") == n
            and proto.get("num_classes") == classes):
        raise _bad(where, "soft_labels.protocol", {key: proto.get(key) for key in ("epochs", "top_k", "num_images",
                                                                                   "num_classes")},
                   f"epochs >= 1, 1 <= top_k <= {classes}, num_images {n}, num_classes {classes}")
    shape = [epochs, n, k]
    out = {"values": ("F16", shape)}
    if k < classes:
        out["indices"] = (_index_dtype_name(classes), shape)
    size = {"F16": 2, "U8": 1, "I16": 2, "I32": 4}
    low = 8 + sum(size[d] * math.prod(s) for d, s in out.values())
    declared = files[LABELS]["bytes"]
    if not low <= declared <= low + MAX_HEADER_BYTES:
        raise ArtifactError(f"{where} declares {declared} bytes for {LABELS}, but the labels it describes take "
                            f"{low} to {low + MAX_HEADER_BYTES}; the manifest was edited or corrupted")
    return out


def save_labels(run_dir: str | Path, blob: bytes, protocol: dict[str, Any]) -> Path:
    """Store soft labels (:func:`labels_blob` bytes) in the artifact ``run_dir``: the file first,
    then the manifest (atomically) with its checksum, size and ``soft_labels.protocol``.

    Replaces stored labels the artifact already has. The manifest is checked first (as
    :func:`load_synset` does), so labels are never attached to a corrupted artifact.

    Returns:
        The labels file's path.

    Raises:
        ArtifactError: ``run_dir`` is not a valid artifact, or ``blob`` does not fit its protocol.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    where = run_dir / MANIFEST
    meta, _ = _manifest_meta(manifest, where)
    files = dict(_manifest_files(manifest, where))
    files[LABELS] = {"sha256": _sha256(blob), "bytes": len(blob)}
    new = {**manifest, "files": files, "soft_labels": {"file": LABELS, "protocol": protocol}}
    expected = _expected_labels(new, meta, files, where)
    _check_labels_header(blob, expected, run_dir / LABELS)
    new["storage_bytes"] = sum(f["bytes"] for f in files.values())
    atomic_write_bytes(run_dir / LABELS, blob)
    write_json_atomic(run_dir / MANIFEST, new)
    return run_dir / LABELS


def _check_labels_header(blob: bytes, expected: dict[str, tuple[str, list[int]]], where: Path) -> None:
    size = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if not 0 < size <= min(len(blob) - 8, MAX_HEADER_BYTES):
        raise ArtifactError(f"{where} is not a readable safetensors file: header size {size} (file of {len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + size])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{where} is not a readable safetensors file: header is not JSON ({_line(e)})") from None
    tag = {"format": f"{LABELS_FORMAT};schema_version={SCHEMA_VERSION}"}
    if not isinstance(header, dict) or header.pop("__metadata__", None) != tag:
        raise ArtifactError(f"{where} does not carry the format tag {tag['format']!r}; not condense soft labels")
    got = {k: (v.get("dtype"), v.get("shape")) if isinstance(v, dict) else (None, None) for k, v in header.items()}
    want = {k: (d, list(s)) for k, (d, s) in expected.items()}
    if got != want:
        raise ArtifactError(f"{where} holds {_line(repr(got))[:120]}, expected {want} (from the manifest)")


def load_labels(run_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], int] | None:
    """The stored soft labels of an artifact, verified, or ``None`` when it has none.

    Returns:
        ``(values (epochs, N, k) float16, indices or None, protocol, file bytes)``.

    Raises:
        ArtifactError: one line naming what is wrong (missing, truncated or modified file, a
            manifest entry that does not describe it).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if "soft_labels" not in manifest:
        return None
    where = run_dir / MANIFEST
    meta, _ = _manifest_meta(manifest, where)
    files = _manifest_files(manifest, where)
    expected = _expected_labels(manifest, meta, files, where)
    blob = _verified_bytes(run_dir, LABELS, files[LABELS])
    _check_labels_header(blob, expected, run_dir / LABELS)
    tensors = _read_tensors(blob, run_dir / LABELS)
    indices = tensors.get("indices")
    classes = meta.dataset.num_classes
    if indices is not None and bool(((indices.long() < 0) | (indices.long() >= classes)).any()):
        raise ArtifactError(f"{run_dir / LABELS} holds class indices outside [0, {classes})")
    return tensors["values"], indices, dict(manifest["soft_labels"]["protocol"]), len(blob)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def export_imagefolder(syn: SyntheticSet, out_dir: str | Path) -> Path:
    """PNG files ``out_dir/NNN-<class name>/<i>.png`` (denormalized, clamped to [0,1]); a
    multi-formation set is decoded first (``factor^2`` files per stored image).

    The zero-padded prefix keeps torchvision's ImageFolder class order equal to ours.
    """
    from PIL import Image

    from condense.ops.formation import decoded_set

    out_dir = Path(out_dir)
    syn = decoded_set(syn)  # multi-formation: the images a network trains on
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
    normalized space (as those repos store them); a multi-formation set is decoded first.
    """
    from condense.ops.formation import decoded_set

    out_dir = Path(out_dir)
    t = _tensors(decoded_set(syn))  # other repos' loaders know no decoder: decoded images
    files = {"images.pt": t["images"], "labels.pt": t["labels"], "res.pt": {"data": [[t["images"], t["labels"]]]}}
    if "lr" in t:
        files["lr.pt"] = t["lr"]
    for name, obj in files.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(out_dir / name, buf.getvalue())
    return out_dir
