"""Pieces shared by every matching synthesizer (DC, DSA, DM, DataDAM, trajectory matchers).

- :func:`init_images` real or noise initialisation, class-major.
- :func:`siamese_views` the FYI flip and siamese DSA applied to per-class real/synthetic batches,
  one implementation composed into every method (a method only passes ``flip=cfg.flip``).
- :class:`ImageOptimizerMixin` the optimizer over the synthetic images (SGD with momentum or
  Adam, constant or cosine learning rate), its schedule and their checkpoint state.
- :class:`MatchingSynthesizer` the base of the matching methods (DC/DSA, DM/DataDAM): the
  per-class real batch (capped at the smallest class, warned once), the siamese views, the
  image optimizer from the config's ``lr_img`` / ``momentum`` / ``opt_img`` / ``betas_img`` /
  ``schedule_img`` fields, checkpoint state.

Class-parallel runs (``ctx.shard``, :mod:`condense.distributed`): the initial images, the real
batches and the siamese DSA parameters are drawn for ALL classes, exactly as one process draws
them, and each rank keeps its own classes' part; so a rank's images, real views and losses are
those of one process for the same classes, and the generators of all ranks stay in step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from condense.errors import ConfigError
from condense.ops.formation import PIXELS
from condense.synth.base import SynthContext, Synthesizer, require_class_parallel
from condense.types import SetMeta, SyntheticSet, class_major_labels

log = logging.getLogger(__name__)

INITS = ("real", "noise", "herding", "kmeans")
#: Optimizers of the synthetic images (``opt_img``).
IMAGE_OPTIMIZERS = ("sgd", "adam")
#: Learning-rate schedules of the image optimizer over the run's iterations (``schedule_img``).
IMAGE_SCHEDULES = ("constant", "cosine")
#: The image-optimizer fields every matching config has, with the defaults that give plain SGD.
IMAGE_OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "opt_img": "sgd", "betas_img": [0.9, 0.999], "schedule_img": "constant",
}


def init_images(ctx: SynthContext, init: str,
                features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Starting images ``(K*ipc, C, H, W)`` on ``ctx.device``, class-major.

    ``real``: ipc distinct random real images of each class; ``noise``: standard normal noise
    (the normalized space has unit variance per channel); ``herding``: the herding selection
    of each class (:func:`condense.synth.selection.herding_init_indices`), a better start than
    random real images at small ipc (measured effect: the cpu budget's ablation records);
    ``kmeans``: per class the real images nearest ``ipc`` k-means centres of ``features(images)``
    (default: the herding feature network's embedding).

    With ``ctx.shard`` (class-parallel): the rows of the rank's classes only, ``(k*ipc, C, H, W)``,
    from the draws of all classes.

    With a multi-formation ``ctx.decoder`` these are the stored slots: ``ipc x factor^2`` images
    per class are initialised as above and each is downsampled into a tile
    (:meth:`~condense.ops.formation.Decoder.encode`); noise stays full-size noise per slot.
    """
    dec = ctx.decoder
    if not dec.identity and init != "noise":  # multi-formation: ipc x factor^2 images per class, one per tile
        many = init_images(dataclasses.replace(ctx, ipc=ctx.ipc * dec.per_slot, decoder=PIXELS), init, features)
        return dec.encode(many)
    images = _all_classes_images(ctx, init, features)  # noise slots: full-size noise per slot
    if ctx.shard is None:
        return images
    return images[ctx.shard.rows(ctx.ipc)].clone()


