"""Distribution matching (DM, Zhao & Bilen 2023) and attention matching (DataDAM, Sajedi et al. 2023).

One iteration: a fresh randomly initialised network (never trained, parameters frozen); a real
batch of every class drawn at once ``(K, B, C, H, W)``; FYI flip / siamese DSA views through
:func:`condense.synth._matching.siamese_views`; ONE forward of all real views (under
``torch.no_grad``) and ONE forward of all synthetic views; per-class means by reshaping
``(K*B, D) -> (K, B, D).mean(1)`` (no loop over classes); loss = sum over classes of squared
distances of the means; one step of the image optimizer (SGD by default, see
:class:`condense.synth._matching.MatchingSynthesizer`).

DataDAM is :class:`DistributionMatching` plus spatial attention maps of intermediate feature
maps, captured by :func:`condense.ops.features.capture_features` in the same two forwards. As
the official code: the maps of every block but the last, taken before the block's pooling (its
ReLU outputs), loss ``100 * (attention term + 0.01 * embedding term)``. The attention exponent
defaults to the paper's p = 4 (the released code passes 1); both are one config value away.

Speed levers (measured in ``benchmarks/perf/distribution_matching.py``): the batched step does
the same arithmetic as a per-class loop, so on a CPU its gain is the per-call overhead only;
``bf16`` (autocast) and ``compile`` (``torch.compile`` of the real forward, which fuses the
memory-bound norm / activation / pooling) are the opt-in levers.

Network mode. As both reference implementations, the network stays in train mode. With
instance/group/layer norm (the default ConvNet) every image is normalised on its own, so the
batched forwards equal a per-class loop exactly (tested). With BatchNorm, train mode normalises
with the statistics of the whole forward batch, i.e. all classes together, which is what the DM
reference does for its BN networks and what DataDAM's code does for its (BatchNorm) ConvNet;
running statistics get updated but the network is discarded after the step. ``chunk_classes``
splits the real forward by classes to bound memory; with BatchNorm this changes the batch
statistics to per-chunk ones (logged once).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from condense.errors import ConfigError, NonFiniteError
from condense.ops._nn import has_batchnorm
from condense.ops.features import (
    attention_map,
    capture_features,
    feature_modules,
    pre_pool,
    resolve_layers,
)
from condense.ops.mmd import group_means, mean_sq_distance
from condense.ops.stem import fusable_stem, fused_embed_means, resolve_fuse_stem
from condense.synth._matching import IMAGE_OPTIMIZER_DEFAULTS, MatchingSynthesizer
from condense.synth.base import SynthContext, register_synthesizer
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Kernels (pure functions: used by the synthesizers, the tests and benchmarks/perf)
# --------------------------------------------------------------------------------------------


def autocast_ctx(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast on ``device``'s type when ``bf16``, a disabled one otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def feature_means(
    model: nn.Module,
    x: torch.Tensor,
    groups: int,
    *,
    modules: Sequence[nn.Module] = (),
    transform: Transform | None = None,
) -> list[torch.Tensor]:
    """One forward of a class-major batch; per-class means of the embedding and hooked maps.

    Args:
        model: network with ``embed(x) -> (N, D)``.
        x: ``(G*N, C, H, W)`` class-major images.
        groups: number of classes ``G``.
        modules: modules whose outputs are also averaged (after ``transform``).
        transform: applied to each hooked output inside the hook (e.g. an attention map).

    Returns:
        ``[embed_means (G, D)] + [means (G, D_l) for each module]``, float32 (float64 kept).
    """
    with capture_features(model, modules, transform=transform) as feats:
        emb = model.embed(x)
    if len(feats) != len(modules):
        raise ConfigError(
            f"{type(model).__name__}.embed called the {len(modules)} hooked feature modules "
            f"{len(feats)} times; feature modules must each run once per embed()"
        )
    return [group_means(emb, groups)] + [group_means(f, groups) for f in feats]


def _embed_means(model: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(G*N, C, H, W)`` -> ``(G, D)`` per-class mean embeddings (one forward)."""
    return group_means(model.embed(x), groups)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_embed_means() -> Callable[[nn.Module, torch.Tensor, int], torch.Tensor]:
    """:func:`_embed_means` through ``torch.compile`` (built once per process, lazily).

    The network is an argument, so a fresh network of the same architecture and the same
    input shape reuse the compiled code (parameters are graph inputs); the first call compiles
    (tens of seconds on a CPU).
    """
    if "embed_means" not in _COMPILED:
        _COMPILED["embed_means"] = torch.compile(_embed_means, dynamic=False)
    return _COMPILED["embed_means"]


