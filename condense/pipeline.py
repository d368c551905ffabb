"""The pipeline on a plain config dict: validate, load data, synthesize, save, evaluate, export,
record. Hydra-free; :mod:`condense.api` (named configs for Python users) and the CLI (Hydra's
composition) both hand it the resolved config dict, so a run is the same whichever way it starts.

Under ``torchrun`` with several processes (:mod:`condense.distributed`) a run is class-parallel:
every rank validates the config, loads the data and distils its block of classes; the run
directory is rank 0's (broadcast, so a timestamp in it cannot differ between ranks); rank 0
alone writes the artifact, evaluates, exports and writes the record, the other ranks write
nothing but their checkpoints and return the same set and record without files (``paths`` empty).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condense import config as C
from condense import distributed, provenance
from condense.data import describe_root
from condense.errors import ConfigError
from condense.synth import runner
from condense.types import EvalReport, SyntheticSet

log = logging.getLogger(__name__)

#: The default run directory (relative to the working directory), as ``hydra.run.dir`` in conf/config.yaml.
RUN_DIR = "runs/{dataset}/{method}/ipc{ipc}-{budget}-seed{seed}"


@dataclass
class DistilResult:
    """What :func:`distil` made.

    Attributes:
        synset: the distilled set (``images (N, C, H, W)`` in the dataset's normalized space).
        record: the run's benchmark-format record (DESIGN.md; also ``run_dir/result.json``).
        report: the evaluation (``None`` with ``evaluate=False``).
        run_dir: the artifact directory (``synset.safetensors``, ``manifest.json``, ...).
        paths: every file written, by role: ``artifact`` (= run_dir), ``synset``, ``manifest``,
            ``preview``, ``result``, ``eval`` (if evaluated), ``result_json`` (if asked),
            ``export-<kind>`` per export, ``labels`` (soft-label protocol with stored labels).
    """

    synset: SyntheticSet
    record: dict[str, Any]
    report: EvalReport | None
    run_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)


def default_run_dir(cfg: Mapping[str, Any]) -> Path:
    """``runs/<dataset>/<method>[+<variant>]/ipc<ipc>-<budget>-seed<seed>`` under the working directory."""
    v = C.variant(cfg)
    method = C.group_name(cfg, "method") + (f"+{v}" if v else "")
    return Path(RUN_DIR.format(dataset=C.group_name(cfg, "dataset"), method=method,
                               budget=C.group_name(cfg, "budget"), ipc=cfg.get("ipc"), seed=cfg.get("seed")))


def distil_config(cfg: Mapping[str, Any], *, explicit: Collection[str] = (), run_dir: str | Path | None = None,
                  callbacks: Sequence[runner.Callback] = (), command: str | None = None) -> DistilResult:
    """Distil with a resolved config dict (what :func:`condense.api.distil` and the CLI pass).

    Args:
        cfg: the plain config (method, dataset, model, eval, budget, logger nodes + top-level keys).
        explicit: method fields the budget's per-method settings must not replace (set by the user).
        run_dir: the artifact directory (default :func:`default_run_dir`, relative to the cwd).
        callbacks: extra runner callbacks (they observe).
        command: the command line stored in the record.

    Raises:
        ConfigError: a bad config value (one line; nothing written). DatasetNotFoundError,
        RunInterrupted: see :func:`condense.api.distil`.
    """
    cfg = dict(cfg)
    device = provenance.resolve_device(str(cfg.get("device") or "auto"))
    built = C.validate(cfg, set(explicit), device)
    out = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    with distributed.session(device) as (world, device):
        if not world.parallel:
            return _pipeline(cfg, built, device, out, list(callbacks), command)
        if not C.method_class(cfg).class_parallel:
            from condense.synth.base import require_class_parallel

            require_class_parallel(C.method_class(cfg))  # raises the same line on every rank
        return _pipeline(cfg, built, device, out, list(callbacks), command, world)


def _pipeline(cfg: dict[str, Any], built: C.Built, device: torch.device, run_dir: Path,
              extra_callbacks: list[runner.Callback], command: str | None,
              world: distributed.World | None = None) -> DistilResult:
    from condense.artifacts import save_synset
    from condense.eval import make_evaluator, write_eval_json

    method, dataset = C.group_name(cfg, "method"), C.group_name(cfg, "dataset")
    data = C.load_data(cfg, device)
    ctx = C.synth_context(cfg, data, device)
    C.check_ipc(cfg, int(ctx.index.min_count))
    main = world is None or world.is_main
    if world is not None:
        ctx = dataclasses.replace(ctx, shard=distributed.ClassShard.of(world, data.spec.num_classes))
        run_dir = Path(ctx.shard.broadcast_object(str(run_dir), "the broadcast of the run directory"))
        log.info("class-parallel %s on %s, run directory %s", method, ctx.shard.describe(), run_dir)
    synth = C.method_class(cfg)(built.method, ctx)
    evaluator = make_evaluator(built.eval, data, device) if cfg.get("evaluate", True) and main else None
    callbacks = (_callbacks(cfg, evaluator, run_dir, parallel=world is not None) if main else []) + extra_callbacks
    log.info("%s on %s, ipc %d, %d iterations (budget %s), %s (%s), device %s", method, dataset, cfg["ipc"],
             built.iterations, C.group_name(cfg, "budget"), built.precision.value, built.precision.source, device)
    code = provenance.code_version()  # the code that runs: taken before the (possibly hours-long) run
    speed = {"start": provenance.speed_probe(device)} if main else None
    result = runner.run(synth, C.run_config(cfg, run_dir, callbacks))
    if speed is not None:
        speed["end"] = provenance.speed_probe(device)
        log.info("machine speed probe: %.1f GFLOP/s at the start, %.1f at the end of the distillation "
                 "(fp32 GEMM)", speed["start"], speed["end"])
    syn = result.syn
    syn.meta.config = {"method": dataclasses.asdict(built.method), "run": cfg,
                       "precision": built.precision.to_dict()}
    syn.meta.code_version = code
    syn.meta.extra = {**syn.meta.extra, "distill": result.info()}
    if not main:  # rank 0 writes the artifact and the record, and evaluates
        record = result_record(cfg, built, result.info(), None, device, run_dir=run_dir, code=code,
                               command=command, data_root=getattr(data, "root", None))
        return DistilResult(synset=syn, record=record, report=None, run_dir=run_dir, paths={})
    report = evaluator.evaluate(syn) if evaluator is not None else None
    recipe = report.protocol if report is not None else None
    paths = {"artifact": run_dir, "manifest": save_synset(syn, run_dir, eval_recipe=recipe),
             "synset": run_dir / "synset.safetensors", "preview": run_dir / "preview.png"}
    if getattr(evaluator, "pending_labels", None) is not None:  # soft protocol, stored labels: into the artifact
        paths["labels"] = evaluator.save_pending(run_dir)
    record = result_record(cfg, built, result.info(), report, device, run_dir=run_dir, code=code,
                           speed=speed, command=command, data_root=getattr(data, "root", None),
                           stored_images=len(syn))
    if report is not None:
        paths["eval"] = write_eval_json(report, run_dir / "eval.json", method=record["method"],
                                        dataset=record["dataset"], ipc=record["ipc"], artifact=record["run_dir"])
    paths.update(export(syn, run_dir, cfg.get("export") or []))
    paths["result"] = run_dir / "result.json"
    provenance.write_json_atomic(paths["result"], record)
    if cfg.get("result_json"):
        paths["result_json"] = Path(str(cfg["result_json"]))
        provenance.write_json_atomic(paths["result_json"], record)
    return DistilResult(synset=syn, record=record, report=report, run_dir=run_dir, paths=paths)


def _callbacks(cfg: Mapping[str, Any], evaluator: Any, run_dir: Path,
               parallel: bool = False) -> list[runner.Callback]:
    """Periodic evaluation (``budget.eval_every``) and the logger of ``cfg["logger"]``.

    ``parallel``: a class-parallel run's rank 0, which holds part of the set during the run, so
    periodic evaluation is skipped (with a warning); the final evaluation runs as usual.
    """
    out: list[runner.Callback] = []
    every = int(C.node(cfg, "budget").get("eval_every") or 0)
    if every and evaluator is not None and parallel:
        log.warning("budget.eval_every=%d is ignored in a class-parallel run (each rank holds only its classes "
                    "during the run); the finished set is evaluated as usual", every)
    elif every and evaluator is not None:
        out.append(runner.EvalCallback(evaluator, every))
    logger = C.node(cfg, "logger")
    if logger.get("name") == "wandb":
        name = f"{C.group_name(cfg, 'method')}-{C.group_name(cfg, 'dataset')}-ipc{cfg['ipc']}-s{cfg['seed']}"
        out.append(runner.WandbCallback(str(logger.get("project", "condense")), mode=str(logger.get("mode", "offline")),
                                        run_dir=run_dir, config=dict(cfg), name=name))
    return out


def export(syn: SyntheticSet, run_dir: str | Path, kinds: Sequence[str]) -> dict[str, Path]:
    """Write the exports ``kinds`` (``imagefolder``, ``tensors``) of ``syn`` into ``run_dir/export-<kind>``."""
    from condense.artifacts import export_imagefolder, export_tensors

    writers = {"imagefolder": export_imagefolder, "tensors": export_tensors}
    out = {}
    for kind in C.check_exports(list(kinds)):
        out[f"export-{kind}"] = Path(run_dir) / f"export-{kind}"
        writers[kind](syn, out[f"export-{kind}"])
    return out


def result_record(cfg: Mapping[str, Any], built: C.Built, result_info: Mapping[str, Any],
                  report: EvalReport | None, device: torch.device | str, *, run_dir: Path | None = None,
                  code: dict[str, Any] | None = None, speed: dict[str, float] | None = None,
                  command: str | None = None, data_root: str | None = None,
                  stored_images: int | None = None) -> dict[str, Any]:
    """The benchmark-format record of DESIGN.md for one run.

    ``code``: the code version taken when the job started (default: now); a long run must not
    record a commit made while it ran. ``speed``: :func:`condense.provenance.speed_probe` GFLOP/s
    at the start and end of the distillation (``machine.gemm_gflops``). ``prepare.wall_s``: the
    method's preparation (teachers, experts) in this run, outside ``distill.wall_s``; with the
    method's ``prepare_info`` beside it (e.g. ``cold_s``: what training its cached experts took). Paths are relative to
    the working directory where they lie under it.
    """
    m = built.method
    return {
        "schema": 1,
        "kind": "ablation" if cfg.get("tag") else "accuracy",
        "tag": cfg.get("tag") or None,
        "method": C.group_name(cfg, "method"),
        "flip": bool(getattr(m, "flip", False)),
        **param_fields(cfg, stored_images),
        "dataset": C.group_name(cfg, "dataset"),
        "ipc": int(cfg["ipc"]),
        "budget": C.group_name(cfg, "budget"),
        "seed": int(cfg["seed"]),
        "precision": built.precision.to_dict(),
        "config": _portable_config(cfg),
        "method_config": dataclasses.asdict(m) if dataclasses.is_dataclass(m) else None,
        "code_version": code if code is not None else provenance.code_version(),
        "machine": {**provenance.machine_info(device), **({"gemm_gflops": speed} if speed else {})},
        "prepare": {"wall_s": result_info.get("prepare_s"), **(result_info.get("prepare_info") or {})},
        "distill": {"wall_s": result_info["wall_s"], "iterations": result_info["iterations"],
                    "iterations_planned": result_info["iterations_planned"],
                    "stopped_by": result_info["stopped_by"], "init_s": result_info.get("init_s"),
                    **({"ranks": result_info["ranks"]} if result_info.get("ranks") else {})},
        "eval": None if report is None else {"protocol": report.protocol, "runs": report.runs,
                                             "summary": report.summary, "wall_s": round(report.wall_s, 3)},
        "command": command,
        "run_dir": provenance.portable_path(run_dir) if run_dir is not None else None,
        "dataset_root": describe_root(data_root) if data_root else None,
    }


def param_fields(cfg: Mapping[str, Any], stored_images: int | None) -> dict[str, Any]:
    """A variant run's record fields: ``variant`` (:func:`condense.config.variant`, e.g. ``multi2``,
    part of the leaderboard row and the record path), ``labels`` when set; for multi-formation the
    decoder and both image counts. Nothing for a plain run."""
    out: dict[str, Any] = {}
    v = C.variant(cfg)
    if v:
        out["variant"] = v
    if C.labels_choice(cfg) is not None:
        out["labels"] = C.labels_choice(cfg)
    dec = C.param_decoder(cfg)
    if not dec.identity:
        out["decoder"] = dec.to_dict()
        out["images"] = {"stored": stored_images,
                         "decoded": None if stored_images is None else stored_images * dec.per_slot}
    return out


#: Top-level config keys holding paths: recorded with :func:`condense.provenance.portable_path`.
PATH_KEYS = ("cache_dir", "result_json")


def _portable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with its path values written portably (no machine's home or checkout in a record)."""
    out = dict(cfg)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = provenance.portable_path(out[key])
    return out


