"""Score-based coreset selection (data pruning) as synthesizers: ``grand``, ``el2n``, ``forgetting``.

Like herding, each picks ``ipc`` real images per class and optimizes nothing. Every image of the
scoring pool (a class's images, or ``pool_per_class`` random ones) gets a difficulty score (higher
= harder) from networks trained briefly on that pool through the training engine:

- ``grand`` (Paul et al. 2021): GraNd, the per-sample gradient norm of the cross-entropy w.r.t.
  all weights, averaged over ``runs`` fresh networks after ``grand_epochs`` epochs (0 = at
  initialisation, the paper's setting). ``last_layer``: DeepCore's shortcut
  ``||g|| sqrt(1 + ||h||^2)`` (``g = softmax - onehot``, ``h`` the embedding), the exact gradient
  norm of the final Linear's weight and bias.
- ``el2n`` (Paul et al. 2021): ``||softmax(f(x)) - onehot(y)||_2`` averaged over ``runs`` networks
  trained ``el2n_epochs`` epochs.
- ``forgetting`` (Toneva et al. 2019): correct -> wrong transitions of each training image,
  evaluated at every epoch end (the engine's epoch callback; it has no per-batch callback), over
  ``forgetting_epochs`` epochs, averaged over ``runs``; an image never classified correctly
  counts ``forgetting_epochs + 1`` (more than any number of events).

Per class, ``keep`` takes the hardest (the papers' choice), the easiest, or ``stratified``
(coverage-centric, CCS, Zheng et al. 2023): ``ipc`` equal-width score strata, the budget spread
over them (one image per stratum where none is empty). ``prune_hard_fraction`` first drops
that fraction of a class's hardest images (CCS's beta). Ties are broken in a random order drawn
from ``ctx.generator``, like every other draw here: the selection is deterministic given the seed.

The scores are cached per dataset, pool, recipe and seed (safetensors under ``ctx.cache_dir``,
like herding's feature net). As herding does for its feature net, scoring happens while the
starting set is built (``init_set``, on the distillation clock): it is the method's whole cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import Tensor, nn

from condense.errors import ConfigError
from condense.ops import BACKENDS as GRAD_BACKENDS
from condense.ops import per_sample_grad_norms
from condense.provenance import atomic_write_bytes
from condense.synth._matching import new_synthetic_set, require_augmenter
from condense.synth.base import SynthContext, Synthesizer, register_synthesizer
from condense.train import EpochState, TrainCallback
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

KEEPS = ("hardest", "easiest", "stratified")
#: Bumped when a score's computation changes, so that no stale cached scores are reused.
SCORE_VERSION = 1


# ----------------------------------------------------------------------------- configs


@dataclass
class PruningConfig:
    """What the three scores share.

    Attributes:
        keep: ``hardest`` | ``easiest`` | ``stratified`` (per class, see the module docstring).
        prune_hard_fraction: drop this fraction of a class's hardest images before choosing
            (CCS's beta; at most all but ``ipc``), in ``[0, 1)``.
        runs: independently seeded networks whose scores are averaged.
        pool_per_class: 0: score every training image; N: ``max(N, ipc)`` random images per
            class (the scoring networks train on that pool).
        score_model: the scoring network (``condense.models`` registry, the run's model kwargs).
        train_lr / train_batch: the networks' SGD (momentum 0.9, wd 5e-4, constant lr).
        dsa: DSA augmentation while the networks train (off: the papers train without it).
        score_batch: images per scoring forward / per-sample-gradient call.
        bf16: bfloat16 autocast of training and forward-only scoring (the run's precision);
            per-sample gradient norms are always float32.
    """

    iterations: int = 0
    keep: str = "hardest"
    prune_hard_fraction: float = 0.0
    runs: int = 10
    pool_per_class: int = 0
    score_model: str = "convnet"
    train_lr: float = 0.01
    train_batch: int = 256
    dsa: bool = False
    score_batch: int = 512
    bf16: bool = False


@dataclass
class GraNdConfig(PruningConfig):
    """``grand_epochs``: training before scoring (0 = at initialisation); ``last_layer``: the
    final Linear's gradient only (DeepCore); ``grad_backend``: of
    :func:`condense.ops.per_sample_grad_norms`."""

    grand_epochs: int = 0
    last_layer: bool = False
    grad_backend: str = "auto"


@dataclass
class EL2NConfig(PruningConfig):
    """``el2n_epochs``: training before scoring (the paper: 20)."""

    el2n_epochs: int = 20


@dataclass
class ForgettingConfig(PruningConfig):
    """``forgetting_epochs``: the training whose epoch ends are evaluated (the paper: 200)."""

    runs: int = 1
    forgetting_epochs: int = 200


# ----------------------------------------------------------------------------- scores


def el2n_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` error-vector norms ``||softmax(logits) - onehot(labels)||_2`` in float32.

    Args:
        logits: ``(B, classes)``.
        labels: ``(B,)`` int64.
    """
    p = F.softmax(logits.float(), dim=-1)
    return (p - F.one_hot(labels, p.shape[-1]).to(p.dtype)).norm(dim=-1)


def last_layer_grad_norms(embedding: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` norm of each sample's cross-entropy gradient w.r.t. the final Linear's weight and
    bias: ``||g|| sqrt(1 + ||h||^2)`` with ``g = softmax(logits) - onehot`` (``dloss/dlogits``) and
    ``h`` the embedding (the weight's gradient is ``g h^T``, the bias's ``g``).

    Args:
        embedding: ``(B, D)`` the classifier's input.
        logits: ``(B, classes)``.
        labels: ``(B,)`` int64.
    """
    h2 = embedding.float().pow(2).sum(-1)
    return el2n_scores(logits, labels) * (1.0 + h2).sqrt()


def forgetting_events(correct: Tensor) -> Tensor:
    """``(N,)`` forgetting scores from ``correct`` ``(T, N)`` bool (evaluation t of image n).

    The number of ``t`` with ``correct[t - 1]`` and not ``correct[t]``; an image never correct
    scores ``T + 1`` (the most forgettable: more than the at most ``T // 2`` events possible).
    """
    c = correct.bool()
    events = (c[:-1] & ~c[1:]).sum(0).float()
    return torch.where(c.any(0), events, torch.full_like(events, float(c.shape[0] + 1)))


@contextmanager
def _classifier_input(model: nn.Module) -> Iterator[list[Tensor]]:
    """Records the input of ``model``'s last ``nn.Linear`` during forwards; removes its hook."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"grand: last_layer=true needs a final nn.Linear; {type(model).__name__} has none "
                          "(use last_layer=false)")
    seen: list[Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def embedding_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``((B, D) embedding, (B, classes) logits)``: ``model.embed`` / ``model.classifier`` of a
    zoo network, else a hook on the input of the last ``nn.Linear``."""
    if callable(getattr(model, "embed", None)) and isinstance(getattr(model, "classifier", None), nn.Linear):
        h = model.embed(x)
        return h, model.classifier(h)
    with _classifier_input(model) as seen:
        logits = model(x)
    return seen[-1].flatten(1), logits


def grad_norms(model: nn.Module, x: Tensor, y: Tensor, backend: str = "auto") -> Tensor:
    """``(B,)`` per-sample norms of the cross-entropy gradient w.r.t. every trainable weight."""
    return per_sample_grad_norms(model, x, y, loss="ce", backend=backend)


# ----------------------------------------------------------------------------- selection


def _stratified(scores: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """CCS's budget allocation: ``k`` equal-width strata over ``scores`` ``(n,)``; visiting them from
    the smallest, each gives ``min(size, budget left // strata left)`` images drawn at random."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi > lo:
        bins = ((scores.double() - lo) / (hi - lo) * k).floor().long().clamp_(0, k - 1)
    else:
        bins = torch.zeros_like(scores, dtype=torch.long)
    strata = [torch.nonzero(bins == j).flatten() for j in range(k)]
    strata = sorted((s for s in strata if s.numel()), key=lambda s: s.numel())  # stable: ties by stratum
    chosen, budget = [], k
    for i, members in enumerate(strata):
        take = min(members.numel(), budget // (len(strata) - i))
        r = torch.randperm(members.numel(), generator=generator, device=generator.device)[:take]
        chosen.append(members[r.to(members.device)])
        budget -= take
    return torch.cat(chosen)


def select_by_scores(scores: Tensor, k: int, keep: str, generator: torch.Generator,
                     prune_hard_fraction: float = 0.0) -> Tensor:
    """``(k,)`` distinct positions into ``scores`` ``(n,)`` (higher = harder), hardest first.

    Args:
        keep: ``hardest`` (the ``k`` highest scores), ``easiest`` (the ``k`` lowest) or
            ``stratified`` (one per equal-width score stratum where none is empty; CCS).
        generator: breaks ties (a random order of equal scores) and draws within strata.
        prune_hard_fraction: the ``floor(fraction * n)`` hardest are dropped first (at most
            ``n - k``).
    """
    n = scores.numel()
    if keep not in KEEPS:
        raise ConfigError(f"unknown keep {keep!r}; valid choices: {', '.join(KEEPS)}")
    if not 1 <= k <= n:
        raise ConfigError(f"cannot keep {k} of {n} scored images; need 1 <= ipc <= {n}")
    perm = torch.randperm(n, generator=generator, device=generator.device).to(scores.device)
    order = perm[torch.argsort(scores[perm], descending=True, stable=True)]  # hardest first
    order = order[min(int(prune_hard_fraction * n), n - k):]
    if keep == "hardest":
        return order[:k]
    if keep == "easiest":
        return order[-k:]
    picked = order[_stratified(scores[order], k, generator).to(order.device)]
    return picked[torch.argsort(scores[picked], descending=True, stable=True)]


# ----------------------------------------------------------------------------- the synthesizers


class CorrectnessLog(TrainCallback):
    """At every epoch end, which images each model classifies correctly (``history``: one
    ``(K, N)`` bool per epoch). Observes only: the models go back to their training mode."""

    def __init__(self, images: Tensor, labels: Tensor, batch: int, bf16: bool) -> None:
        self.images, self.labels, self.batch, self.bf16 = images, labels, batch, bf16
        self.history: list[Tensor] = []

    @torch.no_grad()
    def on_epoch_end(self, state: EpochState) -> None:
        rows = []
        for m in state.models:
            was = m.training
            m.eval()
            try:
                rows.append(torch.cat([_logits(m, self.images[i:i + self.batch], self.bf16).argmax(-1)
                                       == self.labels[i:i + self.batch]
                                       for i in range(0, self.images.shape[0], self.batch)]))
            finally:
                m.train(was)
        self.history.append(torch.stack(rows).cpu())


def _logits(model: nn.Module, x: Tensor, bf16: bool) -> Tensor:
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def _stats(v: Tensor) -> dict[str, float]:
    v = v.double()
    return {"mean": round(float(v.mean()), 6), "min": round(float(v.min()), 6),
            "max": round(float(v.max()), 6), "n": int(v.numel())}


class _ScoreSelection(Synthesizer):
    """Scores the pool (or loads the scores), then keeps ``ipc`` per class by ``cfg.keep``."""

    Config: ClassVar[type] = PruningConfig
    epochs_field: ClassVar[str] = ""  # the Config field holding the networks' training epochs
    min_epochs: ClassVar[int] = 0

    def __init__(self, cfg: Any, ctx: SynthContext) -> None:
        type(self).check_config(cfg, ctx.ipc)
        require_augmenter(self.name, cfg.dsa, ctx)
        super().__init__(cfg, ctx)

    @classmethod
    def check_config(cls, cfg: Any, ipc: int) -> None:
        choices = [("keep", cfg.keep, KEEPS)]
        if hasattr(cfg, "grad_backend"):
            choices.append(("grad_backend", cfg.grad_backend, GRAD_BACKENDS))
        for key, value, valid in choices:
            if value not in valid:
                raise ConfigError(f"{cls.name}: unknown {key} {value!r}; valid choices: {', '.join(valid)}")
        epochs, least = cls.epochs_field, cls.min_epochs
        checks = {"iterations": cfg.iterations == 0, "runs": cfg.runs >= 1, epochs: getattr(cfg, epochs) >= least,
                  "prune_hard_fraction": 0 <= cfg.prune_hard_fraction < 1, "pool_per_class": cfg.pool_per_class >= 0,
                  "train_lr": cfg.train_lr > 0, "train_batch": cfg.train_batch >= 1,
                  "score_batch": cfg.score_batch >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{cls.name}: invalid {key}={getattr(cfg, key)!r} (iterations = 0, runs >= 1, "
                                  f"{epochs} >= {least}, 0 <= prune_hard_fraction < 1, pool_per_class >= 0, "
                                  "train_lr > 0, train_batch >= 1, score_batch >= 1)")

    # -- pool and networks ---------------------------------------------------------------------

    def _pool(self) -> tuple[Tensor | None, list[Tensor]]:
        """``(rows, members)``: the scored images' dataset rows (``None`` = all, in file order) and
        each class's positions among them."""
        ctx = self.ctx
        if not self.cfg.pool_per_class:
            return None, [ctx.index.indices_of(c) for c in range(ctx.spec.num_classes)]
        n = min(max(self.cfg.pool_per_class, ctx.ipc), ctx.index.min_count)
        pool = ctx.index.sample(n, ctx.generator)  # (K, n)
        return pool.reshape(-1), list(torch.arange(pool.numel(), device=pool.device).view(pool.shape))

    def seeds(self) -> list[int]:
        """The networks' seeds, drawn from the run's seed (the first ``r`` do not depend on ``runs``)."""
        g = torch.Generator().manual_seed(self.ctx.seed)
        return [int(s) for s in torch.randint(0, 2**62, (self.cfg.runs,), generator=g)]

    def train_networks(self, x: Tensor, y: Tensor, epochs: int, callbacks: tuple[TrainCallback, ...] = ()) -> list[nn.Module]:
        """``runs`` networks trained ``epochs`` on ``(x (N, C, H, W), y (N,))``, in eval mode."""
        from condense.models import model_factory
        from condense.train import FitConfig, fit

        ctx, c = self.ctx, self.cfg
        make = model_factory(c.score_model, ctx.spec, ctx.device, **ctx.model_kwargs)
        fcfg = FitConfig(epochs=epochs, lr=c.train_lr, batch_size=c.train_batch, schedule="constant", bf16=c.bf16)
        augment = (lambda b, g: ctx.augment(b, g)) if c.dsa else None
        log.info("%s: training %d network(s) for %d epoch(s) on %d images", self.name, c.runs, epochs, x.shape[0])
        models = fit(make, (x, y), fcfg, seeds=self.seeds(), augment=augment, callbacks=callbacks,
                     vectorize=ctx.device.type == "cuda").models
        return [m.eval() for m in models]

    def batches(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.cfg.score_batch
        for i in range(0, x.shape[0], b):
            yield x[i:i + b], y[i:i + b]

    def compute_scores(self, x: Tensor, y: Tensor) -> Tensor:
        """``(N,)`` float32 scores of ``(x (N, C, H, W), y (N,))`` (higher = harder)."""
        raise NotImplementedError

    def mean_score(self, x: Tensor, y: Tensor, epochs: int,
                   score: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Tensor:
        """``(N,)`` mean over the ``runs`` networks (trained ``epochs``) of ``score(model, xb, yb)``
        computed in ``score_batch`` batches."""
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for model in self.train_networks(x, y, epochs):
            total += torch.cat([score(model, xb, yb).double() for xb, yb in self.batches(x, y)])
        return (total / self.cfg.runs).float()

    # -- cache ---------------------------------------------------------------------------------

    def cache_path(self, rows: Tensor | None) -> Path | None:
        ctx = self.ctx
        if ctx.cache_dir is None:
            return None
        recipe = {k: v for k, v in self.config_dict().items()
                  if k not in ("iterations", "keep", "prune_hard_fraction", "score_batch")}
        pool = "all" if rows is None else hashlib.sha256(rows.cpu().numpy().tobytes()).hexdigest()
        blob = json.dumps({"v": SCORE_VERSION, "method": self.name, "dataset": ctx.spec.name,
                           "n": int(ctx.data.train_images.shape[0]), "kw": ctx.model_kwargs, "seed": ctx.seed,
                           "recipe": recipe, "pool": pool}, sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return Path(ctx.cache_dir) / f"scores-{ctx.spec.name}-{self.name}-{key}.safetensors"

    def scores(self, rows: Tensor | None) -> tuple[Tensor, bool, float]:
        """``(scores (N,), from_cache, seconds)`` of the pool ``rows`` (``None`` = every image)."""
        t0 = time.perf_counter()
        path = self.cache_path(rows)
        if path is not None and path.exists():
            log.info("%s: loaded cached scores %s", self.name, path)
            return load(path.read_bytes())["scores"].to(self.ctx.device), True, time.perf_counter() - t0
        d = self.ctx.data
        x, y = (d.train_images, d.train_labels) if rows is None else (d.train_images[rows], d.train_labels[rows])
        s = self.compute_scores(x, y).float()
        if path is not None:
            atomic_write_bytes(path, save({"scores": s.detach().cpu().contiguous()}))
        return s, False, time.perf_counter() - t0

    # -- the set -------------------------------------------------------------------------------

    def init_set(self) -> SyntheticSet:
        ctx, c = self.ctx, self.cfg
        rows, members = self._pool()
        scores, cached, secs = self.scores(rows)
        picked = []
        for pos in members:
            local = select_by_scores(scores[pos], ctx.ipc, c.keep, ctx.generator, c.prune_hard_fraction)
            picked.append(pos[local.to(pos.device)])
        where = torch.cat(picked)
        idx = where if rows is None else rows[where]
        syn = new_synthetic_set(ctx, ctx.data.train_images[idx].clone(), self.name, self.config_dict())
        syn.meta.extra["selected_indices"] = idx.cpu().tolist()
        syn.meta.extra["scores"] = {"score": self.name, "higher": "harder", "pool": _stats(scores),
                                    "selected": _stats(scores[where]), "cached": cached, "seconds": round(secs, 3)}
        log.info("%s: kept %d images per class (%s) from %d scored in %.1f s%s", self.name, ctx.ipc, c.keep,
                 scores.numel(), secs, " (cached)" if cached else "")
        return syn


@register_synthesizer("grand")
class GraNd(_ScoreSelection):
    """GraNd: the expected per-sample gradient norm early in training (module docstring)."""

    Config: ClassVar[type] = GraNdConfig
    epochs_field = "grand_epochs"

    def compute_scores(self, x: Tensor, y: Tensor) -> Tensor:
        return self.mean_score(x, y, self.cfg.grand_epochs, self.score)

    def score(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        c = self.cfg
        if not c.last_layer:
            return grad_norms(model, x, y, c.grad_backend)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            h, z = embedding_and_logits(model, x)
        return last_layer_grad_norms(h, z, y)


@register_synthesizer("el2n")
class EL2N(_ScoreSelection):
    """EL2N: the expected error-vector norm after ``el2n_epochs`` (module docstring)."""

    Config: ClassVar[type] = EL2NConfig
    epochs_field = "el2n_epochs"

    def compute_scores(self, x: Tensor, y: Tensor) -> Tensor:
        return self.mean_score(x, y, self.cfg.el2n_epochs, self.score)

    @torch.no_grad()
    def score(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return el2n_scores(_logits(model, x, self.cfg.bf16), y)


@register_synthesizer("forgetting")
class Forgetting(_ScoreSelection):
    """Forgetting events over training, evaluated at every epoch end (module docstring)."""

    Config: ClassVar[type] = ForgettingConfig
    epochs_field = "forgetting_epochs"
    min_epochs = 1  # events need evaluations

    def compute_scores(self, x: Tensor, y: Tensor) -> Tensor:
        c = self.cfg
        record = CorrectnessLog(x, y, c.score_batch, c.bf16)
        self.train_networks(x, y, c.forgetting_epochs, callbacks=(record,))
        correct = torch.stack(record.history)  # (T, runs, N)
        per_run = torch.stack([forgetting_events(correct[:, r]) for r in range(correct.shape[1])])
        return per_run.double().mean(0).float().to(x.device)
