"""BatchNorm statistic matching (SRe2L / CDA / CV-DD recovery), read through forward hooks.

Inside ``with BNStatLoss(teacher) as bn:`` every BatchNorm layer of the teacher records, on each
forward, how far the batch's per-channel statistics of its INPUT lie from the running statistics
the layer learned on the real data::

    term_l = ||mean_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2

(plain 2-norms over channels, biased variance, statistics in float32 even under autocast).
``bn.loss()`` returns ``sum_l m_l term_l`` with ``m_1 = first_weight`` (SRe2L's 10 for the first
BatchNorm, in forward order) and 1 for the others, and clears the record for the next forward.
The hooks are removed when the block exits, also when it exits with an exception.

Split batches (a class-parallel run, :mod:`condense.distributed`): with ``reduce`` (an in-place
sum over the processes) the statistics are those of the union of every process's images, from
summed per-channel sums and sums of squares; each process's images get the exact gradient of
that loss (the other processes' parts enter as constants).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: SRe2L's weight of the first BatchNorm layer's term.
FIRST_BN_WEIGHT = 10.0


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that track running statistics, in registration order."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


class BNStatLoss:
    """Context manager: forward hooks on every BatchNorm layer of ``model``; see the module doc.

    Args:
        model: the teacher (usually in eval mode: it normalizes with its running statistics,
            while the hooks read the batch's own statistics).
        first_weight: ``m_1``, the weight of the first layer (in forward order).
        reduce: sums a tensor over the processes in place (e.g. ``ClassShard.all_reduce_`` on a
            list of one); ``None`` = the batch is whole here.

    Raises:
        ValueError: ``model`` has no BatchNorm layer with running statistics.
    """

    def __init__(self, model: nn.Module, first_weight: float = FIRST_BN_WEIGHT, *,
                 reduce: Callable[[Tensor], None] | None = None) -> None:
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics; "
                             "BN statistic matching needs a BatchNorm teacher (e.g. convnet_bn, resnet18_bn)")
        self.first_weight = float(first_weight)
        self.reduce = reduce
        self._handles: list[RemovableHandle] = []
        self._terms: list[Tensor] = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        if self.reduce is None:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
        else:
            mean, var = _split_stats(x, dims, self.reduce)
        rm = module.running_mean.float()  # type: ignore[union-attr]
        rv = module.running_var.float()  # type: ignore[union-attr]
        self._terms.append(torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv))

    def __enter__(self) -> BNStatLoss:
        if self._handles:
            raise RuntimeError("BNStatLoss is already active (nested use of one instance)")
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self._terms = []
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def terms(self) -> list[Tensor]:
        """The per-layer terms recorded since the last :meth:`loss` (forward order)."""
        return list(self._terms)

    def loss(self) -> Tensor:
        """``sum_l m_l term_l`` over the layers seen since the last call; clears the record.

        Raises:
            RuntimeError: no forward ran through the model inside the block since the last call.
        """
        if not self._terms:
            raise RuntimeError("BNStatLoss.loss(): no BatchNorm layer ran since the last call (run the "
                               "teacher's forward inside the with-block)")
        total = self._terms[0] * self.first_weight
        for t in self._terms[1:]:
            total = total + t
        self._terms = []
        return total


def _split_stats(x: Tensor, dims: list[int], reduce: Callable[[Tensor], None]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over every process's rows: ``E[x]`` and ``E[x^2] - E[x]^2`` from
    the summed sums, this process's part kept in the autograd graph."""
    local = torch.stack([x.sum(dims), (x * x).sum(dims)])
    total = local.detach().clone()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
    reduce(total)
    reduce(count)
    sums = local + (total - local.detach())
    n = float(count.item())
    mean = sums[0] / n
    return mean, sums[1] / n - mean * mean
