"""Training fresh classifiers on a (small) tensor dataset: the one training loop of condense.

``train_classifiers`` trains K models of one architecture side by side. Where the architecture
allows (no BatchNorm), the K models run as ONE vectorized model: their weights are stacked with
``torch.func.stack_module_state`` and the forward is ``vmap(functional_call)``; SGD with momentum
and weight decay is elementwise, so one optimizer over the stacked tensors is exactly K
independent optimizers. Otherwise the models train one after the other. Each model owns its
generator (init, shuffling, augmentation), so both paths give the same models for the same seeds.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from condense.models import has_batchnorm

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings of one evaluation training run (the METHODS.md protocol)."""

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5  # lr x0.1 once at this fraction of the epochs
    soft_temperature: float = 3.0
    bf16: bool = False




def _loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean loss per model. ``logits`` (K,b,classes); ``targets`` (K,b) int or (K,b,classes)."""
    k, b, c = logits.shape
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # the loss in fp32 under autocast; fp32/fp64 stay as they are
    if targets.dim() == 2:
        return F.cross_entropy(logits.reshape(k * b, c), targets.reshape(-1), reduction="sum") / b
    t = temperature
    log_p = F.log_softmax(logits / t, dim=-1)
    q = F.softmax(targets.to(log_p.dtype) / t, dim=-1)
    return F.kl_div(log_p, q, reduction="sum") * (t * t) / b


class _Ensemble:
    """K models behind one ``forward(x (K,b,...)) -> (K,b,classes)``."""

    def __init__(self, models: Sequence[nn.Module], vectorize: bool) -> None:
        self.models = list(models)
        self.vectorize = vectorize and len(models) > 1
        if self.vectorize:
            params, buffers = stack_module_state(self.models)
            self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            self.buffers = buffers
            base = copy.deepcopy(self.models[0]).to("meta")

            def f(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
                return functional_call(base, (p, b), (x,))

            self._f = f
            self._train_fn = vmap(f, in_dims=(0, 0, 0))
            self._shared_fn = vmap(f, in_dims=(0, 0, None))

    def parameters(self) -> list[torch.Tensor]:
        if self.vectorize:
            return list(self.params.values())
        return [p for m in self.models for p in m.parameters()]

    def train(self, mode: bool) -> None:
        for m in self.models:
            m.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (K,b,C,H,W), model k sees ``x[k]``."""
        if self.vectorize:
            return self._train_fn(self.params, self.buffers, x)
        return torch.stack([m(x[i]) for i, m in enumerate(self.models)])

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (b,C,H,W) seen by every model -> (K,b,classes)."""
        if self.vectorize:
            return self._shared_fn(self.params, self.buffers, x)
        return torch.stack([m(x) for m in self.models])


def train_classifiers(
    make_model: Callable[[torch.Generator], nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor,
    seeds: Sequence[int],
    cfg: TrainConfig,
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    vectorize: bool = True,
) -> list[nn.Module] | _Ensemble:
    """Train ``len(seeds)`` fresh models on ``images``/``targets``.

    Args:
        make_model: builds a fresh model on the right device from a CPU generator.
        images: ``(N,C,H,W)`` training images (normalized), on the training device.
        targets: ``(N,)`` int64 or ``(N,classes)`` soft-label logits (KL at ``soft_temperature``).
        seeds: one per model: it seeds the model's init, data order and augmentation.
        augment: ``augment(x (b,C,H,W), generator) -> x'`` applied per batch (e.g. DSA).
        vectorize: train the models as one vmapped model where the architecture allows.

    Returns:
        The trained ensemble (use :func:`ensemble_accuracy` on it).
    """
    gens = []
    models = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(int(s))
        models.append(make_model(g))
        gens.append(g)
    can_vectorize = vectorize and not any(has_batchnorm(m) for m in models)
    ens = _Ensemble(models, can_vectorize)
    ens.train(True)
    n = images.shape[0]
    bs = min(cfg.batch_size, n)
    steps = math.ceil(n / bs)
    decay_epoch = int(cfg.epochs * cfg.lr_decay_at)
    dev = images.device
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    groups = [ens] if ens.vectorize else [_Ensemble([m], False) for m in models]
    group_gens = [gens] if ens.vectorize else [[g] for g in gens]
    for group, ggens in zip(groups, group_gens, strict=True):
        gopt = torch.optim.SGD(group.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
        for ep in range(cfg.epochs):
            if ep == decay_epoch and ep > 0:
                for pg in gopt.param_groups:
                    pg["lr"] = cfg.lr * 0.1
            perms = torch.stack([torch.randperm(n, generator=g) for g in ggens]).to(dev)
            for s in range(steps):
                idx = perms[:, s * bs:(s + 1) * bs]  # (K, b)
                x = images[idx]
                if augment is not None:
                    x = torch.stack([augment(x[i], g) for i, g in enumerate(ggens)])
                with amp:
                    out = group.forward(x)
                loss = _loss(out, targets[idx], cfg.soft_temperature)
                gopt.zero_grad(set_to_none=True)
                loss.backward()
                gopt.step()
            if (ep + 1) % max(1, cfg.epochs // 5) == 0:
                log.info("trained %d/%d epochs of %d model(s) (last batch loss %.4f)", ep + 1, cfg.epochs,
                         len(ggens), loss.item() / len(ggens))
    return ens


@torch.no_grad()
def ensemble_accuracy(
    ens: _Ensemble, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
    bf16: bool = False,
) -> list[float]:
    """Top-1 accuracy in percent of each model of ``ens`` on ``images`` ``(M,C,H,W)``."""
    ens.train(False)
    correct = torch.zeros(len(ens.models), dtype=torch.long, device=images.device)
    amp = torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16)
    for i in range(0, images.shape[0], batch_size):
        with amp:
            out = ens.forward_shared(images[i:i + batch_size])
        correct += (out.argmax(-1) == labels[i:i + batch_size]).sum(1)
    return (correct.double() * 100.0 / images.shape[0]).tolist()


def describe(cfg: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
