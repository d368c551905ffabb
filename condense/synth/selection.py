"""Coreset selection baselines as synthesizers: ``random``, ``herding``, ``kcenter``.

Herding and k-center select in the embedding space of a ConvNet trained briefly on the real
data. That network is cached per dataset, architecture, seed and training recipe (safetensors,
never pickled) under ``ctx.cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from condense.errors import ConfigError
from condense.provenance import atomic_write_bytes
from condense.synth._matching import new_synthetic_set
from condense.synth.base import SynthContext, Synthesizer, register_synthesizer
from condense.types import SyntheticSet

log = logging.getLogger(__name__)


@register_synthesizer("random")
class RandomSelection(Synthesizer):
    """``ipc`` distinct real images per class, drawn uniformly from ``ctx.generator``."""

    @dataclass
    class Config:
        iterations: int = 0

    def init_set(self) -> SyntheticSet:
        idx = self.ctx.index.sample(self.ctx.ipc, self.ctx.generator).reshape(-1)
        images = self.ctx.data.train_images[idx].clone()
        syn = new_synthetic_set(self.ctx, images, self.name, self.config_dict())
        syn.meta.extra["selected_indices"] = idx.cpu().tolist()
        return syn


@dataclass
class FeatureNetConfig:
    """The briefly trained network whose embedding herding / k-center select in."""

    iterations: int = 0
    feature_model: str = "convnet"
    feature_epochs: int = 2
    feature_train_size: int = 0  # 0 = the whole training set, else a class-balanced subset
    feature_lr: float = 0.01
    embed_batch: int = 1024
    pool_per_class: int = 0  # 0: select among every training image of the class; else a random pool


def _cache_key(ctx: SynthContext, cfg: FeatureNetConfig) -> str:
    blob = json.dumps({"dataset": ctx.spec.name, "n": int(ctx.data.train_images.shape[0]),
                       "model": cfg.feature_model, "kw": ctx.model_kwargs, "epochs": cfg.feature_epochs,
                       "train_size": cfg.feature_train_size, "lr": cfg.feature_lr, "seed": ctx.seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_feature_net(ctx: SynthContext, cfg: FeatureNetConfig) -> nn.Module:
    """A network trained ``feature_epochs`` on the real data; loaded from the cache if present."""
    from condense.models import model_factory
    from condense.train import FitConfig, fit

    spec = ctx.spec
    make = model_factory(cfg.feature_model, spec, ctx.device, **ctx.model_kwargs)

    path = None
    if ctx.cache_dir is not None:
        path = Path(ctx.cache_dir) / f"featnet-{spec.name}-{cfg.feature_model}-{_cache_key(ctx, cfg)}.safetensors"
        if path.exists():
            model = make(torch.Generator())
            model.load_state_dict(load_file(str(path), device=str(ctx.device)))
            log.info("loaded cached feature network %s", path)
            return model.eval()
    x, y = ctx.data.train_images, ctx.data.train_labels
    if cfg.feature_train_size:
        per = max(1, cfg.feature_train_size // spec.num_classes)
        g = torch.Generator(device=ctx.generator.device)
        g.manual_seed(ctx.seed)
        idx = ctx.index.sample(min(per, ctx.index.min_count), g).reshape(-1)
        x, y = x[idx], y[idx]
    tcfg = FitConfig(epochs=cfg.feature_epochs, lr=cfg.feature_lr, schedule="constant")
    log.info("training the feature network (%s, %d epochs on %d images)", cfg.feature_model,
             cfg.feature_epochs, x.shape[0])
    model = fit(make, (x, y), tcfg, seeds=[ctx.seed]).models[0].eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
    return model


@torch.no_grad()
def embed_all(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``(N, D)`` embeddings of ``images`` ``(N,C,H,W)``."""
    model.eval()
    return torch.cat([model.embed(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def herding_select(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding: indices (k,) whose running mean tracks the mean of ``feats`` (N, D)."""
    mu = feats.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    for t in range(k):
        cand = (running.unsqueeze(0) + feats) / (t + 1)
        dist = (cand - mu).pow(2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += feats[i]
    return torch.tensor(chosen, device=feats.device)


def kcenter_select(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center: start at the point nearest the mean, then add the farthest point.

    A chosen point is never chosen again, also among duplicates (every remaining distance 0).
    """
    mu = feats.mean(0, keepdim=True)
    first = int(torch.cdist(feats, mu).squeeze(1).argmin())
    chosen = [first]
    mind = torch.cdist(feats, feats[first:first + 1]).squeeze(1)
    mind[first] = -1.0
    for _ in range(1, k):
        i = int(mind.argmax())
        chosen.append(i)
        mind = torch.minimum(mind, torch.cdist(feats, feats[i:i + 1]).squeeze(1))
        mind[i] = -1.0
    return torch.tensor(chosen, device=feats.device)


def select_indices(ctx: SynthContext, cfg: FeatureNetConfig,
                   select: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Class-major training-set indices, ``ctx.ipc`` per class, chosen by ``select`` in the embedding
    of the feature network ``cfg`` (trained or loaded from the cache)."""
    model = trained_feature_net(ctx, cfg)
    pool = None
    if cfg.pool_per_class:
        n = min(cfg.pool_per_class, ctx.index.min_count)
        pool = ctx.index.sample(n, ctx.generator)  # (K, n)
    return select_by_features(ctx, lambda x: embed_all(model, x, cfg.embed_batch), select, pool)


def select_by_features(ctx: SynthContext, features: Callable[[torch.Tensor], torch.Tensor],
                       select: Callable[[torch.Tensor, int], torch.Tensor],
                       pool: torch.Tensor | None = None) -> torch.Tensor:
    """Class-major indices, ``ctx.ipc`` per class: ``select(features(class images), ipc)``.

    Args:
        features: ``images (n, C, H, W) -> (n, D)`` (an embedding, an expert's logits, ...).
        pool: ``(K, n)`` candidate indices per class; ``None`` = every image of the class.
    """
    picked = []
    for c in range(ctx.spec.num_classes):
        idx_c = ctx.index.indices_of(c) if pool is None else pool[c]
        picked.append(idx_c[select(features(ctx.data.train_images[idx_c]), ctx.ipc)])
    return torch.cat(picked)


def kmeans(feats: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: ``(k, D)`` centres of ``feats`` ``(N, D)``.

    Deterministic given ``generator``; an emptied cluster keeps its previous centre.
    """
    n = feats.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"kmeans: k={k} clusters need 1 <= k <= {n} points")
    x = feats.double()
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centres = [x[first]]
    d2 = (x - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        w = d2.clamp_min(0)
        i = int(torch.multinomial(w / w.sum(), 1, generator=generator)) if float(w.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=generator, device=generator.device))
        centres.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = c.clone()
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled].unsqueeze(1).double()
        if torch.equal(new, c):
            break
        c = new
    return c.to(feats.dtype)


def kmeans_select(feats: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct representatives: k-means into ``k`` clusters, then for each centre (in
    order) the nearest point not taken yet. AST's representative initialisation, for any ``k``."""
    centres = kmeans(feats, k, generator)
    dist = torch.cdist(feats.double(), centres.double())  # (N, k)
    taken = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    chosen = []
    for j in range(k):
        d = dist[:, j].clone()
        d[taken] = float("inf")
        i = int(d.argmin())
        chosen.append(i)
        taken[i] = True
    return torch.tensor(chosen, device=feats.device)


# The feature network behind ``init=herding`` of the matching synthesizers: the cpu budget's
# herding recipe (3 epochs on 10000 images, ~40 s on 2 cores, cached per dataset and seed).
INIT_FEATURES = FeatureNetConfig(feature_epochs=3, feature_train_size=10000)


def herding_init_indices(ctx: SynthContext) -> torch.Tensor:
    """The herding selection that ``init=herding`` starts a synthetic set from."""
    return select_indices(ctx, INIT_FEATURES, herding_select)


def kmeans_init_indices(ctx: SynthContext,
                        features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``init=kmeans``: per class, the real images nearest ``ipc`` k-means centres of their
    features (default: the herding feature network's embedding; the trajectory family passes
    an expert's logits, AST's representative initialisation)."""
    def select(f: torch.Tensor, k: int) -> torch.Tensor:
        return kmeans_select(f, k, ctx.generator)

    if features is None:
        return select_indices(ctx, INIT_FEATURES, select)
    return select_by_features(ctx, features, select)


class _EmbeddingSelection(Synthesizer):
    Config = FeatureNetConfig
    select = staticmethod(herding_select)

    def init_set(self) -> SyntheticSet:
        idx = select_indices(self.ctx, self.cfg, type(self).select)
        syn = new_synthetic_set(self.ctx, self.ctx.data.train_images[idx].clone(), self.name, self.config_dict())
        syn.meta.extra["selected_indices"] = idx.cpu().tolist()
        return syn


@register_synthesizer("herding")
class Herding(_EmbeddingSelection):
    select = staticmethod(herding_select)


@register_synthesizer("kcenter")
class KCenter(_EmbeddingSelection):
    select = staticmethod(kcenter_select)


def config_fields(cls: type[Synthesizer]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls.Config)]
