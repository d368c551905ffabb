"""The one training engine: ``fit`` trains one or K networks and returns them trained.

Every network condense trains goes through :func:`fit`: evaluation models, DC/DSA inner
updates, feature nets of herding / k-center, teachers and expert trajectories.

K models of one architecture train side by side. Where the architecture allows (no
BatchNorm) and ``vectorize`` is asked, they run as ONE model: their parameters are stacked
(``torch.func.stack_module_state``) and the forward is ``vmap(functional_call)``; the optimizers
are elementwise, so one optimizer over the stacked tensors is exactly K independent ones.
Otherwise each model has its own optimizer and the models take turns epoch by epoch (the same
numbers as training them one after another). Each model owns a generator (initialisation through
a factory, shuffling, augmentation), so both paths give the same models for the same seeds, and
the returned modules always hold the trained weights.

Data-parallel (:class:`DataShard`): several processes train ONE model on a data set split
between them (the DC/DSA inner loop of a class-parallel run); each draws what one process draws
for the whole set, trains on the batch members it holds, and the gradients are summed across
the processes before every step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from condense.errors import ConfigError
from condense.train.config import FitConfig, loss_scale, lr_at, make_optimizer

log = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]
TargetsFn = Callable[[Tensor, Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ModelsArg = nn.Module | Sequence[nn.Module] | Callable[[torch.Generator], nn.Module]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (its train-mode output depends on the batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _float_logits(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def per_model_loss(logits: Tensor, targets: Tensor, cfg: FitConfig, loss_fn: LossFn | None = None) -> Tensor:
    """``(K,)`` mean loss of each model.

    Args:
        logits: ``(K, b, classes)``.
        targets: ``(K, b)`` int64 labels or ``(K, b, classes)`` soft-target logits.
        loss_fn: ``(logits (b, classes), targets (b, ...)) -> scalar``, replaces ``cfg.loss``.
    """
    logits = _float_logits(logits)
    k, b, c = logits.shape
    if loss_fn is not None:
        return torch.stack([loss_fn(logits[i], targets[i]) for i in range(k)])
    kind = cfg.loss if cfg.loss != "auto" else ("kl" if targets.dim() == 3 else "ce")
    if kind == "ce":
        if targets.dim() != 2 or targets.dtype != torch.long:
            raise ConfigError(f"train: loss 'ce' needs int64 labels (N,), got {tuple(targets.shape[1:])} "
                              f"{targets.dtype}; use loss 'kl' for soft targets")
        ce = F.cross_entropy(logits.reshape(k * b, c), targets.reshape(-1), reduction="none")
        return ce.view(k, b).sum(1) / b
    if targets.dim() != 3:
        raise ConfigError("train: loss 'kl' needs soft targets (N, classes) (logits); got hard labels")
    t = cfg.temperature
    log_p = F.log_softmax(logits / t, dim=-1)
    q = F.softmax(targets.to(log_p.dtype) / t, dim=-1)
    kl = F.kl_div(log_p, q, reduction="none").sum(-1)
    return kl.sum(1) * (t * t) / b


class Stack:
    """K models of one architecture behind ``forward(x (K, b, ...)) -> (K, b, classes)``.

    ``vectorized``: the parameters live stacked in :attr:`params` (leading dimension K) and
    :meth:`sync` copies them back into the modules; otherwise the modules are used as they are.
    """

    def __init__(self, models: Sequence[nn.Module], vectorize: bool) -> None:
        self.models = list(models)
        self.vectorized = bool(vectorize) and len(self.models) > 1
        if self.vectorized:
            params, buffers = stack_module_state(self.models)
            self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            self.buffers = buffers
            base = copy.deepcopy(self.models[0]).to("meta")

            def f(p: dict, bufs: dict, x: Tensor) -> Tensor:
                return functional_call(base, (p, bufs), (x,))

            self._own = vmap(f, in_dims=(0, 0, 0))
            self._shared = vmap(f, in_dims=(0, 0, None))

    def parameters(self) -> list[Tensor]:
        if self.vectorized:
            return list(self.params.values())
        return [p for m in self.models for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool) -> None:
        for m in self.models:
            m.train(mode)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(K, b, C, H, W)``: model k sees ``x[k]``."""
        if self.vectorized:
            return self._own(self.params, self.buffers, x)
        return torch.stack([m(x[i]) for i, m in enumerate(self.models)])

    def forward_shared(self, x: Tensor) -> Tensor:
        """``x`` ``(b, C, H, W)`` seen by every model -> ``(K, b, classes)``."""
        if self.vectorized:
            return self._shared(self.params, self.buffers, x)
        return torch.stack([m(x) for m in self.models])

    @torch.no_grad()
    def sync(self) -> list[nn.Module]:
        """Copy the stacked parameters and buffers into the modules; return the modules."""
        if self.vectorized:
            for k, m in enumerate(self.models):
                for name, p in m.named_parameters():
                    p.copy_(self.params[name][k])
                for name, b in m.named_buffers():
                    if name in self.buffers:
                        b.copy_(self.buffers[name][k])
        return self.models

    def load_modules(self) -> None:
        """The reverse of :meth:`sync`: modules -> stacked parameters (after a resume)."""
        if self.vectorized:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(torch.stack([dict(m.named_parameters())[name] for m in self.models]))


