"""The soft-label evaluation protocol (SRe2L / FKD family): a student learns a teacher's logits.

A fresh student (ConvNet-3 by default, seeds like the hard-label evaluator's) trains from scratch
on the set's images with a teacher's logits as targets: KL divergence at temperature ``T``, AdamW
(lr 1e-3, weight decay 0.01) with a cosine schedule. Every batch is augmented (random resized
crop, flip, CutMix) and labelled by the teacher on exactly what the student sees, so a crop that
cut the object away gets the teacher's opinion of that crop, not the image's class.

The KL loss is the training engine's (``FitConfig(loss="kl")``), ``KL(softmax(t/T) ||
softmax(z/T)) * T^2`` per image. SRe2L's small-data script has no ``T^2``; under AdamW the factor
changes (almost) nothing: Adam divides the gradient by its own running scale, and the decoupled
weight decay does not see the loss's scale; only the epsilon's relative size moves.

Replayable labels (FKD): the batch order and every augmentation parameter come from generators
seeded by ``(label_seed, epoch, batch)`` (:func:`batch_seed`), never from the student's
generator. Every student therefore sees the same crops, and the labels of a whole training run
can be computed once and stored (:class:`StoredLabels`: the teacher's logits rounded to fp16,
optionally the top k of them) while the crops are regenerated from the seed. Both label modes use
the same fp16 (top-k) targets, so a student trained from stored labels is bit for bit the student
trained online.

Which teacher: a set distilled by a recovery method references its own teachers
(``meta.extra["teachers"]``, refs of :mod:`condense.eval.teachers`; a committee's logits are
averaged with the refs' weights); any other set (DM, DSA, MTT, random, herding) is labelled by the
config's ``teacher`` (:class:`~condense.eval.teachers.TeacherSpec`, by default the ConvNet-3-BN
teacher the recovery methods train), taken from the cache or trained into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from condense.errors import ConfigError
from condense.ops import crops
from condense.types import EvalReport, RealData, SyntheticSet

log = logging.getLogger(__name__)

#: The ``labels`` entry of a soft-protocol report (the hard evaluator writes "hard" / "soft").
SOFT_LABELS = "soft (teacher)"
#: Where the labels come from: the teacher during training, or a file of the artifact.
LABEL_MODES = ("online", "stored")
#: Epochs when neither the config nor the budget (``budget.eval.soft.epochs``) names them: the
#: published SRe2L / DD-Ranking student schedule (METHODS.md).
DEFAULT_EPOCHS = 300
#: The logit of a class outside a stored top k (softmax at any sane T gives it 0).
FILL_LOGIT = -1.0e4
#: Largest finite fp16 value: logits are clamped to it before rounding.
FP16_MAX = 65504.0


@dataclass
class SoftEvalConfig:
    """The soft-label protocol (``conf/eval/soft.yaml``; METHODS.md "Soft-label evaluation").

    Attributes:
        protocol: always ``soft`` (what tells this config from the hard-label one).
        archs / num_models / seed / model_kwargs: students, as the hard evaluator (model i of an
            architecture uses seed ``seed * 1000 + i``).
        epochs: student epochs (cosine over all of them).
        lr / weight_decay / betas: AdamW.
        batch_size: images per step (the set's size when it is smaller). 128 (SRe2L's small-data
            batch): on 2 cores a batch of 32 costs twice as much per epoch; at equal cost (128 for
            160 epochs vs 32 for 80, the proxy of ``temperature``) 77.6 vs 76.4 %.
        temperature: ``T`` of the KL loss (the engine's, with the ``T^2`` factor). Default 4:
            between DD-Ranking's 1.2 and SRe2L's 20-30 (ImageNet / CIFAR scripts), the usual
            choice of CIFAR knowledge distillation; at T near 1 a 10-class teacher near 90 % gives
            nearly one-hot targets (little beyond the hard label), at 20-30 targets near uniform
            whose class information sits in small differences. A proxy on Fashion-MNIST (random
            ipc 10 + KD from the 92.2 % ConvNet-3-BN teacher, one student of 80 epochs, batch 32,
            scored on 5000 held-out TRAINING images) gave 77.5 / 76.4 / 75.4 % at T 1 / 4 / 20:
            within the ~1.3-point spread of single students (the crop variants below), so 4 stays.
        crop_scale / crop_ratio: the random resized crop (area fraction and aspect ratio ranges).
            Default area 0.25-1, not ImageNet's 0.08-1: at 28 x 28 pixels a 0.08 crop is an 8 x 8
            patch blown up 3.5 times, mostly a blur of a fragment; 0.25 keeps at least 14 x 14
            source pixels while the teacher's label still follows what the crop shows. The proxy
            above (T 4) gave 77.7 / 76.4 / 77.7 % at a lower bound of 0.08 / 0.25 / 0.5: no
            difference beyond one student's noise.
        flip: mirror half of the images.
        cutmix_alpha: CutMix's Beta parameter (one box per batch); 0 = no CutMix.
        labels: ``online`` (the teacher labels every batch while the students train) or
            ``stored`` (labels read from the artifact's ``labels.safetensors``; made there first
            when it has none).
        top_k: classes kept per stored label (fp16 values + indices); ``None`` = all. Applies to
            online labels too, so both modes train the same students.
        relabel: ``stored`` only: replace stored labels whose protocol differs from this one
            (without it such labels are an error).
        label_seed: the seed of batch order and augmentation (the labels' seed).
        teacher: a :class:`~condense.eval.teachers.TeacherSpec` mapping for sets without teachers
            of their own (``{}``: the spec's defaults).
        cache_dir: where teachers are cached (``None``: ``$CONDENSE_CACHE``, else
            ``~/.cache/condense``).
        test_size: 0 = the whole test split, else a fixed random subset (the hard evaluator's).
        bf16: bfloat16 autocast of the students' forwards.
    """

    protocol: str = "soft"
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    num_models: int = 3
    epochs: int = DEFAULT_EPOCHS
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 128
    temperature: float = 4.0
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    flip: bool = True
    cutmix_alpha: float = 1.0
    labels: str = "online"
    top_k: int | None = None
    relabel: bool = False
    label_seed: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    test_size: int = 0
    bf16: bool = False
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol != "soft":
            raise ConfigError(f"eval.protocol of the soft-label config must be 'soft', got {self.protocol!r}")
        if self.labels not in LABEL_MODES:
            raise ConfigError(f"unknown eval.labels {self.labels!r}; valid choices: {', '.join(LABEL_MODES)}")
        for name in ("num_models", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.archs:
            raise ConfigError("eval.archs is empty; name at least one model, e.g. [convnet]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"eval.top_k must be >= 1 (at most the number of classes) or null (all), "
                              f"got {self.top_k!r}")
        pairs = {"crop_scale": (self.crop_scale, "0 < lo <= hi <= 1"), "crop_ratio": (self.crop_ratio, "0 < lo <= hi"),
                 "betas": (self.betas, "0 <= b < 1")}
        for name, (v, rule) in pairs.items():
            ok = len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            if ok and name == "betas":
                ok = all(0 <= x < 1 for x in v)
            elif ok:
                ok = 0 < v[0] <= v[1] and (name != "crop_scale" or v[1] <= 1)
            if not ok:
                raise ConfigError(f"eval.{name} must be two numbers with {rule}, got {v!r}")
        checks = {"lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "temperature": self.temperature > 0,
                  "cutmix_alpha": self.cutmix_alpha >= 0, "label_seed": self.label_seed >= 0,
                  "test_size": self.test_size >= 0, "seed": self.seed >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"eval.{name} is invalid: {getattr(self, name)!r} (lr > 0, weight_decay >= 0, "
                                  "temperature > 0, cutmix_alpha >= 0 (0: off), label_seed >= 0, test_size >= 0, "
                                  "seed >= 0)")
        self.crop_scale = [float(v) for v in self.crop_scale]
        self.crop_ratio = [float(v) for v in self.crop_ratio]
        self.betas = [float(v) for v in self.betas]
        self.teacher_spec()  # unknown keys / bad values fail here, with the valid choices

    def teacher_spec(self) -> Any:
        """The :class:`~condense.eval.teachers.TeacherSpec` of ``teacher``."""
        from condense.eval.teachers import TeacherSpec

        return TeacherSpec.from_dict(dict(self.teacher))

    def resolved_cache_dir(self) -> Path:
        """``cache_dir``, else ``$CONDENSE_CACHE``, else ``~/.cache/condense`` (conf/config.yaml's default)."""
        if self.cache_dir:
            return Path(self.cache_dir)
        env = os.environ.get("CONDENSE_CACHE")
        return Path(env) if env else Path(os.environ.get("HOME", ".")) / ".cache" / "condense"


# ----------------------------------------------------------------------------- replayable batches

def batch_seed(seed: int, epoch: int, step: int | None = None) -> int:
    """The 63-bit seed of epoch ``epoch``'s batch order (``step`` None) or of one batch's
    augmentation, from the protocol's ``label_seed`` (a hash: no two triples share a stream)."""
    text = f"condense.soft-labels/{int(seed)}/{int(epoch)}/{'order' if step is None else int(step)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass(frozen=True)
class BatchPlan:
    """Batch order and augmentation of every (epoch, batch): a function of the seed alone.

    Attributes:
        n: images in the set.
        batch_size: images per batch (``<= n``; the last batch of an epoch may be smaller).
        seed: the protocol's ``label_seed``.
        crop_scale / crop_ratio / flip / cutmix_alpha: the augmentation (crop, then flip, then
            CutMix; ``cutmix_alpha`` 0 = none).
    """

    n: int
    batch_size: int
    seed: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    cutmix_alpha: float

    @property
    def steps(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def rows(self, step: int) -> slice:
        """The positions of batch ``step`` within its epoch's order."""
        return slice(step * self.batch_size, min((step + 1) * self.batch_size, self.n))

    def order(self, epoch: int) -> Tensor:
        """``(n,)`` the permutation of epoch ``epoch`` (CPU)."""
        return torch.randperm(self.n, generator=_generator(batch_seed(self.seed, epoch)))

    def augment(self, x: Tensor, epoch: int, step: int) -> Tensor:
        """Batch ``step`` of epoch ``epoch`` (``x``: its images in order) augmented as the plan says."""
        g = _generator(batch_seed(self.seed, epoch, step))
        b, h, w = int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1])
        boxes = crops.sample_resized_crops(b, h, w, scale=self.crop_scale, ratio=self.crop_ratio, generator=g)
        x = crops.resized_crop(x, boxes)
        if self.flip:
            x = crops.flip(x, crops.sample_flips(b, generator=g))
        if self.cutmix_alpha > 0:
            x = crops.cutmix(x, crops.sample_cutmix(b, h, w, alpha=self.cutmix_alpha, generator=g))
        return x

    def epoch(self, images: Tensor, epoch: int) -> Iterator[Tensor]:
        """The augmented batches of epoch ``epoch``, in order."""
        perm = self.order(epoch).to(images.device)
        for s in range(self.steps):
            yield self.augment(images[perm[self.rows(s)]], epoch, s)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "label_seed": self.seed, "crop_scale": list(self.crop_scale),
                "crop_ratio": list(self.crop_ratio), "flip": self.flip, "cutmix_alpha": self.cutmix_alpha,
                "order": "crop, flip, cutmix"}


class SoftBatches:
    """The iterable :func:`condense.train.fit` trains a student on: ``(x_aug, target logits)``
    batches; every ``iter()`` is the next epoch (the engine iterates once per epoch).

    Args:
        images: ``(N, C, H, W)`` the set's images on the training device.
        plan: batch order and augmentation.
        targets: ``targets(epoch, step, x_aug) -> (b, classes)`` float32 logits.
    """

    def __init__(self, images: Tensor, plan: BatchPlan, targets: Callable[[int, int, Tensor], Tensor]) -> None:
        self.images = images
        self.plan = plan
        self.targets = targets
        self.epoch = 0

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ep = self.epoch
        self.epoch += 1
        for s, x in enumerate(self.plan.epoch(self.images, ep)):
            yield x, self.targets(ep, s, x)


# ----------------------------------------------------------------------------- labels

def quantize(logits: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Teacher logits ``(b, classes)`` -> what is stored: fp16 values ``(b, k)`` and, when ``k`` is
    less than the classes, their class indices (the top k of the fp16 values, in order)."""
    half = logits.float().clamp(-FP16_MAX, FP16_MAX).half()
    if k >= logits.shape[1]:
        return half, None
    vals, idx = torch.topk(half.float(), k, dim=1)
    return vals.half(), idx.to(index_dtype(logits.shape[1]))


def dense(values: Tensor, indices: Tensor | None, classes: int) -> Tensor:
    """Stored labels ``(b, k)`` -> float32 logits ``(b, classes)`` (classes outside the top k at
    :data:`FILL_LOGIT`)."""
    v = values.float()
    if indices is None:
        return v
    out = torch.full((v.shape[0], classes), FILL_LOGIT, dtype=torch.float32, device=v.device)
    return out.scatter_(1, indices.long(), v)


def index_dtype(classes: int) -> torch.dtype:
    """The smallest integer dtype holding a class index (uint8 up to 256 classes)."""
    return torch.uint8 if classes <= 256 else torch.int16 if classes <= 32768 else torch.int32


@dataclass
class StoredLabels:
    """Every (epoch, batch) label of a student's training, in batch order.

    Attributes:
        values: ``(epochs, N, k)`` float16 teacher logits (row ``j`` of epoch ``e`` is the ``j``-th
            image of that epoch's batches).
        indices: ``(epochs, N, k)`` class indices (:func:`index_dtype`), ``None`` when k = all.
        protocol: :func:`label_protocol` of the evaluation that made them.
    """

    values: Tensor
    indices: Tensor | None
    protocol: dict[str, Any]

    def targets(self, classes: int, plan: BatchPlan, device: torch.device) -> Callable[[int, int, Tensor], Tensor]:
        def get(epoch: int, step: int, x: Tensor) -> Tensor:
            r = plan.rows(step)
            idx = None if self.indices is None else self.indices[epoch, r]
            return dense(self.values[epoch, r], idx, classes).to(device)

        return get

    def to_bytes(self) -> bytes:
        """The ``labels.safetensors`` bytes (:func:`condense.artifacts.labels_blob`)."""
        from condense.artifacts import labels_blob

        return labels_blob(self.values, self.indices)


class Teachers:
    """The teachers of one evaluation: ``logits(x)`` = the weighted mean of their logits.

    Args:
        members: ``(module in eval mode, weight)`` pairs.
        refs: their references (:mod:`condense.eval.teachers`).
        source: ``set`` (the set's own refs) or ``config`` (``eval.teacher``).
    """

    def __init__(self, members: list[tuple[nn.Module, float]], refs: list[dict[str, Any]], source: str) -> None:
        self.members = members
        self.refs = refs
        self.source = source
        self.bf16 = [bool((r.get("spec") or {}).get("bf16", False)) for r in refs]

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        out = None
        for (m, w), bf16 in zip(self.members, self.bf16, strict=True):
            m.eval()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                z = m(x)
            z = z.float() * float(w)
            out = z if out is None else out + z
        assert out is not None
        return out

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m, _ in self.members for p in m.parameters())

    def identity(self) -> list[dict[str, Any]]:
        """What of the teachers the labels depend on (key, weight, autocast)."""
        return [{"key": r.get("key"), "dir": r.get("dir"), "weight": float(r.get("weight", 1.0)), "bf16": b}
                for r, b in zip(self.refs, self.bf16, strict=True)]


def _images_sha256(images: Tensor) -> str:
    return hashlib.sha256(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def label_protocol(cfg: SoftEvalConfig, plan: BatchPlan, classes: int, k: int, teachers: Teachers,
                   images: Tensor) -> dict[str, Any]:
    """Everything stored labels depend on (two protocols equal <=> the same labels)."""
    return {"epochs": int(cfg.epochs), "num_images": plan.n, "num_classes": classes, "top_k": k,
            **plan.to_dict(), "teachers": teachers.identity(), "images_sha256": _images_sha256(images),
            "logits": "float16" + (f" top {k}" if k < classes else "")}


def protocol_mismatch(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: stored -> wanted`` for every difference between two label protocols."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            a, b = stored.get(key), wanted.get(key)
            if key == "teachers":
                a, b = [t.get("dir") for t in a or []], [t.get("dir") for t in b or []]
            out.append(f"{key} {a!r} (stored) vs {b!r}")
    return out


def relabel(images: Tensor, plan: BatchPlan, teachers: Teachers, epochs: int, k: int, classes: int,
            protocol: dict[str, Any]) -> StoredLabels:
    """The labels of a whole training run: the teacher on every (epoch, batch), crops replayed
    from the plan's seed (the relabel pass of FKD)."""
    values = torch.empty(epochs, plan.n, k, dtype=torch.float16)
    indices = None if k >= classes else torch.empty(epochs, plan.n, k, dtype=index_dtype(classes))
    for ep in range(epochs):
        for s, x in enumerate(plan.epoch(images, ep)):
            v, i = quantize(teachers.logits(x), k)
            values[ep, plan.rows(s)] = v.cpu()
            if indices is not None:
                indices[ep, plan.rows(s)] = i.cpu()
    return StoredLabels(values, indices, protocol)


# ----------------------------------------------------------------------------- the evaluator

class SoftEvaluator:
    """Trains fresh students on a set under the soft-label protocol; tests them on ``data``.

    ``pending_labels``: after :meth:`evaluate` of a set without an artifact directory in stored
    mode, the labels it made (write them with :meth:`save_pending` once the artifact exists).
    """

    def __init__(self, cfg: SoftEvalConfig, data: RealData, device: torch.device | str = "cpu") -> None:
        from condense.models import MODELS

        for a in cfg.archs:
            MODELS.get(a)
        self.cfg = cfg
        self.data = data
        self.device = torch.device(device)
        self.pending_labels: StoredLabels | None = None
        self._teacher_cache: dict[str, Teachers] = {}

    # -- pieces
    def fit_config(self, n: int) -> Any:
        from condense.train import FitConfig

        c = self.cfg
        return FitConfig(epochs=c.epochs, batch_size=min(c.batch_size, n), optimizer="adamw", lr=c.lr,
                         betas=(c.betas[0], c.betas[1]), weight_decay=c.weight_decay, schedule="cosine",
                         loss="kl", temperature=c.temperature, bf16=c.bf16)

    def plan(self, n: int) -> BatchPlan:
        c = self.cfg
        return BatchPlan(n=n, batch_size=min(c.batch_size, n), seed=c.label_seed,
                         crop_scale=(c.crop_scale[0], c.crop_scale[1]), crop_ratio=(c.crop_ratio[0], c.crop_ratio[1]),
                         flip=c.flip, cutmix_alpha=float(c.cutmix_alpha))

    def top_k(self) -> int:
        classes = self.data.spec.num_classes
        k = self.cfg.top_k
        if k is None:
            return classes
        if not 1 <= k <= classes:
            raise ConfigError(f"eval.top_k={k} is outside 1..{classes} (the dataset's classes) or null (all)")
        return int(k)

    def teachers(self, syn: SyntheticSet) -> Teachers:
        """The set's own teachers (``meta.extra["teachers"]``), else ``cfg.teacher`` (cached or trained)."""
        from condense.eval.teachers import load_teacher_refs, obtain_teacher

        cache = self.cfg.resolved_cache_dir()
        refs = syn.meta.extra.get("teachers") if isinstance(syn.meta.extra, dict) else None
        if refs:
            if not isinstance(refs, list) or not all(isinstance(r, Mapping) for r in refs):
                from condense.errors import ArtifactError

                raise ArtifactError(f"the set's meta.extra['teachers'] is not a list of teacher references: {refs!r:.80}")
            key = "set:" + ",".join(f"{r.get('dir')}*{r.get('weight')}" for r in refs)
            if key not in self._teacher_cache:
                members = load_teacher_refs(refs, cache, self.device)
                self._teacher_cache[key] = Teachers(members, [dict(r) for r in refs], "set")
            return self._teacher_cache[key]
        spec = self.cfg.teacher_spec()
        key = "config:" + repr(spec.to_dict())
        if key not in self._teacher_cache:
            module, ref = obtain_teacher(spec, self.data, cache, train=True)
            module = module.to(self.device).eval()
            ref = {**ref, "weight": 1.0}
            self._teacher_cache[key] = Teachers([(module, 1.0)], [ref], "config")
        return self._teacher_cache[key]

    def labels(self, syn: SyntheticSet, images: Tensor, teachers: Teachers, plan: BatchPlan, k: int,
               artifact: Path | None) -> tuple[StoredLabels, int, float]:
        """Stored labels for ``syn``: the artifact's (checked against this protocol), else made now
        (and written into the artifact). Returns them, their file size and the relabel seconds."""
        from condense.artifacts import load_labels, save_labels

        classes = self.data.spec.num_classes
        wanted = label_protocol(self.cfg, plan, classes, k, teachers, images)
        if artifact is not None:
            got = load_labels(artifact)
            if got is not None:
                values, indices, proto, size = got
                diff = protocol_mismatch(proto, wanted)
                if not diff:
                    return StoredLabels(values, indices, proto), size, 0.0
                if not self.cfg.relabel:
                    raise ConfigError(f"the stored labels of {artifact} were made under another protocol ("
                                      f"{'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); evaluate with "
                                      f"their settings, or pass eval.relabel=true to replace them")
        t0 = time.perf_counter()
        stored = relabel(images, plan, teachers, self.cfg.epochs, k, classes, wanted)
        took = time.perf_counter() - t0
        blob = stored.to_bytes()
        if artifact is not None:
            save_labels(artifact, blob, wanted)
            log.info("stored soft labels (%d bytes) in %s", len(blob), artifact)
        else:
            self.pending_labels = stored
        return stored, len(blob), took

    def save_pending(self, run_dir: str | Path) -> Path | None:
        """Write the labels the last in-memory evaluation made into the artifact ``run_dir``."""
        from condense.artifacts import LABELS, save_labels

        if self.pending_labels is None:
            return None
        save_labels(Path(run_dir), self.pending_labels.to_bytes(), self.pending_labels.protocol)
        self.pending_labels = None
        return Path(run_dir) / LABELS

    def train(self, arch: str, images: Tensor, plan: BatchPlan, targets: Callable[[int, int, Tensor], Tensor],
              seed: int) -> nn.Module:
        """One student of ``arch`` (initialised from ``seed``) trained under the protocol; eval mode."""
        from condense.models import model_factory
        from condense.train import fit

        make = model_factory(arch, self.data.spec, self.device, **self.cfg.model_kwargs)
        result = fit(make, SoftBatches(images, plan, targets), self.fit_config(plan.n), seeds=[seed])
        model = result.models[0]
        model.eval()
        return model

    # -- the protocol
    def evaluate(self, syn: SyntheticSet, *, artifact: str | Path | None = None) -> EvalReport:
        """Evaluate ``syn`` under the protocol.

        Args:
            syn: the set (hard, or any, labels: the teacher's replace them).
            artifact: the set's artifact directory, where stored labels are read or written.

        Raises:
            ConfigError: another dataset, a ZCA-whitened set, a bad ``top_k``, stored labels of
                another protocol (without ``relabel``).
            ArtifactError: a missing teacher, a corrupted labels file.
        """
        from condense.eval.evaluator import eval_test_split
        from condense.ops.formation import decoded_set
        from condense.train import accuracy

        c = self.cfg
        syn = decoded_set(syn)  # multi-formation: the students (and the teacher) see decoded images
        if syn.meta.dataset.name != self.data.spec.name:
            raise ConfigError(f"synthetic set is for dataset {syn.meta.dataset.name!r} but the "
                              f"evaluator holds {self.data.spec.name!r}")
        if syn.zca_matrix is not None:
            raise ConfigError("the soft-label protocol cannot evaluate a ZCA-whitened set (its teacher sees "
                              "unwhitened images); evaluate it with eval=default")
        t0 = time.perf_counter()
        k = self.top_k()
        classes = self.data.spec.num_classes
        images = syn.images.detach().to(self.device, torch.float32)
        plan = self.plan(int(images.shape[0]))
        teachers = self.teachers(syn)
        relabel_s = 0.0
        if c.labels == "stored":
            art = Path(artifact) if artifact is not None else None
            stored, label_bytes, relabel_s = self.labels(syn, images, teachers, plan, k, art)
            targets = stored.targets(classes, plan, self.device)
        else:
            label_bytes = 0

            def targets(epoch: int, step: int, x: Tensor) -> Tensor:
                return dense(*quantize(teachers.logits(x), k), classes)

        runs: list[dict[str, Any]] = []
        summary: dict[str, dict[str, float]] = {}
        tx, ty = eval_test_split(self.data, c.test_size)
        for arch in c.archs:
            seeds = [c.seed * 1000 + i for i in range(c.num_models)]
            models = [self.train(arch, images, plan, targets, s) for s in seeds]
            accs = accuracy(models, tx, ty, bf16=c.bf16)
            for s, a in zip(seeds, accs, strict=True):
                runs.append({"arch": arch, "seed": s, "epochs": c.epochs, "lr": c.lr, "test_acc": round(a, 4)})
            summary[arch] = {"mean": round(statistics.fmean(accs), 4), "std": round(statistics.pstdev(accs), 4),
                             "n": len(accs)}
            log.info("soft eval %s: %.2f +- %.2f (n=%d)", arch, summary[arch]["mean"], summary[arch]["std"], len(accs))
        cfg = {k_: v for k_, v in dataclasses.asdict(c).items() if k_ not in ("labels", "cache_dir", "teacher")}
        protocol = {
            **cfg, "labels": SOFT_LABELS, "label_mode": c.labels, "top_k": k, "optimizer": "adamw",
            "schedule": "cosine", "loss": "kl * T^2", "batch_size": plan.batch_size,
            "augmentation": plan.to_dict(), "teacher_source": teachers.source, "teachers": teachers.refs,
            "teacher_acc": [r.get("test_acc") for r in teachers.refs], "train_size": plan.n,
            "test_images": int(tx.shape[0]), "image_bytes": int(images.numel() * 4),
            "label_bytes": int(label_bytes), "teacher_bytes": teachers.parameter_bytes,
            "relabel_s": round(relabel_s, 3),
        }
        return EvalReport(runs=runs, summary=summary, protocol=protocol, wall_s=time.perf_counter() - t0)
