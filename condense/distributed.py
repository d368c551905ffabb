"""Class-parallel distillation on ``torch.distributed``: ranks, the class partition, collectives.

A class-parallel run is one job in several processes ("ranks", started by ``torchrun``). Each
rank owns a block of classes: their synthetic images, their optimizer state, their real batches
and their share of the loss. Everything random is drawn by EVERY rank in the order a single
process draws it (the network of an iteration, the real-batch keys of all classes, the DSA
parameters of all classes, the inner loop's shuffles), from the one generator seeded by the
run's seed; a rank keeps only its own classes' part of each draw. The ranks' generators therefore
stay in the same state, and a rank computes for its classes exactly what one process computes
for them. Where a network trains on the synthetic images of all classes (the DC/DSA inner loop)
the ranks sum their gradients (:meth:`ClassShard.all_reduce_`).

Pieces:

- :func:`session`: init the default process group from torchrun's variables (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on a CPU, NCCL on CUDA
  (``cuda:LOCAL_RANK``); a no-op without them or with ``WORLD_SIZE=1``. A SLURM job that submitit
  started with several tasks (``hydra/launcher=slurm hydra.launcher.tasks_per_node=2``) gets
  them from SLURM's (:func:`env_world`), so its tasks are the ranks of one run.
- :func:`partition`: the class partition, CONTIGUOUS blocks in rank order (the first
  ``K % W`` ranks get one class more), so the gathered set is class-major by concatenation.
- :class:`ClassShard`: one rank's classes and the collectives the runner and the methods use
  (sum of gradients and metrics, agreement on flags, gathering the set in class order).
- :class:`RankLostError`: a collective failed or timed out (another rank died or hangs); one
  line naming this rank and saying how to resume. The timeout is ``$CONDENSE_DIST_TIMEOUT``
  seconds (default :data:`DEFAULT_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from condense.errors import ConfigError, RankLostError

__all__ = ["DEFAULT_TIMEOUT_S", "ENV_TIMEOUT", "ClassShard", "RankLostError", "World", "check_class_parallel",
           "current", "env_world", "partition", "rank_device", "session", "timeout_s"]

log = logging.getLogger(__name__)

#: Environment variable: seconds a rank waits in a collective before it gives up.
ENV_TIMEOUT = "CONDENSE_DIST_TIMEOUT"
#: Default of :data:`ENV_TIMEOUT`: long enough for uneven data loading, short enough to notice a hang.
DEFAULT_TIMEOUT_S = 600.0
#: What the message of a lost rank tells the user to do.
RESUME_HINT = ("every rank's checkpoints stay in the run directory: rerun the same torchrun command "
               "with resume=true to continue from the newest one all ranks have")


@dataclass(frozen=True)
class World:
    """This process's place in a job: ``rank`` of ``size`` (1 without a process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be an integer (torchrun sets it), got {raw!r}") from None


def _export_submitit_slurm() -> None:
    """In a submitit SLURM job of several tasks without torchrun's variables, export them from
    SLURM's (``submitit.helpers.TorchDistributedEnvironment``: rank ``SLURM_PROCID`` of
    ``SLURM_NTASKS``, master = the job's first node, a port derived from the job id)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    if (_env_int("SLURM_NTASKS", 1) or 1) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world() -> World:
    """The world torchrun describes in the environment (``World()`` when it describes none).

    In a submitit SLURM job with several tasks (and no torchrun variables) the variables are
    first exported from SLURM's, so each task is a rank.

    Raises:
        ConfigError: ``WORLD_SIZE`` without ``RANK`` (or the reverse), or a rank out of range.
    """
    _export_submitit_slurm()
    size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    if size is None and rank is None:
        return World()
    if size is None or rank is None:
        raise ConfigError("$WORLD_SIZE and $RANK must be set together (torchrun sets both); "
                          f"got WORLD_SIZE={size}, RANK={rank}")
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"$RANK={rank} is not in 0..$WORLD_SIZE-1 (WORLD_SIZE={size})")
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", 0) or 0)


def timeout_s() -> float:
    """Seconds a collective may wait (``$CONDENSE_DIST_TIMEOUT``, default :data:`DEFAULT_TIMEOUT_S`)."""
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"${ENV_TIMEOUT} must be a number of seconds > 0, got {raw!r}")
    return value


def current() -> World:
    """The world of the initialised default process group, else ``World()``."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=_env_int("LOCAL_RANK", 0) or 0, backend=str(dist.get_backend()))