class TrainCallback:
    """Observes training; never changes the loss. Subclass and override what you need."""

    def on_fit_start(self, state: EpochState) -> None: ...

    def on_epoch_end(self, state: EpochState) -> None: ...


@dataclass
class EpochState:
    """What a callback sees: the epochs finished and the models in their current state."""

    epoch: int
    epochs: int
    _stack: Stack
    _optimizers: list[torch.optim.Optimizer]
    _generators: list[torch.Generator]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def models(self) -> list[nn.Module]:
        """The K current models (synchronized from the stacked parameters when vectorized)."""
        return self._stack.sync()

    def flat_params(self, k: int) -> Tensor:
        """``(P,)`` model ``k``'s parameters flattened in ``named_parameters()`` order (a copy)."""
        if self._stack.vectorized:
            return torch.cat([p[k].detach().reshape(-1) for p in self._stack.params.values()]).clone()
        return torch.cat([p.detach().reshape(-1) for p in self._stack.models[k].parameters()]).clone()

    def checkpoint(self) -> dict[str, Any]:
        """Everything :func:`fit` needs to continue after this epoch with the same bytes.

        Tensors and plain values only (``torch.load(..., weights_only=True)`` reads it).
        """
        models = self.models
        return {"epoch": self.epoch,
                "models": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models],
                "optimizers": [copy.deepcopy(o.state_dict()) for o in self._optimizers],
                "generators": [g.get_state() for g in self._generators],
                "history": copy.deepcopy(self.history)}


@dataclass(frozen=True)
class DataShard:
    """This process's part of a data-parallel :func:`fit` of ONE model over ``total`` rows.

    Every process draws what a one-process fit over all ``total`` rows draws (the epoch's
    shuffle, the augmentation parameters of every batch member), keeps the batch members it
    holds, weights their loss by ``1 / batch size`` of the WHOLE batch, and ``reduce`` sums the
    processes' gradients before each optimizer step. The steps are those of one process up to the
    order of float sums; the models stay identical on every process.

    Attributes:
        rows: ``(n,)`` int64: the global row of each row of the ``images`` passed to :func:`fit`.
        total: rows of the whole data set (over all processes).
        reduce: sums a list of gradient tensors over the processes, in place.
    """

    rows: Tensor
    total: int
    reduce: Callable[[list[Tensor]], None]


@dataclass
class FitResult:
    """Trained modules and one history entry per epoch ``{"epoch", "loss": [per model], "lr"}``."""

    models: list[nn.Module]
    history: list[dict[str, Any]]


def _generators(n: int, seeds: Sequence[int] | None, generators: Sequence[torch.Generator] | None
                ) -> list[torch.Generator]:
    if generators is not None:
        gens = list(generators)
    elif seeds is not None:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    else:
        raise ConfigError("fit: pass seeds=[...] or generators=[...] (one per model)")
    if n >= 0 and len(gens) != n:
        raise ConfigError(f"fit: {len(gens)} seeds/generators for {n} models; give one per model")
    return gens


