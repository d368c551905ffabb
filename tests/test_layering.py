"""The package's layering, read from the source with ``ast`` (every import, also inside functions).

Units are condense's top-level folders (``ops``, ``models``, ``synth`` ...) and top-level modules
(``types``, ``errors``, ``api`` ...); ``condense/__init__.py`` is the unit ``__init__``. An import of
``condense.X...`` (absolute or relative, at module level or inside a function, also under
``TYPE_CHECKING``) is an edge from the importing module's unit to ``X``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "condense"

#: What ``condense/ops`` must never import: ops sit below the networks and everything using them.
ABOVE_OPS = ("models", "synth", "eval", "train", "teachers", "cli", "report", "api", "pipeline", "config")

#: Unit-level import edges allowed to close a cycle, each with the reason it is still there. The
#: aim is none (condense's units forming a DAG); an entry whose import is gone fails the test, so
#: the list cannot go stale.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}

#: The only unit whose modules may import Hydra / OmegaConf.
HYDRA_UNIT = "cli"
HYDRA_PACKAGES = ("hydra", "omegaconf")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it was imported."""

    path: Path  # the importing file, relative to the repository
    line: int
    unit: str  # the importing module's unit
    module: str  # the dotted module name, e.g. ``condense.models._pool`` or ``hydra.errors``

    @property
    def target(self) -> str | None:
        """The condense unit imported, ``None`` for a third-party module."""
        parts = self.module.split(".")
        if parts[0] != "condense":
            return None
        return parts[1] if len(parts) > 1 and parts[1] in UNITS else "__init__"


def _units() -> frozenset[str]:
    out = {"__init__"}
    for p in PKG.iterdir():
        if p.is_dir() and any(p.rglob("*.py")):  # a package, or a namespace folder (condense/cli)
            out.add(p.name)
        elif p.suffix == ".py" and p.name != "__init__.py":
            out.add(p.stem)
    return frozenset(out)


UNITS = _units()


def _module_parts(path: Path) -> list[str]:
    """``condense/ops/stem.py`` -> ``["condense", "ops", "stem"]``; a package's ``__init__`` -> its name."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> Iterator[Import]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    rel = path.relative_to(PKG)
    unit = rel.parts[0] if len(rel.parts) > 1 else ("__init__" if rel.name == "__init__.py" else rel.stem)
    here = _module_parts(path)
    package = here if path.name == "__init__.py" else here[:-1]
    shown = path.relative_to(PKG.parent)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(shown, node.lineno, unit, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "condense":  # from condense import models, errors ...: each name is a module
                for alias in node.names:
                    yield Import(shown, node.lineno, unit, f"condense.{alias.name}")
            else:
                yield Import(shown, node.lineno, unit, module)


def all_imports() -> list[Import]:
    return [imp for path in sorted(PKG.rglob("*.py")) for imp in _imports(path)]


def unit_graph(imports: list[Import]) -> dict[str, set[str]]:
    """``{unit: units it imports}`` without self-edges."""
    graph: dict[str, set[str]] = {u: set() for u in UNITS}
    for imp in imports:
        target = imp.target
        if target is not None and target != imp.unit:
            graph.setdefault(imp.unit, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ----------------------------------------------------------------------------- the helpers themselves


def test_parser_sees_function_local_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "condense"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "ops" / "__init__.py").write_text("from .grads import f\n")
    (pkg / "ops" / "grads.py").write_text(
        "def f():\n    from condense.models._pool import AvgPool2x2\n    from ..synth import base\n"
        "    import hydra.errors\n"
    )
    (pkg / "__init__.py").write_text("")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PKG", pkg)
    monkeypatch.setattr(this, "UNITS", frozenset({"__init__", "ops", "models", "synth"}))
    mods = {(i.unit, i.module, i.target) for i in all_imports()}
    assert ("ops", "condense.ops.grads", "ops") in mods  # relative, in a package __init__
    assert ("ops", "condense.models._pool", "models") in mods  # inside a function
    assert ("ops", "condense.synth", "synth") in mods  # relative from a submodule, two levels
    assert ("ops", "hydra.errors", None) in mods


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ----------------------------------------------------------------------------- the rules


def test_ops_import_nothing_above_them() -> None:
    bad = [f"{i.path}:{i.line} imports {i.module}" for i in all_imports()
           if i.unit == "ops" and i.target in ABOVE_OPS]
    assert not bad, "condense/ops must not import " + ", ".join(ABOVE_OPS) + ":\n" + "\n".join(bad)


def test_no_import_cycle_between_units() -> None:
    graph = unit_graph(all_imports())
    stale = [edge for edge in ALLOWED_CYCLE_EDGES if edge[1] not in graph.get(edge[0], set())]
    assert not stale, f"ALLOWED_CYCLE_EDGES lists imports that no longer exist: {stale}; remove them"
    for src, dst in ALLOWED_CYCLE_EDGES:
        graph[src].discard(dst)
    found = cycles(graph)
    if found:
        imports = all_imports()
        detail = []
        for comp in found:
            members = set(comp)
            detail += [f"  {i.path}:{i.line} ({i.unit} -> {i.target}) imports {i.module}" for i in imports
                       if i.unit in members and i.target in members and i.target != i.unit]
        pytest.fail(f"import cycles between condense units: {found}\n" + "\n".join(detail))


def test_only_cli_imports_hydra() -> None:
    bad = [f"{i.path}:{i.line} imports {i.module}" for i in all_imports()
           if i.module.split(".")[0] in HYDRA_PACKAGES and i.unit != HYDRA_UNIT]
    assert not bad, "only condense/cli may import hydra / omegaconf:\n" + "\n".join(bad)
