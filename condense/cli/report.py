"""``condense-report``: render the leaderboard from benchmark result files.

    condense-report [results_dir=benchmarks/results] [out=benchmarks/LEADERBOARD.md]
                    [html=benchmarks/leaderboard.html | html=null] [figures_dir=<out's folder>/figures]
                    [allow_dirty=false | allow_dirty=true]

Arguments are ``key=value`` (like the Hydra CLIs). Figures (PNG) go next to the Markdown in
``figures/``; the HTML page is one self-contained file (images inlined).
"""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Any

DEFAULTS: dict[str, Any] = {"results_dir": "benchmarks/results", "out": "benchmarks/LEADERBOARD.md",
                            "html": "benchmarks/leaderboard.html", "figures_dir": None, "allow_dirty": "false"}
_NONE = {"", "null", "none", "false"}


def _die(msg: str, code: int = 2) -> int:
    print(f"condense-report: error: {msg}", file=sys.stderr)
    return code


def parse_args(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``key=value`` arguments over ``defaults``; raises ConfigError on an unknown key or a bare word."""
    from condense.errors import ConfigError

    args = dict(defaults)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq:
            raise ConfigError(f"argument {a!r} is not key=value; valid keys: {', '.join(defaults)}")
        if key not in defaults:
            raise ConfigError(f"unknown argument {key!r}; valid keys: {', '.join(defaults)}")
        args[key] = None if value.strip().lower() in _NONE else value
    return args


def run(argv: list[str]) -> int:
    """Entry point without ``sys.exit`` (for tests). Returns the exit status."""
    from condense.errors import CondenseError

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv, DEFAULTS)
    except CondenseError as e:
        return _die(str(e))
    if not args["results_dir"] or not args["out"]:
        return _die("results_dir and out must be set")
    from pathlib import Path

    from condense.report import write_report

    if not Path(args["results_dir"]).is_dir():
        return _die(f"results_dir {args['results_dir']!r} is not a folder")
    allow_dirty = str(args["allow_dirty"]).lower()
    if allow_dirty not in ("true", "false", "none"):
        return _die(f"allow_dirty must be true or false, got {args['allow_dirty']!r}")
    command = "condense-report " + " ".join(
        shlex.quote(f"{k}={'null' if v is None else v}") for k, v in args.items()
        if (k != "figures_dir" or v is not None) and (k != "allow_dirty" or allow_dirty == "true"))
    try:
        written = write_report(args["results_dir"], args["out"], args["html"], args["figures_dir"], command=command,
                               allow_dirty=allow_dirty == "true")
    except CondenseError as e:
        return _die(str(e))
    for p in written[:2 if args["html"] else 1]:
        print(f"wrote {p}")
    print(f"wrote {len(written) - (2 if args['html'] else 1)} figure(s)")
    return 0


def main() -> None:
    """Console script ``condense-report``."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    sys.exit(run(sys.argv[1:]))
