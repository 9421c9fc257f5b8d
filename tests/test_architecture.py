"""The package's layers (generate/layers.py, shown in docs/architecture.md): every
import, wherever it sits in a file, goes down a layer; none forms a cycle; the
generators are never part of a run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from skybot_cleanup.generate import layers

PACKAGE = Path(__file__).resolve().parents[1] / "skybot_cleanup"

# Lowest first: skybot_cleanup/generate/layers.py holds the list (with what each module
# holds), and docs/architecture.md's table is generated from it.
LAYERS: list[set[str]] = [set(layer) for layer in layers.LAYERS]
LEVEL = {module: level for level, modules in enumerate(LAYERS) for module in modules}
ROOT = ""  # `from skybot_cleanup import __version__`: the package's root, imported by anyone


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of the package this file imports, at the top, in a function, or for typing."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("skybot_cleanup"):
            inner = node.module.removeprefix("skybot_cleanup").lstrip(".")
            if inner:
                found.add(inner)
            else:  # from skybot_cleanup import db, __version__
                found |= {alias.name if alias.name in LEVEL else ROOT for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.removeprefix("skybot_cleanup").lstrip(".")
                for alias in node.names
                if alias.name.startswith("skybot_cleanup.")
            }
    return found - {ROOT}


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(GRAPH) - {ROOT} == set(LEVEL), "give each new module its layer in generate/layers.py"


@pytest.mark.parametrize("module", sorted(set(GRAPH) - {ROOT}))
def test_imports_go_down_a_layer(module):
    upward = sorted(target for target in GRAPH[module] if LEVEL[target] >= LEVEL[module])
    assert not upward, f"{module} (layer {LEVEL[module]}) imports {upward} from its own layer or above"


def test_no_import_cycle():
    """Also without the layers: a walk from each module never comes back to it."""
    for start in GRAPH:
        seen, frontier = set(), set(GRAPH[start])
        while frontier:
            module = frontier.pop()
            assert module != start, f"an import cycle runs through {start}"
            if module not in seen:
                seen.add(module)
                frontier |= GRAPH.get(module, set())


def test_the_generators_are_never_part_of_a_run():
    """Only `skybot-cleanup schedule` (commands.schedule_files) loads them: a cleanup run never does."""
    users = {module for module, targets in GRAPH.items() for target in targets if target.startswith("generate")}
    assert {user for user in users if not user.startswith("generate")} == {"commands"}


def test_db_reads_no_settings_and_knows_no_command():
    """The SQL layer is given what it needs: it imports only the foundation and itself."""
    for module, targets in GRAPH.items():
        if module == "db" or module.startswith("db."):
            outside = {target for target in targets if not (target == "db" or target.startswith("db."))}
            assert outside <= {"errors", "registry", "clock"}, (module, outside)


# A class or function longer than this is several: split it (issue 25).
MOST_LINES = 250


def test_no_class_or_function_is_longer_than_a_screenful_or_four():
    too_long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MOST_LINES
    ]
    assert too_long == []
