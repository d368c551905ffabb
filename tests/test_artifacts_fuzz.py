"""Fuzzed artifacts: mutated copies of valid artifact directories (hypothesis).

Each example takes a valid artifact written by :func:`save_synset`, applies one or two mutations
(truncation, flipped or appended bytes, deleted files, edited manifest fields, tensors re-saved
with other dtypes / shapes / names under a manifest forged to match, huge declared sizes, a file
grown to a terabyte (sparse) with a manifest to match, a safetensors header declaring huge
sizes) and loads it. The load must either return exactly the original data or raise
:class:`ArtifactError` with one line naming the artifact; never another exception, never more
than a few MB of Python allocations (``tracemalloc``), never longer than the per-example deadline.

Not covered, by design: the manifest carries no checksum of itself, so edits of its free-text
fields (method, seed, config, code version, creation time, eval recipe, extra, dataset and class
names) load as edited; and a synset whose bytes AND checksum are both rewritten consistently is a
different valid artifact. Mutations that would only produce those are not generated (at most one
mutation edits the manifest's values, and tensor data is only rewritten in ways the shapes,
dtypes, names or label ranges expose).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from condense.artifacts import FORMAT, MANIFEST, PREVIEW, SYNSET, load_synset, save_synset
from condense.errors import ArtifactError
from condense.types import SCHEMA_VERSION, DatasetSpec, SetMeta, SyntheticSet, class_major_labels

FILES = (SYNSET, MANIFEST, PREVIEW)
HUGE = (10**15, 2**40, 2**63 - 1, 2**64 + 7)
TERABYTE = 2**40
PEAK_BYTES = 8 << 20  # Python allocations of one load; a clean load of these sets peaks near 1 MB
WEIRD = [None, True, False, 0, -1, 1, 3, 1.5, -0.0, 1e308, 10**15, 2**64, "", "x", "hard", [], [1, 2], {},
         {"a": 1}, [[[]]], float("nan")]
TAG = f"{FORMAT};schema_version={SCHEMA_VERSION}"


def _set(kind: str) -> SyntheticSet:
    """Small valid sets: hard labels; soft labels with a learned lr; RGB with a ZCA matrix."""
    g = torch.Generator().manual_seed(7)
    ch, size, k, ipc = (3, 6, 3, 2) if kind == "zca" else (1, 8, 4, 2)
    spec = DatasetSpec(name="fuzz", channels=ch, im_size=(size, size), num_classes=k,
                       class_names=tuple(f"c{i}" for i in range(k)), mean=(0.25,) * ch, std=(0.5,) * ch)
    n = k * ipc
    soft = kind == "soft_lr"
    labels = torch.randn(n, k, generator=g) if soft else class_major_labels(k, ipc)
    d = ch * size * size
    return SyntheticSet(images=torch.randn(n, ch, size, size, generator=g), labels=labels,
                        meta=SetMeta(dataset=spec, ipc=ipc, method="random", config={"a": 1}, seed=3,
                                     zca=kind == "zca"),
                        lr=torch.tensor(0.0123) if soft else None,
                        zca_matrix=torch.randn(d, d, generator=g) if kind == "zca" else None)


KINDS = ("hard", "soft_lr", "zca")


class Bases(dict):
    """kind -> (set, bytes of its saved files); a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<artifacts of {', '.join(self)}>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    """Each kind's set and the bytes of its saved files."""
    out = Bases()
    for kind in KINDS:
        syn = _set(kind)
        d = tmp_path_factory.mktemp(f"base-{kind}")
        save_synset(syn, d)
        out[kind] = (syn, {name: (d / name).read_bytes() for name in FILES})
    return out


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a parsed JSON document (containers and leaves)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set_path(doc: Any, path: tuple, value: Any, delete: bool) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if delete:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


