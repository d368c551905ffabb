"""Gradient matching: DC (Zhao et al. 2021) and DSA (Zhao & Bilen 2021).

One :meth:`GradientMatching.step` is one outer iteration of the reference code:

1. a fresh randomly initialised network (``ctx.make_model()``) and its SGD optimizer;
2. ``outer_loop`` times: (BatchNorm networks: running statistics set from 16 real images per
   class and frozen) draw a real batch of every class ``(K, B, ...)``; FYI flip / siamese DSA
   views (:func:`condense.synth._matching.siamese_views`); the per-class gradients of the
   real views (no graph) and of the synthetic views (with graph) in one call each
   (:func:`condense.ops.per_class_grads`); loss = sum over classes of the gradient distance;
   one step of the image optimizer (SGD by default,
   :class:`condense.synth._matching.MatchingSynthesizer`); then, except after the last outer
   loop, ``inner_loop`` epochs of SGD on the network over the (flipped, augmented) synthetic
   set, detached.

DC and DSA are one class: ``dsa`` (siamese augmentation in matching and in the inner training)
and ``init`` differ, set by the two registered configs. With ``dsa=False`` the context's
augmenter is ignored even when it is set.

Reference behaviours kept on purpose: the inner loop runs *epochs* over the synthetic set
(batches of ``batch_train``, reshuffled each epoch; one batch per epoch while ``K*ipc <= 256``);
the logged loss is the summed distance averaged over classes and outer loops. Differences:
the image gradient is taken with ``torch.autograd.grad`` w.r.t. the images only (the reference's
``loss.backward()`` also fills the network's ``.grad``, which it never uses); DSA draws one op per
outer loop shared by all classes (per-class parameters), see ``DSA.sample_per_group``; BatchNorm
statistics are set exactly from the 16-per-class batch (the reference does one running-average
update with momentum 0.1, see :func:`condense.ops.freeze_bn_stats`).

Speed (CPU): per-class gradients use ``impl=loop`` with 32-image micro-batches for the real
batch, and inner-training batches are accumulated over 32-image forwards (same gradients; see
``micro_batch``); ``bf16`` autocasts the forwards; ``compile`` compiles the real-batch forward. ``benchmarks/perf/gradient_matching.py``
times a matching step against the reference's per-class loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from condense.errors import ConfigError, NonFiniteError
from condense.ops._nn import has_batchnorm
from condense.ops.distances import METRICS, gradient_distance
from condense.ops.grads import IMPLS, freeze_bn_stats, matching_params, per_class_grads
from condense.synth._matching import IMAGE_OPTIMIZER_DEFAULTS, INITS, MatchingSynthesizer
from condense.synth.base import SynthContext, register_synthesizer
from condense.train import DataShard, FitConfig, fit
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

#: (outer_loop, inner_loop) by ipc, from the reference ``get_loops``.
LOOPS: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
#: Real images per class used to set BatchNorm statistics before matching.
BN_IMAGES_PER_CLASS = 16
#: Default micro-batch of the real per-class gradients on CPU. Measured (ConvNet-3, 256 real
#: images per class, 1 thread): 32-image forwards make the matching step ~1.3x faster than
#: 256-image ones, because tensors over glibc's mmap threshold are page-faulted in (zero-filled
#: by the kernel) on every allocation; ``benchmarks/perf/gradient_matching.py``.
CPU_MICRO_BATCH = 32


def default_loops(ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)`` for ``ipc`` as published; other ipc values need both set.

    Raises:
        ConfigError: ``ipc`` has no published value.
    """
    if ipc not in LOOPS:
        raise ConfigError(
            f"outer_loop/inner_loop have no published value for ipc={ipc}; set both explicitly "
            f"(published for ipc in {sorted(LOOPS)})"
        )
    return LOOPS[ipc]


# --------------------------------------------------------------------------------------------
# Private helpers (reusable by other matchers; candidates for synth/_matching.py)
# --------------------------------------------------------------------------------------------


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on ``device``'s type when ``bf16``; a no-op otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _class_labels(k: int, n: int, device: torch.device, first: int = 0) -> torch.Tensor:
    """``(K, n)`` int64, row ``c`` filled with ``first + c``."""
    return torch.arange(first, first + k, device=device).unsqueeze(1).expand(k, n)