def _models(models: ModelsArg, gens: list[torch.Generator]) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    if callable(models) and not isinstance(models, Sequence):
        return [models(g) for g in gens]
    return list(models)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def fit(
    models: ModelsArg,
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    cfg: FitConfig,
    *,
    seeds: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    augment: Augment | None = None,
    targets_fn: TargetsFn | None = None,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[TrainCallback] = (),
    vectorize: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    resume: dict[str, Any] | None = None,
    shard: DataShard | None = None,
) -> FitResult:
    """Train one or K models.

    Args:
        models: a module, a list of K modules, or a factory ``make(generator) -> module`` called
            once per seed with that model's generator (its initialisation draws from it).
        data: ``(images (N, C, H, W), targets)`` tensors on the training device, targets
            ``(N,)`` int64 or ``(N, classes)`` soft-target logits; or an iterable of ``(x, y)``
            batches re-iterated every epoch (one model, no vectorization).
        cfg: optimizer, schedule, loss, epochs, batch size, precision.
        seeds / generators: one per model; the generator drives shuffling and augmentation.
        augment: ``augment(x (b, C, H, W), generator) -> x'`` per batch (e.g. a DSA instance).
        targets_fn: ``(x' (b, C, H, W), y (b, ...)) -> targets`` of the augmented batch (e.g. a
            teacher's logits on that crop); replaces the batch's stored targets.
        loss_fn: ``(logits (b, classes), targets) -> scalar`` instead of ``cfg.loss``.
        callbacks: :class:`TrainCallback` observers (``on_fit_start``, ``on_epoch_end``).
        vectorize: train K models without BatchNorm as one vmapped model.
        optimizer: continue with this optimizer (one model); the learning rate is left as it is
            under a constant schedule without warm-up.
        resume: a :meth:`EpochState.checkpoint`: continue after its epoch (same bytes as an
            uninterrupted run of the same call).
        shard: train one model data-parallel with other processes (:class:`DataShard`); ``data``
            are this process's rows, ``augment`` must have ``sample(n, generator, device)`` and
            ``apply(x, params)`` (a DSA); the history's losses are this process's shares.

    Returns:
        :class:`FitResult` with the trained modules (``.models``) and the per-epoch history.
    """
    n_models = 1 if isinstance(models, nn.Module) else (len(models) if isinstance(models, Sequence) else -1)
    if n_models == -1:
        n_models = len(generators) if generators is not None else len(seeds or [])
    gens = _generators(n_models, seeds, generators)
    mods = _models(models, gens)
    tensors = isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[0], Tensor)
    if not tensors and len(mods) != 1:
        raise ConfigError("fit: an iterable of batches trains one model; pass tensors for several")
    if optimizer is not None and len(mods) != 1:
        raise ConfigError("fit: optimizer= continues one model's training; got several models")
    if shard is not None:
        _check_shard(shard, mods, data, tensors, cfg, augment, targets_fn)
    vec = vectorize and tensors and optimizer is None and not any(has_batchnorm(m) for m in mods)
    stack = Stack(mods, vec)
    groups = [stack] if stack.vectorized else [Stack([m], False) for m in mods]
    group_gens = [gens] if stack.vectorized else [[g] for g in gens]
    opts = [optimizer] if optimizer is not None else [make_optimizer(cfg, g.parameters()) for g in groups]
    keep_lr = optimizer is not None and cfg.schedule == "constant" and cfg.warmup_epochs == 0
    if tensors:
        images, targets = data
        n = int(images.shape[0]) if shard is None else int(shard.total)
        bs = min(cfg.batch_size, n)
        steps = math.ceil(n / bs)
        device = images.device
    else:
        steps = len(data) if hasattr(data, "__len__") else 0  # type: ignore[arg-type]
        if steps == 0 and (cfg.schedule == "cosine" or cfg.warmup_epochs):
            raise ConfigError("fit: a cosine schedule or warm-up needs a sized iterable (len(loader))")
        device = next(mods[0].parameters()).device
    start = 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        start = int(resume["epoch"])
        with torch.no_grad():
            for m, sd in zip(mods, resume["models"], strict=True):
                m.load_state_dict(sd)
        stack.load_modules()
        for o, sd in zip(opts, resume["optimizers"], strict=True):
            o.load_state_dict(sd)
        for g, st in zip(gens, resume["generators"], strict=True):
            g.set_state(st)
        history = copy.deepcopy(list(resume.get("history", [])))
    state = EpochState(start, cfg.epochs, stack, opts, gens, history)
    stack.train(True)
    for cb in callbacks:
        cb.on_fit_start(state)
    no_micro = any(has_batchnorm(m) for m in mods)
    for ep in range(start, cfg.epochs):
        losses: list[float] = []
        for group, ggens, opt in zip(groups, group_gens, opts, strict=True):
            group.train(True)
            if shard is not None:
                total = _epoch_shard(group, ggens[0], opt, images, targets, cfg, ep, steps, bs, device,
                                     augment, loss_fn, keep_lr, no_micro, shard)
            elif tensors:
                total = _epoch_tensors(group, ggens, opt, images, targets, cfg, ep, steps, bs, device,
                                       augment, targets_fn, loss_fn, keep_lr, no_micro)
            else:
                total = _epoch_batches(group, ggens[0], opt, data, cfg, ep, steps, device, augment,
                                       targets_fn, loss_fn, keep_lr)
            losses.extend(total)
        history.append({"epoch": ep + 1, "loss": losses, "lr": opts[0].param_groups[0]["lr"]})
        state.epoch = ep + 1
        for cb in callbacks:
            cb.on_epoch_end(state)
    stack.sync()
    return FitResult(models=mods, history=history)