def real_feature_means(
    model: nn.Module,
    real: torch.Tensor,
    *,
    modules: Sequence[nn.Module] = (),
    transform: Transform | None = None,
    chunk_classes: int = 0,
) -> list[torch.Tensor]:
    """:func:`feature_means` of real views under ``torch.no_grad``, optionally chunked by class.

    Args:
        real: ``(K, B, C, H, W)`` real views.
        chunk_classes: classes per forward; 0 = all ``K`` classes in one forward.

    Returns:
        As :func:`feature_means`, each ``(K, D_l)``, without autograd history.
    """
    k = real.shape[0]
    step = k if chunk_classes <= 0 else chunk_classes
    with torch.no_grad():
        parts = [
            feature_means(
                model, r.flatten(0, 1), r.shape[0], modules=modules, transform=transform
            )
            for r in real.split(step, dim=0)
        ]
    return [torch.cat(p, dim=0) for p in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]


def dm_loss(
    model: nn.Module,
    real: torch.Tensor,
    syn: torch.Tensor,
    *,
    bf16: bool = False,
    chunk_classes: int = 0,
    compile: bool = False,
    fuse_stem: bool | None = None,
) -> dict[str, torch.Tensor]:
    """DM loss ``sum_k || mean embed(real_k) - mean embed(syn_k) ||^2`` (batched over classes).

    Args:
        model: frozen network with ``embed``.
        real: ``(K, B, C, H, W)`` real views (no gradient needed).
        syn: ``(K, S, C, H, W)`` synthetic views (on the images' autograd graph).
        bf16: run both forwards under bfloat16 autocast (means and distance in float32).
        chunk_classes: classes per real forward (0 = all at once).
        compile: run the real forward through :func:`compiled_embed_means` (fuses the
            memory-bound norm/activation/pool ops; same result up to float rounding).
        fuse_stem: with ``compile``, a ConvNet's first block (conv, instance norm, ReLU, pool)
            of the real forward in one fused pass (:func:`condense.ops.stem.fused_embed_means`,
            its statistics in closed form; same result up to float rounding); other networks
            take the compiled stock forward. ``None`` = on a CPU only
            (:func:`condense.ops.stem.resolve_fuse_stem`).

    Returns:
        ``{"loss": 0-d tensor}``.
    """
    k = real.shape[0]
    with autocast_ctx(real.device, bf16):
        if compile:
            fused = resolve_fuse_stem(fuse_stem, real.device) and fusable_stem(model)
            fn = fused_embed_means if fused else compiled_embed_means()
            step = k if chunk_classes <= 0 else chunk_classes
            with torch.no_grad():
                r_emb = torch.cat([fn(model, r.flatten(0, 1), r.shape[0]) for r in real.split(step)])
        else:
            (r_emb,) = real_feature_means(model, real, chunk_classes=chunk_classes)
        (s_emb,) = feature_means(model, syn.flatten(0, 1), k)
    return {"loss": mean_sq_distance(r_emb, s_emb)}


def datadam_loss(
    model: nn.Module,
    real: torch.Tensor,
    syn: torch.Tensor,
    *,
    modules: Sequence[nn.Module],
    power: float,
    lambda_mmd: float,
    factor: float,
    bf16: bool = False,
    chunk_classes: int = 0,
) -> dict[str, torch.Tensor]:
    """DataDAM loss, batched over classes.

    ``factor * (sum_l sum_k ||mean a_l(real_k) - mean a_l(syn_k)||^2
    + lambda_mmd * sum_k ||mean embed(real_k) - mean embed(syn_k)||^2)`` with ``a_l`` the
    L2-normalised spatial attention (:func:`condense.ops.features.attention_map`) of the output
    of ``modules[l]``.

    Args:
        model: frozen network with ``embed``; ``modules`` are submodules it runs once per embed.
        real: ``(K, B, C, H, W)`` real views.
        syn: ``(K, S, C, H, W)`` synthetic views.
        modules: feature modules whose attention is matched.
        power: attention exponent ``p``.
        lambda_mmd: weight of the embedding term.
        factor: overall factor on both terms.
        bf16: bfloat16 autocast for the forwards (attention and means in float32).
        chunk_classes: classes per real forward (0 = all at once).

    Returns:
        ``{"loss", "loss_attention", "loss_embed"}`` 0-d tensors (the last two unscaled).
    """
    k = real.shape[0]
    att = partial(attention_map, power=power)
    with autocast_ctx(real.device, bf16):
        r = real_feature_means(
            model, real, modules=modules, transform=att, chunk_classes=chunk_classes
        )
        s = feature_means(model, syn.flatten(0, 1), k, modules=modules, transform=att)
    embed_term = mean_sq_distance(r[0], s[0])
    attn_term = sum((mean_sq_distance(a, b) for a, b in zip(r[1:], s[1:], strict=True)), embed_term.new_zeros(()))
    loss = factor * (attn_term + lambda_mmd * embed_term)
    return {"loss": loss, "loss_attention": attn_term, "loss_embed": embed_term}


