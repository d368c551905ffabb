"""``condense-bench``: run a benchmark suite (a grid of condense runs), resumably.

    condense-bench suite=fmnist_cpu [dry_run=true] [results_dir=benchmarks/results]
                   [launcher=basic|joblib|slurm] [group=auto|true|false] [resume=true]
                   [runs_dir=runs/bench] [suites_dir=benchmarks/suites] [only=PATTERN | only=[P1,P2]]
                   [any condense override ...]

A suite (``benchmarks/suites/<name>.yaml``) names a grid: ``dataset`` (or ``datasets``), ``budget``,
``seeds`` and ``entries`` of ``{method, ipc: [...], flip: [false, true] (optional), overrides: [...]
(optional), tag: NAME (optional: an ablation variant, e.g. fp32; its file is ``ipc<k>-<budget>-<tag>-
seed<s>.json`` and its record kind "ablation", listed by the report but never a leaderboard cell)}``. Each grid point has one result file,
``<results_dir>/<dataset>/<method>[+flip]/ipc<k>-<budget>-seed<s>.json``; a point whose file already
holds a valid record is skipped, a missing or broken one is (re-)run, so an interrupted suite is
resumed by running the same command again. Runs go through Hydra multirun of the real ``condense``
CLI as a subprocess (``condense -m ... result_json=<that file>``), one at a time with the basic
launcher; ``launcher=joblib`` / ``launcher=slurm`` pass ``hydra/launcher=local_parallel`` /
``hydra/launcher=slurm`` through and group the ipcs of an entry into one sweep. Run directories are
``<runs_dir>/<suite>/<dataset>/<method>[+flip]/ipc<k>-<budget>-seed<s>``; with ``resume=true`` a
crashed run continues from its checkpoint there. Other ``key=value`` arguments are passed to every
``condense`` call (e.g. ``device=cuda``). ``only``: keep the grid points whose result file, relative
to ``results_dir``, matches one of these shell-style patterns (``fnmatch``; the dry run lists the
paths), e.g. ``only='fashion_mnist/dsa*/ipc1-*'``; a pattern that matches no grid point is an error.
Exit status: 0 done, 1 some run failed, 2 bad arguments.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condense.cli._conf import CONF_DIR, group_choices
from condense.errors import ConfigError
from condense.provenance import relative_path

REPO = Path(__file__).resolve().parents[2]
DEFAULTS: dict[str, Any] = {
    "suite": None,
    "dry_run": False,
    "results_dir": "benchmarks/results",
    "runs_dir": "runs/bench",
    "suites_dir": str(REPO / "benchmarks" / "suites"),
    "launcher": "basic",
    "group": "auto",
    "resume": True,
    "only": None,
}
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=local_parallel"], "slurm": ["hydra/launcher=slurm"]}
RESERVED = ("method", "dataset", "ipc", "budget", "seed", "result_json", "method.flip", "hydra.sweep.dir",
            "hydra.sweep.subdir", "hydra/launcher", "resume", "tag", "param", "param.factor", "param.mode",
            "labels")
SUITE_KEYS = {"name", "description", "dataset", "datasets", "budget", "seeds", "entries"}
ENTRY_KEYS = {"method", "ipc", "flip", "param", "labels", "overrides", "tag"}


@dataclass(frozen=True)
class Run:
    """One grid point = one condense run = one result file."""

    dataset: str
    method: str
    flip: bool
    ipc: int
    budget: str
    seed: int
    overrides: tuple[str, ...] = ()
    tag: str | None = None
    param: str = ""  # multi-formation label (``multi2``); "" = pixels
    labels: str | None = None  # ``labels=``: None (the method's own), hard, learned

    @property
    def variant(self) -> str:
        """The record's ``variant`` (:func:`condense.config.variant`): what departs from the plain method."""
        parts = [self.param] if self.param else []
        if self.labels is not None and (self.labels == "learned") != _method_learns_labels(self.method):
            parts.append(self.labels)
        return "+".join(parts)

    @property
    def label(self) -> str:
        from condense.report.records import method_label

        return method_label(self.method, self.flip, self.variant)

    def result_path(self, results_dir: Path) -> Path:
        from condense.report.records import result_path

        return result_path(results_dir, self.dataset, self.method, self.flip, self.ipc, self.budget, self.seed,
                           self.tag, self.variant)

    def run_dir(self, runs_dir: Path, suite: str) -> Path:
        from condense.report.records import result_stem

        return runs_dir / suite / self.dataset / self.label / result_stem(self.ipc, self.budget, self.seed, self.tag)

    def expect(self) -> dict[str, Any]:
        """Fields the result record must carry."""
        return {"method": self.method, "flip": self.flip, "dataset": self.dataset, "ipc": self.ipc,
                "budget": self.budget, "seed": self.seed, "tag": self.tag,
                **({"variant": self.variant} if self.variant else {})}

    def describe(self) -> str:
        extra = f" [{' '.join(self.overrides)}]" if self.overrides else ""
        extra = f" <{self.tag}>{extra}" if self.tag else extra
        return f"{self.dataset:<14} {self.label:<13} ipc {self.ipc:<3} {self.budget} seed {self.seed}{extra}"