def _all_classes_images(ctx: SynthContext, init: str,
                        features: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    spec = ctx.spec
    k, ipc = spec.num_classes, ctx.ipc
    if init == "real":
        idx = ctx.index.sample(ipc, ctx.generator)  # (K, ipc)
        return ctx.data.train_images[idx.reshape(-1)].clone()
    if init == "herding":
        from condense.synth.selection import herding_init_indices  # selection imports this module

        return ctx.data.train_images[herding_init_indices(ctx)].clone()
    if init == "kmeans":
        from condense.synth.selection import kmeans_init_indices

        return ctx.data.train_images[kmeans_init_indices(ctx, features)].clone()
    if init == "noise":
        shape = (k * ipc, spec.channels, *spec.im_size)
        return torch.randn(shape, generator=ctx.generator, device=ctx.generator.device).to(
            ctx.device
        )
    raise ConfigError(f"unknown init {init!r}; valid choices: {', '.join(INITS)}")


def new_synthetic_set(ctx: SynthContext, images: torch.Tensor, method: str, config: dict) -> SyntheticSet:
    """Wrap ``images`` (class-major) as a hard-labelled SyntheticSet with metadata (with
    ``ctx.shard``: the rank's classes' images and labels; with a multi-formation ``ctx.decoder``
    the stored slots, the decoder recorded in ``meta.extra["decoder"]``)."""
    if ctx.shard is None:
        labels = class_major_labels(ctx.spec.num_classes, ctx.ipc, device=images.device)
    else:
        labels = ctx.shard.labels(ctx.ipc, images.device)
    meta = SetMeta(dataset=ctx.spec, ipc=ctx.ipc, method=method, config=config, seed=ctx.seed)
    if not ctx.decoder.identity:
        meta.extra["decoder"] = ctx.decoder.to_dict()
    return SyntheticSet(images=images, labels=labels, meta=meta)


def siamese_views(
    ctx: SynthContext, real: torch.Tensor, syn: torch.Tensor, *, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class views that enter a matching loss.

    Args:
        real: ``(K, B, C, H, W)`` real images per class.
        syn: ``(K, S, C, H, W)`` synthetic images per class (part of the autograd graph).
        flip: FYI: each class's synthetic batch becomes ``[x; hflip(x)]`` (``2S`` images) and,
            with DSA, flip is applied first (siamese, p=0.5) before one other sampled operation.

    Returns:
        ``(real_view (K,B,...), syn_view (K,S or 2S,...))``; with ``ctx.augment`` set, class k's
        real and synthetic batch get the same operation with the same parameters. With
        ``ctx.shard`` the ``K`` groups are the rank's classes; the parameters are drawn for all
        classes and the rank's are used.
    """
    if flip:
        from condense.augment.flip import flip_cat_grouped

        syn = flip_cat_grouped(syn)
    dsa = ctx.augment
    if dsa is None:
        return real, syn
    if flip and not dsa.flip_first:
        dsa = dataclasses.replace(dsa, flip_first=True)
    # As the reference's siamese mode: ONE transform per class, shared by every image of the
    # class's real and synthetic batch. Batching choice: the op is drawn once per call and shared
    # by all classes (the reference draws one per class); its parameters are drawn per class.
    shard = ctx.shard
    if shard is None:
        params = dsa.sample_per_group(real.shape[0], 1, ctx.generator)
    else:
        lo, hi = shard.bounds
        params = dsa.sample_per_group(shard.num_classes, 1, ctx.generator).map(
            lambda t: t[lo:hi], num_groups=hi - lo)
    return dsa.apply_grouped(real, params), dsa.apply_grouped(syn, params)


def require_augmenter(method: str, dsa: bool, ctx: SynthContext) -> None:
    """A method configured with ``dsa=true`` needs ``ctx.augment``: never skip it silently."""
    if dsa and ctx.augment is None:
        raise ConfigError(
            f"{method}: dsa=true but the context has no augmenter (ctx.augment is None); "
            "build the context with a condense.augment.DSA or set dsa=false"
        )


def cosine_factor(step: int, total: int) -> float:
    """The cosine schedule's lr multiplier after ``step`` of ``total`` steps: ``(1 + cos(pi t / T)) / 2``
    with ``t = min(step, total)`` (1 at the start, 0 at the end, then held at 0)."""
    total = max(1, int(total))
    return 0.5 * (1.0 + math.cos(math.pi * min(int(step), total) / total))


def check_image_optimizer(method: str, opt: str, betas: Sequence[float], schedule: str) -> None:
    """Validate the image-optimizer settings of a matching config.

    Raises:
        ConfigError: unknown ``opt`` / ``schedule`` (names the valid choices) or ``betas`` not two
            numbers in ``[0, 1)``.
    """
    if opt not in IMAGE_OPTIMIZERS:
        raise ConfigError(f"{method}: unknown opt_img {opt!r}; valid: {', '.join(IMAGE_OPTIMIZERS)}")
    if schedule not in IMAGE_SCHEDULES:
        raise ConfigError(f"{method}: unknown schedule_img {schedule!r}; valid: {', '.join(IMAGE_SCHEDULES)}")
    ok = (isinstance(betas, (list, tuple)) and len(betas) == 2
          and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas))
    if not ok:
        raise ConfigError(
            f"{method}: invalid betas_img={betas!r}; valid: two numbers in [0, 1), e.g. [0.9, 0.999]"
        )


class ImageOptimizerMixin:
    """The optimizer over the synthetic images, its learning-rate schedule, and their checkpoint state.

    ``opt="sgd"`` (with ``momentum``) or ``"adam"`` (with ``betas``); ``schedule="constant"`` or
    ``"cosine"`` (the lr follows :func:`cosine_factor` over ``total_steps``, advanced once per
    outer iteration by :meth:`step_image_schedule`). The scheduler's state is part of
    :meth:`optimizer_state`, so a resumed run continues on the same learning rates.
    """

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None = None

    def init_optimized_set(self, init: str, lr: float, momentum: float = 0.5, **options: Any) -> SyntheticSet:
        """Initial images (``init``), wrapped as a set, with the image optimizer attached
        (``options``: the keyword arguments of :meth:`make_image_optimizer`)."""
        ctx = self.ctx  # type: ignore[attr-defined]
        config = self.config_dict()  # type: ignore[attr-defined]
        syn = new_synthetic_set(ctx, init_images(ctx, init), self.name, config)  # type: ignore[attr-defined]
        self.make_image_optimizer(syn, lr, momentum, **options)
        return syn

    def make_image_optimizer(
        self,
        syn: SyntheticSet,
        lr: float,
        momentum: float = 0.5,
        *,
        opt: str = "sgd",
        betas: Sequence[float] = (0.9, 0.999),
        schedule: str = "constant",
        total_steps: int = 0,
    ) -> None:
        """Make ``syn.images`` a leaf that requires grad and attach its optimizer (and schedule).

        Args:
            syn: the set whose ``images (N, C, H, W)`` are optimized in place.
            lr: the (initial) learning rate.
            momentum: SGD momentum (ignored by Adam).
            opt: ``sgd`` | ``adam``.
            betas: Adam's ``(beta1, beta2)`` (ignored by SGD).
            schedule: ``constant`` | ``cosine`` (to 0 over ``total_steps`` outer iterations).
            total_steps: the schedule's length in outer iterations (the run's iterations).
        """
        check_image_optimizer(getattr(self, "name", type(self).__name__), opt, betas, schedule)
        syn.images.requires_grad_(True)
        if opt == "adam":
            self.opt = torch.optim.Adam([syn.images], lr=lr, betas=(float(betas[0]), float(betas[1])))
        else:
            self.opt = torch.optim.SGD([syn.images], lr=lr, momentum=momentum)
        self.sched = None
        if schedule == "cosine":
            total = max(1, int(total_steps))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: cosine_factor(t, total))

    def step_image_schedule(self) -> None:
        """Advance the learning-rate schedule by one outer iteration (no-op when constant)."""
        if self.sched is not None:
            self.sched.step()

    def optimizer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"opt": self.opt.state_dict()}
        if self.sched is not None:
            state["sched"] = self.sched.state_dict()
        return state

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if "opt" in state:
            self.opt.load_state_dict(state["opt"])
        if self.sched is not None and "sched" in state:
            self.sched.load_state_dict(state["sched"])


class MatchingSynthesizer(ImageOptimizerMixin, Synthesizer):
    """Base of the matching methods: image optimizer, real batches, views, checkpoint state.

    Composes with multi-formation (``ctx.decoder``): the optimized leaf holds the stored slots and
    every synthetic batch that enters a loss or an inner step is decoded first.

    The config needs ``iterations``, ``init``, ``lr_img``, ``momentum``, ``flip``, ``dsa`` and
    the image-optimizer fields ``opt_img``, ``betas_img``, ``schedule_img``
    (:data:`IMAGE_OPTIMIZER_DEFAULTS`). With ``dsa=False`` the context's augmenter is ignored.
    """

    params: ClassVar[tuple[str, ...]] = ("pixels", "multi")

    def __init__(self, cfg: Any, ctx: SynthContext) -> None:
        type(self).check_config(cfg, ctx.ipc)
        require_augmenter(self.name, cfg.dsa, ctx)
        if ctx.shard is not None:
            require_class_parallel(type(self), ctx)
        super().__init__(cfg, ctx)
        self._view_ctx = ctx if cfg.dsa else dataclasses.replace(ctx, augment=None)
        self._warned_batch: set[int] = set()

    @classmethod
    def check_matching_config(cls, cfg: Any) -> None:
        """The checks every matching config shares: ``init`` and the image optimizer.

        Raises:
            ConfigError: one line naming the bad value and the valid choices.
        """
        if cfg.init not in INITS:
            raise ConfigError(f"{cls.name}: unknown init {cfg.init!r}; valid: {', '.join(INITS)}")
        check_image_optimizer(cls.name, cfg.opt_img, cfg.betas_img, cfg.schedule_img)

    # -- contract ---------------------------------------------------------------------------

    def init_set(self) -> SyntheticSet:
        cfg = self.cfg
        return self.init_optimized_set(
            cfg.init, float(cfg.lr_img), cfg.momentum, opt=cfg.opt_img, betas=cfg.betas_img,
            schedule=cfg.schedule_img, total_steps=cfg.iterations,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state)

    # -- pieces -----------------------------------------------------------------------------

    def real_batch_size(self, want: int) -> int:
        """``want`` capped at the smallest class (as the references' ``perm[:n]``), with a
        warning the first time a given ``want`` is capped."""
        smallest = getattr(self.ctx.index, "min_count", None)
        if smallest is None or want <= smallest:
            return want
        if want not in self._warned_batch:
            log.warning("%s: a real batch of %d images per class exceeds the smallest class (%d images); "
                        "using %d", self.name, want, smallest, smallest)
            self._warned_batch.add(want)
        return int(smallest)

    def real_batch(self, want: int) -> torch.Tensor:
        """``(K, B, C, H, W)`` random real images of every class, ``B = real_batch_size(want)``,
        drawn from ``ctx.generator`` (with ``ctx.shard``: the rank's ``k`` classes, from the
        draw of all classes)."""
        ctx = self.ctx
        n = self.real_batch_size(want)
        if ctx.shard is None:
            return ctx.index.gather(ctx.data.train_images, n, ctx.generator)
        lo, hi = ctx.shard.bounds
        idx = ctx.index.sample(n, ctx.generator)[lo:hi]  # the keys of every class are drawn
        images = ctx.data.train_images
        return images[idx.reshape(-1).to(images.device)].reshape(hi - lo, n, *images.shape[1:])

    def views(self, syn: SyntheticSet) -> tuple[torch.Tensor, torch.Tensor]:
        """A real batch of every class (``cfg.batch_real`` each) and the per-class synthetic
        batch, through FYI flip / siamese DSA (:func:`siamese_views`).

        Returns:
            ``real (K, B, C, H, W)`` and ``syn (K, S, C, H, W)`` (``S = ipc``, ``2*ipc`` with flip;
            times ``factor^2`` with multi-formation: the decoded images, flipped after decoding).
        """
        k = self.ctx.spec.num_classes if self.ctx.shard is None else self.ctx.shard.classes
        real = self.real_batch(self.cfg.batch_real)
        images = self.ctx.decoder.decode(syn.images)  # multi-formation: factor^2 images per slot
        syn_k = images.view(k, -1, *images.shape[1:])
        return siamese_views(self._view_ctx, real, syn_k, flip=self.cfg.flip)