# --------------------------------------------------------------------------------------------
# Synthesizers
# --------------------------------------------------------------------------------------------


@dataclass
class DMConfig:
    """Distribution matching. Defaults: the published protocol (METHODS.md).

    Attributes:
        iterations: outer iterations (20000 in the paper).
        lr_img: lr of the images; ``None`` = by ipc (1, or 10 from ipc 100 on).
        momentum: SGD momentum of the images (``opt_img=sgd``).
        batch_real: real images per class per iteration.
        init: ``real``, ``noise`` or ``herding`` (the herding selection, see ``init_images``).
        flip: FYI flip (each class's synthetic batch becomes ``[x; hflip(x)]``).
        dsa: siamese DSA on real and synthetic views (needs ``ctx.augment``).
        bf16: bfloat16 autocast for the network forwards.
        chunk_classes: classes per real forward, 0 = all classes in one forward (memory bound;
            with BatchNorm networks it changes batch statistics to per-chunk ones).
        compile: ``torch.compile`` the real-image forward (DM only; the first iteration pays
            the compilation, tens of seconds on a CPU).
        fuse_stem: with ``compile``, a ConvNet's first block of the real forward as one fused
            gradient-free pass (:mod:`condense.ops.stem`; ~0.65x the compiled stock forward's
            time on Fashion-MNIST on a CPU); ``None`` = on a CPU only (where it was measured),
            ``True`` / ``False`` = everywhere / never. No effect without ``compile`` or on other
            networks.
        opt_img: optimizer of the images, ``sgd`` (with ``momentum``, the paper's) or ``adam``.
        betas_img: Adam's ``[beta1, beta2]`` (``opt_img=adam`` only).
        schedule_img: lr of the images over the run's ``iterations``: ``constant`` or ``cosine``
            (to 0 at the end).
    """

    iterations: int = 20000
    lr_img: float | None = None
    momentum: float = 0.5
    batch_real: int = 256
    init: str = "real"
    flip: bool = False
    dsa: bool = True
    bf16: bool = False
    chunk_classes: int = 0
    compile: bool = False
    fuse_stem: bool | None = None
    opt_img: str = IMAGE_OPTIMIZER_DEFAULTS["opt_img"]
    betas_img: list[float] = field(default_factory=lambda: list(IMAGE_OPTIMIZER_DEFAULTS["betas_img"]))
    schedule_img: str = IMAGE_OPTIMIZER_DEFAULTS["schedule_img"]