class Work:
    """The files of one example while it is being mutated."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs: dict[str, bytes | None] = dict(blobs)
        self.grow: dict[str, int] = {}  # file -> sparse size to extend it to when written

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.blobs[MANIFEST])

    def put_manifest(self, m: dict[str, Any]) -> None:
        self.blobs[MANIFEST] = json.dumps(m, indent=2, allow_nan=True).encode()

    def resign(self, name: str, size: int | None = None) -> None:
        """Forge the manifest to match the current bytes of ``name`` (or a declared ``size``)."""
        m = self.manifest()
        data = self.blobs[name] or b""
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data) if size is None else size}
        m["files"][name] = entry
        m["storage_bytes"] = sum(f["bytes"] for f in m["files"].values())
        if name == SYNSET:
            m["tensor_bytes"] = entry["bytes"]
        self.put_manifest(m)

    def write(self, d: Path) -> None:
        for name, data in self.blobs.items():
            if data is not None:
                (d / name).write_bytes(data)
        for name, size in self.grow.items():
            if self.blobs[name] is not None:
                os.truncate(d / name, size)  # sparse: no blocks written


def _retensor(syn: SyntheticSet, how: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The set's tensors changed in a way its manifest exposes, and the header metadata to save with."""
    t = {"images": syn.images.clone(), "labels": syn.labels.clone()}
    if syn.lr is not None:
        t["lr"] = syn.lr.reshape(()).float()
    if syn.zca_matrix is not None:
        t["zca_matrix"] = syn.zca_matrix.clone()
    meta = {"format": TAG}
    if how == "images_f64":
        t["images"] = t["images"].double()
    elif how == "images_f16":
        t["images"] = t["images"].half()
    elif how == "images_int":
        t["images"] = t["images"].round().int()
    elif how == "labels_i32":
        t["labels"] = t["labels"].int() if t["labels"].dim() == 1 else t["labels"].double()
    elif how == "labels_out_of_range":
        t["labels"] = t["labels"] + 100 if t["labels"].dim() == 1 else t["labels"][:, :-1].contiguous()
    elif how == "drop_row":
        t["images"] = t["images"][:-1].contiguous()
    elif how == "extra_dim":
        t["images"] = t["images"].unsqueeze(0)
    elif how == "transpose":
        t["images"] = t["images"].transpose(2, 3).contiguous().reshape(t["images"].shape[0], -1, 2, 2)
    elif how == "no_labels":
        del t["labels"]
    elif how == "extra_tensor":
        t["evil"] = torch.zeros(3)
    elif how == "lr_toggle":
        if "lr" in t:
            del t["lr"]
        else:
            t["lr"] = torch.tensor(0.5)
    elif how == "lr_value":
        t["lr"] = torch.tensor(0.75)
    elif how == "zca_shape":
        d = syn.images[0].numel()
        t["zca_matrix"] = torch.zeros(d, d + 1)
    elif how == "no_tag":
        meta = {"format": "something-else"}
    return t, meta


RETENSOR = ("images_f64", "images_f16", "images_int", "labels_i32", "labels_out_of_range", "drop_row",
            "extra_dim", "transpose", "no_labels", "extra_tensor", "lr_toggle", "lr_value", "zca_shape", "no_tag")

frac = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
files = st.sampled_from(FILES)
mutation = st.one_of(
    st.tuples(st.just("truncate"), files, frac),
    st.tuples(st.just("flip"), files, frac, st.integers(1, 255)),
    st.tuples(st.just("append"), files, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), files),
    st.tuples(st.just("edit"), st.integers(0, 10**6), st.sampled_from(WEIRD), st.booleans()),
    st.tuples(st.just("header_flip"), frac, st.integers(1, 255)),
    st.tuples(st.just("header_shape"), st.sampled_from(["images", "labels"]), st.sampled_from(HUGE)),
    st.tuples(st.just("header_len"), st.sampled_from(HUGE)),
    st.tuples(st.just("retensor"), st.sampled_from(RETENSOR)),
    st.tuples(st.just("declare"), st.sampled_from([SYNSET, PREVIEW]), st.sampled_from(HUGE)),
    st.tuples(st.just("sparse"), st.sampled_from([SYNSET, PREVIEW, MANIFEST])),
)
EDITS_MANIFEST = {"edit"}


def _header_span(blob: bytes) -> tuple[int, int]:
    return 8, 8 + int.from_bytes(blob[:8], "little")


def apply(work: Work, syn: SyntheticSet, op: tuple) -> None:
    """Apply one mutation ``op`` (see :data:`mutation`) to ``work``; one that needs what an earlier
    mutation destroyed (a parsable manifest, a synset header) stops where it fails."""
    try:
        _apply(work, syn, op)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
        pass


