"""Teacher-based recovery: ``sre2l``, ``cda``, ``committee`` (CV-DD) and ``rded``.

All four squeeze the real data into BatchNorm teachers (:mod:`condense.eval.teachers`, trained
and cached in :meth:`prepare`, before the distillation clock) and hand the images to the
soft-label evaluation with a reference to those teachers (``meta.extra["teachers"]``), which
relabels every augmented batch (``eval=soft``; METHODS.md, "Teacher-based recovery").

- ``sre2l`` (Yin et al. 2023): images from noise; per Adam step (betas 0.5, 0.9, cosine lr) the
  loss is ``CE(teacher(aug(x)), y) + r_bn * sum_l m_l (||mu_l - running_mean_l|| +
  ||var_l - running_var_l||)`` (:class:`condense.ops.bn_stats.BNStatLoss`, ``m_1 = 10``),
  ``aug`` = optional random resized crop and flip, then a random roll (jitter); pixels are
  clipped to the valid range after every step. The images of one class are recovered in groups
  of ``batch_ipc`` per class (one forward per group: SRe2L's batches of one image per class when
  ``batch_ipc = 1``); groups never share BatchNorm statistics.
- ``cda`` (Yin & Shen 2024): the same with the crop scale's lower bound following a curriculum
  (step / linear / cosine over ``milestone`` x the iterations) from global to local crops.
- ``committee`` (CV-DD): several teachers; each step draws ``voters`` of them and weighs their
  losses by ``softmax(accuracy / vote_temperature)``; relabelling uses all of them, weighted by
  ``softmax(accuracy / relabel_temperature)``. Starts from real images by default.
- ``rded`` (Sun et al. 2024): no optimization. Per class, random resized crops of real images are
  scored by the teacher (cross-entropy to the class); each image keeps its best crop, the
  ``ipc * factor^2`` best images are kept and stitched ``factor x factor`` into the stored images.

All four run class-parallel under ``torchrun`` (:mod:`condense.distributed`): each rank holds its
classes' images and draws every random number one process draws (crops and flips for the whole
group, then its rows); the recovery's BatchNorm statistics are those of the whole group, summed
over the ranks (:class:`~condense.ops.bn_stats.BNStatLoss` with ``reduce``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condense.errors import ConfigError
from condense.ops import crops
from condense.ops.bn_stats import FIRST_BN_WEIGHT, BNStatLoss
from condense.synth._matching import INITS, ImageOptimizerMixin, init_images, new_synthetic_set
from condense.synth.base import SynthContext, Synthesizer, derive_generator, register_synthesizer
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

#: Crop-scale curricula of CDA (``curriculum``); ``none`` keeps ``crop_scale`` fixed.
CURRICULA = ("none", "step", "linear", "cosine")
#: CDA's final (and linear/cosine starting-offset) lower bound of the crop scale.
CDA_MIN_SCALE = 0.08


def curriculum_min_scale(kind: str, t: int, total: int, milestone: float = 1.0,
                         floor: float = CDA_MIN_SCALE) -> float:
    """CDA's lower bound of the random-resized-crop scale at iteration ``t`` (0-based) of ``total``.

    Over the first ``M = milestone * total`` iterations: ``step`` 1.0; ``linear``
    ``floor + (1 - floor)(1 - t / M)``; ``cosine`` ``floor + (1 - floor)(1 + cos(pi t / M)) / 2``;
    afterwards ``floor`` (METHODS.md). ``none``: always ``floor``.

    Raises:
        ConfigError: unknown ``kind`` or ``milestone`` outside ``(0, 1]``.
    """
    if kind not in CURRICULA:
        raise ConfigError(f"unknown curriculum {kind!r}; valid choices: {', '.join(CURRICULA)}")
    if not 0 < milestone <= 1:
        raise ConfigError(f"milestone must be in (0, 1], got {milestone!r}")
    span = milestone * max(1, int(total))
    if kind == "none" or t >= span:
        return floor
    if kind == "step":
        return 1.0
    frac = t / span
    if kind == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _teacher_default() -> dict[str, Any]:
    from condense.eval.teachers import TeacherSpec

    return TeacherSpec().to_dict()


@dataclass
class TeacherSetup:
    """The teachers of a recovery method (one, or a committee)."""

    teacher: dict[str, Any] = field(default_factory=_teacher_default)
    teachers: list[dict[str, Any]] = field(default_factory=list)  # committee: several specs; [] = [teacher]
    relabel_temperature: float = 10.0  # committee relabel weights softmax(acc / this)
    bf16: bool = False  # bfloat16 autocast of the teacher forwards


class TeacherMixin:
    """:meth:`prepare` obtains the configured teachers; :meth:`teacher_refs` is what the set stores."""

    ctx: SynthContext
    cfg: Any
    nets: list[nn.Module]
    refs: list[dict[str, Any]]

    def teacher_specs(self) -> list[dict[str, Any]]:
        return list(self.cfg.teachers) if self.cfg.teachers else [self.cfg.teacher]

    @classmethod
    def check_teachers(cls, cfg: Any) -> None:
        from condense.eval.teachers import TeacherSpec

        specs = list(cfg.teachers) if cfg.teachers else [cfg.teacher]
        for s in specs:
            if not isinstance(s, dict):
                raise ConfigError(f"{cls.name}: a teacher must be a mapping of TeacherSpec fields, got {s!r}")  # type: ignore[attr-defined]
            TeacherSpec.from_dict(s)
        if not cfg.relabel_temperature > 0:
            raise ConfigError(f"{cls.name}: relabel_temperature must be > 0, got {cfg.relabel_temperature!r}")  # type: ignore[attr-defined]

    def prepare(self) -> None:
        from condense.eval.teachers import accuracy_weights, obtain_teacher

        if self.ctx.cache_dir is None:
            raise ConfigError(f"{self.name} needs a cache_dir for its teachers")  # type: ignore[attr-defined]
        self.nets, self.refs = [], []
        cold = 0.0
        for spec in self.teacher_specs():
            net, ref = obtain_teacher(spec, self.ctx.data, self.ctx.cache_dir)
            for p in net.parameters():
                p.requires_grad_(False)
            self.nets.append(net.eval())
            self.refs.append(ref)
            cold += float(ref.get("wall_s") or 0.0)
        for ref, w in zip(self.refs, accuracy_weights([r["test_acc"] for r in self.refs],
                                                      self.cfg.relabel_temperature), strict=True):
            ref["weight"] = w
        self.prepare_info = {"teachers": [{k: r[k] for k in ("model", "seed", "epochs", "test_acc", "dir")}
                                          for r in self.refs], "cold_s": round(cold, 1)}
        log.info("%s: teachers %s", self.name,  # type: ignore[attr-defined]
                 ", ".join(f"{r['model']} seed {r['seed']} ({r['test_acc']:.2f}%)" for r in self.refs))

    def _ensure_prepared(self) -> None:
        if not getattr(self, "nets", None):
            self.prepare()

    def _autocast(self) -> Any:
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg.bf16))

    def attach_teachers(self, syn: SyntheticSet) -> SyntheticSet:
        """The set with its teacher references (the soft-label evaluation relabels with them)."""
        syn.meta.extra["teachers"] = [dict(r) for r in self.refs]
        syn.meta.extra["labels"] = "teacher"
        return syn


@dataclass
class RecoveryConfig(TeacherSetup):
    """SRe2L recovery (defaults: the small-data recipe of METHODS.md, CIFAR script).

    Attributes:
        iterations: Adam steps (each step updates every group of images once).
        lr / betas: Adam on the pixels, lr x ``(1 + cos(pi t / T)) / 2``.
        r_bn / first_bn_weight: weight of the BN statistic loss and of its first layer's term.
        jitter: the random roll's range in pixels (SRe2L: 4 at 32 px); 0 = off.
        crop / crop_scale / flip: random resized crop (area fraction in ``crop_scale``) and
            horizontal flip before the jitter (SRe2L small data: off; Tiny/ImageNet and CDA: on).
        curriculum / milestone: CDA's schedule of the crop scale's lower bound (``none``: fixed).
        batch_ipc: images per class recovered together (one forward, shared BN statistics);
            0 = all ``ipc``.
        init: ``noise`` (SRe2L) or a real-data start (``real``, ``herding``, ``kmeans``).
        voters / vote_temperature: committee only (:class:`CommitteeConfig`).
    """

    iterations: int = 1000
    lr: float = 0.25
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    r_bn: float = 0.01
    first_bn_weight: float = FIRST_BN_WEIGHT
    jitter: int = 4
    crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    flip: bool = False
    curriculum: str = "none"
    milestone: float = 1.0
    batch_ipc: int = 10
    init: str = "noise"
    voters: int = 0  # 0 = every teacher each step
    vote_temperature: float = 5.0


@register_synthesizer("sre2l")
class SRe2L(TeacherMixin, ImageOptimizerMixin, Synthesizer):
    """Recover images from BatchNorm teachers (see the module doc)."""

    Config: ClassVar[type] = RecoveryConfig
    class_parallel: ClassVar[bool] = True

    def __init__(self, cfg: Any, ctx: SynthContext) -> None:
        type(self).check_config(cfg, ctx.ipc)
        super().__init__(cfg, ctx)
        self.nets, self.refs = [], []
        lo = torch.tensor(ctx.spec.mean)
        std = torch.tensor(ctx.spec.std)
        view = (1, -1, 1, 1)
        self._lo = ((0.0 - lo) / std).view(view).to(ctx.device)
        self._hi = ((1.0 - lo) / std).view(view).to(ctx.device)

    @classmethod
    def check_config(cls, cfg: Any, ipc: int) -> None:
        cls.check_teachers(cfg)
        if cfg.curriculum not in CURRICULA:
            raise ConfigError(f"{cls.name}: unknown curriculum {cfg.curriculum!r}; valid choices: {', '.join(CURRICULA)}")
        if cfg.init not in INITS:
            raise ConfigError(f"{cls.name}: unknown init {cfg.init!r}; valid choices: {', '.join(INITS)}")
        lo, hi = (float(v) for v in cfg.crop_scale)
        checks = {"lr": cfg.lr > 0, "r_bn": cfg.r_bn >= 0, "first_bn_weight": cfg.first_bn_weight >= 0,
                  "jitter": int(cfg.jitter) >= 0, "crop_scale": 0 < lo <= hi <= 1,
                  "milestone": 0 < cfg.milestone <= 1, "batch_ipc": int(cfg.batch_ipc) >= 0,
                  "voters": int(cfg.voters) >= 0, "vote_temperature": cfg.vote_temperature > 0,
                  "betas": len(cfg.betas) == 2 and all(0 <= float(b) < 1 for b in cfg.betas)}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{cls.name}: invalid {name}={getattr(cfg, name)!r} (lr > 0, r_bn >= 0, "
                                  "first_bn_weight >= 0, jitter >= 0, 0 < crop_scale[0] <= crop_scale[1] <= 1, "
                                  "0 < milestone <= 1, batch_ipc >= 0, voters >= 0, vote_temperature > 0, "
                                  "two betas in [0, 1))")
        if cfg.curriculum != "none" and not cfg.crop:
            raise ConfigError(f"{cls.name}: curriculum={cfg.curriculum!r} schedules the crop scale; set crop=true "
                              "(or curriculum=none)")

    # -- contract ---------------------------------------------------------------------------

    def init_set(self) -> SyntheticSet:
        cfg = self.cfg
        images = init_images(self.ctx, cfg.init)
        syn = new_synthetic_set(self.ctx, images, self.name, self.config_dict())
        self.make_image_optimizer(syn, float(cfg.lr), opt="adam", betas=cfg.betas, schedule="cosine",
                                  total_steps=cfg.iterations)
        return syn

    def _per_group(self) -> int:
        ipc = self.ctx.ipc
        return ipc if int(self.cfg.batch_ipc) == 0 else min(int(self.cfg.batch_ipc), ipc)

    def groups(self) -> list[Tensor]:
        """Row indices (into the held images) of each recovery group: ``batch_ipc`` images of
        every class (with ``ctx.shard``: of the rank's classes)."""
        ipc, per = self.ctx.ipc, self._per_group()
        k = self.ctx.spec.num_classes if self.ctx.shard is None else self.ctx.shard.classes
        rows = torch.arange(k * ipc, device=self.ctx.device).view(k, ipc)
        return [rows[:, j:j + per].reshape(-1) for j in range(0, ipc, per)]

    def _group_span(self, rows: Tensor) -> tuple[int, int]:
        """``(images of the whole group over all ranks, offset of the held rows in it)``."""
        per = rows.numel() // (self.ctx.spec.num_classes if self.ctx.shard is None else self.ctx.shard.classes)
        lo = 0 if self.ctx.shard is None else self.ctx.shard.lo
        return self.ctx.spec.num_classes * per, lo * per

    def min_scale(self, it: int) -> float:
        """The crop scale's lower bound at iteration ``it``."""
        if self.cfg.curriculum == "none":
            return float(self.cfg.crop_scale[0])
        return curriculum_min_scale(self.cfg.curriculum, it, self.cfg.iterations, self.cfg.milestone,
                                    floor=float(self.cfg.crop_scale[0]))

    def augment(self, x: Tensor, it: int, gen: torch.Generator, span: tuple[int, int] | None = None) -> Tensor:
        """Crop (with the curriculum's scale) and flip if asked, then the jitter roll.

        ``span``: ``(n, offset)``: ``x`` is rows ``offset..offset + len(x)`` of a batch of ``n``
        (class-parallel): the draws are made for all ``n`` and the held rows' are used.
        """
        cfg, (h, w) = self.cfg, x.shape[-2:]
        n, off = span if span is not None else (x.shape[0], 0)
        rows = slice(off, off + x.shape[0])
        if cfg.crop:
            scale = (min(self.min_scale(it), float(cfg.crop_scale[1])), float(cfg.crop_scale[1]))
            boxes = crops.sample_resized_crops(n, h, w, scale=scale, generator=gen, device=x.device)
            x = crops.resized_crop(x, boxes[rows])
        if cfg.flip:
            x = crops.flip(x, crops.sample_flips(n, generator=gen, device=x.device)[rows])
        return crops.random_shift(x, int(cfg.jitter), generator=gen)

    def _reduce(self) -> Any:
        shard = self.ctx.shard
        if shard is None:
            return None
        return lambda t: shard.all_reduce_([t], "the sum of the BatchNorm statistics")

    def voters(self) -> list[int]:
        """The teachers of this step (all, or ``voters`` drawn without replacement)."""
        n = len(self.nets)
        v = int(self.cfg.voters)
        if v == 0 or v >= n:
            return list(range(n))
        return sorted(torch.randperm(n, generator=self.ctx.generator, device=self.ctx.generator.device)[:v].tolist())

    def step(self, syn: SyntheticSet, it: int) -> dict[str, float]:
        from condense.eval.teachers import accuracy_weights

        self._ensure_prepared()
        cfg = self.cfg
        chosen = self.voters()
        weights = accuracy_weights([self.refs[i]["test_acc"] for i in chosen], cfg.vote_temperature) \
            if len(chosen) > 1 else [1.0]
        self.opt.zero_grad(set_to_none=True)
        ce_sum, bn_sum = 0.0, 0.0
        gen = derive_generator(self.ctx.generator, self.ctx.device)
        groups = self.groups()
        for rows in groups:
            total, offset = self._group_span(rows)
            x = self.augment(syn.images[rows], it, gen, (total, offset))
            y = syn.labels[rows]
            loss = x.new_zeros(())
            for i, w in zip(chosen, weights, strict=True):
                with BNStatLoss(self.nets[i], cfg.first_bn_weight, reduce=self._reduce()) as bn, self._autocast():
                    logits = self.nets[i](x)
                    # the group's mean (over all ranks' rows): this rank's share of the sum
                    ce = F.cross_entropy(logits.float(), y, reduction="sum") / total
                    reg = bn.loss()
                loss = loss + w * (ce + cfg.r_bn * reg)
                ce_sum += w * float(ce.detach())
                bn_sum += w * float(reg.detach())
            loss.backward()
        self.opt.step()
        self.step_image_schedule()
        with torch.no_grad():
            syn.images.copy_(torch.maximum(torch.minimum(syn.images, self._hi), self._lo))
        n = len(groups)
        ranks = 1 if self.ctx.shard is None else self.ctx.shard.world_size
        # the runner sums class-parallel metrics over the ranks: shares of the global values
        ce_m, bn_m = ce_sum / n, bn_sum / n / ranks
        return {"loss": ce_m + cfg.r_bn * bn_m, "ce": ce_m, "bn": bn_m,
                "lr": float(self.opt.param_groups[0]["lr"]) / ranks, "min_scale": self.min_scale(it) / ranks}

    def finalize(self, syn: SyntheticSet) -> SyntheticSet:
        self._ensure_prepared()
        out = dataclasses.replace(syn, images=syn.images.detach().clone())
        return self.attach_teachers(out)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state)