@register_synthesizer("dm")
class DistributionMatching(MatchingSynthesizer):
    """DM: match per-class mean embeddings of real and synthetic images in random networks."""

    Config: ClassVar[type] = DMConfig
    class_parallel: ClassVar[bool] = True
    #: ``lr_img=None`` resolves to 1.0 below this ipc and 10.0 from it on.
    high_ipc: ClassVar[int] = 100

    def __init__(self, cfg: DMConfig, ctx: SynthContext) -> None:
        if cfg.lr_img is None:
            cfg = dataclasses.replace(cfg, lr_img=10.0 if ctx.ipc >= self.high_ipc else 1.0)
        super().__init__(cfg, ctx)
        self._warned_bn = False

    @classmethod
    def check_config(cls, cfg: DMConfig, ipc: int) -> None:
        checks = {
            "iterations": cfg.iterations >= 0,
            "batch_real": cfg.batch_real >= 1,
            "momentum": 0.0 <= cfg.momentum < 1.0,
            "chunk_classes": cfg.chunk_classes >= 0,
            "lr_img": cfg.lr_img is None or cfg.lr_img > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"{cls.name}: invalid {key}={getattr(cfg, key)!r} (iterations >= 0, "
                    "batch_real >= 1, 0 <= momentum < 1, chunk_classes >= 0, lr_img > 0 or null)"
                )
        cls.check_matching_config(cfg)

    # -- contract ---------------------------------------------------------------------------

    def step(self, syn: SyntheticSet, it: int) -> dict[str, float]:
        model = self.matching_model()
        real, syn_views = self.views(syn)
        terms = self.matching_loss(model, real, syn_views)
        loss = terms["loss"]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(f"{self.name}: loss became {value} at iteration {it}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_image_schedule()
        return {name: float(t.detach()) for name, t in terms.items()}

    # -- pieces -----------------------------------------------------------------------------

    def matching_model(self) -> nn.Module:
        """A fresh network (weights from ``ctx.generator``), frozen, in train mode."""
        model = self.ctx.make_model()
        model.requires_grad_(False)
        model.train()
        if self.cfg.chunk_classes and not self._warned_bn and has_batchnorm(model):
            log.warning(
                "%s: chunk_classes=%d with a BatchNorm network: real batch statistics are "
                "per chunk, not over all classes",
                self.name,
                self.cfg.chunk_classes,
            )
            self._warned_bn = True
        return model

    def matching_loss(
        self, model: nn.Module, real: torch.Tensor, syn: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one draw (``"loss"`` is minimised)."""
        return dm_loss(
            model,
            real,
            syn,
            bf16=self.cfg.bf16,
            chunk_classes=self.cfg.chunk_classes,
            compile=self.cfg.compile,
            fuse_stem=self.cfg.fuse_stem,
        )


@dataclass
class DataDAMConfig(DMConfig):
    """DataDAM: DM's fields plus attention matching (defaults from the official code/paper).

    Attributes:
        batch_real: 64 (official code).
        power: attention exponent p. The paper's hyper-parameter table says 4, the released code
            calls its attention with exponent 1; we follow the paper (4).
        layers: indices into ``model.feature_modules()`` whose attention is matched;
            ``None`` = all but the last (the last block enters through the embedding term).
        lambda_mmd: weight of the embedding (MMD) term (0.01; 0.02 at high resolution).
        factor: overall factor on both terms (100 in the code).
        pre_pool: take each selected block's map before its trailing pooling layer (the
            official code hooks the ReLU outputs, i.e. before pooling); ``False`` = the block
            output (after pooling). See :func:`condense.ops.features.pre_pool`.
    """

    batch_real: int = 64
    power: float = 4.0
    layers: list[int] | None = None
    lambda_mmd: float = 0.01
    factor: float = 100.0
    pre_pool: bool = True


@register_synthesizer("datadam")
class AttentionMatching(DistributionMatching):
    """DataDAM: DM plus matching of spatial attention maps of intermediate blocks."""

    Config: ClassVar[type] = DataDAMConfig
    high_ipc: ClassVar[int] = 51  # METHODS.md: lr_img 10 for ipc > 50

    @classmethod
    def check_config(cls, cfg: DataDAMConfig, ipc: int) -> None:
        super().check_config(cfg, ipc)
        if cfg.compile:
            raise ConfigError(
                f"{cls.name}: compile=true is not supported (its forward hooks would recompile "
                "every iteration); valid: compile=false"
            )
        if cfg.power <= 0 or cfg.lambda_mmd < 0 or cfg.factor <= 0:
            raise ConfigError(
                f"{cls.name}: invalid power={cfg.power}, lambda_mmd={cfg.lambda_mmd} or "
                f"factor={cfg.factor} (power > 0, lambda_mmd >= 0, factor > 0)"
            )

    def matching_loss(
        self, model: nn.Module, real: torch.Tensor, syn: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        modules = resolve_layers(feature_modules(model), self.cfg.layers)
        if self.cfg.pre_pool:
            modules = [pre_pool(m) for m in modules]
        return datadam_loss(
            model,
            real,
            syn,
            modules=modules,
            power=self.cfg.power,
            lambda_mmd=self.cfg.lambda_mmd,
            factor=self.cfg.factor,
            bf16=self.cfg.bf16,
            chunk_classes=self.cfg.chunk_classes,
        )


