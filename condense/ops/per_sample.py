"""Per-sample gradients and their norms, by four backends behind one switch.

- :func:`per_sample_grads` ``{name: (B, *param.shape)}``: the gradient of each sample's loss.
- :func:`per_sample_grad_norms` ``(B,)`` (or ``{layer: (B,)}``): their Euclidean norms, without
  materializing what the backend can avoid.

Backends (``backend=``, :data:`BACKENDS`):

- ``func``: ``vmap(grad(loss))`` over ``functional_call`` (any differentiable model; the
  reference the others are tested against).
- ``hooks``: one ordinary forward and one backward of the summed loss. Forward hooks keep each
  layer's input; ``torch.autograd.grad`` returns the gradient w.r.t. each layer's *output* (the
  summed weight gradients are never computed). Per-sample weight gradients then follow per layer:
  Linear an outer product, Conv2d ``G_n = B_n^T A_n`` with ``A_n`` the unfolded input ``(T, D)``
  and ``B_n`` the output gradient ``(T, P)``, norm layers (GroupNorm / InstanceNorm / LayerNorm /
  BatchNorm in eval mode) the normalized input times the output gradient summed over positions.
- ``ghost``: norms only. A Conv2d / Linear weight's ``||B_n^T A_n||^2 = <A_n A_n^T, B_n B_n^T>``
  costs ``T^2 (D + P)`` and ``T^2`` memory instead of ``T P D`` (Bu et al. 2022); biases and
  norm-layer weights are tiny and materialized.
- ``auto``: ``hooks`` when every trainable layer is one of the supported types, else ``func``;
  for norms, per Conv2d / Linear layer the fastDP rule: ghost when ``2 T^2 <= P D``, else the
  per-sample gradient is reduced tile by tile (:func:`condense.ops.kernels.per_sample_conv_sqnorm`:
  a Triton kernel on CUDA, chunked ``bmm`` on a CPU) and never stored for the whole batch.

Per-sample gradients are those of ``loss(model(x)[n], y[n])``: the samples must not interact, so
BatchNorm layers must be in eval mode (train-mode batch statistics couple them; this raises).
The per-sample arithmetic runs in float32 (float64 inputs stay float64) whatever the model's
dtype or autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from condense.errors import ConfigError
from condense.ops._nn import BATCHNORMS
from condense.ops.kernels import ghost_sqnorm, per_sample_conv_sqnorm, unfold_conv_input, use_ghost

BACKENDS = ("auto", "func", "hooks", "ghost")
LOSSES = ("ce",)

#: Layers the ``hooks`` / ``ghost`` backends handle (BatchNorm only in eval mode).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    *BATCHNORMS,
)

#: Bytes of per-sample intermediates (unfolded inputs, gradients) held at once by default.
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: Samples per forward / backward pass of the hooks and ghost backends (``chunk_size=None``).
#: Memory falls with it; on a 2-core CPU 32 is also faster than one 256-image pass.
DEFAULT_MICRO_BATCH = 32

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- checks


def _check_inputs(model: nn.Module, x: Tensor, y: Tensor) -> None:
    if x.dim() < 1 or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ConfigError(
            f"per-sample gradients need x (B, ...) and y (B, ...) with the same B; "
            f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ConfigError("per-sample gradients of an empty batch (B = 0)")
    for name, m in model.named_modules():
        if isinstance(m, BATCHNORMS) and (m.training or not m.track_running_stats or m.running_mean is None):
            raise ConfigError(
                f"BatchNorm layer {name!r} of {type(model).__name__} uses batch statistics "
                "(train mode or no running statistics), which couple the samples; call "
                "model.eval() (or condense.ops.freeze_bn_stats(model, images)) first"
            )


def _check_backend(backend: str, choices: tuple[str, ...] = BACKENDS) -> None:
    if backend not in choices:
        raise ConfigError(f"unknown per-sample backend {backend!r}; valid choices: {', '.join(choices)}")


def _loss_fn(loss: str | LossFn) -> LossFn:
    """``f(logits (B, K), y) -> (B,)`` per-sample losses (float32 at least)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(f"unknown per-sample loss {loss!r}; valid choices: {', '.join(LOSSES)} or a callable")

    def ce(logits: Tensor, y: Tensor) -> Tensor:
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        return F.cross_entropy(z, y, reduction="none")

    return ce