def _train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    augment: Any = None,
    bf16: bool = False,
    micro_batch: int = 0,
    shard: DataShard | None = None,
) -> None:
    """``epochs`` passes of the network's optimizer ``opt`` over ``(images, labels)`` (detached),
    shuffled per epoch: the training engine (:func:`condense.train.fit`) continuing ``opt``.

    Args:
        images: ``(N, C, H, W)``; labels: ``(N,)`` int64, or ``(N, classes)`` learned label logits.
        generator: shuffling and augmentation draw from it (the run's generator).
        augment: a DSA (fresh, non-siamese parameters per batch) or ``None``.
        micro_batch: accumulate each batch's gradient over forwards of this many images (same
            gradient; 0 = one forward). Ignored for BatchNorm networks, whose train-mode
            statistics depend on the forward's batch.
        shard: class-parallel: ``images`` are this rank's rows of the set, the gradients are
            summed over the ranks (:class:`condense.train.DataShard`).
    """
    soft = labels.dim() == 2  # learned label logits: KL at T = 1 (the matching loss's targets)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, schedule="constant", loss="kl" if soft else "ce",
                    temperature=1.0, bf16=bf16, micro_batch=micro_batch)
    fit(model, (images.detach(), labels.detach()), cfg, generators=[generator], augment=augment,
        optimizer=opt, shard=shard)


# --------------------------------------------------------------------------------------------
# Configs and the synthesizer
# --------------------------------------------------------------------------------------------


@dataclass
class GradientMatchingConfig:
    """DC defaults (the published protocol, METHODS.md and the reference ``main.py``).

    Attributes:
        iterations: outer iterations (1000).
        lr_img: lr of the synthetic images (0.1).
        momentum: SGD momentum of the images (0.5; ``opt_img=sgd``).
        batch_real: real images per class per outer loop (256).
        outer_loop: matching steps per iteration, each on a partly trained network; ``None`` =
            by ipc (:data:`LOOPS`).
        inner_loop: network training epochs on the synthetic set between matching steps;
            ``None`` = by ipc.
        lr_net: SGD lr of the network's inner training (0.01).
        momentum_net: SGD momentum of the network's inner training. The original DC code used
            0.5, the current reference script (which added DSA) uses none (0).
        batch_train: batch size of the inner training (256).
        dis_metric: gradient distance, ``ours`` | ``mse`` | ``cos``.
        init: ``noise`` (DC), ``real`` (DSA) or ``herding`` (the herding selection, see ``init_images``).
        flip: FYI: synthetic batches become ``[x; hflip(x)]`` in matching and inner training.
        dsa: siamese DSA on real/synthetic views and DSA in the inner training (needs
            ``ctx.augment``); ``False`` ignores ``ctx.augment``.
        bf16: bfloat16 autocast for the network forwards (gradients and distances stay fp32).
        grad_impl: per-class gradient formulation, ``auto`` | ``vmap`` | ``loop``
            (:func:`condense.ops.per_class_grads`; same numbers, different speed).
        chunk_classes: ``vmap`` only: classes per vectorised call (0 = all; bounds memory).
        micro_batch: images per forward for the real per-class gradients (``loop`` only) and
            the inner-training batches (not with BatchNorm): same gradients, less memory
            traffic; ``None`` = :data:`CPU_MICRO_BATCH` on CPU, the whole batch elsewhere;
            0 = the whole batch.
        compile: ``torch.compile`` the real-batch forward + loss (first-order gradients, the
            bulk of a matching step; the synthetic side stays eager because it needs a double
            backward). The first iteration compiles (~10-30 s on a CPU).
        fuse_stem: with ``compile``, a ConvNet's first block of the real side as one fused pass
            with a hand-derived backward (:func:`condense.ops.stem.fused_module_loss`);
            ``None`` = on a CPU only (where it was measured), ``True`` / ``False`` = everywhere
            / never. No effect without ``compile`` or on other networks.
        opt_img: optimizer of the images, ``sgd`` (with ``momentum``, the reference's) or ``adam``.
        betas_img: Adam's ``[beta1, beta2]`` (``opt_img=adam`` only).
        schedule_img: lr of the images over the run's ``iterations`` (stepped once per outer
            iteration, not per outer loop): ``constant`` or ``cosine`` (to 0 at the end).
        soft_labels: learn per-image label logits with the images (``labels=learned``): the
            synthetic per-class gradients use soft-target cross-entropy on ``softmax(logits)``,
            so the matching loss reaches the labels through the gradients; the inner training
            uses them too (KL at T = 1). One process only.
        lr_y / momentum_y: SGD on the label logits.
        label_init: the initial probability of each image's own class (the rest spread evenly).
    """

    iterations: int = 1000
    lr_img: float = 0.1
    momentum: float = 0.5
    batch_real: int = 256
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_net: float = 0.01
    momentum_net: float = 0.5
    batch_train: int = 256
    dis_metric: str = "ours"
    init: str = "noise"
    flip: bool = False
    dsa: bool = False
    bf16: bool = False
    grad_impl: str = "auto"
    chunk_classes: int = 0
    micro_batch: int | None = None
    compile: bool = False
    fuse_stem: bool | None = None
    opt_img: str = IMAGE_OPTIMIZER_DEFAULTS["opt_img"]
    betas_img: list[float] = field(default_factory=lambda: list(IMAGE_OPTIMIZER_DEFAULTS["betas_img"]))
    schedule_img: str = IMAGE_OPTIMIZER_DEFAULTS["schedule_img"]
    soft_labels: bool = False
    lr_y: float = 0.01
    momentum_y: float = 0.5
    label_init: float = 0.9


