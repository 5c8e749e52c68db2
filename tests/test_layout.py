"""The layering rules of the tree, checked on the source: programs import each other only through
protobuf contracts, and no import is hidden (inside a function, or through importlib) to dodge a
cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = ("campaign_service", "dispatcher_service", "waha_sandbox")


def modules(package: str) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted((REPO / package).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        yield path, ast.parse(path.read_text(), str(path))


def imported(tree: ast.Module) -> Iterator[tuple[ast.stmt, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, node.module


@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_do_not_import_each_other(program: str) -> None:
    others = [p for p in PROGRAMS if p != program]
    bad = [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
           for path, tree in modules(program) for node, name in imported(tree)
           if name.split(".")[0] in others]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("program", PROGRAMS)
def test_no_hidden_imports(program: str) -> None:
    """Every import at module level (or under `if TYPE_CHECKING:`); no importlib."""
    bad: list[str] = []
    for path, tree in modules(program):
        top = {id(n) for n in tree.body}
        top |= {id(n) for stmt in tree.body if isinstance(stmt, ast.If) for n in stmt.body}
        for node, name in imported(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name.split(".")[0] == "importlib":
                bad.append(f"{where} uses importlib")
            elif id(node) not in top:
                bad.append(f"{where} imports {name} inside a function or block")
    assert not bad, "\n".join(bad)