def _per_model(group: Stack, values: Sequence[Tensor]) -> Tensor:
    """``(K,)`` sums over each model's share of ``values`` (tensors shaped like the parameters)."""
    if group.vectorized:
        return torch.stack([_float_logits(v).reshape(v.shape[0], -1).sum(1) for v in values]).sum(0)
    return torch.stack([_float_logits(v).sum() for v in values]).sum().reshape(1)


def _bcast(group: Stack, per_model: Tensor, like: Tensor) -> Tensor:
    """``(K,)`` -> broadcastable against a parameter-shaped ``like``."""
    if group.vectorized:
        return per_model.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    return per_model[0].to(like.dtype)


def input_grad_penalty(group: Stack, x: Tensor, device: torch.device, bf16: bool) -> Tensor:
    """``(K,)`` AST's penalty: mean over images and pixels of ``(||d sum f(x) / dx||_2 - 1)^2``.

    The norm runs over channels; the graph is kept (``create_graph``) so the penalty trains.
    """
    x = x.detach().requires_grad_(True)
    with _autocast(device, bf16):
        out = group.forward(x)
    (g,) = torch.autograd.grad(_float_logits(out).sum(), x, create_graph=True)
    norm = (_float_logits(g).pow(2).sum(2) + 1e-12).sqrt()  # (K, b, H, W)
    return (norm - 1.0).pow(2).flatten(1).mean(1)


def _grads(group: Stack, x: Tensor, t: Tensor, cfg: FitConfig, loss_fn: LossFn | None, micro: int,
           device: torch.device, scale: float, x_raw: Tensor | None, whole: int | None = None) -> Tensor:
    """Accumulate the batch objective's gradient into ``.grad``; return the ``(K,)`` losses (detached).

    ``whole``: the batch ``x`` is part of a batch of this many images (data-parallel), whose
    mean loss the gradient is of; ``None``: ``x`` is the whole batch.
    """
    b = x.shape[1]
    chunk = micro if 0 < micro < b else b
    denom = b if whole is None else whole
    out = torch.zeros(x.shape[0], device=device, dtype=torch.float64)
    for s in range(0, b, chunk):
        with _autocast(device, cfg.bf16):
            logits = group.forward(x[:, s:s + chunk])
        loss = per_model_loss(logits, t[:, s:s + chunk], cfg, loss_fn)
        if chunk < b or whole is not None:
            loss = loss * (min(chunk, b - s) / denom)
        objective = loss * scale if scale != 1.0 else loss
        if cfg.input_grad_penalty > 0:
            raw = x if x_raw is None else x_raw
            pen = input_grad_penalty(group, raw[:, s:s + chunk], device, cfg.bf16)
            objective = objective + cfg.input_grad_penalty * pen * (min(chunk, b - s) / denom)
        objective.sum().backward()
        out += loss.detach().double()
    return out