@dataclass
class DSAConfig(GradientMatchingConfig):
    """DSA: DC plus siamese augmentation, real init, inner SGD without momentum (reference)."""

    momentum_net: float = 0.0
    init: str = "real"
    dsa: bool = True


@register_synthesizer("dc")
class GradientMatching(MatchingSynthesizer):
    """DC: match per-class weight gradients of real and synthetic batches in training networks."""

    Config: ClassVar[type] = GradientMatchingConfig
    class_parallel: ClassVar[bool] = True

    def __init__(self, cfg: GradientMatchingConfig, ctx: SynthContext) -> None:
        if cfg.outer_loop is None or cfg.inner_loop is None:
            outer, inner = default_loops(ctx.ipc)
            cfg = dataclasses.replace(
                cfg,
                outer_loop=outer if cfg.outer_loop is None else cfg.outer_loop,
                inner_loop=inner if cfg.inner_loop is None else cfg.inner_loop,
            )
        super().__init__(cfg, ctx)
        # The augmenter every view and inner batch goes through (None: no augmentation).
        aug = ctx.augment if cfg.dsa else None
        if aug is not None and cfg.flip and not aug.flip_first:
            aug = dataclasses.replace(aug, flip_first=True)  # FYI with DSA: flip first
        self._aug = aug
        self.opt_y: torch.optim.Optimizer | None = None
        if cfg.soft_labels and ctx.shard is not None:
            raise ConfigError(f"{self.name}: labels=learned runs in one process (not class-parallel); "
                              "run it without torchrun")

    @classmethod
    def check_config(cls, cfg: GradientMatchingConfig, ipc: int) -> None:
        checks = {
            "iterations": cfg.iterations >= 0,
            "lr_img": cfg.lr_img > 0,
            "momentum": 0.0 <= cfg.momentum < 1.0,
            "batch_real": cfg.batch_real >= 1,
            "outer_loop": cfg.outer_loop is None or cfg.outer_loop >= 1,
            "inner_loop": cfg.inner_loop is None or cfg.inner_loop >= 0,
            "lr_net": cfg.lr_net > 0,
            "momentum_net": 0.0 <= cfg.momentum_net < 1.0,
            "batch_train": cfg.batch_train >= 1,
            "chunk_classes": cfg.chunk_classes >= 0,
            "micro_batch": cfg.micro_batch is None or cfg.micro_batch >= 0,
            "lr_y": cfg.lr_y > 0,
            "momentum_y": 0.0 <= cfg.momentum_y < 1.0,
            "label_init": 0.0 < cfg.label_init < 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"{cls.name}: invalid {key}={getattr(cfg, key)!r} (iterations >= 0, lr_img > 0, "
                    "0 <= momentum < 1, batch_real >= 1, outer_loop >= 1 or null, inner_loop >= 0 "
                    "or null, lr_net > 0, 0 <= momentum_net < 1, batch_train >= 1, chunk_classes >= 0, "
                    "micro_batch >= 0 or null, lr_y > 0, 0 <= momentum_y < 1, 0 < label_init < 1)"
                )
        choices = {"dis_metric": (cfg.dis_metric, METRICS), "init": (cfg.init, INITS),
                   "grad_impl": (cfg.grad_impl, IMPLS)}
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ConfigError(f"{cls.name}: unknown {key} {value!r}; valid: {', '.join(valid)}")
        if cfg.outer_loop is None or cfg.inner_loop is None:
            default_loops(ipc)  # an ipc without published loops needs both set
        cls.check_matching_config(cfg)

    # -- contract ---------------------------------------------------------------------------

    def step(self, syn: SyntheticSet, it: int) -> dict[str, float]:
        cfg = self.cfg
        model = self.ctx.make_model()
        model.train()
        net_opt = torch.optim.SGD(model.parameters(), lr=cfg.lr_net, momentum=cfg.momentum_net)
        params = matching_params(model, cfg.dis_metric)
        total = 0.0
        for ol in range(cfg.outer_loop):
            loss = self.match_step(model, params, syn)
            value = float(loss)
            if not math.isfinite(value):
                raise NonFiniteError(f"{self.name}: loss became {value} at iteration {it}")
            total += value
            if ol == cfg.outer_loop - 1:
                break
            self.train_network(model, net_opt, syn)
        self.step_image_schedule()
        return {"loss": total / (self.ctx.spec.num_classes * cfg.outer_loop)}

    # -- pieces -----------------------------------------------------------------------------

    def matching_loss(
        self, model: nn.Module, params: dict[str, torch.Tensor], real: torch.Tensor, syn: torch.Tensor,
        syn_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(K,)`` per-class gradient distances of real ``(K,B,...)`` and synthetic ``(K,S,...)`` views
        (``syn_targets``: ``(K, S, classes)`` soft-target probabilities of the synthetic views; default
        their class)."""
        cfg = self.cfg
        dev = real.device
        k = real.shape[0]
        first = 0 if self.ctx.shard is None else self.ctx.shard.lo  # the classes' ids
        chunk = cfg.chunk_classes or None
        micro = self._micro_batch(dev)
        y_syn = _class_labels(k, syn.shape[1], dev, first) if syn_targets is None else syn_targets
        with _autocast(dev, cfg.bf16):
            g_real = per_class_grads(model, real, _class_labels(k, real.shape[1], dev, first),
                                     create_graph=False, params=params, impl=cfg.grad_impl,
                                     chunk_size=chunk, micro_batch=micro, compile=cfg.compile,
                                     fuse_stem=cfg.fuse_stem)
            g_syn = per_class_grads(model, syn, y_syn, create_graph=True, params=params, impl=cfg.grad_impl,
                                    chunk_size=chunk)
        return gradient_distance(g_real, g_syn, cfg.dis_metric)

    def _micro_batch(self, device: torch.device) -> int:
        if self.cfg.micro_batch is not None:
            return self.cfg.micro_batch
        return CPU_MICRO_BATCH if device.type == "cpu" else 0

    def match_step(self, model: nn.Module, params: dict[str, torch.Tensor], syn: SyntheticSet) -> torch.Tensor:
        """Freeze BatchNorm statistics, compute the matching loss, one SGD step on the images.

        Returns:
            The summed (over classes) loss, detached.
        """
        if has_batchnorm(model):
            self.freeze_bn(model)
        real, syn_views = self.views(syn)
        if self.opt_y is None:
            loss = self.matching_loss(model, params, real, syn_views).sum()
            (grad_img,) = torch.autograd.grad(loss, syn.images)
        else:
            loss = self.matching_loss(model, params, real, syn_views, self.label_views(syn)).sum()
            grad_img, grad_y = torch.autograd.grad(loss, [syn.images, syn.labels])
            self.opt_y.zero_grad(set_to_none=True)
            syn.labels.grad = grad_y
            self.opt_y.step()
        self.opt.zero_grad(set_to_none=True)
        syn.images.grad = grad_img
        self.opt.step()
        return loss.detach()

    def label_views(self, syn: SyntheticSet) -> torch.Tensor:
        """``(K, S, classes)`` soft targets of the synthetic views (:meth:`views`' order: decoded,
        then ``[x; flip(x)]`` with flip): ``softmax`` of the learned logits."""
        k = self.ctx.spec.num_classes
        y = self.ctx.decoder.decode_labels(syn.labels).view(k, -1, syn.labels.shape[-1])
        if self.cfg.flip:
            y = torch.cat([y, y], dim=1)
        return torch.softmax(y, dim=-1)

    # -- learned labels ---------------------------------------------------------------------

    def init_set(self) -> SyntheticSet:
        syn = super().init_set()
        if self.cfg.soft_labels:
            k = self.ctx.spec.num_classes
            p = float(self.cfg.label_init)
            # logits whose softmax gives p to the own class and (1 - p) / (K - 1) to each other
            gap = math.log(p * (k - 1) / (1.0 - p)) if k > 1 else 0.0
            logits = torch.nn.functional.one_hot(syn.labels, k).to(syn.images.dtype) * gap
            syn.labels = logits.requires_grad_(True)
            self.opt_y = torch.optim.SGD([syn.labels], lr=self.cfg.lr_y, momentum=self.cfg.momentum_y)
        return syn

    def finalize(self, syn: SyntheticSet) -> SyntheticSet:
        out = syn.detach_clone()
        if self.cfg.soft_labels:
            out.meta.extra["label_temperature"] = 1.0  # learned as softmax targets (T = 1)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.opt_y is not None:
            state["opt_y"] = self.opt_y.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.opt_y is not None and "opt_y" in state:
            self.opt_y.load_state_dict(state["opt_y"])

    def freeze_bn(self, model: nn.Module) -> None:
        """BatchNorm statistics from ``16`` real images per class, then frozen (eval mode)."""
        freeze_bn_stats(model, self.real_batch(BN_IMAGES_PER_CLASS).flatten(0, 1))

    def train_network(self, model: nn.Module, opt: torch.optim.Optimizer, syn: SyntheticSet) -> None:
        """``inner_loop`` epochs of SGD on the synthetic set (flipped with FYI, DSA if on).

        Class-parallel (``ctx.shard``): the set is split over the ranks, each trains on its rows
        of every batch and the ranks sum their gradients (:class:`condense.train.DataShard`).
        """
        dec = self.ctx.decoder  # multi-formation: train on the decoded images
        images, labels = dec.decode(syn.images.detach()), dec.decode_labels(syn.labels)
        if self.cfg.flip:
            from condense.augment.flip import flip_cat

            images, labels = flip_cat(images, labels)
        _train_epochs(
            model,
            opt,
            images,
            labels,
            epochs=int(self.cfg.inner_loop),
            batch_size=self.cfg.batch_train,
            generator=self.ctx.generator,
            augment=self._aug,
            bf16=self.cfg.bf16,
            micro_batch=self._micro_batch(images.device),
            shard=self._data_shard(images.device),
        )

    def _data_shard(self, device: torch.device) -> DataShard | None:
        """The inner loop's :class:`~condense.train.DataShard` of this rank (``None``: one process).

        The one-process set is ``[x; flip(x)]`` with FYI flip: global row ``j`` (``j < N``) is
        image ``j``, row ``N + j`` its mirror; a rank holds rows ``lo*ipc..hi*ipc`` of each half.
        """
        shard = self.ctx.shard
        if shard is None:
            return None
        ipc = self.ctx.ipc * self.ctx.decoder.per_slot  # training images per class (decoded)
        total = self.ctx.spec.num_classes * ipc
        own = shard.rows(ipc)
        rows = torch.arange(own.start, own.stop, device=device)
        if self.cfg.flip:
            rows, total = torch.cat([rows, rows + total]), 2 * total
        return DataShard(rows=rows, total=total, reduce=shard.all_reduce_)


@register_synthesizer("dsa")
class DSAGradientMatching(GradientMatching):
    """DSA: :class:`GradientMatching` with siamese augmentation on and real initialisation."""

    Config: ClassVar[type] = DSAConfig