@dataclass
class CDAConfig(RecoveryConfig):
    """CDA: SRe2L with crops whose scale's lower bound follows a curriculum (Tiny recipe: lr 0.4,
    r_bn 0.05, cosine curriculum, milestone 1)."""

    lr: float = 0.4
    r_bn: float = 0.05
    crop: bool = True
    flip: bool = True
    curriculum: str = "cosine"


@register_synthesizer("cda")
class CDA(SRe2L):
    """SRe2L with a crop curriculum (global to local crops)."""

    Config: ClassVar[type] = CDAConfig


def _committee_default() -> list[dict[str, Any]]:
    from condense.eval.teachers import TeacherSpec

    return [TeacherSpec(seed=0).to_dict(), TeacherSpec(seed=1).to_dict(), TeacherSpec(model="alexnet_bn").to_dict()]


@dataclass
class CommitteeConfig(RecoveryConfig):
    """CV-DD: a committee of teachers, two voters per step, real-image start."""

    teachers: list[dict[str, Any]] = field(default_factory=_committee_default)
    voters: int = 2
    init: str = "real"


@register_synthesizer("committee")
class Committee(SRe2L):
    """SRe2L recovery with a committee of teachers (CV-DD)."""

    Config: ClassVar[type] = CommitteeConfig


@dataclass
class RDEDConfig(TeacherSetup):
    """RDED (defaults: METHODS.md; the crop scale range chosen for 28-32 px images, see the yaml).

    Attributes:
        candidates_per_class: real images of each class drawn as candidates (0 = all).
        crops_per_image: random resized crops scored per candidate.
        crop_scale: area fraction range of those crops.
        factor: each stored image holds ``factor x factor`` crops (1: one crop per image).
        score_batch: crops per teacher forward.
    """

    iterations: int = 0
    candidates_per_class: int = 300
    crops_per_image: int = 5
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    factor: int = 1
    score_batch: int = 1024