def evaluate_config(target: SyntheticSet | str | Path, cfg: Mapping[str, Any]) -> tuple[EvalReport | None, Path | None]:
    """:func:`evaluate` on a composed ``eval_app`` config; also the ``eval.json`` path written."""
    from condense.artifacts import load_synset
    from condense.data import build_dataset
    from condense.eval import SoftEvaluator, make_evaluator, write_eval_json

    device = provenance.resolve_device(str(cfg.get("device") or "auto"))
    if isinstance(target, SyntheticSet):
        syn, art = target, None
    else:
        art = Path(target)
        syn = load_synset(art, device)
    ecfg = C.eval_config(cfg, ipc=syn.meta.ipc)
    kinds = C.check_exports(cfg.get("export"))
    if kinds and art is None:
        raise ConfigError("export needs an artifact directory to write into; pass the run directory, "
                          "or call condense.api.export(syn, dir, kinds)")
    if art is not None:
        export(syn, art, kinds)
    if not cfg.get("evaluate", True):
        return None, None
    data = build_dataset(syn.meta.dataset.name, root=cfg.get("data_root"), device=device)
    evaluator = make_evaluator(ecfg, data, device)
    report = (evaluator.evaluate(syn, artifact=art) if isinstance(evaluator, SoftEvaluator)
              else evaluator.evaluate(syn))
    path = Path(str(cfg["out"])) if cfg.get("out") else (art / "eval.json" if art is not None else None)
    if path is not None:
        write_eval_json(report, path, method=syn.meta.method, dataset=syn.meta.dataset.name, ipc=syn.meta.ipc,
                        artifact=provenance.relative_path(art) if art is not None else None,
                        eval_config=_portable_config(dataclasses.asdict(ecfg)))
    return report, path