def _wanted(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (``params`` narrows them; frozen ones only when named)."""
    known = dict(model.named_parameters())
    if params is None:
        out = {n: p for n, p in known.items() if p.requires_grad}
    else:
        names = list(params)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"params {unknown} are not parameters of {type(model).__name__}; "
                f"valid names: {', '.join(known)}"
            )
        out = {n: known[n] for n in names}
    if not out:
        raise ConfigError(f"no weights to differentiate for {type(model).__name__} (all frozen?)")
    return out


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def unsupported_layers(model: nn.Module, params: Iterable[str] | None = None) -> list[str]:
    """Names and types of the modules owning wanted weights that ``hooks`` cannot handle."""
    wanted = set(_wanted(model, params))
    bad = []
    for mname, m in model.named_modules():
        own = {f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)}
        if own & wanted and not isinstance(m, SUPPORTED_LAYERS):
            bad.append(f"{mname or '<root>'} ({type(m).__name__})")
    return bad


# --------------------------------------------------------------------------- func backend


def _func_grads(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, wanted: dict[str, nn.Parameter],
                chunk_size: int | None) -> dict[str, Tensor]:
    fixed = {n: t.detach() for n, t in model.named_parameters() if n not in wanted}
    fixed.update(dict(model.named_buffers()))

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),), strict=False)
        return loss(out, yi.unsqueeze(0)).sum()

    p = {n: t.detach() for n, t in wanted.items()}
    out = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(p, x.detach(), y)
    return {n: g.detach() for n, g in out.items()}


# --------------------------------------------------------------------------- hooks backend


@dataclass
class _Site:
    """One supported layer owning wanted weights: its inputs / outputs, one entry per call."""

    name: str
    module: nn.Module
    weight: str | None  # full parameter names, None when not wanted
    bias: str | None
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


def _sites(model: nn.Module, wanted: dict[str, nn.Parameter]) -> list[_Site]:
    sites = []
    for mname, m in model.named_modules():
        full = {n: f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)}
        mine = {n: f for n, f in full.items() if f in wanted}
        if not mine:
            continue
        if not isinstance(m, SUPPORTED_LAYERS) or set(mine) - {"weight", "bias"}:
            raise ConfigError(
                f"layer {mname or '<root>'} ({type(m).__name__}) is not supported by the hooks/ghost "
                f"per-sample backends (supported: {', '.join(sorted({t.__name__ for t in SUPPORTED_LAYERS}))}); "
                "use backend='func' or 'auto'"
            )
        sites.append(_Site(mname, m, mine.get("weight"), mine.get("bias")))
    return sites


def _forward_backward(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, sites: list[_Site]) -> Tensor:
    """Run the model once; fill each site's inputs and output gradients. Returns the losses."""

    def hook(site: _Site) -> Callable[..., None]:
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            site.inputs.append(inputs[0].detach())
            site.outputs.append(output)

        return fn

    handles = [s.module.register_forward_hook(hook(s)) for s in sites]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # a graph exists even when every weight is frozen
            losses = loss(model(xg), y)
            outs = [o for s in sites for o in s.outputs]
            gs = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    it = iter(gs)
    for s in sites:
        s.grads = [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(s.outputs, it, strict=False)]
        s.outputs = []
    return losses.detach()


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _as_tpd(site: _Site, a: Tensor, g: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per group, ``A (n, T, D)`` and ``B (n, T, P)`` of one Linear / Conv2d call."""
    m = site.module
    dt = _acc_dtype(a)
    if isinstance(m, nn.Linear):
        n = a.shape[0]
        return [(a.reshape(n, -1, a.shape[-1]).to(dt), g.reshape(n, -1, g.shape[-1]).to(dt))]
    cols = unfold_conv_input(a.to(dt), m)  # (n, T, C_in kh kw), channel-major columns
    b = g.to(dt).flatten(2).transpose(1, 2)  # (n, T, C_out)
    if m.groups == 1:
        return [(cols, b)]
    d, o = cols.shape[-1] // m.groups, m.out_channels // m.groups
    return [(cols[..., i * d:(i + 1) * d], b[..., i * o:(i + 1) * o]) for i in range(m.groups)]


def _pairs(site: _Site, sl: slice) -> list[tuple[Tensor, Tensor]]:
    """Per group ``(A, B)`` of samples ``sl``; a layer called several times has its calls
    concatenated along ``T`` (the gradient is the sum over calls: ``[B_1; B_2]^T [A_1; A_2]``)."""
    per_call = [_as_tpd(site, a[sl], g[sl]) for a, g in zip(site.inputs, site.grads, strict=True)]
    if len(per_call) == 1:
        return per_call[0]
    return [(torch.cat([c[i][0] for c in per_call], 1), torch.cat([c[i][1] for c in per_call], 1))
            for i in range(len(per_call[0]))]


def _normalized(m: nn.Module, a: Tensor) -> Tensor:
    """The input of a norm layer with its normalization applied and no affine."""
    dt = _acc_dtype(a)
    a = a.to(dt)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(a, m.num_groups, eps=m.eps)
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, eps=m.eps)
    if isinstance(m, BATCHNORMS):
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = m.running_mean.to(dt).reshape(shape)
        var = m.running_var.to(dt).reshape(shape)
        return (a - mean) / torch.sqrt(var + m.eps)
    # instance norm (affine): per-sample, per-channel statistics
    if m.track_running_stats and not m.training:
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return (a - m.running_mean.to(dt).reshape(shape)) / torch.sqrt(m.running_var.to(dt).reshape(shape) + m.eps)
    return F.instance_norm(a, eps=m.eps)


def _norm_layer_grads(m: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (weight, bias) gradients of a norm layer's affine, shaped ``(n, *param)``."""
    g = g.to(_acc_dtype(a))
    prod = _normalized(m, a) * g
    if isinstance(m, nn.LayerNorm):
        lead = tuple(range(1, g.dim() - len(m.normalized_shape)))
        return prod.sum(lead) if lead else prod, g.sum(lead) if lead else g
    red = tuple(range(2, g.dim()))
    return prod.sum(red), g.sum(red)


def _chunks(n: int, per_sample_bytes: int, chunk_size: int | None) -> list[slice]:
    size = chunk_size or max(1, DEFAULT_CHUNK_BYTES // max(per_sample_bytes, 1))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _site_bytes(site: _Site) -> int:
    """Bytes per sample of a Linear / Conv2d's intermediates (shifted inputs, output gradient,
    a Gram matrix); 0 for norm layers (nothing beyond their activations)."""
    m = site.module
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return 0
    a, g = site.inputs[0], site.grads[0]
    if isinstance(m, nn.Conv2d):  # unfolded input, output gradient
        t = g[0].numel() // g.shape[1]
        per = math.prod(m.kernel_size) * m.in_channels * t + g[0].numel()
    else:
        t = g[0].numel() // g.shape[-1]
        per = a[0].numel() + g[0].numel()
    return (per + 2 * t * t) * len(site.inputs) * 4


def _site_grads(site: _Site, chunk_size: int | None) -> dict[str, Tensor]:
    m = site.module
    n = site.inputs[0].shape[0]
    out: dict[str, list[Tensor]] = {k: [] for k in (site.weight, site.bias) if k}
    for sl in _chunks(n, _site_bytes(site), chunk_size):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            groups = _pairs(site, sl)
            if site.weight:
                w = torch.cat([torch.bmm(b.mT, a) for a, b in groups], 1)
                out[site.weight].append(w.reshape(w.shape[0], *m.weight.shape))
            if site.bias:
                out[site.bias].append(torch.cat([b.sum(1) for _, b in groups], 1))
        else:
            wb = [_norm_layer_grads(m, a[sl], g[sl]) for a, g in zip(site.inputs, site.grads, strict=True)]
            if site.weight:
                out[site.weight].append(sum(w for w, _ in wb))
            if site.bias:
                out[site.bias].append(sum(b for _, b in wb))
    return {k: torch.cat(v) for k, v in out.items()}


def _site_sqnorms(site: _Site, mode: str, chunk_size: int | None) -> Tensor:
    """Per-sample squared norm of the site's wanted weights; ``mode`` ghost | auto."""
    m = site.module
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return sum(g.flatten(1).square().sum(1) for g in _site_grads(site, chunk_size).values())
    n = site.inputs[0].shape[0]
    parts = []
    for sl in _chunks(n, _site_bytes(site), chunk_size):
        total = 0
        for a, b in _pairs(site, sl):
            if site.weight:
                t, d, p = a.shape[1], a.shape[2], b.shape[2]
                if mode == "ghost" or use_ghost(t, p, d):
                    total = total + ghost_sqnorm(a, b)
                else:  # the per-sample gradient reduced as it is formed (Triton on CUDA)
                    total = total + per_sample_conv_sqnorm(a, b).to(a.dtype)
            if site.bias:
                total = total + b.sum(1).square().sum(1)
        parts.append(total)
    return torch.cat(parts)


# --------------------------------------------------------------------------- public API


def _resolve(model: nn.Module, backend: str, wanted: dict[str, nn.Parameter]) -> str:
    if backend != "auto":
        return backend
    return "func" if unsupported_layers(model, wanted) else "hooks"


def _by_micro_batch(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, wanted: dict[str, nn.Parameter],
                    chunk_size: int | None, per_site: Callable[[_Site], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``per_site`` of every site, one forward / backward pass per ``chunk_size`` samples, concatenated."""
    sites = _sites(model, wanted)
    size = chunk_size or DEFAULT_MICRO_BATCH
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, x.shape[0], size):
        _forward_backward(model, x[i:i + size], y[i:i + size], loss, sites)
        for s in sites:
            for k, v in per_site(s).items():
                parts.setdefault(k, []).append(v)
            s.inputs, s.grads = [], []
    return {k: torch.cat(v) for k, v in parts.items()}


def per_sample_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "ce",
    backend: str = "auto",
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradient of each sample's loss w.r.t. the weights (detached).

    Args:
        model: the network; BatchNorm layers must be in eval mode.
        x: ``(B, ...)`` inputs.
        y: ``(B,)`` int64 labels (or ``(B, K)`` probabilities for ``ce``; anything ``loss`` takes).
        loss: ``"ce"`` or ``f(logits, y) -> (B,)`` per-sample losses.
        backend: ``auto`` | ``func`` | ``hooks`` (``ghost`` gives norms only).
        params: parameter names (a ``{name: tensor}`` mapping works too: its keys); default:
            every parameter with ``requires_grad``.
        chunk_size: samples per forward / backward pass (``hooks``, ``ghost``; ``None``:
            :data:`DEFAULT_MICRO_BATCH`) or per vectorised call (``func``; ``None``: all at once).
            Within a pass, per-layer work is further split to ~256 MB of intermediates.

    Returns:
        ``{name: (B, *param.shape)}`` in float32 (float64 for a float64 model).
    """
    _check_backend(backend, ("auto", "func", "hooks"))
    _check_inputs(model, x, y)
    lf = _loss_fn(loss)
    wanted = _wanted(model, params)
    if _resolve(model, backend, wanted) == "func":
        return _func_grads(model, x, y, lf, wanted, chunk_size)
    out = _by_micro_batch(model, x, y, lf, wanted, chunk_size, lambda s: _site_grads(s, None))
    return {n: out[n] for n in wanted}


def per_sample_grad_norms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "ce",
    backend: str = "auto",
    per_layer: bool = False,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
) -> Tensor | dict[str, Tensor]:
    """Euclidean norm of each sample's gradient, over the wanted weights.

    Args:
        model, x, y, loss, params, chunk_size: as :func:`per_sample_grads`.
        backend: ``auto`` | ``func`` | ``hooks`` | ``ghost`` (module docstring).
        per_layer: return ``{layer name: (B,)}`` (a layer's weight and bias together; ``""`` for
            parameters of the root module) instead of the total ``(B,)``.

    Returns:
        ``(B,)`` norms, or the per-layer dict; float32 (float64 for a float64 model).
    """
    _check_backend(backend)
    _check_inputs(model, x, y)
    lf = _loss_fn(loss)
    wanted = _wanted(model, params)
    mode = backend
    if backend == "auto" and unsupported_layers(model, wanted):
        mode = "func"
    if mode in ("func", "hooks"):
        grads = per_sample_grads(model, x, y, loss=lf, backend=mode, params=wanted, chunk_size=chunk_size)
        sq: dict[str, Tensor] = {}
        for n, g in grads.items():
            k = _layer_of(n)
            sq[k] = sq.get(k, 0) + g.flatten(1).square().sum(1)
    else:
        sq = _by_micro_batch(model, x, y, lf, wanted, chunk_size, lambda s: {s.name: _site_sqnorms(s, mode, None)})
    if per_layer:
        return {k: v.sqrt() for k, v in sq.items()}
    return torch.stack(list(sq.values())).sum(0).sqrt()
