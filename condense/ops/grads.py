"""Per-class and per-sample gradients of the cross-entropy w.r.t. a network's weights.

- :func:`per_class_grads` for each class ``k`` the gradient of ``mean CE(model(x_k), y_k)``,
  for all classes in one call, optionally differentiable w.r.t. the images (gradient matching
  back-propagates through the synthetic gradients into the synthetic images).
- :func:`freeze_bn_stats` set BatchNorm running statistics from real images, then freeze them.
- :func:`matching_params` the weights a gradient distance needs (``ours`` ignores 1-D ones).

Two formulations of :func:`per_class_grads` compute the same numbers:

- ``vmap``: ``torch.func`` — ``vmap(grad(functional_call))`` over the class dimension with the
  weights shared (not batched): one call for all ``K*B`` images, no Python loop over classes.
- ``loop``: one forward and one ``torch.autograd.grad`` per class, optionally in micro-batches.

On a CPU the loop is the faster one (this 2-core machine, ConvNet-3, 10 classes): vmap took
~1.8x the loop's time, because its batching rules for the per-class weight gradient (a grouped
convolution backward) and for GroupNorm are slower than ``K`` plain calls, and on a CPU the
per-image cost of a forward + backward does not fall with the batch size, so one big batch
gains nothing. It rises instead: tensors above glibc's mmap threshold are page-faulted in on
every allocation, so ``micro_batch=32`` makes the first-order (real-batch) gradients ~1.3x
faster than 256-image forwards (``benchmarks/perf/gradient_matching.py``). ``impl="auto"``
picks ``loop`` on CPU and ``vmap`` elsewhere (where one call replaces ``K`` sequences of small
kernels; not measured here, no GPU: check with the benchmark before relying on it).

LayerNorm: a vmapped ``grad`` of LayerNorm back-propagates wrong gradients into its input
(pytorch/functorch#534, still so in torch 2.14); with ``create_graph`` such models use ``loop``.
Under autocast, BatchNorm's batching rule fails on mixed dtypes (pytorch/pytorch#184890); such
models use ``loop`` too.

``compile=True`` (first-order only, ``impl=loop``): the forward + loss go through
``torch.compile`` (AOTAutograd compiles the backward too, fusing GroupNorm / ReLU / pooling
passes that dominate a CPU step: ConvNet-3 convolutions are only ~30% of its time). The network
is an argument of the compiled function, so fresh networks of one architecture reuse the code;
the first call compiles (~10-30 s on a CPU). Double backward through compiled code is not
supported by PyTorch, hence first-order only (the real batch: ~90% of a matching step).
With ``fuse_stem`` as well, a ConvNet's first block (conv, instance norm, ReLU, pool) runs as
the fused pass of :mod:`condense.ops.stem` with its hand-derived first-order backward (real
images need no input gradient), the rest of the network compiled.

BatchNorm: both formulations need BatchNorm layers in eval mode (statistics frozen by
:func:`freeze_bn_stats`); in train mode the batch statistics would couple the images of a class
and vmap cannot update running statistics, so this raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from condense.errors import ConfigError
from condense.ops._nn import has_batchnorm

log = logging.getLogger(__name__)

IMPLS = ("auto", "vmap", "loop")
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)

Params = Mapping[str, Tensor]


# --------------------------------------------------------------------------- helpers


def matching_params(model: nn.Module, metric: str = "ours") -> dict[str, Tensor]:
    """The weights whose gradients a distance ``metric`` reads, by name.

    ``ours`` gives 1-D weights (biases, norm scales) zero weight, so they are left out (exact,
    and it skips their gradient computation); ``mse`` / ``cos`` use every weight.

    Args:
        model: the network; only parameters with ``requires_grad`` are considered.
        metric: a :data:`condense.ops.distances.METRICS` name.

    Returns:
        ``{name: parameter}`` in ``named_parameters`` order (the module's own tensors).
    """
    from condense.ops.distances import METRICS

    if metric not in METRICS:
        raise ConfigError(f"unknown gradient distance {metric!r}; valid choices: {', '.join(METRICS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if metric == "ours":
        named = [(n, p) for n, p in named if p.dim() > 1]
    if not named:
        raise ConfigError(f"{type(model).__name__} has no trainable weights for metric {metric!r}")
    return dict(named)


def _bn_in_train_mode(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORMS) and m.training for m in model.modules())


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)




def _has_layernorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def _resolve_params(model: nn.Module, params: Params | None) -> dict[str, Tensor]:
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(f"no weights to differentiate for {type(model).__name__}")
    known = dict(model.named_parameters())
    unknown = [n for n in params if n not in known]
    if unknown:
        raise ConfigError(
            f"params {unknown} are not parameters of {type(model).__name__}; "
            f"valid names: {', '.join(known)}"
        )
    return dict(params)


def _check_xy(x: Tensor, y: Tensor, lead: int) -> None:
    """Labels ``x.shape[:lead]`` (int64) or soft-target probabilities ``x.shape[:lead] + (classes,)``."""
    soft = y.is_floating_point() and y.dim() == lead + 1
    if x.dim() < lead + 1 or tuple(y.shape[:lead]) != tuple(x.shape[:lead]) or (y.dim() != lead and not soft):
        raise ConfigError(
            f"expected images with {lead} leading dims matching labels; got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}"
        )


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``loop`` on CPU, ``vmap`` elsewhere; other names are checked and returned."""
    if impl not in IMPLS:
        raise ConfigError(f"unknown per-class gradient impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl == "auto":
        return "loop" if device.type == "cpu" else "vmap"
    return impl


def _upcast(t: Tensor) -> Tensor:
    """Half / bfloat16 logits (autocast) -> float32; float32 / float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _ce_loss_fn(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """``f(params, x (B,...), y (B,)) -> mean CE`` with ``params`` swapped into ``model``."""

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, p, (x,), strict=False)
        return F.cross_entropy(_upcast(out), y)

    return loss


def _module_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(_upcast(model(x)), y)


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def compiled_module_loss() -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """``mean CE(model(x), y)`` through ``torch.compile`` (built once per process, lazily).

    The network is an argument, so fresh networks of the same architecture reuse the compiled
    code (their parameters are graph inputs); backward through it is first-order only.
    """
    if "module_loss" not in _COMPILED:
        _COMPILED["module_loss"] = torch.compile(_module_loss, dynamic=False)
    return _COMPILED["module_loss"]


# --------------------------------------------------------------------------- per-class grads


def per_class_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    create_graph: bool,
    params: Params | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    micro_batch: int = 0,
    compile: bool = False,
    fuse_stem: bool | None = None,
) -> dict[str, Tensor]:
    """Gradient of each class's mean cross-entropy w.r.t. the weights, for all classes.

    ``out[name][k] = d/dW mean_b CE(model(x[k, b]), y[k, b])``. Runs under an enclosing
    ``torch.autocast`` if there is one (gradients come out in the weights' dtype).

    Args:
        model: the network; BatchNorm layers must be in eval mode (:func:`freeze_bn_stats`).
        x: ``(K, B, C, H, W)`` images of ``K`` groups (classes), ``B`` each.
        y: ``(K, B)`` int64 labels, or ``(K, B, classes)`` soft-target probabilities (soft-target
            cross-entropy; differentiable w.r.t. them with ``create_graph``: learned labels).
        create_graph: keep the graph so the result is differentiable w.r.t. ``x`` (and w.r.t.
            ``params`` that require grad); ``False`` returns detached tensors.
        params: ``{name: tensor}`` weights to differentiate (used in place of the module's
            tensors of the same names; default: every trainable parameter).
        impl: ``auto`` | ``vmap`` | ``loop`` (see the module docstring).
        chunk_size: ``vmap`` only: classes per vectorised call (bounds memory); ``None`` = all.
        micro_batch: ``loop`` only: images per forward within a class (0 = the whole class
            batch); the class gradient is the size-weighted mean of the micro-batch gradients.
        compile: ``loop`` with ``create_graph=False`` only: run forward + loss through
            ``torch.compile`` (same numbers up to float rounding; see the module docstring).
            ``params`` must then be the module's own parameters.
        fuse_stem: with ``compile``: a fusable ConvNet first block
            (:func:`condense.ops.stem.fusable_stem`) through :func:`condense.ops.stem.fused_module_loss`;
            other networks take the compiled stock forward. ``None`` = on a CPU only
            (:func:`condense.ops.stem.resolve_fuse_stem`).

    Returns:
        ``{name: (K, *param.shape)}`` in the order of ``params``.

    Raises:
        ConfigError: bad shapes, unknown ``impl`` / parameter names, or train-mode BatchNorm.
    """
    _check_xy(x, y, 2)
    if _bn_in_train_mode(model):
        raise ConfigError(
            f"{type(model).__name__} has BatchNorm layers in train mode; per-class gradients need "
            "frozen statistics: call condense.ops.freeze_bn_stats(model, images) first"
        )
    p = _resolve_params(model, params)
    kind = resolve_impl(impl, x.device)
    if kind == "vmap" and create_graph and _has_layernorm(model):
        _warn_once(
            "per_class_grads: LayerNorm's batching rule gives wrong input gradients through a "
            "vmapped grad (pytorch/functorch#534); using impl='loop' for this model"
        )
        kind = "loop"
    if kind == "vmap" and torch.is_autocast_enabled(x.device.type) and has_batchnorm(model):
        _warn_once(
            "per_class_grads: BatchNorm's batching rule fails on mixed dtypes under autocast "
            "(pytorch/pytorch#184890); using impl='loop' for this model"
        )
        kind = "loop"
    if compile:
        if create_graph:
            raise ConfigError("per_class_grads: compile=True needs create_graph=False (PyTorch cannot "
                              "double-backward through compiled code); valid: compile=False")
        own = {id(t) for t in model.parameters()}
        if any(id(t) not in own or not t.requires_grad for t in p.values()):
            raise ConfigError("per_class_grads: compile=True needs params that are the module's own "
                              "trainable parameters (functional or frozen weights are not supported); "
                              "valid: compile=False")
        from condense.ops.stem import resolve_fuse_stem

        return _per_class_loop(model, x, y, p, False, micro_batch, compiled=True,
                               fuse_stem=resolve_fuse_stem(fuse_stem, x.device))
    if kind == "vmap":
        return _per_class_vmap(model, x, y, p, create_graph, chunk_size)
    return _per_class_loop(model, x, y, p, create_graph, micro_batch)


def _per_class_vmap(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: dict[str, Tensor],
    create_graph: bool,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """``vmap(grad(loss))`` over the class dim, weights shared (``in_dims=None``)."""
    if not create_graph:
        x = x.detach()
        params = {n: t.detach() for n, t in params.items()}
    fn = vmap(grad(_ce_loss_fn(model)), in_dims=(None, 0, 0), chunk_size=chunk_size)
    out = fn(params, x, y)
    return out if create_graph else {n: g.detach() for n, g in out.items()}


def _per_class_loop(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: dict[str, Tensor],
    create_graph: bool,
    micro_batch: int = 0,
    compiled: bool = False,
    fuse_stem: bool = False,
) -> dict[str, Tensor]:
    """One forward + ``torch.autograd.grad`` per class (or per micro-batch of a class).

    With ``micro_batch`` m, class ``k``'s gradient is the size-weighted mean of the gradients of
    its micro-batches' mean losses (the same quantity, summed in another order). ``compiled``:
    the module's own forward + loss through :func:`compiled_module_loss` (``params`` are the
    module's parameters, all requiring grad).
    """
    # Leaves to differentiate: the given tensors if they already require grad (keeps outer
    # graphs intact), else fresh leaves sharing their storage.
    leaves = {n: t if t.requires_grad else t.detach().requires_grad_(True) for n, t in params.items()}
    names = list(leaves)
    inputs = [leaves[n] for n in names]
    if compiled:
        from condense.ops.stem import fusable_stem, fused_module_loss

        fn = fused_module_loss if fuse_stem and fusable_stem(model) else compiled_module_loss()

        def loss_fn(_p: dict[str, Tensor], xm: Tensor, ym: Tensor) -> Tensor:
            return fn(model, xm, ym)
    else:
        loss_fn = _ce_loss_fn(model)
    b = x.shape[1]
    step = micro_batch if 0 < micro_batch < b else b
    rows: list[list[Tensor]] = []
    with torch.enable_grad():
        for k in range(x.shape[0]):
            xk = x[k] if create_graph else x[k].detach()
            acc: list[Tensor] | None = None
            for start in range(0, b, step):
                xm, ym = xk[start : start + step], y[k, start : start + step]
                g = torch.autograd.grad(loss_fn(leaves, xm, ym), inputs, create_graph=create_graph)
                if not create_graph:
                    g = tuple(t.detach() for t in g)
                w = xm.shape[0] / b
                g = [t * w for t in g] if step < b else list(g)
                acc = g if acc is None else [a + t for a, t in zip(acc, g, strict=True)]
            rows.append(acc)  # type: ignore[arg-type]
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(names)}


# --------------------------------------------------------------------------- per-sample grads


# --------------------------------------------------------------------------- BatchNorm


@torch.no_grad()
def freeze_bn_stats(model: nn.Module, images: Tensor, *, momentum: float | None = None) -> nn.Module:
    """Set every BatchNorm's running statistics from ``images``, then put BatchNorm in eval mode.

    DC/DSA do this before matching (16 real images per class): a synthetic batch of one image
    per class is too small for batch statistics. Other modules keep their mode.

    Args:
        model: the network (changed in place).
        images: ``(N, C, H, W)`` real images (e.g. 16 per class, all classes together).
        momentum: ``None``: statistics become exactly those of ``images`` (mean, unbiased
            variance). A float: one running-average update with that momentum, on top of the
            current statistics (the reference code's behaviour, momentum 0.1).

    Returns:
        ``model``.
    """
    bns = [m for m in model.modules() if isinstance(m, _BATCHNORMS)]
    if not bns:
        return model
    saved = [(m, m.training, m.momentum) for m in bns]
    try:
        for m in bns:
            if momentum is None:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch -> exactly its statistics
            else:
                m.momentum = momentum
            m.train()
        model(images)
    finally:
        for m, _, mom in saved:
            m.momentum = mom
            m.eval()
    return model