def _step(group: Stack, opt: torch.optim.Optimizer, x: Tensor, t: Tensor, cfg: FitConfig,
          loss_fn: LossFn | None, micro: int, device: torch.device, scale: float = 1.0,
          x_raw: Tensor | None = None) -> Tensor:
    """One optimizer step on ``x`` ``(K, b, ...)``; returns the ``(K,)`` batch losses (detached).

    ``scale`` multiplies the loss (the loss ramp); ``x_raw`` is the un-augmented batch (the
    input-gradient penalty). Under ``cfg.sam`` the step uses the gradient at the perturbed
    weights ``w + rho * g / ||g||`` (each model its own norm), GSAM corrected.
    """
    opt.zero_grad(set_to_none=True)
    out = _grads(group, x, t, cfg, loss_fn, micro, device, scale, x_raw)
    if cfg.sam != "none" and cfg.sam_rho > 0:
        params = [p for p in group.parameters() if p.grad is not None]
        g = [p.grad.detach().clone() for p in params]
        coef = cfg.sam_rho / (_per_model(group, [v * v for v in g]).sqrt() + 1e-12)
        eps = [_bcast(group, coef, v) * v for v in g]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        opt.zero_grad(set_to_none=True)
        _grads(group, x, t, cfg, loss_fn, micro, device, scale, x_raw)
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
            if cfg.sam == "gsam" and cfg.gsam_alpha > 0:
                gh = [p.grad for p in params]
                along = _per_model(group, [a * b for a, b in zip(g, gh, strict=True)]) / (
                    _per_model(group, [v * v for v in gh]) + 1e-12)
                for p, gi, ghi in zip(params, g, gh, strict=True):
                    p.grad.sub_(cfg.gsam_alpha * (gi - _bcast(group, along, ghi) * ghi))
    opt.step()
    return out


def _epoch_tensors(group: Stack, gens: list[torch.Generator], opt: torch.optim.Optimizer, images: Tensor,
                   targets: Tensor, cfg: FitConfig, ep: int, steps: int, bs: int, device: torch.device,
                   augment: Augment | None, targets_fn: TargetsFn | None, loss_fn: LossFn | None,
                   keep_lr: bool, no_micro: bool) -> list[float]:
    n = images.shape[0]
    perms = torch.stack([torch.randperm(n, generator=g, device=g.device) for g in gens]).to(device)
    total = torch.zeros(len(gens), dtype=torch.float64, device=device)
    micro = 0 if no_micro else cfg.micro_batch
    for s in range(steps):
        if not keep_lr:
            _set_lr(opt, lr_at(cfg, ep, s, steps))
        idx = perms[:, s * bs:(s + 1) * bs]  # (K, b)
        x = raw = images[idx]
        t = targets[idx]
        if augment is not None:
            x = torch.stack([augment(x[i], g) for i, g in enumerate(gens)])
        if targets_fn is not None:
            t = torch.stack([targets_fn(x[i], t[i]) for i in range(len(gens))])
        total += _step(group, opt, x, t, cfg, loss_fn, micro, device, loss_scale(cfg, ep), raw)
    return (total / steps).tolist()


def _check_shard(shard: DataShard, mods: list[nn.Module], data: Any, tensors: bool, cfg: FitConfig,
                 augment: Augment | None, targets_fn: TargetsFn | None) -> None:
    if len(mods) != 1 or not tensors:
        raise ConfigError("fit: shard= trains ONE model on tensors (images, targets) data-parallel; "
                          f"got {len(mods)} models{'' if tensors else ' and an iterable of batches'}")
    if int(data[0].shape[0]) != shard.rows.numel():
        raise ConfigError(f"fit: shard.rows names {shard.rows.numel()} rows but the images have "
                          f"{int(data[0].shape[0])}; pass this process's rows, one per image")
    if has_batchnorm(mods[0]):
        raise ConfigError("fit: shard= needs a network without BatchNorm (its batch statistics would be "
                          "per process); use a per-image norm")
    if cfg.sam != "none" or targets_fn is not None:
        raise ConfigError("fit: shard= does not support sam / targets_fn (valid: sam='none', no targets_fn)")
    if augment is not None and not (hasattr(augment, "sample") and hasattr(augment, "apply")):
        raise ConfigError("fit: shard= needs an augmenter with sample(n, generator, device) and apply(x, params) "
                          "(condense.augment.DSA) to draw the whole batch's parameters")
    if shard.rows.dim() != 1 or not 0 <= shard.rows.numel() <= shard.total:
        raise ConfigError(f"fit: shard.rows must be 1-D with at most total={shard.total} rows, "
                          f"got shape {tuple(shard.rows.shape)}")


