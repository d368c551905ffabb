"""Trajectory matching: MTT (Cazenavette et al. 2022) and its family as one synthesizer.

Experts (``condense.teachers.get_experts``, trained in :meth:`prepare`, cached) are networks
trained on the real data with their parameters saved after every epoch. One iteration: pick an
expert ``k`` and a start epoch ``t``; the student starts at ``theta*_t`` and takes ``syn_steps``
SGD steps on (augmented) synthetic batches with a learnable step size ``alpha``; the loss is
``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (``M = expert_epochs``); the
images (and ``alpha``, and learned labels) take one optimizer step.

The student is ``torch.func.functional_call`` of the matching network over a flat ``(P,)``
parameter vector sliced into the network's shapes (:func:`condense.teachers.unflatten`): no
hand-written flattened network. Members of the family are switches of one config:

- ``mtt``: the above, full unroll (autograd keeps every step's graph: memory grows with
  ``syn_steps``).
- ``tesla`` (Cui et al. 2023): ``unroll=tesla``, constant memory. Pass 1 runs the unroll with
  detached per-step gradients ``g_i`` and keeps each step's parameters, batch indices and
  augmentation state; since ``theta_N = theta_0 - alpha * sum g_i``, ``dL/dg_i`` is the same
  vector ``v = -alpha dL/dtheta_N`` for every step, and pass 2 recomputes each ``g_i`` with a
  graph and accumulates ``d(v . g_i)/dX``. Exact for ``syn_steps=1`` (tested against ``mtt``);
  for more steps it drops the terms through which a step's images change later steps'
  parameters (the released code also loses a factor 2; ours keeps it).
- ``ftd`` (Du et al. 2023): experts trained with GSAM (``expert_sam``), and an exponential
  moving average of the images (``ema_decay``), which is what gets exported.
- ``datm`` (Guo et al. 2024): the start-epoch window widens as distillation goes on
  (``sequential``), updates with a normalised loss above ``skip_threshold`` are skipped, and
  soft labels are learned (``soft_labels``; initialised from the experts' final logits on
  real images they classify correctly).
- AST (Shen et al., smooth expert trajectories), each part a switch, off by default: the expert
  recipe (``expert_loss_ramp_epochs`` / ``expert_grad_penalty`` with momentum, weight decay and
  a step schedule), ``init=kmeans`` (representatives by k-means over an expert's logits, any
  ipc), ``balanced_inner_loss``, ``intermediate_matching`` and ``weight_perturbation``.

The learned ``alpha`` is kept positive either by clamping (``lr_param=direct``, the default:
the published ``lr_lr`` values assume SGD on ``alpha`` itself; clamped at ``lr_floor``) or by
optimizing ``log alpha`` (``lr_param=log``). It is saved in the artifact (``SyntheticSet.lr``)
and the evaluator trains with it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from condense.errors import ConfigError, NonFiniteError
from condense.synth._matching import ImageOptimizerMixin, init_images, new_synthetic_set, require_augmenter
from condense.synth.base import SynthContext, Synthesizer, register_synthesizer
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

UNROLLS = ("full", "tesla")
LR_PARAMS = ("direct", "log")
INITS = ("real", "noise", "herding", "kmeans", "expert_correct")
#: Published settings by ipc (MTT's CIFAR-10 table, METHODS.md); other ipc values use the nearest.
BY_IPC: dict[str, dict[int, Any]] = {
    "syn_steps": {1: 50, 10: 30, 50: 30},
    "max_start_epoch": {1: 2, 10: 20, 50: 40},
    "lr_img": {1: 100.0, 10: 100.0, 50: 1000.0},
    "lr_lr": {1: 1e-7, 10: 1e-5, 50: 1e-5},
    "lr_teacher": {1: 0.01, 10: 0.001, 50: 0.001},
}


def by_ipc(key: str, ipc: int) -> Any:
    """The published value of ``key`` for ``ipc`` (the nearest tabulated ipc at or below it)."""
    table = BY_IPC[key]
    below = [i for i in table if i <= ipc]
    return table[max(below) if below else min(table)]


# --------------------------------------------------------------------------------------------
# Kernels (pure functions; used by the synthesizer, the tests and benchmarks/perf)
# --------------------------------------------------------------------------------------------


class Student:
    """A network evaluated at a flat ``(P,)`` parameter vector (``functional_call``).

    Args:
        model: the architecture (its own weights are never used).
        layout: ``(name, shape)`` per parameter in flattening order (an expert's layout).
    """

    def __init__(self, model: nn.Module, layout: Sequence[tuple[str, Sequence[int]]]) -> None:
        names = [n for n, _ in model.named_parameters()]
        if names != [n for n, _ in layout]:
            raise ConfigError(f"the experts' parameters {[n for n, _ in layout][:4]}... do not match the "
                              f"matching network's {names[:4]}...; use the experts' model")
        self.model = model
        self.layout = [(n, tuple(int(d) for d in s)) for n, s in layout]
        self.sizes = [math.prod(s) for _, s in self.layout]
        self.buffers = dict(model.named_buffers())

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        from condense.teachers import unflatten

        return unflatten(flat, self.layout)

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, ({**self.params(flat)}, self.buffers), (x,))


def inner_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """CE on hard labels ``(b,)``, or soft CE against ``softmax(targets)`` for label logits ``(b, K)``."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(F.softmax(targets, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def balanced_scale(start: int, max_start: int) -> float:
    """AST's balanced inner loss factor for start epoch ``start`` (S = max_start // 2):
    ``log_5(t - S + 8)`` for ``t >= S``, else ``1 / log_5(S - t + 8)``."""
    s = max_start // 2
    if start >= s:
        return math.log(start - s + 8, 5)
    return 1.0 / math.log(s - start + 8, 5)


@dataclass
class Unroll:
    """What one iteration's student unroll needs: data, batches and their augmentation.

    Attributes:
        images: ``(N, C, H, W)`` the synthetic images (leaf requiring grad).
        targets: ``(N,)`` hard labels or ``(N, K)`` learned label logits.
        batches: one ``(b,)`` index tensor per student step.
        augment: ``augment(step, x) -> x'`` (replayable: the same step gives the same transform).
        flip: FYI: each batch becomes ``[x; hflip(x)]`` (labels duplicated).
        scale: factor on the inner loss (AST's balanced loss).
        bf16: bfloat16 autocast of the student's forwards.
        channels_last: feed the student channels-last batches (faster convolutions on some CPUs).
        decoder: multi-formation (:mod:`condense.ops.formation`): ``images`` are the stored slots,
            decoded afresh for every step (a new graph per step, so TESLA's per-step backward
            works) and ``batches`` index the decoded rows; ``None`` = plain pixels.
    """

    images: Tensor
    targets: Tensor
    batches: list[Tensor]
    augment: Callable[[int, Tensor], Tensor] | None = None
    flip: bool = False
    scale: float = 1.0
    bf16: bool = False
    channels_last: bool = False
    decoder: Any = None

    def batch(self, i: int) -> tuple[Tensor, Tensor]:
        idx = self.batches[i]
        if self.decoder is None or self.decoder.identity:
            x, y = self.images[idx], self.targets[idx]
        else:
            x, y = self.decoder.decode(self.images)[idx], self.decoder.decode_labels(self.targets)[idx]
        if self.flip:
            x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])
        if self.augment is not None:
            x = self.augment(i, x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def step_loss(self, student: Student, flat: Tensor, i: int) -> Tensor:
        x, y = self.batch(i)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = student(flat, x)
        loss = inner_loss(out, y)
        return loss * self.scale if self.scale != 1.0 else loss


def normalized_distance(theta: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """``||theta - target||^2 / ||start - target||^2`` (the division by P in the reference cancels)."""
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum()


def checkpoints(syn_steps: int, expert_epochs: int, intermediate: bool) -> list[int]:
    """Student steps whose parameters are matched: the last, and with AST's intermediate
    matching also steps ``k * syn_steps / expert_epochs`` (matched to epoch ``t + k``)."""
    if not intermediate or expert_epochs < 2:
        return [syn_steps]
    return [round(k * syn_steps / expert_epochs) for k in range(1, expert_epochs)] + [syn_steps]


def full_unroll(student: Student, start: Tensor, targets: dict[int, Tensor], lr: Tensor, u: Unroll) -> Tensor:
    """The matching loss with the whole unroll kept by autograd (MTT).

    Args:
        start: ``(P,)`` the expert's parameters at the start epoch.
        targets: ``{student step: (P,) expert parameters}`` to match (the last step, plus
            AST's intermediate ones).
        lr: the learnable step size (0-d, part of the graph).

    Returns:
        The loss (0-d): sum over ``targets`` of :func:`normalized_distance`.
    """
    theta = start.detach().clone().requires_grad_(True)
    loss = start.new_zeros(())
    for i in range(len(u.batches)):
        ce = u.step_loss(student, theta, i)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - lr * g
        if i + 1 in targets:
            loss = loss + normalized_distance(theta, start, targets[i + 1])
    return loss


def tesla_unroll(student: Student, start: Tensor, targets: dict[int, Tensor], lr: Tensor, u: Unroll,
                 leaves: Sequence[Tensor]) -> Tensor:
    """TESLA's constant-memory gradient: accumulates into ``.grad`` of ``leaves`` (images, label
    logits) and of ``lr``'s leaf; returns the (detached) loss.

    Pass 1 keeps only each step's parameters; pass 2 recomputes step ``i``'s gradient with a
    graph and backpropagates ``v_i . g_i`` with ``v_i = -lr * sum_{j > i} dL/dtheta_j`` (the
    matched steps after ``i``). ``dL/dlr = -sum_j dL/dtheta_j . sum_{i < j} g_i``. Exact for one
    step; for more it drops the dependence of later gradients on earlier steps' images.
    """
    n = len(u.batches)
    lr_value = lr.detach()
    thetas: list[Tensor] = []
    grads_sum = torch.zeros_like(start)
    theta = start.detach()
    dtheta: dict[int, Tensor] = {}
    dlr = torch.zeros((), dtype=start.dtype, device=start.device)
    loss = start.new_zeros(())
    for i in range(n):
        thetas.append(theta)
        p = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(u.step_loss(student, p, i), p)
        grads_sum = grads_sum + g
        theta = theta - lr_value * g
        if i + 1 in targets:
            t = targets[i + 1]
            denom = (start - t).pow(2).sum()
            loss = loss + (theta - t).pow(2).sum() / denom
            d = 2.0 * (theta - t) / denom
            dtheta[i + 1] = d
            dlr = dlr - (d * grads_sum).sum()
    # v_i = -lr * sum_{j > i} dL/dtheta_j: a suffix sum over the matched steps
    suffix = torch.zeros_like(start)
    for i in reversed(range(n)):
        if i + 1 in dtheta:
            suffix = suffix + dtheta[i + 1]
        p = thetas[i].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(u.step_loss(student, p, i), p, create_graph=True)
        wanted = [t for t in leaves if t.requires_grad]
        if wanted:
            torch.autograd.backward(g, grad_tensors=-lr_value * suffix, inputs=wanted)
    if lr.requires_grad:
        torch.autograd.backward(lr, grad_tensors=dlr.to(lr.dtype))
    return loss.detach()


def perturb_conv_weights(flat: Tensor, student: Student, alpha: float, generator: torch.Generator) -> Tensor:
    """AST's weight perturbation: each conv weight ``W += alpha * (d / ||d||_F) * W``, ``d ~ N(0, I)``."""
    out = flat.clone()
    offset = 0
    for (name, shape), size in zip(student.layout, student.sizes, strict=True):
        if len(shape) == 4 and name.endswith("weight"):
            w = out[offset:offset + size]
            d = torch.randn(size, generator=generator, device=generator.device).to(w)
            w.add_(alpha * d / d.norm() * w)
        offset += size
    return out


# --------------------------------------------------------------------------------------------
# Synthesizer
# --------------------------------------------------------------------------------------------


@dataclass
class TrajectoryConfig:
    """The trajectory family. Defaults: MTT's published protocol (METHODS.md); ``null`` = by ipc.

    Attributes:
        iterations: outer iterations (5000 in MTT's CIFAR runs).
        num_experts: expert trajectories used (the prepare phase trains missing ones).
        expert_train_epochs: epochs each expert is trained (its trajectory has one more row).
        expert_lr / expert_momentum / expert_weight_decay / expert_batch: the experts' SGD
            (MTT: 0.01, none, none, 256; AST: 0.003, 0.9, 1e-3).
        expert_schedule / expert_gamma: ``constant``, or ``step`` (x gamma at mid-training; AST 0.6).
        expert_augment: DSA during expert training: ``default`` (the dataset's), ``none``, or ops.
        expert_sam / expert_sam_rho / expert_gsam_alpha: FTD's flat experts (``gsam``, 0.01, 0.3).
        expert_loss_ramp_epochs: AST's "clipping": the experts' loss x (0.5 + 0.05 e) for e < 10.
        expert_grad_penalty: AST's input-gradient penalty lambda (2).
        expert_seed: base seed of the experts (expert k uses expert_seed + k).
        expert_train_size: 0 = experts train on the whole training split; else on a
            class-balanced subset of this many images (quick looks, the smoke budget).
        expert_test_size: 0 = experts are scored on the whole test split after every epoch (the
            manifest's accuracy curve); else on a class-balanced subset of this many images.
        syn_steps: student steps per iteration (50/30/30 at ipc 1/10/50).
        expert_epochs: M, the expert epochs the student's steps must cover (2).
        min_start_epoch / max_start_epoch: start epoch drawn from [min, max) (max 2/20/40).
        lr_img: lr of the images (100/100/1000); momentum: their SGD momentum (0.5).
        lr_lr / momentum_lr: SGD of the learnable step size (1e-7/1e-5/1e-5; 0.5).
        lr_teacher: the step size's initial value (0.01/0.001/0.001).
        lr_param: ``direct`` (SGD on alpha, clamped at ``lr_floor``) or ``log`` (SGD on log alpha).
        batch_syn: images per student step; ``null`` = the whole set (with ``flip``: half of it,
            each batch doubled by its mirror).
        init: ``real`` | ``noise`` | ``herding`` | ``kmeans`` (AST: k-means of an expert's final
            logits per class, nearest image per centre) | ``expert_correct`` (DATM: random real
            images an expert classifies correctly, labels from those experts' logits). With
            ``soft_labels`` and another init the labels start as the experts' mean final logits.
        flip: FYI flip of every student batch.
        dsa: DSA on every student batch (a fresh transform per image).
        zca / zca_reg: ZCA whitening (the CIFAR protocol at ipc 1 / 10): fitted on the training
            images (eigenvalues + ``zca_reg``, MTT's 0.1); experts train and images live in the
            whitened space; the artifact stores the matrix and the evaluator whitens its test
            images with the same transform (refitted on its training images and checked equal).
        bf16: bfloat16 autocast of the student's forwards.
        channels_last: channels-last student batches (same numbers up to rounding; speed:
            benchmarks/perf/trajectory_matching.py).
        unroll: ``full`` (MTT) or ``tesla`` (constant memory).
        ema_decay: FTD's exponential moving average of the images (0 = off; FTD 0.999); the
            average is the exported set.
        soft_labels / lr_y / momentum_y: DATM's learned label logits and their SGD.
        sequential / current_max_start_epoch / expansion_end: DATM's widening window: the upper
            start epoch grows from ``current_max`` to ``max_start_epoch`` over ``expansion_end``
            iterations.
        skip_threshold: skip the update when the normalised loss exceeds it (DATM 1.0; 0 = never).
        balanced_inner_loss / intermediate_matching / weight_perturbation: AST's switches
            (off / off / 0; AST uses 1.0 for the perturbation).
    """

    iterations: int = 5000
    num_experts: int = 10
    expert_train_epochs: int = 50
    expert_lr: float = 0.01
    expert_momentum: float = 0.0
    expert_weight_decay: float = 0.0
    expert_batch: int = 256
    expert_schedule: str = "constant"
    expert_gamma: float = 0.1
    expert_augment: str = "default"
    expert_sam: str = "none"
    expert_sam_rho: float = 0.01
    expert_gsam_alpha: float = 0.3
    expert_loss_ramp_epochs: int = 0
    expert_grad_penalty: float = 0.0
    expert_seed: int = 0
    expert_train_size: int = 0
    expert_test_size: int = 0
    syn_steps: int | None = None
    expert_epochs: int = 2
    min_start_epoch: int = 0
    max_start_epoch: int | None = None
    lr_img: float | None = None
    momentum: float = 0.5
    lr_lr: float | None = None
    momentum_lr: float = 0.5
    lr_teacher: float | None = None
    lr_param: str = "direct"
    lr_floor: float = 1e-8
    batch_syn: int | None = None
    init: str = "real"
    flip: bool = False
    dsa: bool = True
    zca: bool = False
    zca_reg: float = 0.1
    bf16: bool = False
    channels_last: bool = False
    unroll: str = "full"
    ema_decay: float = 0.0
    soft_labels: bool = False
    lr_y: float = 2.0
    momentum_y: float = 0.9
    sequential: bool = False
    current_max_start_epoch: int | None = None
    expansion_end: int = 1000
    skip_threshold: float = 0.0
    balanced_inner_loss: bool = False
    intermediate_matching: bool = False
    weight_perturbation: float = 0.0


def resolve_config(cfg: TrajectoryConfig, ipc: int) -> TrajectoryConfig:
    """``cfg`` with every ``null`` by-ipc setting (:data:`BY_IPC`) filled in for ``ipc``."""
    return dataclasses.replace(cfg, **{k: by_ipc(k, ipc) for k in BY_IPC if getattr(cfg, k) is None})


@register_synthesizer("mtt")
class TrajectoryMatching(ImageOptimizerMixin, Synthesizer):
    """MTT and, through its config, TESLA / FTD / DATM / AST (module docstring)."""

    Config: ClassVar[type] = TrajectoryConfig
    params: ClassVar[tuple[str, ...]] = ("pixels", "multi")

    def __init__(self, cfg: TrajectoryConfig, ctx: SynthContext) -> None:
        cfg = resolve_config(cfg, ctx.ipc)
        type(self).check_config(cfg, ctx.ipc)
        require_augmenter(self.name, cfg.dsa, ctx)
        super().__init__(cfg, ctx)
        self.experts: Any = None
        self.student: Student | None = None
        self.lr_leaf: Tensor | None = None
        self.opt_lr: torch.optim.Optimizer | None = None
        self.opt_y: torch.optim.Optimizer | None = None
        self.ema: Tensor | None = None
        self.zca: Any = None
        self._perm: list[Tensor] = []
        self.skipped = 0

    # -- config -----------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: TrajectoryConfig, ipc: int) -> None:
        cfg = resolve_config(cfg, ipc)
        name = cls.name
        for key, value, valid in (("unroll", cfg.unroll, UNROLLS), ("lr_param", cfg.lr_param, LR_PARAMS),
                                  ("init", cfg.init, INITS), ("expert_schedule", cfg.expert_schedule,
                                                              ("constant", "step")),
                                  ("expert_sam", cfg.expert_sam, ("none", "sam", "gsam"))):
            if value not in valid:
                raise ConfigError(f"{name}: unknown {key} {value!r}; valid: {', '.join(valid)}")
        checks = {
            "iterations": cfg.iterations >= 0, "num_experts": cfg.num_experts >= 1,
            "expert_train_epochs": cfg.expert_train_epochs >= 1, "syn_steps": cfg.syn_steps >= 1,
            "expert_epochs": cfg.expert_epochs >= 1, "min_start_epoch": cfg.min_start_epoch >= 0,
            "max_start_epoch": cfg.max_start_epoch > cfg.min_start_epoch,
            "lr_img": cfg.lr_img > 0, "lr_lr": cfg.lr_lr >= 0, "lr_teacher": cfg.lr_teacher > 0,
            "momentum": 0 <= cfg.momentum < 1, "momentum_lr": 0 <= cfg.momentum_lr < 1,
            "batch_syn": cfg.batch_syn is None or cfg.batch_syn >= (2 if cfg.flip else 1),
            "ema_decay": 0 <= cfg.ema_decay < 1, "lr_y": cfg.lr_y >= 0, "expansion_end": cfg.expansion_end >= 1,
            "skip_threshold": cfg.skip_threshold >= 0, "weight_perturbation": cfg.weight_perturbation >= 0,
            "lr_floor": cfg.lr_floor > 0, "expert_train_size": cfg.expert_train_size >= 0,
            "expert_test_size": cfg.expert_test_size >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: invalid {key}={getattr(cfg, key)!r} (iterations >= 0, num_experts "
                                  ">= 1, syn_steps >= 1, expert_epochs >= 1, 0 <= min_start_epoch < "
                                  "max_start_epoch, lr_img > 0, lr_lr >= 0, lr_teacher > 0, momenta in [0, 1), "
                                  "batch_syn >= 1 (>= 2 with flip) or null, 0 <= ema_decay < 1, ...)")
        last = cfg.max_start_epoch - 1 + cfg.expert_epochs
        if last > cfg.expert_train_epochs:
            raise ConfigError(f"{name}: max_start_epoch={cfg.max_start_epoch} and expert_epochs={cfg.expert_epochs} "
                              f"reach epoch {last}, but experts are trained for expert_train_epochs="
                              f"{cfg.expert_train_epochs}; valid: max_start_epoch - 1 + expert_epochs <= "
                              "expert_train_epochs")
        if cfg.sequential:
            cur = cfg.current_max_start_epoch
            if cur is None or not cfg.min_start_epoch < cur <= cfg.max_start_epoch:
                raise ConfigError(f"{name}: sequential=true needs min_start_epoch < current_max_start_epoch <= "
                                  f"max_start_epoch, got current_max_start_epoch={cur!r}")
        if cfg.zca_reg < 0:
            raise ConfigError(f"{name}: invalid zca_reg={cfg.zca_reg!r} (zca_reg >= 0)")

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    # -- prepare: the experts ---------------------------------------------------------------

    def expert_recipe(self) -> tuple[Any, str]:
        """The experts' engine settings and augmentation (what the cache key hashes)."""
        from condense.teachers import expert_fit_config

        c = self.cfg
        extra: dict[str, Any] = {"lr": c.expert_lr, "momentum": c.expert_momentum,
                                 "weight_decay": c.expert_weight_decay, "batch_size": c.expert_batch,
                                 "schedule": c.expert_schedule, "bf16": c.bf16}
        if c.expert_schedule == "step":
            extra.update(milestones=[0.5], gamma=c.expert_gamma)
        if c.expert_sam != "none":
            extra.update(sam=c.expert_sam, sam_rho=c.expert_sam_rho, gsam_alpha=c.expert_gsam_alpha)
        if c.expert_loss_ramp_epochs:
            extra.update(loss_ramp_epochs=c.expert_loss_ramp_epochs, loss_ramp_start=0.5)
        if c.expert_grad_penalty:
            extra.update(input_grad_penalty=c.expert_grad_penalty)
        return expert_fit_config(c.expert_train_epochs, **extra), c.expert_augment

    def prepare(self) -> None:
        from condense.teachers import balanced_subset, get_experts

        ctx = self.ctx
        if ctx.cache_dir is None:
            raise ConfigError(f"{self.name}: needs a cache_dir for its expert trajectories (cache_dir=...)")
        fit_cfg, augment = self.expert_recipe()
        c = self.cfg
        if c.zca:
            from condense.data import ZCA

            self.zca = ZCA.fit(ctx.data.train_images, c.zca_reg)
            d = ctx.data
            white = dataclasses.replace(d, train_images=self.zca.apply(d.train_images),
                                        test_images=self.zca.apply(d.test_images))
            self.ctx = ctx = dataclasses.replace(ctx, data=white)
        data = balanced_subset(ctx.data, c.expert_train_size, c.expert_test_size) \
            if c.expert_train_size or c.expert_test_size else ctx.data
        self.experts = get_experts(data, self.cfg.num_experts, model=ctx.model_name,
                                   model_kwargs=ctx.model_kwargs, cfg=fit_cfg, augment=augment,
                                   cache_dir=ctx.cache_dir, seed=self.cfg.expert_seed)
        model = ctx.make_model()
        model.requires_grad_(False)
        self.student = Student(model, self.experts.layout)
        accs = [e.test_acc[-1] for e in self.experts]
        self.prepare_info = {
            "experts": len(self.experts), "expert_epochs": self.experts.epochs, "expert_set": self.experts.root.name,
            # what training these experts took when they were trained (summed over the experts; the
            # manifests' wall_s), i.e. the prepare time of a cold run
            "cold_s": round(sum(float(e.manifest.get("wall_s") or 0.0) for e in self.experts), 1),
            "expert_test_acc": accs}
        log.info("%s: %d experts of %d epochs, final test accuracy %s", self.name, len(self.experts),
                 self.experts.epochs, ", ".join(f"{a:.2f}" for a in accs if a is not None))

    def _ensure_prepared(self) -> None:
        if self.experts is None:
            self.prepare()

    # -- initial set ------------------------------------------------------------------------

    def expert_logits(self, k: int, epoch: int, images: Tensor, batch: int = 1024) -> Tensor:
        """``(n, K)`` logits of expert ``k`` after ``epoch`` epochs (no grad, float32)."""
        assert self.student is not None
        flat = self.experts.params(k, epoch, self.ctx.device)
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch):
                with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                    out.append(self.student(flat, images[i:i + batch]).float())
        return torch.cat(out)

    def _expert_correct_init(self) -> tuple[Tensor, Tensor]:
        """DATM: random real images that the experts' final checkpoints classify correctly; their
        label logits = the mean final logits over the experts that classify them correctly.
        Candidates are scanned in random order, 256 at a time, until ``ipc`` are found."""
        ctx, e = self.ctx, self.experts
        k_cls, ipc = ctx.spec.num_classes, ctx.ipc
        order = ctx.index.sample(ctx.index.min_count, ctx.generator)  # (K, min_count), shuffled
        images, labels = [], []
        for c in range(k_cls):
            got_x, got_y, found = [], [], 0
            for s in range(0, order.shape[1], 256):
                x = ctx.data.train_images[order[c, s:s + 256]]
                logits = torch.stack([self.expert_logits(k, e.epochs, x) for k in range(len(e))])  # (E, n, K)
                right = logits.argmax(-1) == c  # (E, n)
                keep = right.any(0).nonzero().squeeze(1)[:ipc - found]
                w = right[:, keep].unsqueeze(-1).to(logits.dtype)
                got_x.append(x[keep])
                got_y.append((logits[:, keep] * w).sum(0) / w.sum(0))
                found += int(keep.numel())
                if found == ipc:
                    break
            if found < ipc:
                raise ConfigError(f"{self.name}: only {found} of {order.shape[1]} images of class {c} are "
                                  f"classified correctly by an expert; need ipc={ipc} (use init=real)")
            images.append(torch.cat(got_x))
            labels.append(torch.cat(got_y))
        return torch.cat(images).clone(), torch.cat(labels)

    def init_set(self) -> SyntheticSet:
        self._ensure_prepared()
        cfg, ctx = self.cfg, self.ctx
        init = cfg.init
        label_logits = None
        if init == "expert_correct":
            if not ctx.decoder.identity:
                raise ConfigError(f"{self.name}: init=expert_correct picks whole real images and does not "
                                  "compose with param=multi; valid inits there: real, noise, herding, kmeans")
            images, label_logits = self._expert_correct_init()
        elif init == "kmeans":
            images = init_images(ctx, "kmeans", lambda x: self.expert_logits(0, self.experts.epochs, x))
        else:
            images = init_images(ctx, init)
        syn = new_synthetic_set(ctx, images, self.name, self.config_dict())
        if cfg.soft_labels:
            if label_logits is None:  # the experts' mean final logits on the initial (decoded) images
                shown = ctx.decoder.decode(images)
                label_logits = torch.stack([self.expert_logits(k, self.experts.epochs, shown)
                                            for k in range(len(self.experts))]).mean(0)
                label_logits = label_logits.view(images.shape[0], -1, label_logits.shape[-1]).mean(1)
            syn.labels = label_logits.detach().clone().requires_grad_(True)
            self.opt_y = torch.optim.SGD([syn.labels], lr=cfg.lr_y, momentum=cfg.momentum_y)
        self.make_image_optimizer(syn, float(cfg.lr_img), cfg.momentum)
        # the learnable step size: syn.lr is what the artifact stores and the evaluator uses
        lr0 = torch.tensor(float(cfg.lr_teacher), device=ctx.device)
        self.lr_leaf = (lr0.log() if cfg.lr_param == "log" else lr0).requires_grad_(True)
        syn.lr = self._lr().detach().clone()
        self.opt_lr = torch.optim.SGD([self.lr_leaf], lr=float(cfg.lr_lr), momentum=cfg.momentum_lr)
        if cfg.ema_decay > 0:
            self.ema = syn.images.detach().clone()
        return syn

    # -- one iteration ----------------------------------------------------------------------

    def _lr(self) -> Tensor:
        assert self.lr_leaf is not None
        return self.lr_leaf.exp() if self.cfg.lr_param == "log" else self.lr_leaf

    def start_window(self, it: int) -> tuple[int, int]:
        """``[low, high)`` of the start epoch at iteration ``it`` (DATM's widening window)."""
        c = self.cfg
        high = c.max_start_epoch
        if c.sequential:
            cur = int(c.current_max_start_epoch)
            high = min(cur + int((c.max_start_epoch - cur) * it / c.expansion_end), c.max_start_epoch)
        return c.min_start_epoch, max(high, c.min_start_epoch + 1)

    def _randint(self, low: int, high: int) -> int:
        g = self.ctx.generator
        return int(torch.randint(low, high, (1,), generator=g, device=g.device))

    def _batches(self, n_images: int) -> list[Tensor]:
        """One index batch per student step: consecutive chunks of fresh permutations of the set."""
        c = self.cfg
        size = c.batch_syn if c.batch_syn is not None else n_images
        if c.flip:
            size = max(1, size // 2)
        size = min(size, n_images)
        g = self.ctx.generator
        out = []
        for _ in range(c.syn_steps):
            if not self._perm:
                perm = torch.randperm(n_images, generator=g, device=g.device).to(self.ctx.device)
                self._perm = list(torch.split(perm, size))
            out.append(self._perm.pop(0))
        return out

    def _augment(self) -> Callable[[int, Tensor], Tensor] | None:
        """Per-step DSA from generator states drawn now: replaying step ``i`` gives the same transform."""
        dsa = self.ctx.augment if self.cfg.dsa else None
        if dsa is None:
            return None
        g = self.ctx.generator
        seeds = torch.randint(0, 2**62, (self.cfg.syn_steps,), generator=g, device=g.device).tolist()

        def aug(i: int, x: Tensor) -> Tensor:
            gi = torch.Generator(device=g.device)
            gi.manual_seed(int(seeds[i]))
            return dsa(x, gi)

        return aug

    def step(self, syn: SyntheticSet, it: int) -> dict[str, float]:
        self._ensure_prepared()
        cfg, ctx = self.cfg, self.ctx
        assert self.student is not None and self.opt_lr is not None
        k = self._randint(0, len(self.experts))
        low, high = self.start_window(it)
        t0 = self._randint(low, high)
        start = self.experts.params(k, t0, ctx.device)
        if cfg.weight_perturbation > 0:
            start = perturb_conv_weights(start, self.student, cfg.weight_perturbation, ctx.generator)
        matched = checkpoints(cfg.syn_steps, cfg.expert_epochs, cfg.intermediate_matching)
        targets = {s: self.experts.params(k, t0 + (j + 1 if s != cfg.syn_steps else cfg.expert_epochs), ctx.device)
                   for j, s in enumerate(matched)}
        scale = balanced_scale(t0, cfg.max_start_epoch) if cfg.balanced_inner_loss else 1.0
        u = Unroll(syn.images, syn.labels, self._batches(syn.images.shape[0] * ctx.decoder.per_slot), self._augment(),
                   cfg.flip, scale, cfg.bf16, cfg.channels_last, ctx.decoder)
        self.opt.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        if self.opt_y is not None:
            self.opt_y.zero_grad(set_to_none=True)
        lr = self._lr()
        if cfg.unroll == "full":
            loss_t = full_unroll(self.student, start, targets, lr, u)
            loss_t.backward()
        else:
            loss_t = tesla_unroll(self.student, start, targets, lr, u, [syn.images, syn.labels])
        loss = float(loss_t.detach()) / len(targets)
        if not math.isfinite(loss):
            raise NonFiniteError(f"{self.name}: loss became {loss} at iteration {it}")
        skip = cfg.skip_threshold > 0 and loss > cfg.skip_threshold
        if skip:
            self.skipped += 1
        else:
            self.opt.step()
            self.opt_lr.step()
            if cfg.lr_param == "direct":
                with torch.no_grad():
                    self.lr_leaf.clamp_(min=cfg.lr_floor)
            if self.opt_y is not None:
                self.opt_y.step()
            if self.ema is not None:
                with torch.no_grad():
                    self.ema.mul_(cfg.ema_decay).add_(syn.images.detach(), alpha=1.0 - cfg.ema_decay)
        with torch.no_grad():
            syn.lr = self._lr().detach().clone()
        return {"loss": loss, "syn_lr": float(syn.lr), "start_epoch": float(t0), "expert": float(k),
                "skipped": float(skip)}

    def finalize(self, syn: SyntheticSet) -> SyntheticSet:
        out = syn.detach_clone()
        if self.ema is not None:
            out.images = self.ema.detach().clone()
        out.lr = self._lr().detach().clone().float()
        out.meta.extra["skipped_updates"] = self.skipped
        if self.zca is not None:
            out.zca_matrix = self.zca.matrix.detach().clone().float()
            out.meta.zca = True
            out.meta.extra["zca_reg"] = float(self.zca.reg)
        if self.cfg.soft_labels:
            out.meta.extra["label_temperature"] = 1.0  # learned as softmax targets (soft CE at T = 1)
        if self.experts is not None:
            out.meta.extra["experts"] = {"n": len(self.experts), "epochs": self.experts.epochs,
                                         "set": self.experts.root.name}
        return out

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        assert self.lr_leaf is not None and self.opt_lr is not None
        state: dict[str, Any] = {**self.optimizer_state(), "lr_leaf": self.lr_leaf.detach().clone(),
                                 "opt_lr": self.opt_lr.state_dict(), "perm": [p.clone() for p in self._perm],
                                 "skipped": self.skipped}
        if self.opt_y is not None:
            state["opt_y"] = self.opt_y.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state)
        assert self.lr_leaf is not None and self.opt_lr is not None
        with torch.no_grad():
            self.lr_leaf.copy_(state["lr_leaf"].to(self.lr_leaf.device))
        self.opt_lr.load_state_dict(state["opt_lr"])
        self._perm = [p.to(self.ctx.device) for p in state.get("perm", [])]
        self.skipped = int(state.get("skipped", 0))
        if self.opt_y is not None and "opt_y" in state:
            self.opt_y.load_state_dict(state["opt_y"])
        if self.ema is not None and "ema" in state:
            self.ema.copy_(state["ema"].to(self.ema.device))


@dataclass
class TESLAConfig(TrajectoryConfig):
    """TESLA: MTT with the constant-memory gradient (``unroll=tesla``)."""

    unroll: str = "tesla"


@dataclass
class FTDConfig(TrajectoryConfig):
    """FTD: flat experts (GSAM rho 0.01, alpha 0.3, DATM's expert script) and an EMA of the images."""

    expert_sam: str = "gsam"
    ema_decay: float = 0.999


@dataclass
class DATMConfig(TrajectoryConfig):
    """DATM: learned soft labels, the widening start window, skipped high-loss updates.

    The published CIFAR-10 ipc 10 window (min/current/max 0/10/20, expansion over 1000
    iterations), label lr 2 (SGD momentum 0.9), threshold 1.0, and syn_steps 80, 10000 iterations.
    """

    iterations: int = 10000
    soft_labels: bool = True
    init: str = "expert_correct"
    sequential: bool = True
    current_max_start_epoch: int | None = 10
    max_start_epoch: int | None = 20
    syn_steps: int | None = 80
    skip_threshold: float = 1.0


@register_synthesizer("tesla")
class TESLA(TrajectoryMatching):
    """TESLA: constant memory in ``syn_steps`` (:func:`tesla_unroll`)."""

    Config: ClassVar[type] = TESLAConfig


@register_synthesizer("ftd")
class FTD(TrajectoryMatching):
    """FTD: GSAM experts and the EMA of the images."""

    Config: ClassVar[type] = FTDConfig


@register_synthesizer("datm")
class DATM(TrajectoryMatching):
    """DATM: difficulty-aligned start window and learned soft labels."""

    Config: ClassVar[type] = DATMConfig
