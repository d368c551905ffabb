"""``condense`` (distil -> artifact -> evaluate -> export) and ``condense-eval`` (evaluate an artifact).

Every configuration problem is reported as ONE line naming the bad value and the valid choices,
exit status 2, before anything is written. Hydra's own composition errors are caught by composing
each requested combination with the compose API first (``precheck``).
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from condense.errors import CondenseError, ConfigError, DatasetNotFoundError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("method", "dataset", "model", "eval", "budget", "logger")
log = logging.getLogger("condense")


def _die(msg: str, code: int) -> NoReturn:
    print(f"condense: error: {msg}", file=sys.stderr)
    sys.exit(code)


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _one_line(e: Exception) -> str:
    """Hydra's multi-line composition errors -> one line with the valid choices."""
    text = str(e)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m and m.group(1) in GROUPS:
        g, bad = m.group(1), m.group(2)
        return f"unknown {g} {bad!r}; valid choices: {', '.join(group_choices(g))}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        return (f"unknown config key {m.group(1)!r}; the valid top-level keys are in conf/config.yaml "
                f"(a key missing from a group's defaults, e.g. a model kwarg, is added with "
                f"+{m.group(1)}=...)")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _combinations(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (each value checked once, others at their first)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    base, sweeps = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra"):
            continue
        if o.is_sweep_override():
            vals = list(o.sweep_string_iterator())
            prefix = o.input_line.split("=", 1)[0]
            sweeps.append([f"{prefix}={v}" for v in vals])
            base.append(sweeps[-1][0])
        else:
            base.append(o.input_line)
    combos = [base]
    for choices in sweeps:
        for c in choices[1:]:
            key = c.split("=", 1)[0]
            combos.append([c if b.split("=", 1)[0] == key else b for b in base])
    return combos


def precheck(overrides: list[str], config_name: str = "config") -> None:
    """Compose and validate every requested combination; raise ConfigError on the first problem."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from condense.cli.build import validate

    try:
        combos = _combinations(overrides)
    except HydraException as e:
        raise ConfigError(_one_line(e)) from None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in combos:
            try:
                cfg = compose(config_name=config_name, overrides=combo)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_one_line(e)) from None
            if config_name == "config":
                try:
                    validate(cfg)
                except OmegaConfBaseException as e:
                    raise ConfigError(_one_line(e)) from None


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def _remove_if_empty(path: Path) -> None:
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    except OSError:
        pass


def result_record(cfg: Any, built: dict[str, Any], result_info: dict[str, Any], report: Any,
                  device: Any, run_dir: Path | None = None, code: dict[str, Any] | None = None,
                  speed: dict[str, float] | None = None) -> dict[str, Any]:
    """The benchmark-format record of DESIGN.md for one run.

    ``code``: the code version taken when the job started (default: now); a long run must not
    record a commit made while it ran. ``speed``: :func:`condense.provenance.speed_probe` GFLOP/s
    at the start and end of the distillation (``machine.gemm_gflops``).
    """
    import dataclasses

    from condense.cli.build import to_plain
    from condense.provenance import code_version, machine_info

    return {
        "schema": 1,
        "kind": "ablation" if cfg.get("tag") else "accuracy",
        "tag": cfg.get("tag") or None,
        "method": str(cfg.method.name),
        "flip": bool(getattr(built["method"], "flip", False)),
        "dataset": str(cfg.dataset.name),
        "ipc": int(cfg.ipc),
        "budget": str(cfg.budget.name),
        "seed": int(cfg.seed),
        "config": to_plain(cfg),
        "method_config": dataclasses.asdict(built["method"]) if dataclasses.is_dataclass(built["method"]) else None,
        "code_version": code if code is not None else code_version(),
        "machine": {**machine_info(device), **({"gemm_gflops": speed} if speed else {})},
        "distill": {"wall_s": result_info["wall_s"], "iterations": result_info["iterations"],
                    "iterations_planned": result_info["iterations_planned"],
                    "stopped_by": result_info["stopped_by"], "init_s": result_info.get("init_s")},
        "eval": None if report is None else {"protocol": report.protocol, "runs": report.runs,
                                             "summary": report.summary, "wall_s": round(report.wall_s, 3)},
        "command": _job_command(cfg),
        "run_dir": str(run_dir.resolve()) if run_dir is not None else None,
    }


def _job_command(cfg: Any = None) -> str:
    """The command that reproduces THIS job (a multirun job's own overrides, not the sweep).

    Overrides whose value interpolates (``result_json=.../ipc${ipc}...`` from condense-bench)
    are written with their resolved value, so the line runs as a single job.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        task = sys.argv[1:]
    if cfg is not None:
        from omegaconf import OmegaConf

        for i, a in enumerate(task):
            key, eq, value = a.partition("=")
            if eq and "$" in value and not key.startswith(("+", "~", "hydra")):
                resolved = OmegaConf.select(cfg, key)
                if isinstance(resolved, str):
                    task[i] = f"{key}={resolved}"
    return "condense " + " ".join(shlex.quote(a) for a in task)


def distil(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The job: validate, load data, synthesize, save, evaluate, export. Returns the record."""
    import dataclasses

    from condense.artifacts import export_imagefolder, export_tensors, save_synset
    from condense.cli.build import (
        check_ipc,
        load_data,
        method_class,
        run_config,
        synth_context,
        to_plain,
        validate,
    )
    from condense.eval import Evaluator, write_eval_json
    from condense.provenance import code_version, resolve_device, speed_probe, write_json_atomic
    from condense.synth.runner import EvalCallback, WandbCallback, run

    built = validate(cfg)
    device = resolve_device(str(cfg.device))
    data = load_data(cfg, device)
    ctx = synth_context(cfg, data, device)
    check_ipc(cfg, int(ctx.index.min_count))
    mcfg = dataclasses.replace(built["method"], iterations=built["iterations"]) if hasattr(
        built["method"], "iterations") else built["method"]
    synth = method_class(cfg)(mcfg, ctx)
    evaluator = Evaluator(built["eval"], data, device) if cfg.evaluate else None
    callbacks: list = []
    every = int(cfg.budget.get("eval_every") or 0)
    if every and evaluator is not None:
        callbacks.append(EvalCallback(evaluator, every))
    if cfg.logger.name == "wandb":
        callbacks.append(WandbCallback(str(cfg.logger.project), mode=str(cfg.logger.mode),
                                       run_dir=run_dir, config=to_plain(cfg),
                                       name=f"{cfg.method.name}-{cfg.dataset.name}-ipc{cfg.ipc}-s{cfg.seed}"))
    log.info("%s on %s, ipc %d, %d iterations (budget %s), device %s", cfg.method.name,
             cfg.dataset.name, cfg.ipc, built["iterations"], cfg.budget.name, device)
    code = code_version()  # the code that runs: taken before the (possibly hours-long) run
    speed = {"start": speed_probe(device)}
    result = run(synth, run_config(cfg, run_dir, callbacks))
    speed["end"] = speed_probe(device)
    log.info("machine speed probe: %.1f GFLOP/s at the start, %.1f at the end of the distillation "
             "(fp32 GEMM)", speed["start"], speed["end"])
    syn = result.syn
    syn.meta.config = {"method": dataclasses.asdict(mcfg), "run": to_plain(cfg)}
    syn.meta.code_version = code
    syn.meta.extra = {**syn.meta.extra, "distill": result.info()}
    report = None
    if evaluator is not None:
        report = evaluator.evaluate(syn)
    save_synset(syn, run_dir, eval_recipe=None if report is None else report.protocol)
    record = result_record(cfg, built, result.info(), report, device, run_dir, code=code, speed=speed)
    if report is not None:
        write_eval_json(report, run_dir / "eval.json", method=record["method"], dataset=record["dataset"],
                        ipc=record["ipc"], artifact=str(run_dir))
    for e in cfg.export or []:
        (export_imagefolder if e == "imagefolder" else export_tensors)(syn, run_dir / f"export-{e}")
    write_json_atomic(run_dir / "result.json", record)
    if cfg.get("result_json"):
        write_json_atomic(Path(str(cfg.result_json)), record)
    return record


def _print_summary(record: dict[str, Any], run_dir: Path) -> None:
    d = record["distill"]
    print(f"distilled {record['dataset']} with {record['method']} at ipc {record['ipc']}: "
          f"{d['iterations']} iterations in {d['wall_s']:.0f} s ({d['stopped_by']})")
    if record["eval"]:
        for arch, s in record["eval"]["summary"].items():
            print(f"accuracy ({arch}, {s['n']} models): {s['mean']:.2f} +- {s['std']:.2f} %")
    print(f"artifact: {run_dir.resolve()}")


def _hydra_job(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from condense.synth.runner import RunInterrupted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        t0 = time.perf_counter()
        record = distil(cfg, run_dir)
        _print_summary(record, run_dir)
        log.info("done in %.0f s", time.perf_counter() - t0)
    except ConfigError as e:
        _remove_if_empty(run_dir)
        _die(str(e), 2)
    except DatasetNotFoundError as e:
        _remove_if_empty(run_dir)
        _die(str(e), 2)
    except RunInterrupted as e:
        _die(f"{e} (rerun the same command with resume=true to continue)", 128 + e.signum)
    except CondenseError as e:
        _die(str(e), 1)


def main() -> None:
    """Console script ``condense``."""
    import hydra

    from condense.runtime import keep_freed_memory

    keep_freed_memory()
    argv = sys.argv[1:]
    if not any(a in ("-h", "--help", "--hydra-help", "--info", "--cfg", "-c") or a.startswith("--cfg")
               for a in argv):
        try:
            precheck(_user_overrides(argv))
        except CondenseError as e:
            _die(str(e), 2)
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_job)
    app()


def _eval_job(cfg: Any) -> None:
    from omegaconf import OmegaConf, open_dict

    from condense.artifacts import export_imagefolder, export_tensors, load_synset, read_manifest
    from condense.cli.build import eval_config, to_plain
    from condense.data import build_dataset
    from condense.eval import Evaluator, write_eval_json
    from condense.provenance import resolve_device

    try:
        art = Path(str(cfg.artifact))
        manifest = read_manifest(art)
        device = resolve_device(str(cfg.device))
        syn = load_synset(art, device)
        with open_dict(cfg):
            cfg.ipc = int(manifest["ipc"])
        ecfg = eval_config(cfg)
        for e in cfg.export or []:
            if e not in ("imagefolder", "tensors"):
                raise ConfigError(f"unknown export {e!r}; valid choices: imagefolder, tensors")
        for e in cfg.export or []:
            (export_imagefolder if e == "imagefolder" else export_tensors)(syn, art / f"export-{e}")
        if not cfg.evaluate:
            return
        data = build_dataset(syn.meta.dataset.name, root=cfg.get("data_root"), device=device)
        report = Evaluator(ecfg, data, device).evaluate(syn)
        out = Path(str(cfg.out)) if cfg.get("out") else art / "eval.json"
        write_eval_json(report, out, method=syn.meta.method, dataset=syn.meta.dataset.name,
                        ipc=syn.meta.ipc, artifact=str(art.resolve()), eval_config=to_plain(OmegaConf.create(
                            to_plain(cfg.eval))))
        for arch, s in report.summary.items():
            print(f"accuracy ({arch}, {s['n']} models): {s['mean']:.2f} +- {s['std']:.2f} %")
        print(f"eval: {out.resolve()}")
    except ConfigError as e:
        _die(str(e), 2)
    except CondenseError as e:
        _die(str(e), 1)


def eval_main() -> None:
    """Console script ``condense-eval artifact=DIR [eval.epochs=...] [budget=...]``."""
    import hydra

    from condense.runtime import keep_freed_memory

    keep_freed_memory()
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):
        try:
            precheck(_user_overrides(argv), config_name="eval_app")
        except CondenseError as e:
            _die(str(e), 2)
    app = hydra.main(config_path=str(CONF_DIR), config_name="eval_app", version_base="1.3")(_eval_job)
    app()