def _augment_part(augment: Any, x: Tensor, n: int, pos: Tensor, gen: torch.Generator) -> Tensor:
    """What ``augment(batch, gen)`` does to the rows ``pos`` of an ``n``-image batch, applied to
    those rows ``x`` only (draws the parameters of all ``n``, as that call does)."""
    params = augment.sample(n, gen, device=x.device)
    if pos.numel() == 0:
        return x
    return augment.apply(x, params.map(lambda t: t.index_select(0, pos), n=int(pos.numel())))


def _epoch_shard(group: Stack, gen: torch.Generator, opt: torch.optim.Optimizer, images: Tensor,
                 targets: Tensor, cfg: FitConfig, ep: int, steps: int, bs: int, device: torch.device,
                 augment: Augment | None, loss_fn: LossFn | None, keep_lr: bool, no_micro: bool,
                 shard: DataShard) -> list[float]:
    """One data-parallel epoch (:class:`DataShard`): :func:`_epoch_tensors`' draws and steps,
    with this process's batch members and the gradients summed over the processes."""
    perm = torch.randperm(shard.total, generator=gen, device=gen.device).to(device)
    local = torch.full((shard.total,), -1, dtype=torch.long, device=device)
    local[shard.rows.to(device)] = torch.arange(shard.rows.numel(), device=device)
    params = group.parameters()
    total = torch.zeros(1, dtype=torch.float64, device=device)
    micro = 0 if no_micro else cfg.micro_batch
    for s in range(steps):
        if not keep_lr:
            _set_lr(opt, lr_at(cfg, ep, s, steps))
        idx = perm[s * bs:(s + 1) * bs]
        loc = local[idx]
        pos = (loc >= 0).nonzero().squeeze(1)
        rows = loc.index_select(0, pos)
        x = raw = images[rows]
        if augment is not None:
            x = _augment_part(augment, x, int(idx.numel()), pos, gen)
        opt.zero_grad(set_to_none=True)
        if rows.numel():
            total += _grads(group, x.unsqueeze(0), targets[rows].unsqueeze(0), cfg, loss_fn, micro, device,
                            loss_scale(cfg, ep), raw.unsqueeze(0), whole=int(idx.numel()))
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        shard.reduce(grads)
        opt.step()
    return (total / steps).tolist()


def _epoch_batches(group: Stack, gen: torch.Generator, opt: torch.optim.Optimizer,
                   data: Iterable[tuple[Tensor, Tensor]], cfg: FitConfig, ep: int, steps: int,
                   device: torch.device, augment: Augment | None, targets_fn: TargetsFn | None,
                   loss_fn: LossFn | None, keep_lr: bool) -> list[float]:
    total, count = 0.0, 0
    no_micro = has_batchnorm(group.models[0])
    for s, (x, y) in enumerate(data):
        if not keep_lr:
            _set_lr(opt, lr_at(cfg, ep, s, max(steps, 1)))
        x, y = x.to(device), y.to(device)
        raw = x
        if augment is not None:
            x = augment(x, gen)
        if targets_fn is not None:
            y = targets_fn(x, y)
        total += float(_step(group, opt, x.unsqueeze(0), y.unsqueeze(0), cfg, loss_fn,
                             0 if no_micro else cfg.micro_batch, device, loss_scale(cfg, ep),
                             raw.unsqueeze(0))[0])
        count += 1
    return [total / max(count, 1)]


@torch.no_grad()
def accuracy(models: nn.Module | Sequence[nn.Module], images: Tensor, labels: Tensor, *,
             batch_size: int = 1024, bf16: bool = False, vectorize: bool = False) -> list[float]:
    """Top-1 accuracy in percent of each model on ``images`` ``(M, C, H, W)`` / ``labels`` ``(M,)``.

    ``vectorize``: one vmapped forward over the stacked models (no BatchNorm), else each model.
    """
    mods = [models] if isinstance(models, nn.Module) else list(models)
    stack = Stack(mods, vectorize and not any(has_batchnorm(m) for m in mods))
    was = [m.training for m in mods]
    stack.train(False)
    correct = torch.zeros(len(mods), dtype=torch.long, device=images.device)
    try:
        for i in range(0, images.shape[0], batch_size):
            with _autocast(images.device, bf16):
                out = stack.forward_shared(images[i:i + batch_size])
            correct += (out.argmax(-1) == labels[i:i + batch_size]).sum(1)
    finally:
        for m, w in zip(mods, was, strict=True):
            m.train(w)
    return (correct.double() * 100.0 / images.shape[0]).tolist()
