"""``condense`` (distil -> artifact -> evaluate -> export) and ``condense-eval`` (evaluate an artifact).

Hydra composes the config; the job hands the plain dict to :func:`condense.pipeline.distil_config` /
:func:`condense.pipeline.evaluate_config`, the same pipeline Python users call. Every configuration
problem is reported as ONE line naming the bad value and the valid choices, exit status 2, before
anything is written. Hydra's own composition errors are caught by composing each requested
combination with the compose API first (``precheck``).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from condense.cli._conf import CONF_DIR, group_choices
from condense.errors import CondenseError, ConfigError, DatasetNotFoundError

__all__ = ["CONF_DIR", "group_choices", "precheck", "main", "eval_main"]
log = logging.getLogger("condense")


def _die(msg: str, code: int, prog: str = "condense") -> NoReturn:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(code)


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


def precheck(overrides: list[str], config_name: str = "config",
             check: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Compose and validate every requested combination; raise ConfigError on the first problem.

    ``check(cfg)`` validates one composed combination (a plain dict); default: the distillation
    config's :func:`condense.config.validate` for ``config``, composition alone otherwise.
    """
    from hydra.errors import HydraException

    from condense.cli.build import compose, one_line
    from condense.config import method_keys, validate

    try:
        combos = _combinations(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    for combo in combos:
        cfg = compose(combo, config_name)
        if check is not None:
            check(cfg)
        elif config_name == "config":
            validate(cfg, method_keys(combo))


HELP_FLAGS = ("-h", "--help", "--hydra-help", "--info", "--cfg", "-c")


def run_app(config_name: str, job: Callable[[Any], None], *, prog: str = "condense",
            check: Callable[[list[str]], None] | None = None) -> None:
    """A console script: check every requested combination first (one line, exit 2, nothing
    written; ``check(overrides)``, default :func:`precheck`), then hand the command line to Hydra
    with ``conf/<config_name>.yaml``."""
    import hydra

    from condense.cli.build import argv_overrides
    from condense.runtime import keep_freed_memory

    keep_freed_memory()
    argv = sys.argv[1:]
    if not any(a in HELP_FLAGS or a.startswith("--cfg") for a in argv):
        try:
            (check or (lambda o: precheck(o, config_name)))(argv_overrides(argv))
        except CondenseError as e:
            _die(str(e), 2, prog)
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(job)()


def _remove_if_empty(path: Path) -> None:
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    except OSError:
        pass


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


def _print_summary(record: dict[str, Any], run_dir: Path) -> None:
    d = record["distill"]
    print(f"distilled {record['dataset']} with {record['method']} at ipc {record['ipc']}: "
          f"{d['iterations']} iterations in {d['wall_s']:.0f} s ({d['stopped_by']}, "
          f"{record['precision']['value']})")
    if record["eval"]:
        for arch, s in record["eval"]["summary"].items():
            print(f"accuracy ({arch}, {s['n']} models): {s['mean']:.2f} +- {s['std']:.2f} %")
    print(f"artifact: {run_dir.resolve()}")


def _hydra_job(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from condense.cli.build import cli_method_keys, to_plain
    from condense.pipeline import distil_config
    from condense.synth.runner import RunInterrupted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        t0 = time.perf_counter()
        world = _world()
        if world.rank > 0:  # a class-parallel run's other ranks: warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        command = _job_command(cfg)
        if world.parallel:
            command = f"{_torchrun(world.size)} --no-python {command}"
        result = distil_config(to_plain(cfg), explicit=cli_method_keys(), run_dir=run_dir, command=command)
        if result.run_dir != run_dir:  # a rank's own (time-stamped) folder: the run used rank 0's
            _remove_if_empty(run_dir)
        if world.is_main:
            _print_summary(result.record, result.run_dir)
        log.info("done in %.0f s", time.perf_counter() - t0)
    except (ConfigError, DatasetNotFoundError) as e:
        _remove_if_empty(run_dir)
        _die(str(e), 2)
    except RunInterrupted as e:
        _die(f"{e} (rerun the same command with resume=true to continue)", 128 + e.signum)
    except CondenseError as e:
        _die(str(e), 1)


def _torchrun(size: int) -> str:
    """The torchrun call of this job's shape (one node: ``--standalone``)."""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or size)
    if local >= size:
        return f"torchrun --standalone --nproc-per-node {size}"
    return f"torchrun --nnodes {size // max(local, 1)} --nproc-per-node {local}"


def _world() -> Any:
    """The torchrun world of this process (``condense.distributed.World``)."""
    from condense.distributed import env_world

    try:
        return env_world()
    except ConfigError as e:
        _die(str(e), 2)


def main() -> None:
    """Console script ``condense``; under ``torchrun --nproc-per-node N --no-python condense ...``
    one class-parallel run (:mod:`condense.distributed`)."""
    if _world().parallel and any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        _die("a sweep (-m) cannot run under torchrun: torchrun runs ONE class-parallel job; start one "
             "torchrun per job, or sweep without torchrun (hydra/launcher=joblib or slurm)", 2)
    run_app("config", _hydra_job)


def _eval_job(cfg: Any) -> None:
    from condense.cli.build import to_plain
    from condense.pipeline import evaluate_config

    try:
        report, out = evaluate_config(str(cfg.artifact), to_plain(cfg))
        if report is None:
            return
        for arch, s in report.summary.items():
            print(f"accuracy ({arch}, {s['n']} models): {s['mean']:.2f} +- {s['std']:.2f} %")
        print(f"eval: {Path(out).resolve()}")
    except ConfigError as e:
        _die(str(e), 2)
    except CondenseError as e:
        _die(str(e), 1)


def eval_main() -> None:
    """Console script ``condense-eval artifact=DIR [eval.epochs=...] [budget=...]``."""
    run_app("eval_app", _eval_job, prog="condense-eval")
