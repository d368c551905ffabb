"""The one synthesis loop: iterations and/or a wall-clock budget, checkpoints, resume, signals,
NaN guards, metrics (``metrics.jsonl``), callbacks (periodic evaluation, wandb) and a progress bar.
"""

from __future__ import annotations

import io
import json
import logging
import math
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
from condense.synth.base import Synthesizer
from condense.types import SyntheticSet

log = logging.getLogger(__name__)

CKPT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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
        resume: continue from ``run_dir/checkpoint.pt`` if it exists.
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

    def info(self) -> dict[str, Any]:
        return {"iterations": self.iterations_done, "iterations_planned": self.iterations_planned,
                "wall_s": round(self.wall_s, 3), "init_s": round(self.init_s, 3),
                "prepare_s": round(self.prepare_s, 3), "prepare_info": dict(self.prepare_info),
                "stopped_by": self.stopped_by}


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


def _save_checkpoint(path: Path, synth: Synthesizer, syn: SyntheticSet, it: int, elapsed: float) -> None:
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
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, synth: Synthesizer, syn: SyntheticSet) -> tuple[int, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
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


def _check_finite(it: int, metrics: dict[str, float], syn: SyntheticSet, ckpt: Path | None) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    what = f"metric(s) {', '.join(bad)}" if bad else None
    if what is None and not bool(torch.isfinite(syn.images).all()):
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


def run(synth: Synthesizer, cfg: RunConfig) -> RunResult:
    """Run ``synth`` under ``cfg`` and return the finished synthetic set.

    ``synth.prepare()`` runs first, off the clock: its time is reported as ``prepare_s`` and is
    neither part of ``wall_s`` nor of ``cfg.max_seconds`` (a resumed run prepares again, again
    off the clock; with a cache that is a load).

    Raises:
        RunInterrupted: on SIGINT/SIGTERM, after writing a checkpoint.
        NonFiniteError: on NaN/inf loss or images (the last good checkpoint is kept).
    """
    total = synth.iterations if cfg.iterations is None else int(cfg.iterations)
    run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else None
    ckpt = run_dir / CKPT_NAME if run_dir is not None else None
    metrics_path = run_dir / METRICS_NAME if run_dir is not None else None
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
    for cb in cfg.callbacks:
        cb.on_start(syn, start)
    t0 = time.perf_counter()
    it = start
    stopped_by = "iterations"
    bar = None
    if cfg.progress and total > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=synth.name, dynamic_ncols=True, leave=False)
    mf = open(metrics_path, "a") if metrics_path is not None and total > 0 else None  # noqa: SIM115
    try:
        with _SignalFlag() as flag:
            last_step: float | None = None  # the previous iteration's time: the next one's estimate
            while it < total:
                if cfg.max_seconds is not None:
                    now = elapsed0 + time.perf_counter() - t0
                    if now >= cfg.max_seconds or (last_step is not None and now + last_step > cfg.max_seconds):
                        stopped_by = "deadline"
                        log.info("wall-clock budget of %.0f s: stopping after %d/%d iterations at %.0f s "
                                 "(the next would end at ~%.0f s)", cfg.max_seconds, it, total, now,
                                 now + (last_step or 0.0))
                        break
                ts = time.perf_counter()
                metrics = {k: float(v) for k, v in synth.step(syn, it).items()}
                it += 1
                _check_finite(it, metrics, syn, ckpt)
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
                if ckpt is not None and cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < total:
                    _save_checkpoint(ckpt, synth, syn, it, elapsed)
                if flag.signum is not None:
                    if ckpt is not None:
                        _save_checkpoint(ckpt, synth, syn, it, elapsed)
                    raise RunInterrupted(flag.signum, it, ckpt)
    finally:
        if bar is not None:
            bar.close()
        if mf is not None:
            mf.close()
    wall = elapsed0 + time.perf_counter() - t0
    if ckpt is not None and total > 0:
        _save_checkpoint(ckpt, synth, syn, it, wall)
    syn = synth.finalize(syn)
    syn = syn.detach_clone()
    result = RunResult(syn=syn, iterations_done=it, iterations_planned=total, wall_s=wall, stopped_by=stopped_by,
                       init_s=init_s, prepare_s=prepare_s, prepare_info=dict(synth.prepare_info))
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
