"""The floor plan holds: no module imports a layer above its own (the import-linter contract in
pyproject.toml), and no import cycle exists anywhere in moetrain, function-level imports included (grimp
reads every import statement of a module, wherever it sits)."""

from __future__ import annotations

import subprocess

import grimp
import pytest
from helpers.launch import BIN, ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (make test also runs lint-imports itself)
LAYERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]


def import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("moetrain", cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph.find_modules_directly_imported_by(module)):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_every_module_lives_in_a_layer():
    top = {m for m in import_graph().find_children("moetrain")}
    assert top == set(LAYERS), top ^ set(LAYERS)


def test_no_import_cycles_anywhere():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle():
    graph = import_graph()
    graph.add_import(importer="moetrain.model.router", imported="moetrain.model.moe")  # moe imports router
    assert ["moetrain.model.moe", "moetrain.model.router"] in cycles(graph)


def test_layers_contract_holds_and_an_upward_import_breaks_it():
    graph = import_graph()
    assert graph.find_illegal_dependencies_for_layers(layers=LAYERS) == set()
    graph.add_import(importer="moetrain.model.moe", imported="moetrain.train.trainer")
    (illegal,) = graph.find_illegal_dependencies_for_layers(layers=LAYERS)
    assert (illegal.importer, illegal.imported) == ("moetrain.model", "moetrain.train")


def test_lint_imports_passes():
    proc = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
