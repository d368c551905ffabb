"""Pieces shared by every matching synthesizer (DC, DSA, DM, DataDAM, trajectory matchers).

- :func:`init_images` real or noise initialisation, class-major.
- :func:`siamese_views` the FYI flip and siamese DSA applied to per-class real/synthetic batches,
  one implementation composed into every method (a method only passes ``flip=cfg.flip``).
- :class:`ImageOptimizerMixin` the SGD optimizer over the synthetic images and its checkpoint state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from condense.errors import ConfigError
from condense.synth.base import SynthContext
from condense.types import SetMeta, SyntheticSet, class_major_labels

INITS = ("real", "noise", "herding")


def init_images(ctx: SynthContext, init: str) -> torch.Tensor:
    """Starting images ``(K*ipc, C, H, W)`` on ``ctx.device``, class-major.

    ``real``: ipc distinct random real images of each class; ``noise``: standard normal noise
    (the normalized space has unit variance per channel); ``herding``: the herding selection
    of each class (:func:`condense.synth.selection.herding_init_indices`), a better start than
    random real images at small ipc (measured effect: the cpu budget's ablation records).
    """
    spec = ctx.spec
    k, ipc = spec.num_classes, ctx.ipc
    if init == "real":
        idx = ctx.index.sample(ipc, ctx.generator)  # (K, ipc)
        return ctx.data.train_images[idx.reshape(-1)].clone()
    if init == "herding":
        from condense.synth.selection import herding_init_indices  # selection imports this module

        return ctx.data.train_images[herding_init_indices(ctx)].clone()
    if init == "noise":
        shape = (k * ipc, spec.channels, *spec.im_size)
        return torch.randn(shape, generator=ctx.generator, device=ctx.generator.device).to(
            ctx.device
        )
    raise ConfigError(f"unknown init {init!r}; valid choices: {', '.join(INITS)}")


def new_synthetic_set(ctx: SynthContext, images: torch.Tensor, method: str, config: dict) -> SyntheticSet:
    """Wrap ``images`` (class-major) as a hard-labelled SyntheticSet with metadata."""
    labels = class_major_labels(ctx.spec.num_classes, ctx.ipc, device=images.device)
    meta = SetMeta(dataset=ctx.spec, ipc=ctx.ipc, method=method, config=config, seed=ctx.seed)
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
        real and synthetic batch get the same operation with the same parameters.
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
    params = dsa.sample_per_group(real.shape[0], 1, ctx.generator)
    return dsa.apply_grouped(real, params), dsa.apply_grouped(syn, params)


def require_augmenter(method: str, dsa: bool, ctx: SynthContext) -> None:
    """A method configured with ``dsa=true`` needs ``ctx.augment``: never skip it silently."""
    if dsa and ctx.augment is None:
        raise ConfigError(
            f"{method}: dsa=true but the context has no augmenter (ctx.augment is None); "
            "build the context with a condense.augment.DSA or set dsa=false"
        )


class ImageOptimizerMixin:
    """SGD (momentum) over the synthetic images; state saved/restored with checkpoints."""

    opt: torch.optim.Optimizer

    def init_optimized_set(self, init: str, lr: float, momentum: float) -> SyntheticSet:
        """Initial images (``init``), wrapped as a set, with the image optimizer attached."""
        ctx = self.ctx  # type: ignore[attr-defined]
        syn = new_synthetic_set(ctx, init_images(ctx, init), self.name, self.config_dict())  # type: ignore[attr-defined]
        self.make_image_optimizer(syn, lr=lr, momentum=momentum)
        return syn

    def make_image_optimizer(self, syn: SyntheticSet, lr: float, momentum: float) -> None:
        syn.images.requires_grad_(True)
        self.opt = torch.optim.SGD([syn.images], lr=lr, momentum=momentum)

    def optimizer_state(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if "opt" in state:
            self.opt.load_state_dict(state["opt"])
