"""The teacher cache: content keys, checksums, atomic directories, per-entry locks.

An entry is a directory holding safetensors file(s) and ``manifest.json``; it is built in a
temporary sibling and renamed into place, so a reader sees either nothing or a complete entry.
Keys hash what produced the entry: the training data (a SHA-256 of its tensors), the model,
the training recipe and the *code key* (a hash of the source files on the training path,
:func:`code_key`), not the repository's commit, so unrelated commits keep the cache valid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from condense.errors import ArtifactError
from condense.types import RealData

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_PKG = Path(__file__).resolve().parent.parent  # the condense package folder
_CHUNK = 1 << 20


def _tree_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((_PKG / f).glob("*.py"))]


def code_files(model: str, augment: bool) -> list[Path]:
    """The source files whose change may change a trained teacher: ``condense/train``,
    ``condense/teachers``, the model's module with the zoo's init/factory code, and
    ``condense/augment`` when training augments."""
    from condense.models import MODELS

    module = Path(inspect.getsourcefile(MODELS.get(model)) or "").resolve()
    files = _tree_files("train", "teachers") + [_PKG / "models" / "_base.py", _PKG / "models" / "_factory.py",
                                                  module]
    if augment:
        files += _tree_files("augment")
    return sorted(set(files))


def code_key(model: str, augment: bool = True) -> str:
    """16 hex digits: SHA-256 over the relative paths and bytes of :func:`code_files`."""
    h = hashlib.sha256()
    for path in code_files(model, augment):
        h.update(str(path.relative_to(_PKG)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")


def data_fingerprint(data: RealData, split: str = "train") -> str:
    """SHA-256 (hex) of one split's image and label tensors.

    The training split (what the network learns from) is part of every cache key; the test
    split only scores it, and is recorded in the manifest beside the accuracies it produced.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    h = hashlib.sha256()
    for t in (getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")):
        _hash_tensor(h, t)
    return h.hexdigest()


def content_key(payload: dict[str, Any]) -> str:
    """16 hex digits: SHA-256 of ``payload`` as canonical JSON."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_manifest(entry: Path, fmt: str) -> dict[str, Any]:
    """``entry/manifest.json``, checked for format and schema version (ArtifactError otherwise)."""
    path = entry / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {entry} is not a condense {fmt} directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the cached entry is corrupted: delete {entry} "
                            "to rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path} has format {got!r}, expected {fmt!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path} has schema_version {manifest.get('schema_version')!r}; this condense "
                            f"reads {SCHEMA_VERSION} only: delete {entry} to rebuild it")
    return manifest


def verify_files(entry: Path, manifest: dict[str, Any]) -> None:
    """Check size and SHA-256 of every file the manifest lists (streamed; ArtifactError on a mismatch)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{entry / MANIFEST} lists no files; delete {entry} to rebuild it")
    for name, want in files.items():
        path = entry / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (listed in {MANIFEST}); delete {entry} to rebuild it")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise ArtifactError(f"{path} has {size} bytes, its manifest records {want.get('bytes')}: truncated "
                                f"or replaced; delete {entry} to rebuild it")
        if sha256_file(path) != want.get("sha256"):
            raise ArtifactError(f"{path} fails its SHA-256 check: the cached file is corrupted; delete {entry} "
                                "to rebuild it")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing): one trainer per entry.

    Two processes asking for the same entry do not both train it: the second waits, then
    finds the entry in the cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building %s", path.with_suffix(""))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``final``; renamed to ``final`` when the block succeeds.

    On an exception the temporary folder is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp  # files inside are written with condense.provenance's atomic (fsynced) writes
        if final.exists():  # built meanwhile by a process that did not take the lock: keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