@register_synthesizer("rded")
class RDED(TeacherMixin, Synthesizer):
    """Select the teacher's most confident real crops and stitch them (see the module doc)."""

    Config: ClassVar[type] = RDEDConfig
    class_parallel: ClassVar[bool] = True

    def __init__(self, cfg: Any, ctx: SynthContext) -> None:
        type(self).check_config(cfg, ctx.ipc)
        super().__init__(cfg, ctx)
        self.nets, self.refs = [], []
        h, w = ctx.spec.im_size
        if h % int(cfg.factor) or w % int(cfg.factor):
            raise ConfigError(f"rded: factor {cfg.factor} does not divide the image size {h}x{w}; "
                              f"valid factors: {', '.join(str(f) for f in range(1, 5) if h % f == 0 and w % f == 0)}")

    @classmethod
    def check_config(cls, cfg: Any, ipc: int) -> None:
        cls.check_teachers(cfg)
        lo, hi = (float(v) for v in cfg.crop_scale)
        checks = {"candidates_per_class": int(cfg.candidates_per_class) >= 0,
                  "crops_per_image": int(cfg.crops_per_image) >= 1, "crop_scale": 0 < lo <= hi <= 1,
                  "factor": int(cfg.factor) >= 1, "score_batch": int(cfg.score_batch) >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"rded: invalid {name}={getattr(cfg, name)!r} (candidates_per_class >= 0, "
                                  "crops_per_image >= 1, 0 < crop_scale[0] <= crop_scale[1] <= 1, factor >= 1, "
                                  "score_batch >= 1)")
        need = ipc * int(cfg.factor) ** 2
        if cfg.candidates_per_class and int(cfg.candidates_per_class) < need:
            raise ConfigError(f"rded: candidates_per_class={cfg.candidates_per_class} < ipc x factor^2 = {need} "
                              "crops to keep per class; raise it (or 0 = every image)")

    @torch.no_grad()
    def _scores(self, x: Tensor, y: Tensor) -> Tensor:
        """Weighted teacher cross-entropy of each crop ``(n,)`` (lower = more typical)."""
        out = torch.zeros(x.shape[0], device=x.device)
        bs = int(self.cfg.score_batch)
        for net, ref in zip(self.nets, self.refs, strict=True):
            for s in range(0, x.shape[0], bs):
                with self._autocast():
                    logits = net(x[s:s + bs])
                out[s:s + bs] += ref["weight"] * F.cross_entropy(logits.float(), y[s:s + bs], reduction="none")
        return out

    def init_set(self) -> SyntheticSet:
        self._ensure_prepared()
        ctx, cfg = self.ctx, self.cfg
        k, ipc, f = ctx.spec.num_classes, ctx.ipc, int(cfg.factor)
        h, w = ctx.spec.im_size
        n_cand = min(int(cfg.candidates_per_class) or int(ctx.index.min_count), int(ctx.index.min_count))
        idx = ctx.index.sample(n_cand, ctx.generator)  # (K, n_cand) real image indices
        gen = derive_generator(ctx.generator, ctx.device)
        images = ctx.data.train_images
        out, scores_kept = [], []
        m = int(cfg.crops_per_image)
        lo, hi = (0, k) if ctx.shard is None else ctx.shard.bounds
        for c in range(k):
            # every class's crops are drawn (the generator stays in step with one process's)
            boxes = crops.sample_resized_crops(n_cand * m, h, w, scale=tuple(cfg.crop_scale), generator=gen,
                                               device=ctx.device)
            if not lo <= c < hi:
                continue
            real = images[idx[c].to(images.device)]  # (n, C, H, W)
            rep = real.repeat_interleave(m, 0)
            cand = crops.resized_crop(rep, boxes)  # scored at full size
            y = torch.full((cand.shape[0],), c, device=ctx.device, dtype=torch.long)
            score = self._scores(cand, y).view(-1, m)
            best = score.argmin(1)  # each image's best crop
            per_img = score.gather(1, best[:, None]).squeeze(1)
            keep = torch.argsort(per_img, stable=True)[: ipc * f * f]
            chosen = cand.view(-1, m, *cand.shape[1:])[keep, best[keep]]  # (ipc f^2, C, H, W)
            if f > 1:
                chosen = crops.resized_crop(chosen, _full_boxes(chosen), (h // f, w // f))
            out.append(_stitch(chosen, ipc, f))
            scores_kept.append(per_img[keep].mean().item())
        syn = new_synthetic_set(ctx, torch.cat(out), self.name, self.config_dict())
        if ctx.shard is not None:
            parts = ctx.shard.all_gather_object(scores_kept, "the gather of the crop scores")
            scores_kept = [v for part in parts for v in part]
        syn.meta.extra["rded_mean_ce"] = [round(s, 5) for s in scores_kept]
        return self.attach_teachers(syn)


def _full_boxes(x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    return torch.tensor([[0.0, 0.0, float(w), float(h)]], device=x.device).expand(x.shape[0], 4)


def _stitch(patches: Tensor, ipc: int, f: int) -> Tensor:
    """``(ipc * f^2, C, h, w)`` patches -> ``(ipc, C, f h, f w)``, patch ``j`` of image ``i`` at
    row ``j // f``, column ``j % f``."""
    if f == 1:
        return patches
    n, c, h, w = patches.shape
    grid = patches.view(ipc, f, f, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(ipc, c, f * h, f * w)