@dataclass
class Suite:
    name: str
    description: str
    datasets: list[str]
    budget: str
    seeds: list[int]
    entries: list[dict[str, Any]]
    path: Path


@dataclass
class Call:
    """One ``condense -m`` subprocess and the runs it must produce."""

    argv: list[str]
    runs: list[Run] = field(default_factory=list)


def suite_names(suites_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(suites_dir).glob("*.yaml"))


def _choices(group: str) -> list[str]:
    return group_choices(group)


def _method_learns_labels(method: str) -> bool:
    """Whether ``method``'s own config learns soft labels (its yaml's ``soft_labels``)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml").get("soft_labels", False))


def _method_params(method: str) -> tuple[str, ...]:
    """The parametrizations ``method`` composes with (its ``params``)."""
    from condense.synth import SYNTHESIZERS

    return tuple(SYNTHESIZERS.get(method).params)


def _method_has_flip(method: str) -> bool:
    from omegaconf import OmegaConf

    return "flip" in OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")


def _as_list(value: Any) -> list[Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_in(value: Any, valid: list[str], what: str, where: str) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: unknown {what} {value!r}; valid choices: {', '.join(valid)}")


def load_suite(name: str | None, suites_dir: str | Path) -> Suite:
    """Read and validate a suite by name (in ``suites_dir``) or by path to a ``.yaml`` file."""
    from omegaconf import OmegaConf

    suites_dir = Path(suites_dir)
    valid = suite_names(suites_dir)
    if not name:
        raise ConfigError(f"no suite given (suite=NAME); valid choices: {', '.join(valid) or '(none)'}")
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else suites_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown suite {name!r}; valid choices: {', '.join(valid) or '(none)'}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001  (YAML syntax / interpolation errors of any kind)
        raise ConfigError(f"suite {path}: cannot read it: {' '.join(str(e).split())}") from None
    where = f"suite {path.name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"valid keys: {', '.join(sorted(SUITE_KEYS))}")
    datasets = _as_list(raw.get("datasets", raw.get("dataset")))
    if not datasets:
        raise ConfigError(f"{where}: name a dataset (dataset: fashion_mnist or datasets: [...])")
    for d in datasets:
        _check_in(d, _choices("dataset"), "dataset", where)
    budget = raw.get("budget")
    _check_in(budget, _choices("budget"), "budget", where)
    seeds = _as_list(raw.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    entries = raw.get("entries") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: entries must be a non-empty list of {{method, ipc, flip, overrides}}")
    for i, e in enumerate(entries):
        _check_entry(e, f"{where} entry {i}")
    return Suite(str(raw.get("name") or path.stem), str(raw.get("description") or ""), [str(d) for d in datasets],
                 str(budget), [int(s) for s in seeds], entries, path)


def _check_entry(e: Any, where: str) -> None:
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: expected a mapping {{method, ipc, flip, overrides, tag}}, got {e!r}")
    unknown = set(e) - ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"valid keys: {', '.join(sorted(ENTRY_KEYS))}")
    _check_in(e.get("method"), _choices("method"), "method", where)
    ipcs = _as_list(e.get("ipc"))
    if not ipcs or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ipcs):
        raise ConfigError(f"{where}: ipc must be a non-empty list of positive integers, got {e.get('ipc')!r}")
    flips = _as_list(e.get("flip", [False]))
    if not flips or not all(isinstance(f, bool) for f in flips):
        raise ConfigError(f"{where}: flip must be a list of booleans, got {e.get('flip')!r}")
    if True in flips and not _method_has_flip(e["method"]):
        have = [m for m in _choices("method") if _method_has_flip(m)]
        raise ConfigError(f"{where}: method {e['method']!r} has no flip option; "
                          f"flip variants exist for: {', '.join(have)}")
    params = _as_list(e.get("param", ["pixels"]))
    if not params or not all(isinstance(p, str) for p in params):
        raise ConfigError(f"{where}: param must be a list of labels (pixels, multi2, ...), got {e.get('param')!r}")
    from condense.ops.formation import Decoder

    for p in params:
        try:
            kind = Decoder.from_label(p).kind
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if kind not in _method_params(e["method"]):
            raise ConfigError(f"{where}: method {e['method']!r} does not support param={kind}")
    labels = _as_list(e.get("labels", [None]))
    if not labels or not all(v in (None, "hard", "learned") for v in labels):
        raise ConfigError(f"{where}: labels must be a list of null, hard, learned, got {e.get('labels')!r}")
    tag = e.get("tag")
    if tag is not None and not (isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.]+", tag)):
        raise ConfigError(f"{where}: tag must be letters, digits, '_' or '.', got {tag!r}")
    if tag is not None and not e.get("overrides"):
        raise ConfigError(f"{where}: a tagged (ablation) entry needs overrides saying what it changes")
    for o in _as_list(e.get("overrides")):
        key = str(o).partition("=")[0].lstrip("+~")
        if "=" not in str(o) or key in RESERVED:
            raise ConfigError(f"{where}: override {o!r} must be key=value and not one of the grid keys "
                              f"({', '.join(RESERVED)})")


def expand(suite: Suite) -> list[Run]:
    """Every grid point of the suite, in file order; duplicates (same result file) are an error."""
    runs: list[Run] = []
    seen: dict[tuple, int] = {}
    for i, e in enumerate(suite.entries):
        overrides = tuple(str(o) for o in _as_list(e.get("overrides")))
        for d in suite.datasets:
            for flip, param, labels in itertools.product(_as_list(e.get("flip", [False])),
                                                         _as_list(e.get("param", ["pixels"])),
                                                         _as_list(e.get("labels", [None]))):
                for ipc in _as_list(e["ipc"]):
                    for seed in suite.seeds:
                        run = Run(d, str(e["method"]), bool(flip), int(ipc), suite.budget, int(seed), overrides,
                                  e.get("tag"), "" if param == "pixels" else str(param), labels)
                        ident = (d, run.label, run.ipc, seed, run.tag)
                        if ident in seen:
                            raise ConfigError(f"suite {suite.path.name}: entries {seen[ident]} and {i} both "
                                              f"produce {run.label} ipc {ipc} seed {seed} on {d}")
                        seen[ident] = i
                        runs.append(run)
    return runs


def select(runs: list[Run], patterns: list[str], results_dir: Path) -> list[Run]:
    """The runs whose result path relative to ``results_dir`` matches one of ``patterns``.

    Raises:
        ConfigError: a pattern that matches none of the suite's grid points.
    """
    from fnmatch import fnmatchcase

    rel = {run: run.result_path(results_dir).relative_to(results_dir).as_posix() for run in runs}
    for pat in patterns:
        if not any(fnmatchcase(path, pat) for path in rel.values()):
            raise ConfigError(f"only={pat!r} matches no grid point of the suite; its result files: "
                              f"{', '.join(sorted(rel.values()))}")
    return [run for run in runs if any(fnmatchcase(rel[run], pat) for pat in patterns)]


def plan(runs: list[Run], results_dir: Path) -> tuple[list[tuple[Run, str]], list[Run]]:
    """Split runs into (to run, with the reason) and (skipped: a valid result file exists)."""
    from condense.report.records import is_valid_result

    todo, skipped = [], []
    for run in runs:
        ok, why = is_valid_result(run.result_path(results_dir), run.expect())
        if ok:
            skipped.append(run)
        else:
            todo.append((run, why))
    return todo, skipped


def _q(value: str | Path) -> str:
    """A Hydra override value, single-quoted unless plain (``${...}`` interpolations resolve either way)."""
    text = str(value)
    if re.fullmatch(r"[\w/.+\-]*", re.sub(r"\$\{\w+\}", "", text)):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def condense_command() -> list[str]:
    """How to start the ``condense`` CLI: the script next to this Python, on PATH, or via ``-c``."""
    local = Path(sys.executable).with_name("condense")
    if local.is_file() and os.access(local, os.X_OK):
        return [str(local)]
    found = shutil.which("condense")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'condense'; from condense.cli.main import main; main()"]


def make_calls(todo: list[Run], *, results_dir: Path, runs_dir: Path, suite: str, launcher: str,
               group: bool, resume: bool, passthrough: list[str]) -> list[Call]:
    """The ``condense -m`` calls that produce ``todo`` (one per run, or one per entry x seed sweep)."""
    from condense.report.records import result_stem

    buckets: dict[tuple, list[Run]] = defaultdict(list)
    for run in todo:
        key = (run.dataset, run.budget, run.method, run.flip, run.param, run.labels, run.overrides, run.tag, run.seed)
        buckets[key if group else key + (run.ipc,)].append(run)
    calls = []
    for runs in buckets.values():
        r0 = runs[0]
        ipcs = ",".join(str(r.ipc) for r in sorted(runs, key=lambda r: r.ipc))
        stem = result_stem("${ipc}", r0.budget, r0.seed, r0.tag)
        argv = [*condense_command(), "-m", f"method={r0.method}", f"dataset={r0.dataset}", f"budget={r0.budget}",
                f"seed={r0.seed}", f"ipc={ipcs}"]
        if r0.flip:
            argv.append("method.flip=true")
        if r0.param:
            from condense.ops.formation import Decoder

            argv += Decoder.from_label(r0.param).overrides()
        if r0.labels is not None:
            argv.append(f"labels={r0.labels}")
        argv += list(r0.overrides)
        if r0.tag:
            argv.append(f"tag={r0.tag}")
        argv += [f"result_json={_q(relative_path(results_dir / r0.dataset / r0.label / (stem + '.json')))}",
                 f"hydra.sweep.dir={_q(relative_path(runs_dir / suite / r0.dataset / r0.label))}",
                 f"hydra.sweep.subdir={_q(stem)}", *LAUNCHERS[launcher]]
        if resume:
            argv.append("resume=true")
        argv += passthrough
        calls.append(Call(argv, sorted(runs, key=lambda r: r.ipc)))
    return calls


def run_command(argv: list[str]) -> int:
    """Run one condense call (output streams to this terminal); its exit status.

    On Ctrl-C the child (same process group, so it got the SIGINT too) is given up to a minute to
    write its checkpoint before the interrupt propagates.
    """
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def _annotate(path: Path, run_dir: Path, suite: str) -> None:
    """Record where the run directory is (for the leaderboard's image previews) if the CLI did not."""
    rec = json.loads(path.read_text())
    if rec.get("run_dir") or not run_dir.is_dir():
        return
    rec["bench"] = {"suite": suite, "run_dir": str(run_dir)}
    tmp = path.with_name(f".{path.name}.bench.tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Bench ``key=value`` arguments (over DEFAULTS) and the condense overrides passed through."""
    from omegaconf import OmegaConf

    mine, passthrough = [], []
    only: list[str] | None = None
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq:
            raise ConfigError(f"argument {a!r} is not key=value; bench keys: {', '.join(DEFAULTS)}")
        bare = key.lstrip("+~")
        if key == "only":  # patterns are not YAML ('*' would start an alias): split by hand
            inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            only = [p.strip().strip("'\"") for p in inner.split(",")] if inner.strip() else []
            if not only or not all(only):
                raise ConfigError(f"only must be a pattern or a non-empty list of patterns, got {value!r}")
        elif key in DEFAULTS:
            mine.append(a)
        elif bare in RESERVED or bare.startswith("hydra/launcher"):
            raise ConfigError(f"{bare!r} is set by the suite (or by launcher=...); bench keys: "
                              f"{', '.join(DEFAULTS)}")
        else:
            passthrough.append(a)
    args = dict(DEFAULTS)
    args.update(OmegaConf.to_container(OmegaConf.from_dotlist(mine), resolve=True))
    for key in ("dry_run", "resume"):
        if not isinstance(args[key], bool):
            raise ConfigError(f"{key} must be true or false, got {args[key]!r}")
    if args["launcher"] not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {args['launcher']!r}; valid choices: {', '.join(LAUNCHERS)}")
    g = str(args["group"]).lower()
    if g not in ("auto", "true", "false"):
        raise ConfigError(f"group must be auto, true or false, got {args['group']!r}")
    args["group"] = (args["launcher"] != "basic") if g == "auto" else g == "true"
    args["only"] = only
    return args, passthrough


def _print_plan(suite: Suite, todo: list[tuple[Run, str]], skipped: list[Run], results_dir: Path,
                n_calls: int, launcher: str) -> None:
    print(f"suite {suite.name}: {suite.description}".rstrip(": "))
    print(f"  {len(todo) + len(skipped)} runs; results in {results_dir}")
    n_missing = sum(why == "missing" for _, why in todo)
    for run in skipped:
        print(f"  skip   {run.describe()}  (valid result exists)")
    for run, why in todo:
        print(f"  {'run' if why == 'missing' else 'rerun':<6} {run.describe()}  ({why})")
    print(f"plan: {len(todo)} to run ({n_missing} missing, {len(todo) - n_missing} invalid), "
          f"{len(skipped)} skipped; {n_calls} condense call(s), launcher {launcher}")


def run(argv: list[str]) -> int:
    """Entry point without ``sys.exit`` (for tests). Returns the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args, passthrough = parse_args(argv)
        suite = load_suite(args["suite"], args["suites_dir"])
        runs = expand(suite)
        if args["only"] is not None:
            runs = select(runs, args["only"], Path(args["results_dir"]).resolve())
        if passthrough:
            from condense.cli.main import precheck

            r0 = runs[0]
            precheck([f"method={r0.method}", f"dataset={r0.dataset}", f"budget={r0.budget}", f"ipc={r0.ipc}",
                      *passthrough])
    except ConfigError as e:
        print(f"condense-bench: error: {e}", file=sys.stderr)
        return 2
    results_dir = Path(args["results_dir"]).resolve()
    runs_dir = Path(args["runs_dir"]).resolve()
    todo, skipped = plan(runs, results_dir)
    calls = make_calls([r for r, _ in todo], results_dir=results_dir, runs_dir=runs_dir, suite=suite.name,
                       launcher=args["launcher"], group=args["group"], resume=args["resume"],
                       passthrough=passthrough)
    _print_plan(suite, todo, skipped, results_dir, len(calls), args["launcher"])
    if args["dry_run"]:
        for c in calls:
            print("  " + shlex.join(c.argv))
        return 0
    return _execute(calls, suite.name, results_dir, runs_dir, len(skipped))


def _execute(calls: list[Call], suite: str, results_dir: Path, runs_dir: Path, n_skipped: int) -> int:
    from condense.report.records import is_valid_result

    done, failed = [], []
    t_start = time.perf_counter()
    try:
        for i, call in enumerate(calls, 1):
            names = ", ".join(f"{r.label} ipc {r.ipc} seed {r.seed}" for r in call.runs)
            print(f"[{i}/{len(calls)}] {names}: {shlex.join(call.argv)}", flush=True)
            t0 = time.perf_counter()
            code = run_command(call.argv)
            for r in call.runs:
                path = r.result_path(results_dir)
                ok, why = is_valid_result(path, r.expect())
                if ok:
                    _annotate(path, r.run_dir(runs_dir, suite), suite)
                    done.append(r)
                else:
                    failed.append((r, f"exit {code}, result {why}"))
            print(f"[{i}/{len(calls)}] exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        _print_summary(done, failed, n_skipped, time.perf_counter() - t_start)
        return 130
    _print_summary(done, failed, n_skipped, time.perf_counter() - t_start)
    return 1 if failed else 0


def _print_summary(done: list[Run], failed: list[tuple[Run, str]], n_skipped: int, wall: float) -> None:
    print(f"summary: {len(done)} done, {len(failed)} failed, {n_skipped} skipped in {wall / 60:.1f} min")
    for r, why in failed:
        print(f"  FAILED {r.describe()}  ({why})")


def main() -> None:
    """Console script ``condense-bench``."""
    sys.exit(run(sys.argv[1:]))