def rank_device(device: torch.device, world: World) -> torch.device:
    """``device`` for this rank: CUDA without an index becomes ``cuda:LOCAL_RANK`` (modulo the
    visible GPUs: a SLURM task that sees only its own GPU gets ``cuda:0``)."""
    if device.type == "cuda" and device.index is None and world.parallel:
        return torch.device("cuda", world.local_rank % max(torch.cuda.device_count(), 1))
    return device


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """The job's world and this rank's device, with the default process group initialised.

    Without torchrun's variables (or with ``WORLD_SIZE=1``) this is ``World()`` and ``device``
    unchanged, and nothing is initialised. A process group initialised by the caller is used as
    it is; one initialised here is destroyed on leaving.

    Raises:
        ConfigError: inconsistent environment variables or an existing group of another size.
    """
    want = env_world()
    if not want.parallel:
        yield World(), device
        return
    if not dist.is_available():
        raise ConfigError("$WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        have = current()
        if have.size != want.size:
            raise ConfigError(f"a process group of {have.size} ranks is initialised but $WORLD_SIZE is "
                              f"{want.size}; initialise it with all ranks or unset $WORLD_SIZE")
        yield have, rank_device(device, have)
        return
    dev = rank_device(device, want)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except RuntimeError as e:  # DistNetworkError / DistStoreError: the rendezvous failed
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise _lost(want, f"the start (rendezvous at {where})", e) from e
    world = World(rank=want.rank, size=want.size, local_rank=want.local_rank, backend=backend)
    log.info("class-parallel run: rank %d of %d (%s, %s)", world.rank, world.size, backend, dev)
    try:
        yield world, dev
    finally:
        with contextlib.suppress(Exception):  # a lost peer must not hide the error being raised
            dist.destroy_process_group()


def partition(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous class blocks ``[(lo, hi), ...]`` of every rank, in rank order.

    Block sizes differ by at most one; the first ``num_classes % world_size`` ranks get the larger.

    Raises:
        ConfigError: more ranks than classes.
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size > num_classes:
        raise ConfigError(f"class-parallel run with {world_size} ranks but only {num_classes} classes: "
                          f"every rank needs a class; use at most {num_classes} processes")
    base, extra = divmod(num_classes, world_size)
    out, lo = [], 0
    for r in range(world_size):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _lost(world: World, what: str, err: BaseException) -> RankLostError:
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    cause = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", cause)  # the backend's source location
    cause = cause.split(". This is typically")[0][:240]
    return RankLostError(f"class-parallel run: rank {world.rank} of {world.size} lost the other ranks during "
                         f"{what} (a rank died, was killed or hangs longer than ${ENV_TIMEOUT}="
                         f"{timeout_s():.0f} s; backend: {cause}); {RESUME_HINT}")


@dataclass(frozen=True)
class ClassShard:
    """One rank's classes ``[lo, hi)`` of ``num_classes`` and the collectives over all ranks.

    Every collective raises :class:`RankLostError` (one line) when another rank is gone.
    Collectives run on the default process group; tensors on the run's device.
    """

    rank: int
    world_size: int
    num_classes: int

    @classmethod
    def of(cls, world: World, num_classes: int) -> ClassShard:
        shard = cls(world.rank, world.size, num_classes)
        partition(num_classes, world.size)  # raises for more ranks than classes
        return shard

    @property
    def bounds(self) -> tuple[int, int]:
        return partition(self.num_classes, self.world_size)[self.rank]

    @property
    def lo(self) -> int:
        return self.bounds[0]

    @property
    def hi(self) -> int:
        return self.bounds[1]

    @property
    def classes(self) -> int:
        """How many classes this rank owns."""
        lo, hi = self.bounds
        return hi - lo

    @property
    def world(self) -> World:
        return World(rank=self.rank, size=self.world_size)

    def rows(self, per_class: int) -> slice:
        """This rank's rows of a class-major tensor with ``per_class`` rows per class."""
        lo, hi = self.bounds
        return slice(lo * per_class, hi * per_class)

    def labels(self, per_class: int, device: torch.device | str) -> torch.Tensor:
        """``(classes * per_class,)`` int64 class-major labels of this rank's classes."""
        lo, hi = self.bounds
        return torch.arange(lo, hi, device=device).repeat_interleave(per_class)

    def describe(self) -> str:
        lo, hi = self.bounds
        return f"rank {self.rank} of {self.world_size} (classes {lo}..{hi - 1})"

    # -- collectives ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except RankLostError:
            raise
        except RuntimeError as e:  # DistBackendError / DistNetworkError are RuntimeErrors
            raise _lost(self.world, what, e) from e

    def all_reduce_(self, tensors: Sequence[torch.Tensor], what: str = "the sum of the gradients") -> None:
        """Sum ``tensors`` over all ranks, in place (ONE collective over a flat buffer)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self._guard(what):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def sum_scalars(self, values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
        """``{key: sum over ranks}`` of per-rank float scalars (same keys on every rank)."""
        if not values:
            return {}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        with self._guard("the sum of the metrics"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = dict(zip(keys, t.tolist(), strict=True))
        return {k: out[k] for k in values}

    def max_ints(self, values: Sequence[int], what: str, device: torch.device | str = "cpu") -> list[int]:
        """Element-wise maximum over ranks of small integers (flags: "does any rank want to stop?")."""
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
        with self._guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """``obj`` of every rank, in rank order (small picklable values only)."""
        out: list[Any] = [None] * self.world_size
        with self._guard(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        with self._guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_classes(self, x: torch.Tensor, per_class: int, what: str = "the gather of the synthetic set") -> torch.Tensor:
        """The class-major tensor of ALL classes from every rank's block, on every rank.

        Args:
            x: ``(classes * per_class, ...)`` this rank's rows (class-major).
            per_class: rows per class.

        Returns:
            ``(num_classes * per_class, ...)``: the blocks concatenated in rank (= class) order.
        """
        blocks = partition(self.num_classes, self.world_size)
        most = max(hi - lo for lo, hi in blocks) * per_class
        x = x.detach().contiguous()
        if x.shape[0] != self.classes * per_class:
            raise ValueError(f"{self.describe()} holds {x.shape[0]} rows, expected {self.classes * per_class}")
        pad = x.new_zeros((most, *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in blocks]
        with self._guard(what):
            dist.all_gather(parts, pad)
        return torch.cat([p[: (hi - lo) * per_class] for p, (lo, hi) in zip(parts, blocks, strict=True)])

    def barrier(self, what: str) -> None:
        with self._guard(what):
            dist.barrier()


def check_class_parallel(ctx: Any, method: str) -> None:
    """A class-parallel run needs networks whose output for an image does not depend on the
    other images of the forward (no BatchNorm): DM/DataDAM normalise, and DC/DSA train, over
    batches that mix the classes, which the ranks would each see only in part.

    Builds a probe network of the context's architecture with its own generator (the run's
    generator is not touched).

    Raises:
        ConfigError: the network has BatchNorm layers.
    """
    from condense.models import create_model
    from condense.train.engine import has_batchnorm

    spec = ctx.spec
    probe = create_model(ctx.model_name, channels=spec.channels, num_classes=spec.num_classes,
                         im_size=spec.im_size, generator=torch.Generator().manual_seed(0), **ctx.model_kwargs)
    if has_batchnorm(probe):
        raise ConfigError(f"{method}: class-parallel runs need a network without BatchNorm (its train-mode "
                          f"statistics mix the classes of one batch, which the ranks hold apart); "
                          f"{ctx.model_name!r} has BatchNorm: use a norm of one image (the default "
                          "convnet, instancenorm) or run with one process")