def _apply(work: Work, syn: SyntheticSet, op: tuple) -> None:
    kind = op[0]
    if kind == "truncate":
        _, name, f = op
        if work.blobs[name] is not None:
            work.blobs[name] = work.blobs[name][: int(len(work.blobs[name]) * f)]
    elif kind == "flip":
        _, name, f, mask = op
        data = work.blobs[name]
        if data:
            i = min(int(len(data) * f), len(data) - 1)
            work.blobs[name] = data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
    elif kind == "append":
        if work.blobs[op[1]] is not None:
            work.blobs[op[1]] += op[2]
    elif kind == "delete":
        work.blobs[op[1]] = None
    elif kind == "edit":
        _, pick, value, delete = op
        m = work.manifest()
        paths = _paths(m)
        _set_path(m, paths[pick % len(paths)], value, delete)
        work.put_manifest(m)
    elif kind == "header_flip":  # a flipped byte inside the JSON header, checksum forged to match
        _, f, mask = op
        data = work.blobs[SYNSET]
        lo, hi = _header_span(data)
        i = lo + min(int((hi - lo) * f), hi - lo - 1)
        work.blobs[SYNSET] = data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
        work.resign(SYNSET)
    elif kind == "header_shape":  # the header declares a huge tensor; checksum forged to match
        _, name, size = op
        data = work.blobs[SYNSET]
        lo, hi = _header_span(data)
        header = json.loads(data[lo:hi])
        header[name]["shape"] = [size, *header[name]["shape"][1:]]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        work.blobs[SYNSET] = len(text).to_bytes(8, "little") + text + data[hi:]
        work.resign(SYNSET)
    elif kind == "header_len":  # the 8-byte header length says huge; checksum forged to match
        work.blobs[SYNSET] = (op[1] % 2**64).to_bytes(8, "little") + work.blobs[SYNSET][8:]
        work.resign(SYNSET)
    elif kind == "retensor":  # other dtypes / shapes / names, saved properly, manifest forged to match
        tensors, meta = _retensor(syn, op[1])
        work.blobs[SYNSET] = st_save(tensors, metadata=meta)
        work.resign(SYNSET)
    elif kind == "declare":  # the manifest declares a huge size for an unchanged file
        m = work.manifest()
        m["files"][op[1]]["bytes"] = op[2]
        work.put_manifest(m)
    elif kind == "sparse":  # the file really is a terabyte (sparse), and the manifest says so
        name = op[1]
        work.grow[name] = TERABYTE
        if name != MANIFEST and work.blobs[MANIFEST] is not None:
            work.resign(name, size=TERABYTE)


def same_data(got: SyntheticSet, want: SyntheticSet) -> None:
    """Exactly the original tensors and structural metadata (free-text metadata aside)."""
    for name in ("images", "labels", "lr", "zca_matrix"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            b = b.reshape(()).float() if name == "lr" else b
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    g, w = got.meta.dataset, want.meta.dataset
    assert (g.channels, g.im_size, g.num_classes, g.mean, g.std) == (w.channels, w.im_size, w.num_classes, w.mean, w.std)
    assert len(g.class_names) == len(w.class_names)
    assert (got.meta.ipc, got.meta.zca) == (want.meta.ipc, want.meta.zca)


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=timedelta(seconds=5), database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(kind=st.sampled_from(KINDS),
       ops=st.lists(mutation, min_size=1, max_size=2).filter(lambda ops: sum(o[0] in EDITS_MANIFEST for o in ops) <= 1))
@example(kind="hard", ops=[("declare", SYNSET, 10**15)])
@example(kind="hard", ops=[("sparse", SYNSET)])
@example(kind="soft_lr", ops=[("sparse", PREVIEW)])
@example(kind="hard", ops=[("sparse", MANIFEST)])
@example(kind="hard", ops=[("header_len", 2**63 - 1)])
@example(kind="zca", ops=[("header_shape", "images", 10**15)])
@example(kind="hard", ops=[("retensor", "images_f64")])
@example(kind="hard", ops=[("edit", 0, 10**15, False)])
def test_mutated_artifact_loads_exactly_or_fails_cleanly(bases, kind: str, ops: list[tuple]) -> None:
    syn, blobs = bases[kind]
    work = Work(blobs)
    for op in ops:
        apply(work, syn, op)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "artifact"
        run_dir.mkdir()
        work.write(run_dir)
        tracemalloc.start()
        try:
            got, err = load_synset(run_dir), None
        except ArtifactError as e:
            got, err = None, e
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak} bytes allocated by one load"
    event(f"{'+'.join(o[0] for o in ops)}: {'loaded' if err is None else 'refused'}")  # --hypothesis-show-statistics
    if err is not None:
        msg = str(err)
        assert msg and "\n" not in msg and len(msg) < 600, msg
        assert str(run_dir) in msg, msg  # names the artifact (or the file in it)
    else:
        same_data(got, syn)


@pytest.mark.parametrize("kind", KINDS)
def test_unmutated_bases_load_exactly(bases, kind: str, tmp_path: Path) -> None:
    """The fuzz's starting points are valid: with no mutation they load to the original data."""
    syn, blobs = bases[kind]
    Work(blobs).write(tmp_path)
    same_data(load_synset(tmp_path), syn)


@pytest.mark.parametrize("op", [("retensor", r) for r in RETENSOR] + [("declare", SYNSET, 10**15), ("sparse", SYNSET),
                                                                      ("sparse", PREVIEW), ("header_len", 2**63)])
def test_forged_but_inconsistent_synsets_are_refused(bases, op: tuple, tmp_path: Path) -> None:
    """Every forgery the fuzz can make of a synset (manifest forged to match) is refused outright:
    none of them may load, since each changes the data."""
    kind = "soft_lr" if op[1] in ("lr_value", "lr_toggle") else ("zca" if op[1] == "zca_shape" else "hard")
    syn, blobs = bases[kind]
    work = Work(blobs)
    apply(work, syn, op)
    work.write(tmp_path)
    with pytest.raises(ArtifactError) as err:
        load_synset(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
