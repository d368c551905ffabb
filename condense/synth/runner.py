"""The one synthesis loop: iterations and/or a wall-clock budget, checkpoints, resume, signals,
NaN guards, metrics (``metrics.jsonl``), callbacks (periodic evaluation, wandb) and a progress bar.

Class-parallel runs (``synth.ctx.shard`` set, several ranks under torchrun; see
:mod:`condense.distributed`): every rank runs this loop on its classes. The ranks sum their
metric shares after each step and agree on the deadline, signals and NaN images (one small
collective each), so they always stop together. Each rank writes its own checkpoints,
``checkpoint.rank<r>-of-<W>.it<N>.pt``, keeping its two newest; a resume continues from the newest
iteration EVERY rank has a checkpoint of (a rank that died while writing leaves its previous
one). Rank 0 alone writes ``metrics.jsonl`` and shows the progress bar. At the end every rank
gathers the whole set in class order (``RunResult.syn``); callbacks run on every rank and see
that rank's classes in ``on_start`` / ``on_step`` and the whole set in ``on_end``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condense.errors import ConfigError, NonFiniteError
from condense.provenance import atomic_write_bytes
from condense.synth.base import Synthesizer, require_class_parallel
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
#: A class-parallel rank's checkpoint: ``checkpoint.rank<r>-of-<W>.it<N>.pt``.
RANK_CKPT = re.compile(r"^checkpoint\.rank(\d+)-of-(\d+)\.it(\d+)\.pt$")


_BAD = "__images_not_finite"  # a class-parallel rank's NaN flag, summed with the metrics


def rank_checkpoint_name(rank: int, world_size: int, iteration: int) -> str:
    """The file name of rank ``rank``'s checkpoint after ``iteration`` in a run of ``world_size`` ranks."""
    return f"checkpoint.rank{rank}-of-{world_size}.it{iteration}.pt"


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written (``resume=true`` continues)."""

    def __init__(self, signum: int, iteration: int, ckpt: Path | None) -> None:
        self.signum = signum
        self.iteration = iteration
        self.ckpt = ckpt
        super().__init__(f"stopped by signal {signum} after iteration {iteration}; "
                         f"checkpoint: {ckpt if ckpt else 'none (no run_dir)'}")


class Callback:
    """Observes a run. Callbacks never change the loss or the images."""

    def on_start(self, syn: SyntheticSet, start_it: int) -> None: ...

    def on_step(self, it: int, metrics: dict[str, float], syn: SyntheticSet) -> dict[str, float] | None:
        """Return extra scalars to log (e.g. an evaluation accuracy) or None."""
        return None

    def on_end(self, syn: SyntheticSet, info: dict[str, Any]) -> None: ...


@dataclass
class RunConfig:
    """What the runner needs besides the synthesizer.

    Attributes:
        iterations: outer iterations (None: the method config's ``iterations``).
        max_seconds: wall-clock budget for the iterations (None: unlimited); the run stops cleanly
            before starting an iteration that would end past it (judged by the previous
            iteration's time; the first one after a start or resume always runs) and records how
            far it got. Iterations of minutes (DC/DSA at ipc 10/50 on a CPU) would otherwise
            overrun the budget by up to one iteration.
        run_dir: where ``metrics.jsonl`` and the checkpoint go (None: nowhere).
        ckpt_every: write a checkpoint every N iterations (0: only on signals and at the end).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists (class-parallel: from the
            newest iteration every rank has a checkpoint of).
        progress: show a tqdm progress bar.
    """

    iterations: int | None = None
    max_seconds: float | None = None
    run_dir: Path | None = None
    ckpt_every: int = 0
    resume: bool = False
    progress: bool = True
    callbacks: Sequence[Callback] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.iterations is not None and self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0 (or null for no limit), got {self.max_seconds}")
        if self.ckpt_every < 0:
            raise ConfigError(f"ckpt_every must be >= 0, got {self.ckpt_every}")


@dataclass
class RunResult:
    syn: SyntheticSet
    iterations_done: int
    iterations_planned: int
    wall_s: float
    stopped_by: str  # "iterations" | "deadline"
    init_s: float = 0.0  # of wall_s: building the starting set (this process; a resumed run's is in wall_s)
    prepare_s: float = 0.0  # NOT in wall_s: ``Synthesizer.prepare`` (teachers, experts) in this process
    prepare_info: dict[str, Any] = field(default_factory=dict)  # ``Synthesizer.prepare_info``
    ranks: int = 1  # processes of a class-parallel run (1: one process)

    def info(self) -> dict[str, Any]:
        out = {"iterations": self.iterations_done, "iterations_planned": self.iterations_planned,
               "wall_s": round(self.wall_s, 3), "init_s": round(self.init_s, 3),
               "prepare_s": round(self.prepare_s, 3), "prepare_info": dict(self.prepare_info),
               "stopped_by": self.stopped_by}
        if self.ranks > 1:
            out["ranks"] = self.ranks
        return out


class _SignalFlag:
    """Sets a flag on SIGINT/SIGTERM inside a ``with`` block (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _save_checkpoint(path: Path, synth: Synthesizer, syn: SyntheticSet, it: int, elapsed: float,
                     extra: dict[str, Any] | None = None) -> None:
    state = {
        "iteration": it,
        "elapsed_s": elapsed,
        "images": syn.images.detach().cpu(),
        "labels": syn.labels.detach().cpu(),
        "lr": None if syn.lr is None else syn.lr.detach().cpu(),
        "synth": synth.state_dict(),
        "rng": synth.ctx.generator.get_state(),
        "method": synth.name,
        "config": synth.resume_fingerprint(),
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, synth: Synthesizer, syn: SyntheticSet,
                     expect: dict[str, Any] | None = None) -> tuple[int, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, want in (expect or {}).items():
        if state.get(key) != want:
            raise ConfigError(f"checkpoint {path} has {key}={state.get(key)!r}, this rank needs {want!r}; "
                              "resume with the process count that wrote it, or use another run directory")
    if state.get("method") != synth.name:
        raise ConfigError(f"checkpoint {path} belongs to method {state.get('method')!r}, "
                          f"not {synth.name!r}; use another run directory or resume=false")
    saved = state.get("config")  # absent in checkpoints of older versions: not checked
    current = synth.resume_fingerprint()
    if saved is not None and saved != current:
        old, new = json.loads(saved), json.loads(current)
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                         if old.get(k) != new.get(k))
        raise ConfigError(f"checkpoint {path} was written with another {synth.name} config ({diff}); "
                          "resuming would mix the two: rerun with the checkpoint's settings, or use "
                          "another run directory / resume=false")
    with torch.no_grad():
        syn.images.copy_(state["images"].to(syn.images.device))
        if syn.labels.shape == state["labels"].shape:
            syn.labels.copy_(state["labels"].to(syn.labels.device))
        if syn.lr is not None and state.get("lr") is not None:
            syn.lr.copy_(state["lr"].to(syn.lr.device))
    synth.load_state_dict(state["synth"])
    synth.ctx.generator.set_state(state["rng"])
    return int(state["iteration"]), float(state.get("elapsed_s", 0.0))


def _check_finite(it: int, metrics: dict[str, float], syn: SyntheticSet, ckpt: Path | None,
                  images_finite: bool | None = None) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    what = f"metric(s) {', '.join(bad)}" if bad else None
    finite = bool(torch.isfinite(syn.images).all()) if images_finite is None else images_finite
    if what is None and not finite:
        what = "the synthetic images"
    if what is not None:
        where = f"the last good checkpoint is kept at {ckpt}" if ckpt and ckpt.exists() else "no checkpoint was written yet"
        raise NonFiniteError(f"iteration {it}: {what} became NaN/inf ({metrics}); {where}. "
                             "Lower the image learning rate or try bf16=false.")


def _truncate_metrics(path: Path, last_it: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("it", 0) <= last_it]
    atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


class _RankCheckpoints:
    """A class-parallel rank's checkpoints in ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: Path, shard: Any) -> None:
        self.dir = run_dir
        self.shard = shard
        self.last: int | None = None  # the newest iteration saved or resumed in this run

    def path(self, it: int) -> Path:
        return self.dir / rank_checkpoint_name(self.shard.rank, self.shard.world_size, it)

    @property
    def latest(self) -> Path | None:
        return None if self.last is None else self.path(self.last)

    def _files(self) -> list[tuple[int, int, int, Path]]:
        """Every rank checkpoint in the directory: ``(rank, world_size, iteration, path)``."""
        out = []
        for p in self.dir.glob("checkpoint.rank*.pt"):
            m = RANK_CKPT.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), p))
        return out

    def _mine(self) -> dict[int, Path]:
        r, w = self.shard.rank, self.shard.world_size
        return {it: p for rank, ws, it, p in self._files() if rank == r and ws == w}

    def extra(self) -> dict[str, Any]:
        return {"rank": self.shard.rank, "world_size": self.shard.world_size, "classes": list(self.shard.bounds)}

    def clear(self) -> None:
        """A run that does not resume: remove this rank's checkpoints of earlier runs (rank 0 also
        those of runs with another process count and a one-process ``checkpoint.pt``), as a
        one-process run replaces its ``checkpoint.pt``; a later ``resume`` finds this run's only."""
        mine = set(self._mine().values())
        for _, ws, _, p in self._files():
            if p in mine or (self.shard.rank == 0 and ws != self.shard.world_size):
                p.unlink(missing_ok=True)
        if self.shard.rank == 0:
            (self.dir / CKPT_NAME).unlink(missing_ok=True)

    def save(self, synth: Synthesizer, syn: SyntheticSet, it: int, elapsed: float) -> None:
        """Write this rank's checkpoint of iteration ``it``; keep it and the previous one only."""
        _save_checkpoint(self.path(it), synth, syn, it, elapsed, self.extra())
        keep = {it, self.last}
        for i, p in self._mine().items():
            if i not in keep:
                p.unlink(missing_ok=True)
        self.last = it

    def resume(self, synth: Synthesizer, syn: SyntheticSet) -> tuple[int, float] | None:
        """Load the newest iteration every rank has; ``None`` when no rank has a checkpoint.

        Raises:
            ConfigError: the same on every rank: checkpoints of another process count or of a
                one-process run, or no iteration that every rank has.
        """
        w = self.shard.world_size
        other = sorted({ws for _, ws, _, _ in self._files() if ws != w})
        problem = None
        if (self.dir / CKPT_NAME).exists():
            problem = (f"{self.dir} holds a one-process checkpoint ({CKPT_NAME}); resume it with one process "
                       "(without torchrun), or use another run directory")
        elif other:
            problem = (f"{self.dir} holds checkpoints of a run with {other[0]} ranks, not {w}; resume with "
                       f"torchrun --nproc-per-node {other[0]}, or use another run directory")
        views = self.shard.all_gather_object({"its": sorted(self._mine()), "problem": problem},
                                             "the choice of the checkpoint to resume from")
        problems = [v["problem"] for v in views if v["problem"]]
        if problems:
            raise ConfigError(problems[0])
        if not any(v["its"] for v in views):
            return None
        common = set.intersection(*(set(v["its"]) for v in views))
        if not common:
            have = "; ".join(f"rank {r}: {v['its'] or 'none'}" for r, v in enumerate(views))
            raise ConfigError(f"no iteration has a checkpoint of every rank in {self.dir} ({have}); "
                              "use another run directory or resume=false")
        it = max(common)
        out = _load_checkpoint(self.path(it), synth, syn, self.extra())
        self.last = it
        return out


def _refuse_rank_checkpoints(run_dir: Path) -> None:
    """A one-process ``resume`` in a directory of a class-parallel run: say how to resume it."""
    sizes = sorted({int(m.group(2)) for p in run_dir.glob("checkpoint.rank*.pt") if (m := RANK_CKPT.match(p.name))})
    if sizes:
        raise ConfigError(f"{run_dir} holds the checkpoints of a class-parallel run of {sizes[0]} ranks; resume it "
                          f"with torchrun --nproc-per-node {sizes[0]} (resume=true), or use another run directory")


def _gather_set(syn: SyntheticSet, shard: Any, ipc: int) -> SyntheticSet:
    """The whole set, class-major, from every rank's classes (on every rank)."""
    return dataclasses.replace(syn, images=shard.gather_classes(syn.images, ipc),
                               labels=shard.gather_classes(syn.labels, ipc))


def run(synth: Synthesizer, cfg: RunConfig) -> RunResult:
    """Run ``synth`` under ``cfg`` and return the finished synthetic set.

    ``synth.prepare()`` runs first, off the clock: its time is reported as ``prepare_s`` and is
    neither part of ``wall_s`` nor of ``cfg.max_seconds`` (a resumed run prepares again, again
    off the clock; with a cache that is a load).

    Class-parallel (``synth.ctx.shard``): see the module docstring; ``RunResult.syn`` is the
    whole set on every rank.

    Raises:
        RunInterrupted: on SIGINT/SIGTERM, after writing a checkpoint.
        NonFiniteError: on NaN/inf loss or images (the last good checkpoint is kept).
        condense.distributed.RankLostError: class-parallel, another rank died or hangs.
    """
    total = synth.iterations if cfg.iterations is None else int(cfg.iterations)
    run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else None
    shard = synth.ctx.shard
    if shard is not None:
        require_class_parallel(type(synth), synth.ctx)
    main = shard is None or shard.rank == 0
    ckpt = run_dir / CKPT_NAME if run_dir is not None and shard is None else None
    ranked = _RankCheckpoints(run_dir, shard) if run_dir is not None and shard is not None else None
    metrics_path = run_dir / METRICS_NAME if run_dir is not None and main else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    t_prep = time.perf_counter()
    synth.prepare()
    prepare_s = time.perf_counter() - t_prep
    log.info("prepare (teachers/experts, off the distillation clock): %.1f s", prepare_s)
    t_init = time.perf_counter()
    syn = synth.init_set()
    init_s = time.perf_counter() - t_init  # counted in the wall time and the deadline (a resume restores it)
    start, elapsed0 = 0, init_s
    if cfg.resume and ckpt is not None and ckpt.exists():
        start, elapsed0 = _load_checkpoint(ckpt, synth, syn)
        _truncate_metrics(metrics_path, start)
        log.info("resumed from %s at iteration %d", ckpt, start)
    elif cfg.resume and ckpt is not None:
        _refuse_rank_checkpoints(run_dir)
    elif ranked is not None and cfg.resume:
        got = ranked.resume(synth, syn)
        if got is not None:
            start, elapsed0 = got
            if metrics_path is not None:
                _truncate_metrics(metrics_path, start)
            log.info("%s resumed from %s at iteration %d", shard.describe(), ranked.latest, start)
    elif ranked is not None:
        ranked.clear()

    def save(it: int, elapsed: float) -> Path | None:
        if ranked is not None:
            ranked.save(synth, syn, it, elapsed)
            return ranked.latest
        if ckpt is not None:
            _save_checkpoint(ckpt, synth, syn, it, elapsed)
        return ckpt

    for cb in cfg.callbacks:
        cb.on_start(syn, start)
    t0 = time.perf_counter()
    it = start
    stopped_by = "iterations"
    bar = None
    if cfg.progress and total > 0 and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=synth.name, dynamic_ncols=True, leave=False)
    mf = open(metrics_path, "a") if metrics_path is not None and total > 0 else None  # noqa: SIM115
    try:
        with _SignalFlag() as flag:
            last_step: float | None = None  # the previous iteration's time: the next one's estimate
            while it < total:
                if cfg.max_seconds is not None:
                    now = elapsed0 + time.perf_counter() - t0
                    late = now >= cfg.max_seconds or (last_step is not None and now + last_step > cfg.max_seconds)
                    if shard is not None:  # the ranks stop together when one of them would end late
                        late = bool(shard.max_ints([late], "the deadline check", synth.ctx.device)[0])
                    if late:
                        stopped_by = "deadline"
                        log.info("wall-clock budget of %.0f s: stopping after %d/%d iterations at %.0f s "
                                 "(the next would end at ~%.0f s)", cfg.max_seconds, it, total, now,
                                 now + (last_step or 0.0))
                        break
                ts = time.perf_counter()
                metrics = {k: float(v) for k, v in synth.step(syn, it).items()}
                it += 1
                if shard is None:
                    _check_finite(it, metrics, syn, ckpt)
                else:  # the metrics' shares summed and the NaN check agreed: all ranks act alike
                    metrics[_BAD] = float(not bool(torch.isfinite(syn.images).all()))
                    metrics = shard.sum_scalars(metrics, synth.ctx.device)
                    finite = metrics.pop(_BAD) == 0.0
                    _check_finite(it, metrics, syn, ranked.latest if ranked else None, images_finite=finite)
                step_s = last_step = time.perf_counter() - ts
                for cb in cfg.callbacks:
                    extra = cb.on_step(it, metrics, syn)
                    if extra:
                        metrics.update({k: float(v) for k, v in extra.items()})
                elapsed = elapsed0 + time.perf_counter() - t0
                if mf is not None:
                    mf.write(json.dumps({"it": it, **metrics, "step_s": round(step_s, 4),
                                         "elapsed_s": round(elapsed, 3)}) + "\n")
                    mf.flush()
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                    bar.update(1)
                if cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < total:
                    save(it, elapsed)
                signum = flag.signum
                if shard is not None:  # one rank's signal stops every rank (torchrun signals them all)
                    signum = shard.max_ints([signum or 0], "the signal check", synth.ctx.device)[0] or None
                if signum is not None:
                    raise RunInterrupted(signum, it, save(it, elapsed))
    finally:
        if bar is not None:
            bar.close()
        if mf is not None:
            mf.close()
    wall = elapsed0 + time.perf_counter() - t0
    if total > 0:
        save(it, wall)
    if shard is not None:
        syn = _gather_set(syn, shard, synth.ctx.ipc)
    syn = synth.finalize(syn)
    syn = syn.detach_clone()
    result = RunResult(syn=syn, iterations_done=it, iterations_planned=total, wall_s=wall, stopped_by=stopped_by,
                       init_s=init_s, prepare_s=prepare_s, prepare_info=dict(synth.prepare_info),
                       ranks=1 if shard is None else shard.world_size)
    for cb in cfg.callbacks:
        cb.on_end(syn, result.info())
    return result


class EvalCallback(Callback):
    """Evaluates the current set every ``every`` iterations (observes; logs ``eval_acc``)."""

    def __init__(self, evaluator: Any, every: int) -> None:
        self.evaluator = evaluator
        self.every = int(every)

    def on_step(self, it: int, metrics: dict[str, float], syn: SyntheticSet) -> dict[str, float] | None:
        if self.every <= 0 or it % self.every:
            return None
        rep = self.evaluator.evaluate(syn.detach_clone())
        first = next(iter(rep.summary.values()))
        return {"eval_acc": first["mean"]}


class WandbCallback(Callback):
    """Logs metrics to Weights & Biases (offline mode unless told otherwise)."""

    def __init__(self, project: str, mode: str = "offline", run_dir: Path | None = None,
                 config: dict[str, Any] | None = None, name: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir) if run_dir else None,
                              config=config, name=name, reinit=True)

    def on_step(self, it: int, metrics: dict[str, float], syn: SyntheticSet) -> None:
        self.run.log(metrics, step=it)
        return None

    def on_end(self, syn: SyntheticSet, info: dict[str, Any]) -> None:
        self.run.summary.update(info)
        self.run.finish()
